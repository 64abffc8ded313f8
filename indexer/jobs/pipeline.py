"""The indexing job's embedding stage: reader (stat, read and hash the catalog's photos) -> mapper (decode and embed)
on a Distributor: this machine's threads (ThreadDistributor), or a Ray cluster's actors (indexer.jobs.distributed).
The writer is the core's (indexer.writes.CatalogWriter).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import numpy as np

from indexer.catalog import CatalogImage
from indexer.config import Settings
from indexer.embedding.images import ImageError, load_views
from indexer.embedding.model import Embedder
from indexer.storage.vectors import KnownFile
from indexer.writes import Photo

Known = dict[str, KnownFile]  # rel_path -> what the store holds of each live catalog image


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class CheckedBatch:
    """One worker's batch: photos embedded (with their vectors, sha256 and stat), photos unchanged since the
    last run (with the stat of those read again), and photos that could not be read or decoded. With extra
    catalog views, `vectors` holds each embedded photo's vector and then its views', photo after photo."""

    embedded: list[CatalogImage]
    vectors: np.ndarray
    digests: dict[str, str]
    stats: dict[str, tuple[int, int]]
    unchanged: int
    restated: list[tuple[str, int, int]]
    failures: list[tuple[CatalogImage, str]]

    def photos(self, views: tuple[str, ...]) -> list[Photo]:
        """The embedded photos, as the writer stores them (each with its extra views' vectors)."""
        if not self.embedded:
            return []
        vectors = self.vectors.reshape(len(self.embedded), 1 + len(views), -1)
        return [
            Photo(
                sku=image.sku,
                rel_path=image.rel_path,
                path=str(image.path),
                sha256=self.digests[image.rel_path],
                vectors=photo_vectors,
                views=views,
                size=self.stats[image.rel_path][0],
                mtime_ns=self.stats[image.rel_path][1],
            )
            for image, photo_vectors in zip(self.embedded, vectors, strict=True)
        ]


@dataclass
class CheckedFiles:
    """A batch after stat, read and hash: the photos to embed (with their bytes), and the rest as in
    CheckedBatch. The driver's part of the work, wherever decoding and embedding then run."""

    to_embed: list[tuple[CatalogImage, bytes]]
    digests: dict[str, str]
    stats: dict[str, tuple[int, int]]
    unchanged: int
    restated: list[tuple[str, int, int]]
    failures: list[tuple[CatalogImage, str]]

    def decoded(self, problems: dict[int, str], vectors: np.ndarray) -> CheckedBatch:
        """The batch once its photos are decoded and embedded: vectors of those that decoded (each photo's and
        then its views'), in order; the others (problems: position in to_embed -> why) become failures."""
        embedded = []
        for position, (image, _) in enumerate(self.to_embed):
            if position in problems:
                self.failures.append((image, problems[position]))
            else:
                embedded.append(image)
        self.to_embed = []
        return CheckedBatch(embedded, vectors, self.digests, self.stats, self.unchanged, self.restated, self.failures)


def check_files(images: list[CatalogImage], known: Known, model_key: str, views: tuple[str, ...] = ()) -> CheckedFiles:
    """Stat each photo; read and hash only those whose size or mtime changed (as rsync and git do); keep
    the bytes of those whose bytes, model or extra views changed since the last run, to be decoded and embedded."""
    checked = CheckedFiles([], {}, {}, 0, [], [])
    for image in images:
        stored = known.get(image.rel_path)
        if stored is not None and (stored.model_key, stored.views) != (model_key, frozenset(views)):
            stored = None  # embedded again whatever its bytes
        try:
            stat = os.stat(image.path)
            if stored is not None and (stored.size, stored.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                checked.unchanged += 1
                continue
            data = image.path.read_bytes()
        except OSError as exc:
            checked.failures.append((image, f"cannot be read ({exc.strerror or exc})"))
            continue
        digest = sha256_bytes(data)
        if stored is not None and stored.sha256 == digest:
            checked.unchanged += 1
            checked.restated.append((image.rel_path, stat.st_size, stat.st_mtime_ns))
            continue
        checked.to_embed.append((image, data))
        checked.digests[image.rel_path] = digest
        checked.stats[image.rel_path] = (stat.st_size, stat.st_mtime_ns)
    return checked


def decode_photos(photos: list[bytes], size: int, views: tuple[str, ...] = ()) -> tuple[np.ndarray, dict[int, str]]:
    """The photos decoded and resized by the one preprocessing path, each followed by its extra catalog views,
    stacked as (N * (1 + len(views)), size, size, 3) uint8, and {position: problem} for those that do not decode."""
    pixels, problems = [], {}
    for position, data in enumerate(photos):
        try:
            pixels.append(load_views(data, size, views))
        except ImageError as exc:
            problems[position] = str(exc)
    return (np.concatenate(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)), problems


def in_batches(images: Sequence[CatalogImage], size: int) -> Iterator[list[CatalogImage]]:
    return (list(images[i : i + size]) for i in range(0, len(images), size))


class Distributor(Protocol):
    """Where the photos are decoded and embedded. `embed` starts the first batches at once, before the caller
    iterates, yields them checked and embedded in catalog order, and keeps a bounded number in flight, so memory
    stays bounded for any catalog size."""

    def embed(self, images: Sequence[CatalogImage], known: Known) -> Iterator[CheckedBatch]: ...


class ThreadDistributor:
    """On this machine's threads: each worker checks, decodes and then embeds one batch with its own interpreter,
    so both kinds of work keep every core busy; at most 2 batches per worker are in flight."""

    def __init__(
        self, embedder: Embedder, pool: ThreadPoolExecutor, workers: int, batch_size: int, views: tuple[str, ...] = ()
    ):
        self.embedder, self.pool, self.workers = embedder, pool, workers
        self.batch_size, self.views = batch_size, views

    def _check_and_embed(self, images: list[CatalogImage], known: Known) -> CheckedBatch:
        """One worker's unit of work: check_files, then decode and embed (with this thread's interpreter) the
        photos whose bytes, model or extra views changed since the last run."""
        embedder = self.embedder
        checked = check_files(images, known, embedder.identity.key, self.views)
        pixels, problems = decode_photos([data for _, data in checked.to_embed], embedder.input_size, self.views)
        return checked.decoded(problems, embedder.embed_pixels(pixels))

    def embed(self, images: Sequence[CatalogImage], known: Known) -> Iterator[CheckedBatch]:
        batches = in_batches(images, self.batch_size)
        pending = deque(
            self.pool.submit(self._check_and_embed, batch, known) for batch in islice(batches, 2 * self.workers)
        )

        def in_order() -> Iterator[CheckedBatch]:
            while pending:
                done = pending.popleft().result()
                if (batch := next(batches, None)) is not None:
                    pending.append(self.pool.submit(self._check_and_embed, batch, known))
                yield done

        return in_order()


@contextmanager
def thread_distributor(settings: Settings, embedder: Embedder) -> Iterator[ThreadDistributor]:
    """A ThreadDistributor on settings.embed_workers threads, which are stopped at the end."""
    workers = settings.embed_workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed") as pool:
        yield ThreadDistributor(embedder, pool, workers, settings.batch_size, settings.catalog_views)
