"""Query tokens: the photos of recent searches, each named by a token, so that a results page can link to its
preview grid and to a region search without the shopper uploading the photo again.

What is kept of a photo is never the bytes as sent: it is decoded and written again as a JPEG of at most
STORED_SIDE pixels a side (indexer.embedding.images.reencoded), and that copy is what is searched, previewed and
shown, in every process alike. Its token is an HMAC-SHA256 of that copy under a key kept in the folder
(``.token_key``, made once by whichever process needs it first): one photo has one token on every worker and
host sharing ``DATA_DIR``, yet nobody without the key can tell from a copy of a photo whether it was searched.

Two levels:

- **memory**: a small LRU per process (bounded in count and in bytes) of photos with their whole-photo vectors,
  and the digests of recent uploads as sent, so that the same upload again is neither decoded nor embedded again;
- **the data folder**: every photo once, at ``<data_dir>/queries/<token[:2]>/<token>``, so that a token made by
  one server worker, or by one host of several sharing ``DATA_DIR``, is found by all of them. A token that misses
  memory is read from its file; the file must carry the token's HMAC (a token is 64 lowercase hex digits, nothing
  else reaches the file system), and the photo is embedded again where its vector is needed.

A file is written to a temporary name in its own folder and renamed into place, so a reader never sees part of
one. The same photo again is not rewritten: its file's modification time is brought forward (one ``utime``),
which also keeps a photo in use from expiring or from being the first removed. The folder is bounded twice:

- in time: files older than ``service.query_ttl_s`` are removed by whichever process notices first that nobody
  has pruned for a minute (one ``stat`` of a marker file, at most once a minute per process);
- in bytes (``service.query_store_mb``): each process counts what it writes, and once that passes its share of
  the room left at its last sweep (the room divided among the server's processes), it sweeps: one scan of the
  folder, removing the least recently used photos until the folder is back under three quarters of the cap.

Several processes or hosts sweeping at once only find some files already gone. A folder that cannot be written
(disk full, read-only) leaves the tokens in memory only: the search goes on, and the failure is logged once until
writing works again. ``query_ttl_s = 0`` keeps query photos in memory only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.embedding.images import ImageError, reencoded, thumbnail
from indexer.embedding.model import Embedder
from service.errors import BadRequest
from service.params import embed_upload

log = logging.getLogger(__name__)

TOKEN = re.compile(r"[0-9a-f]{64}")
# Seconds between two prunings of the folder, by any process; and between two checks by one process.
PRUNE_EVERY_S = 60.0
PRUNED_MARKER = ".pruned"
KEY_FILE = ".token_key"
KEY_BYTES = 32
# The longest side of a kept photo: a region of a quarter of its side still has the model's 224 pixels, and a new
# search pays a small decode and encode for it (a 12-megapixel JPEG decodes at a quarter scale).
STORED_SIDE = 896
# A sweep leaves the folder at this share of its cap, so that the next ones are some writes away.
SWEPT_SHARE = 0.75


@dataclass(frozen=True)
class Query:
    token: str
    # The photo as kept (re-encoded), never the bytes as sent.
    photo: bytes
    # The whole photo's vector; None while only regions of it were searched (each is embedded on its own).
    vector: np.ndarray | None
    # The identity (ModelIdentity.key) of the embedder that made the vector: another model or whitening needs
    # another vector (a new base with a new whitening came in since).
    identity: str | None = None

    def thumbnail(self) -> Image.Image:
        """Made only when a page or preview shows the photo, not on every search."""
        return thumbnail(self.photo)


def stored_photo(data: bytes) -> bytes:
    """The photo as kept and searched: decoded and re-encoded; a 400 that says why for bytes that are no photo."""
    return _kept(data)[0]


def _kept(data: bytes) -> tuple[bytes, Image.Image]:
    """The kept photo, and the decoded photo it was written from (embedded at once, without decoding it again)."""
    try:
        return reencoded(data, STORED_SIDE)
    except ImageError as exc:
        raise BadRequest(f"the upload is not a usable image: {exc}") from None


def disk_bytes(stat: os.stat_result) -> int:
    """What a file takes on disk: its blocks, or its size where blocks are not counted (or compressed)."""
    return max(stat.st_size, getattr(stat, "st_blocks", 0) * 512)


class QueryFolder:
    """Query photos as files in a folder shared by every server process, by token; see the module docstring."""

    def __init__(self, root: Path, ttl_s: float, max_bytes: int = 200_000_000, processes: int = 1):
        self.root = root
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.processes = max(1, processes)
        self._next_prune_check = 0.0  # time.monotonic() of this process's next look at the marker
        self._failing = False  # the last write failed (and was logged)
        self._key: bytes | None = None
        self._written = 0  # bytes this process wrote since its last sweep
        self._budget = 0  # bytes it may write before it sweeps again (none before its first sweep)
        self._lock = threading.Lock()
        self._sweeping = threading.Lock()

    @property
    def key(self) -> bytes:
        """The deployment's token key, read from the folder or made there once; a folder where it can be neither
        read nor made leaves this process a key of its own (its tokens then stay in its memory)."""
        if self._key is None:
            try:
                key = self._read_or_make_key()
            except OSError as exc:
                self._failed(exc)
                key = secrets.token_bytes(KEY_BYTES)
            with self._lock:
                self._key = self._key or key
        return self._key

    def _read_or_make_key(self) -> bytes:
        path = self.root / KEY_FILE
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            temporary = self.root / f".{KEY_FILE}.{uuid.uuid4().hex[:12]}.tmp"
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with open(descriptor, "wb") as handle:
                    handle.write(secrets.token_bytes(KEY_BYTES))
                os.link(temporary, path)  # never replaces a key another process made meanwhile
            except FileExistsError:
                pass
            finally:
                temporary.unlink(missing_ok=True)
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise OSError(f"{path} is not a token key ({len(key)} bytes)")
        return key

    def token(self, photo: bytes) -> str:
        return hmac.new(self.key, photo, hashlib.sha256).hexdigest()

    def path(self, token: str) -> Path | None:
        """Where a token's photo is kept, or None for anything but 64 lowercase hex digits."""
        if not TOKEN.fullmatch(token):
            return None
        return self.root / token[:2] / token

    def load(self, token: str) -> bytes | None:
        """The photo of a token made by any process, or None: unknown, expired, malformed, or bytes that do not
        carry the token."""
        path = self.path(token)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:  # not there (never written, or pruned), or unreadable: as good as forgotten
            return None
        if not hmac.compare_digest(self.token(data), token):
            log.warning("query photo %s does not match its name; ignored", path)
            return None
        return data

    def save(self, token: str, data: bytes) -> None:
        """Keep a photo for other processes: written once (atomically), else only its time brought forward.
        Never raises: a folder that cannot be written leaves the photo in this process's memory only."""
        path = self.path(token)
        if path is None:
            return
        self.sweep_if_due(len(data))
        try:
            try:
                os.utime(path)  # already kept, by this process or another: keep it longer, do not rewrite it
            except FileNotFoundError:
                self._write(path, data)
                with self._lock:
                    self._written += len(data)
        except OSError as exc:
            self._failed(exc)
            return
        if self._failing:
            with self._lock:
                self._failing = False
            log.info("query photos are kept in %s again", self.root)

    def _failed(self, exc: OSError) -> None:
        with self._lock:
            failing, self._failing = self._failing, True
        if not failing:
            log.warning("cannot keep query photos in %s (%s); tokens stay in this process only", self.root, exc)

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

    def sweep_if_due(self, incoming: int = 0) -> None:
        """Prune when no process has for PRUNE_EVERY_S (this process looks at most that often), or sweep down to
        SWEPT_SHARE of the cap once this process's writes since its last sweep would pass its budget."""
        now = time.monotonic()
        with self._lock:
            over = self._written + incoming > self._budget
            look = now >= self._next_prune_check
            if look:
                self._next_prune_check = now + PRUNE_EVERY_S
        if look and self._prune_is_due():
            self.prune(incoming)
        elif over:
            self.prune(incoming, expire=False)

    def _prune_is_due(self) -> bool:
        marker = self.root / PRUNED_MARKER
        try:
            if time.time() - marker.stat().st_mtime < PRUNE_EVERY_S:
                return False
            os.utime(marker)  # first, so that the others leave it to this process
        except FileNotFoundError:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:
                return False  # cannot write here: save() says so
        except OSError:
            return False
        return True

    def prune(self, incoming: int = 0, expire: bool = True) -> int:
        """Remove photos (and temporary files left by a crash) older than ttl_s (with expire), then the least
        recently used until the folder and `incoming` bytes fit in SWEPT_SHARE of the cap; how many were removed.
        One sweep at a time per process: a thread that finds one running leaves it to that one."""
        if not self._sweeping.acquire(blocking=False):
            return 0
        try:
            removed, kept = self._remove_expired(time.time() - self.ttl_s if expire else None)
            total = sum(size for _, size, _ in kept)
            target = int(self.max_bytes * SWEPT_SHARE) - incoming
            for _, size, path in sorted(kept):
                if total <= target:
                    break
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:  # removed by another process sweeping at the same time
                    pass
                except OSError as exc:
                    log.debug("cannot remove %s: %s", path, exc)
                    continue
                total -= size
            with self._lock:
                self._written = 0
                self._budget = max(0, self.max_bytes - total) // (2 * self.processes)
            return removed
        finally:
            self._sweeping.release()

    def _remove_expired(self, cutoff: float | None) -> tuple[int, list[tuple[float, int, str]]]:
        """One scan of the shards: files older than cutoff removed (how many), and the others' (mtime, bytes on
        disk, path); temporary files still being written are neither counted nor kept."""
        removed, kept = 0, []
        try:
            shards = [entry.path for entry in os.scandir(self.root) if entry.is_dir(follow_symlinks=False)]
        except OSError:
            return 0, []
        for shard in shards:
            try:
                entries = list(os.scandir(shard))
            except OSError:
                continue
            for entry in entries:
                try:
                    stat = entry.stat(follow_symlinks=False)
                    if cutoff is not None and stat.st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                    elif not entry.name.startswith("."):
                        kept.append((stat.st_mtime, disk_bytes(stat), entry.path))
                except FileNotFoundError:  # removed by another process pruning at the same time
                    continue
                except OSError as exc:
                    log.debug("cannot prune %s: %s", entry.path, exc)
        return removed, kept


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
        # sha256 of an upload as sent -> its token: the same upload again is neither decoded nor embedded again
        self._uploads: OrderedDict[bytes, str] = OrderedDict()
        self._own_key = secrets.token_bytes(KEY_BYTES)  # without a folder, tokens live in this process alone
        self._lock = threading.Lock()

    def token(self, photo: bytes) -> str:
        """A kept photo's token: keyed, so not derivable from the photo by anyone without the key."""
        if self.folder is not None:
            return self.folder.token(photo)
        return hmac.new(self._own_key, photo, hashlib.sha256).hexdigest()

    def add(self, data: bytes, embedder: Embedder | None = None) -> Query:
        """Remember an uploaded photo (decoded and re-encoded: a 400 before anything is kept), embedded whole with
        the embedder of the view searched, or return it from memory. Without an embedder the photo is remembered
        unembedded: a region search needs only the region."""
        digest = hashlib.sha256(data).digest()
        with self._lock:
            token = self._uploads.get(digest)
        known = None if token is None else self._remembered(token)
        decoded = None
        if known is None:
            photo, decoded = _kept(data)
            token = self.token(photo)
            known = self._remembered(token)  # the same pixels sent otherwise (other metadata, trailing bytes)
            if known is None:
                known = self._remember(Query(token, photo, None), saved=False)
        with self._lock:
            self._uploads[digest] = token
            self._uploads.move_to_end(digest)
            while len(self._uploads) > 4 * self._size:
                self._uploads.popitem(last=False)
        return self.embedded(known, embedder, decoded)

    def embedded(self, query: Query, embedder: Embedder | None, decoded: Image.Image | None = None) -> Query:
        """The query with its whole photo's vector from this embedder: the one remembered, or made (again, for a
        vector from another view's identity: another whitening or model) and remembered. `decoded`: the photo as
        decoded to be kept, embedded instead of the kept JPEG (one decoding per new photo, not two)."""
        if embedder is None:
            return query
        identity = embedder.identity.key
        if query.vector is not None and query.identity == identity:
            return query
        vector = embed_upload(query.photo if decoded is None else decoded, embedder)
        return self._remember(Query(query.token, query.photo, vector, identity), saved=True)

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
            self._items.move_to_end(query.token)
            while self._items and (len(self._items) > self._size or self._bytes > self._max_bytes):
                _, (evicted, _) = self._items.popitem(last=False)
                self._bytes -= len(evicted.photo)
        return query
