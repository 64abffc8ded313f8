"""Query tokens: the photos of recent searches, named by the sha256 of their bytes, so that a results page can
link to its preview grid and to a region search without the shopper uploading the photo again.

Two levels:

- **memory**: a small LRU per process (bounded in count and in bytes) of photos with their whole-photo vectors;
- **the data folder**: every photo once, content-addressed, at ``<data_dir>/queries/<sha256[:2]>/<sha256>``, so
  that a token made by one server worker, or by one host of several sharing ``DATA_DIR``, is found by all of
  them. A token that misses memory is read from its file; the bytes must hash to the token (a token is 64
  lowercase hex digits, nothing else reaches the file system), and the photo is embedded again where its
  vector is needed.

A file is written to a temporary name in its own folder and renamed into place, so a reader never sees part of
one. The same photo again is not rewritten: its file's modification time is brought forward (one ``utime``),
which also keeps a photo in use from expiring. Files older than ``service.query_ttl_s`` are removed by whichever
process notices first that nobody has pruned for a minute (one ``stat`` of a marker file, at most once a minute
per process); several processes or hosts pruning at once only find some files already gone. A folder that
cannot be written (disk full, read-only) leaves the tokens in memory only: the search goes on, and the failure
is logged once until writing works again. ``query_ttl_s = 0`` keeps query photos in memory only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.embedding.images import thumbnail
from indexer.embedding.model import Embedder
from service.params import embed_upload

log = logging.getLogger(__name__)

TOKEN = re.compile(r"[0-9a-f]{64}")
# Seconds between two prunings of the folder, by any process; and between two checks by one process.
PRUNE_EVERY_S = 60.0
PRUNED_MARKER = ".pruned"


@dataclass(frozen=True)
class Query:
    token: str
    photo: bytes
    # The whole photo's vector; None while only regions of it were searched (each is embedded on its own).
    vector: np.ndarray | None
    # The identity (ModelIdentity.key) of the embedder that made the vector: another model or whitening needs
    # another vector (a new base with a new whitening came in since).
    identity: str | None = None

    def thumbnail(self) -> Image.Image:
        """Made only when a page or preview shows the photo, not on every search."""
        return thumbnail(self.photo)


class QueryFolder:
    """Query photos as files in a folder shared by every server process, by token; see the module docstring."""

    def __init__(self, root: Path, ttl_s: float):
        self.root = root
        self.ttl_s = ttl_s
        self._next_prune_check = 0.0  # time.monotonic() of this process's next look at the marker
        self._failing = False  # the last write failed (and was logged)
        self._lock = threading.Lock()

    def path(self, token: str) -> Path | None:
        """Where a token's photo is kept, or None for anything but 64 lowercase hex digits."""
        if not TOKEN.fullmatch(token):
            return None
        return self.root / token[:2] / token

    def load(self, token: str) -> bytes | None:
        """The photo of a token made by any process, or None: unknown, expired, malformed, or bytes that do not
        hash to the token."""
        path = self.path(token)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:  # not there (never written, or pruned), or unreadable: as good as forgotten
            return None
        if hashlib.sha256(data).hexdigest() != token:
            log.warning("query photo %s does not match its name; ignored", path)
            return None
        return data

    def save(self, token: str, data: bytes) -> None:
        """Keep a photo for other processes: written once (atomically), else only its time brought forward.
        Never raises: a folder that cannot be written leaves the photo in this process's memory only."""
        path = self.path(token)
        if path is None:
            return
        self.prune_if_due()
        try:
            try:
                os.utime(path)  # already kept, by this process or another: keep it longer, do not rewrite it
            except FileNotFoundError:
                self._write(path, data)
        except OSError as exc:
            with self._lock:
                failing, self._failing = self._failing, True
            if not failing:
                log.warning("cannot keep query photos in %s (%s); tokens stay in this process only", self.root, exc)
            return
        if self._failing:
            with self._lock:
                self._failing = False
            log.info("query photos are kept in %s again", self.root)

    def _write(self, path: Path, data: bytes) -> None:
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # the first photo of this shard
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with open(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def prune_if_due(self) -> None:
        """Prune when no process has for PRUNE_EVERY_S; this process looks at most that often."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_prune_check:
                return
            self._next_prune_check = now + PRUNE_EVERY_S
        marker = self.root / PRUNED_MARKER
        try:
            if time.time() - marker.stat().st_mtime < PRUNE_EVERY_S:
                return
            os.utime(marker)  # first, so that the others leave it to this process
        except FileNotFoundError:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:
                return  # cannot write here: save() says so
        except OSError:
            return
        self.prune()

    def prune(self) -> int:
        """Remove photos (and temporary files left by a crash) older than ttl_s; how many were removed."""
        cutoff = time.time() - self.ttl_s
        removed = 0
        try:
            shards = [entry.path for entry in os.scandir(self.root) if entry.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for shard in shards:
            try:
                entries = list(os.scandir(shard))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:  # removed by another process pruning at the same time
                    continue
                except OSError as exc:
                    log.debug("cannot prune %s: %s", entry.path, exc)
        return removed


class RecentQueries:
    """Query photos by token: the last few in memory with their vectors (bounded in count and in bytes held),
    and, with a folder, every photo of the last ttl_s shared with the other server processes."""

    def __init__(self, folder: QueryFolder | None = None, size: int = 64, max_bytes: int = 32_000_000):
        self.folder = folder
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        # token -> (query, time.monotonic() when its file was last written or brought forward)
        self._items: OrderedDict[str, tuple[Query, float]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, embedder: Embedder | None) -> Query:
        """Remember a photo, embedded whole once (with the embedder of the view searched), or return it from memory:
        a vector remembered from another view's identity (another whitening or model) is made again. Without an
        embedder the photo is remembered unembedded: a region search needs only the region."""
        token = hashlib.sha256(data).hexdigest()
        known = self._remembered(token)
        identity = None if embedder is None else embedder.identity.key
        if known is not None and (embedder is None or (known.vector is not None and known.identity == identity)):
            return known
        vector = None if embedder is None else embed_upload(data, embedder)  # a 400 before anything is kept
        return self._remember(Query(token, data, vector, identity), saved=known is not None)

    def get(self, token: str) -> Query | None:
        """The photo of a token from memory, else from the folder (unembedded), else None."""
        known = self._remembered(token)
        if known is not None or self.folder is None:
            return known
        data = self.folder.load(token)
        if data is None:
            return None
        return self._remember(Query(token=token, photo=data, vector=None), saved=False)  # kept longer: in use

    def _remembered(self, token: str) -> Query | None:
        """A token in memory; its file is brought forward (or written again) a few times per ttl while in use."""
        with self._lock:
            item = self._items.get(token)
            if item is None:
                return None
            self._items.move_to_end(token)
            query, saved_at = item
            due = self.folder is not None and time.monotonic() - saved_at > self.folder.ttl_s / 4
            if due:
                self._items[token] = (query, time.monotonic())
        if due:
            self.folder.save(token, query.photo)
        return query

    def _remember(self, query: Query, saved: bool) -> Query:
        if self.folder is not None and not saved:
            self.folder.save(query.token, query.photo)
        with self._lock:
            previous = self._items.get(query.token)
            if previous is None:
                self._bytes += len(query.photo)
            self._items[query.token] = (query, time.monotonic() if previous is None else previous[1])
            while self._items and (len(self._items) > self._size or self._bytes > self._max_bytes):
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= len(evicted.photo)
        return query
