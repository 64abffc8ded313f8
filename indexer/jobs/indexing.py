"""The indexing job: catalog folder -> embeddings in the store -> searchable on every server.

Incremental: a file whose size and mtime are unchanged is not read again; one whose bytes (sha256) and model
are unchanged is not embedded again; changed files are re-embedded under the same id; files gone from the
catalog become tombstones. Embeddings are committed in batches, each under its own change number, so running
servers pick them up at once and an interrupted run keeps what it finished. When the changes since the base
segment pass index.compact_after (or there is no base yet), a compaction builds a new base at the end.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.config import Settings, process_memory_mb
from indexer.embedding.images import ImageError, load_views
from indexer.embedding.model import Embedder
from indexer.embedding.whitening import MIN_FIT_PHOTOS, configured
from indexer.embedding.whitening import fit as whitening_fit
from indexer.embedding.whitening import keep as keep_whitening
from indexer.index.compaction import CompactionReport, compact, compaction_due
from indexer.index.segments import read_manifest
from indexer.jobs.catalog import CatalogImage, CatalogScan, scan_catalog
from indexer.storage.locks import write_lock
from indexer.storage.store import Store
from indexer.storage.vectors import ImageVector, KnownFile

# A run that would remove more than this fraction of its folder's images stops and asks for --prune.
MOST_REMOVED = 0.2


class PruneNeeded(RuntimeError):
    """The run would remove a large part of the folder's products; the message lists a sample."""


