"""The indexing job: catalog folder -> embeddings in the store -> searchable on every server.

Incremental: a file whose size and mtime are unchanged is not read again; one whose bytes (sha256) and model
are unchanged is not embedded again; changed files are re-embedded under the same id; files gone from the
catalog become tombstones. Embeddings are committed in batches, each under its own change number, so running
servers pick them up at once and an interrupted run keeps what it finished. When the changes since the base
segment pass index.compact_after (or there is no base yet), a compaction builds a new base at the end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.catalog import CatalogScan, scan_catalog
from indexer.config import Settings, process_memory_mb
from indexer.embedding.images import limit_decoding
from indexer.embedding.model import Embedder
from indexer.embedding.whitening import MIN_FIT_PHOTOS, configured
from indexer.embedding.whitening import fit as whitening_fit
from indexer.embedding.whitening import keep as keep_whitening
from indexer.index.compaction import CompactionReport, compact, compaction_due
from indexer.index.segments import read_manifest
from indexer.jobs.pipeline import Distributor, thread_distributor
from indexer.storage.locks import write_lock
from indexer.storage.store import Store
from indexer.writes import CatalogWriter

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
    # Photos written through the API embedded again with this run's model (a change of model).
    uploads_embedded: int = 0
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
        if self.uploads_embedded:
            lines.append(f"  {self.uploads_embedded} photos written through the API embedded again with this model")
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


@contextmanager
def distributor(settings: Settings, embedder: Embedder) -> Iterator[Distributor]:
    """The embedding stage's distributor: this machine's threads; or, with RAY_ADDRESS set (Ray's own variable;
    `local` starts a local cluster), a Ray cluster's actors. Ray is imported only then."""
    if not os.environ.get("RAY_ADDRESS"):
        with thread_distributor(settings, embedder) as local:
            yield local
        return
    from indexer.jobs.distributed import ray_distributor

    with ray_distributor(settings, embedder) as cluster:
        yield cluster


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
    limit_decoding(settings.image_max_mb)  # the bytes this process's indexing threads may decode at once
    catalog_dir = Path(catalog_dir or settings.catalog_dir)
    scan: CatalogScan = scan_catalog(catalog_dir, metadata or settings.metadata_path)
    report = IndexReport(catalog=scan.root, scanned=len(scan.images), problems=list(scan.problems))
    store = store or Store.open(settings)
    fitted = None if refit else configured(settings, store, embedder.network.key)
    embedder = embedder.with_whitening(fitted)
    identity = embedder.identity
    # Vectors of a run that will fit the whitening are replaced at its end: Milvus gets only the whitened ones.
    fit_pending = settings.whitens and fitted is None

    views = settings.catalog_views
    known = store.vectors.known_files()
    writer = CatalogWriter(settings, store)
    failed: set[str] = set()
    # Variants: each photo file is read and embedded once, and its vectors stored for every product naming it.
    variants: dict[str, list[str]] = {}
    for image in scan.images:
        variants.setdefault(image.rel_path, []).append(image.sku)
    photos = scan.photos
    with distributor(settings, embedder) as embedding:
        embed_started = time.perf_counter()
        results = embedding.embed(photos, known)
        # While the first batches are embedded: every product's metadata, which the embeddings' rows
        # point to. Products whose photos all fail are removed again by reconcile_catalog.
        writer.write([image.product for image in scan.images])
        bar = tqdm(total=len(photos), desc="Indexing", unit="img", disable=not progress)
        for batch in results:
            for image, problem in batch.failures:
                failed.add(image.rel_path)
                report.problems.append(f"{image.rel_path}: {problem}")
            if batch.embedded or batch.restated:
                # Milvus follows each batch, unless this run's vectors are to be whitened at its end.
                sync = bool(batch.embedded) and not fit_pending
                embedded = [replace(p, sku=sku) for p in batch.photos(views) for sku in variants[p.rel_path]]
                writer.write(photos=embedded, model=identity, restated=batch.restated, sync=sync)
            report.embedded += len(batch.embedded)
            report.unchanged += batch.unchanged
            bar.update(len(batch.embedded) + batch.unchanged + len(batch.failures))
        bar.close()
        report.embed_seconds = time.perf_counter() - embed_started

    keep = {
        image.rel_path: (frozenset(writer.product_ids[sku] for sku in variants[image.rel_path]), str(image.path))
        for image in photos
        if image.rel_path not in failed
    }
    most_removed = None if prune else MOST_REMOVED
    reconciled = writer.reconcile(keep, str(scan.root), remove=not add_only, most_removed=most_removed)
    if reconciled.refused:
        sample = "\n".join(f"  - {path}" for path in reconciled.sample)
        raise PruneNeeded(
            f"this run would remove {reconciled.refused} of the {reconciled.in_folder} images indexed from "
            f"{scan.root} (more than {MOST_REMOVED:.0%}), for example:\n{sample}\n"
            "Nothing was removed. If these photos really left the catalog, run again with --prune "
            "(make index PRUNE=1); to only add new photos, use --add (make index ADD=1)."
        )
    report.removed = reconciled.removed
    report.whitening, embedder = ensure_whitening(settings, store, embedder)
    report.uploads_embedded = embed_uploads_again(settings, store, embedder)
    if settings.index_backend == "milvus":
        from indexer.index.milvus_store import sync_locked

        report.vector_store = sync_locked(settings, store, embedder.identity, purge=True).summary()
    else:
        report.compaction, report.pending = compact_if_due(settings, store, embedder, progress=progress)
        # Servers switch to a new model's base once published, and refuse writes made with the one before from then
        # on; those that were saved while this run compacted are embedded again now.
        report.uploads_embedded += embed_uploads_again(settings, store, embedder)
    report.indexed, report.products = store.products.counts()
    report.seconds = time.perf_counter() - started
    report.peak_memory_mb = process_memory_mb("VmHWM")
    return report