@dataclass
class IndexReport:
    catalog: Path
    scanned: int = 0
    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    indexed: int = 0
    products: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    compaction: CompactionReport | None = None
    pending: int = 0
    # With index.backend = "milvus": what its collection holds after the run.
    vector_store: str | None = None
    # What this run did about the catalog's whitening, when it fitted one.
    whitening: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"Indexed {self.catalog}: {self.indexed} images of {self.products} products are searchable.",
            f"  scanned {self.scanned}, embedded {self.embedded} ({self.images_per_second:.1f} images/s), "
            f"unchanged {self.unchanged}, removed {self.removed}, skipped {len(self.problems)}, "
            f"in {self.seconds:.1f} s, peak memory {self.peak_memory_mb:.0f} MB",
        ]
        if self.whitening is not None:
            lines.append("  " + self.whitening)
        if self.vector_store is not None:
            lines.append("  " + self.vector_store)
        if self.compaction is not None:
            lines.append("  " + self.compaction.summary())
        elif self.pending:
            lines.append(
                f"  {self.pending} changed images are served from the delta until the next compaction "
                "(`python -m indexer compact`)"
            )
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s); these files or rows were skipped:")
            lines += [f"    - {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"    ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Known = dict[str, KnownFile]  # rel_path -> what the store holds of each live catalog image


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


def _check_and_embed(
    images: list[CatalogImage], known: Known, embedder: Embedder, views: tuple[str, ...]
) -> CheckedBatch:
    """One worker's unit of work: check_files, then decode and embed (with this thread's interpreter)
    the photos whose bytes, model or extra views changed since the last run."""
    checked = check_files(images, known, embedder.identity.key, views)
    pixels, problems = decode_photos([data for _, data in checked.to_embed], embedder.input_size, views)
    return checked.decoded(problems, embedder.embed_pixels(pixels))


def checked_batches(
    images: list[CatalogImage],
    known: Known,
    embedder: Embedder,
    batch_size: int,
    pool: ThreadPoolExecutor,
    workers: int,
    views: tuple[str, ...] = (),
) -> Iterator[CheckedBatch]:
    """Check and embed batches on `workers` threads, each reading, decoding and then running its
    own interpreter, so both kinds of work keep every core busy. The first batches start at
    once, before the caller iterates; results come back in order; at most 2 batches per worker
    are in flight, so memory stays bounded for any catalog size. `views`: the extra catalog views."""
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    pending = deque(
        pool.submit(_check_and_embed, batch, known, embedder, views) for batch in islice(batches, 2 * workers)
    )

    def in_order() -> Iterator[CheckedBatch]:
        while pending:
            done = pending.popleft().result()
            if (batch := next(batches, None)) is not None:
                pending.append(pool.submit(_check_and_embed, batch, known, embedder, views))
            yield done

    return in_order()


@contextmanager
def embedding_stage(settings: Settings, embedder: Embedder) -> Iterator[Callable[..., Iterator[CheckedBatch]]]:
    """checked_batches on this machine's threads; or, with RAY_ADDRESS set (Ray's own variable; `local`
    starts a local cluster), decoding and embedding on a Ray cluster's actors. Ray is imported only then."""
    if not os.environ.get("RAY_ADDRESS"):
        yield checked_batches
        return
    from indexer.jobs.distributed import ray_embedding

    with ray_embedding(settings, embedder) as stage:
        yield stage


def index_catalog(
    settings: Settings,
    embedder: Embedder,
    catalog_dir: Path | None = None,
    metadata: Path | None = None,
    *,
    store: Store | None = None,
    progress: bool = True,
    add_only: bool = False,
    prune: bool = False,
    refit: bool = False,
) -> IndexReport:
    """Bring the store (and so every server) in line with the catalog folder; compact when due.

    Products belong to the folder they were indexed from: a run removes only products of its own folder
    whose photos are gone, none with `add_only`, and stops with PruneNeeded (having added and updated, but
    removed nothing) when it would remove more than MOST_REMOVED of them, unless `prune`. With model.whitening,
    the catalog's whitening follows the network (fitted by this run when there is none yet, or with `refit`)."""
    started = time.perf_counter()
    catalog_dir = Path(catalog_dir or settings.catalog_dir)
    scan: CatalogScan = scan_catalog(catalog_dir, metadata or settings.metadata_path)
    report = IndexReport(catalog=scan.root, scanned=len(scan.images), problems=list(scan.problems))
    store = store or Store.open(settings)
    fitted = None if refit else configured(settings, store, embedder.network.key)
    embedder.use_whitening(fitted)
    model_key = embedder.identity.key
    # Vectors of a run that will fit the whitening are replaced at its end: Milvus gets only the whitened ones.
    fit_pending = settings.whitens and fitted is None

    views = settings.catalog_views
    known = store.vectors.known_files()
    failed: set[str] = set()
    with (
        ThreadPoolExecutor(max_workers=settings.embed_workers, thread_name_prefix="embed") as pool,
        embedding_stage(settings, embedder) as stage,
    ):
        embed_started = time.perf_counter()
        results = stage(scan.images, known, embedder, settings.batch_size, pool, settings.embed_workers, views)
        # While the first batches are embedded: every product's metadata, which the embeddings' rows
        # point to. Products whose photos all fail are removed again by reconcile_catalog.
        with write_lock(settings.data_dir, store):
            product_ids = store.products.upsert(image.product for image in scan.images)
        bar = tqdm(total=len(scan.images), desc="Indexing", unit="img", disable=not progress)
        for batch in results:
            for image, problem in batch.failures:
                failed.add(image.rel_path)
                report.problems.append(f"{image.rel_path}: {problem}")
            if batch.embedded:
                with write_lock(settings.data_dir, store):
                    store.vectors.upsert(_image_vectors(batch, product_ids, views), model_key)
                    if not fit_pending:
                        sync_vector_store(settings, store, embedder)
            if batch.restated:
                with write_lock(settings.data_dir, store):
                    store.vectors.record_file_stats(batch.restated)
            report.embedded += len(batch.embedded)
            report.unchanged += batch.unchanged
            bar.update(len(batch.embedded) + batch.unchanged + len(batch.failures))
        bar.close()
        report.embed_seconds = time.perf_counter() - embed_started

    keep = {
        image.rel_path: (product_ids[image.sku], str(image.path))
        for image in scan.images
        if image.rel_path not in failed
    }
    with write_lock(settings.data_dir, store):
        reconciled = store.vectors.reconcile_catalog(
            keep, str(scan.root), remove=not add_only, most_removed=None if prune else MOST_REMOVED
        )
    if reconciled.refused:
        sample = "\n".join(f"  - {path}" for path in reconciled.sample)
        raise PruneNeeded(
            f"this run would remove {reconciled.refused} of the {reconciled.in_folder} images indexed from "
            f"{scan.root} (more than {MOST_REMOVED:.0%}), for example:\n{sample}\n"
            "Nothing was removed. If these photos really left the catalog, run again with --prune "
            "(make index PRUNE=1); to only add new photos, use --add (make index ADD=1)."
        )
    report.removed = reconciled.removed
    report.whitening = ensure_whitening(settings, store, embedder)
    if settings.index_backend == "milvus":
        from indexer.index.milvus_store import sync_locked

        report.vector_store = sync_locked(settings, store, embedder.identity, purge=True).summary()
    else:
        report.compaction, report.pending = compact_if_due(settings, store, embedder, progress=progress)
    report.indexed, report.products = store.products.counts()
    report.seconds = time.perf_counter() - started
    report.peak_memory_mb = process_memory_mb("VmHWM")
    return report


def ensure_whitening(settings: Settings, store: Store, embedder: Embedder) -> str | None:
    """When the settings whiten and none is in use: fit one on the vectors this run stored (the network's own), keep it
    with the catalog, replace those vectors by their whitened ones (no photo is embedded again) and go on with it.
    Returns what was done, if anything."""
    if not settings.whitens or embedder.whitening is not None:
        return None
    network_key, dim = embedder.network.key, embedder.network.dim
    # Fitted on the photos alone, so that the projection does not depend on the extra views configured.
    photos = store.vectors.labelled(network_key, dim, views=False)
    whitening = whitening_fit(((vectors, categories) for _, vectors, categories in photos), settings.whitening_dims)
    if whitening is None:
        return f"whitening not fitted yet: it needs {MIN_FIT_PHOTOS} photos or more"
    keep_whitening(store, network_key, whitening)
    embedder.use_whitening(whitening)
    with write_lock(settings.data_dir, store):
        for ids, vectors, _ in store.vectors.labelled(network_key, dim):
            store.vectors.replace(ids, whitening.apply(vectors), embedder.identity.key)
    fitted = whitening.fitted_on
    return (
        f"fitted {whitening.name} whitening on {fitted['photos']} photos of {fitted['categories']} categories "
        f"(kept with the catalog for later runs; --refit fits again)"
    )


def sync_vector_store(settings: Settings, store: Store, embedder: Embedder) -> None:
    """With index.backend = "milvus": bring its collection up to the store's head (call it holding write_lock).
    With FAISS, nothing: servers apply the changes to their deltas themselves, and compaction builds bases.
    pymilvus is imported only for Milvus."""
    if settings.index_backend == "milvus":
        from indexer.index.milvus_store import sync

        sync(settings, store, embedder.identity)


def compact_if_due(
    settings: Settings, store: Store, embedder: Embedder, *, progress: bool = False
) -> tuple[CompactionReport | None, int]:
    """Compact when compaction_due says so; else (None, changes waiting in the delta). A compaction that
    another process or host runs meanwhile (a server's) is waited for, and counts: due is checked again on
    the base it published, so the same changes are not compacted twice."""
    while True:
        seen = (read_manifest(settings.index_dir) or {}).get("version", "")
        if compaction_due(settings, store, embedder) is None:
            break
        if (report := compact(settings, store, embedder, progress=progress, if_base=seen)) is not None:
            return report, 0
    return None, store.vectors.pending_changes(int((read_manifest(settings.index_dir) or {}).get("built_through", 0)))


def _image_vectors(batch: CheckedBatch, product_ids: dict[str, int], views: tuple[str, ...]) -> list[ImageVector]:
    """Each embedded photo's row, and one per extra view (its vectors follow the photo's, in `views` order)."""
    names = ("", *views)
    vectors = batch.vectors.reshape(len(batch.embedded), len(names), -1)
    return [
        ImageVector(
            rel_path=image.rel_path,
            path=str(image.path),
            product_id=product_ids[image.sku],
            sha256=batch.digests[image.rel_path],
            vector=vector,
            size=batch.stats[image.rel_path][0],
            mtime_ns=batch.stats[image.rel_path][1],
            view=view,
        )
        for image, photo_vectors in zip(batch.embedded, vectors, strict=True)
        for view, vector in zip(names, photo_vectors, strict=True)
    ]