def embed_uploads_again(settings: Settings, store: Store, embedder: Embedder) -> int:
    """Photos written through the write API whose vectors are of another model than `embedder`'s (written before, or
    while, this run embedded the catalog with a new model): embedded again from their files in uploads/ and their
    vectors replaced, so that none is missing from the new model's index. Returns how many rows.

    Most are embedded before taking the write lock; under it, the list is read once more and the few written
    meanwhile are embedded too. Run after a new model's base is published, that makes it complete: a server
    refuses a write made with the model before from then on (writes.ModelChanged), so any that is saved was saved
    before this run took the lock."""
    key = embedder.identity.key
    uploads = settings.data_dir / "uploads"

    def embed(rows: list[tuple[int, str, str]]) -> dict[int, tuple[str, np.ndarray]]:
        made = {}
        for image_id, path, view in rows:
            source = uploads / Path(path).name  # named by its content, never rewritten
            if source.is_file():
                made[image_id] = (path, embedder.embed_views(source, (view,) if view else ())[-1])
        return made

    embedded = embed(store.vectors.uploads_of_other_models(key))
    with write_lock(settings.data_dir, store):
        stale = store.vectors.uploads_of_other_models(key)
        # One written again since keeps its new vector; one written meanwhile is embedded now.
        embedded |= embed([row for row in stale if row[0] not in embedded or embedded[row[0]][0] != row[1]])
        ids = sorted(image_id for image_id, path, _ in stale if image_id in embedded and embedded[image_id][0] == path)
        if ids:
            store.vectors.replace(np.array(ids, dtype=np.int64), np.stack([embedded[i][1] for i in ids]), key)
    return len(ids)


def ensure_whitening(settings: Settings, store: Store, embedder: Embedder) -> tuple[str | None, Embedder]:
    """When the settings whiten and none is in use: fit one on the vectors this run stored (the network's own), keep it
    with the catalog, replace those vectors by their whitened ones (no photo is embedded again) and go on with it.
    Returns what was done, if anything, and the embedder to go on with."""
    if not settings.whitens or embedder.whitening is not None:
        return None, embedder
    network_key, dim = embedder.network.key, embedder.network.dim
    # Fitted on the photos alone, so that the projection does not depend on the extra views configured.
    photos = store.vectors.labelled(network_key, dim, views=False)
    whitening = whitening_fit(((vectors, categories) for _, vectors, categories in photos), settings.whitening_dims)
    if whitening is None:
        return f"whitening not fitted yet: it needs {MIN_FIT_PHOTOS} photos or more", embedder
    keep_whitening(store, network_key, whitening)
    embedder = embedder.with_whitening(whitening)
    with write_lock(settings.data_dir, store):
        for ids, vectors, _ in store.vectors.labelled(network_key, dim):
            store.vectors.replace(ids, whitening.apply(vectors), embedder.identity.key)
    fitted = whitening.fitted_on
    return (
        f"fitted {whitening.name} whitening on {fitted['photos']} photos of {fitted['categories']} categories "
        f"(kept with the catalog for later runs; --refit fits again)"
    ), embedder


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
