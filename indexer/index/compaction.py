"""Compaction: fold every live vector into a new base segment, off the request path, and publish it.

Reads the store (ids, categories, prices and attributes first, then the vectors streamed by id into a memory-mapped file
sorted by category), builds and tunes the approximate structure the catalog size calls for, and publishes the
base atomically. Servers switch to it and replay the changes committed after it from the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faiss
import numpy as np
from numpy.lib.format import open_memmap
from tqdm import tqdm

from indexer.config import Settings
from indexer.embedding.model import Embedder, ModelIdentity
from indexer.embedding.whitening import Whitening, by_sha256, configured, in_use
from indexer.index.ann import build_ann, resolve_factory, tune
from indexer.index.attributes import Postings
from indexer.index.segments import (
    NO_CATEGORY,
    new_version,
    partial_folder,
    publish_base,
    read_manifest,
    remove_partial_bases,
    rows_by_id,
    write_arrays,
)
from indexer.storage.locks import compaction_lock, write_lock
from indexer.storage.store import Store

log = logging.getLogger(__name__)
# Tombstoned rows are deleted once a base without them has been the current one this long: by then every server,
# on every host, sees that base before it applies further changes (an NFS client caches a manifest's attributes
# for at most a minute by default), so none still needs the tombstone to mask the deleted vector.
PURGE_AFTER = timedelta(minutes=5)


@dataclass
class CompactionReport:
    base: str
    vectors: int
    built_through: int
    factory: str
    tuning: dict
    seconds: float
    stage_seconds: dict[str, float]

    def summary(self) -> str:
        recall = self.tuning.get("recall_at_10")
        measured = f", recall@10 {recall:.3f} against exact search" if recall is not None else " (exact search)"
        stages = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.stage_seconds.items())
        return (
            f"Compacted {self.vectors} vectors into {self.base} through change {self.built_through}: "
            f"{self.factory}{measured}, in {self.seconds:.1f} s ({stages})"
        )


def manifest_identity(embedder: Embedder) -> dict:
    """What the manifest records of the model, so a server never searches vectors of another model."""
    return {
        **embedder.identity.as_dict(),
        "model_key": embedder.identity.key,
        "model_version": embedder.version,
        "engine": embedder.engine.name,
        "tflite_sha256": embedder.tflite_sha256,
    }


def index_whitening(store: Store, network_key: str, built: list[dict]) -> tuple[bool, Whitening | None]:
    """The whitening an index of this network was built with (identities from manifests or Milvus collections;
    of several, the one `make index` uses now): (True, it), (True, None) for one built without; (False, None)
    when none is of this network or the database lacks the one it names (model_mismatch then says why)."""
    candidates = [c for c in map(ModelIdentity.from_dict, built) if c.network_key == network_key]
    if not candidates:
        return False, None
    current = in_use(store, network_key)
    chosen = next((c for c in candidates if current and c.whitening_sha256 == current.sha256), candidates[0])
    if chosen.whitening_sha256 is None:
        return True, None
    whitening = by_sha256(store, chosen.whitening_sha256)
    return whitening is not None, whitening


def with_catalog_whitening(settings: Settings, store: Store, embedder: Embedder) -> Embedder:
    """The embedder followed by the whitening the catalog's vectors carry: the current base's when it is of this
    network (what a server-started compaction must rebuild), else the one `make index` uses."""
    manifest = read_manifest(settings.index_dir) or {}
    found, whitening = index_whitening(store, embedder.network.key, [manifest] if "model" in manifest else [])
    return embedder.with_whitening(whitening if found else configured(settings, store, embedder.network.key))


def compaction_due(settings: Settings, store: Store, embedder: Embedder) -> str | None:
    """Why the base should be rebuilt now, or None when the delta is small enough to keep serving."""
    manifest = read_manifest(settings.index_dir) or {}
    if "base" not in manifest:
        return "there is no base segment yet"
    if manifest.get("model_key") != embedder.identity.key or manifest.get("model_version") != embedder.version:
        return "the base was built with another model"
    if not manifest.get("attribute_postings"):
        return "the base has no attribute postings (written by an older version); attribute filters need them"
    if manifest.get("configured_factory") != settings.index_factory:
        return f"index.factory changed to {settings.index_factory!r}"
    pending = store.vectors.pending_changes(int(manifest.get("built_through", 0)))
    if pending >= settings.compact_after:
        return f"{pending} changed images since the base (index.compact_after = {settings.compact_after})"
    return None


def compact(
    settings: Settings,
    store: Store,
    embedder: Embedder,
    *,
    progress: bool = False,
    wait: bool = True,
    if_base: str | None = None,
) -> CompactionReport | None:
    """Build and publish a new base from every live vector; None when another compaction holds the lock
    and wait is False, or when if_base is given and the current base is no longer that version ("" for none):
    a compaction that the caller decided on is then done already, by another process or host."""
    with compaction_lock(settings.data_dir, store, wait=wait) as held:
        if not held:
            return None
        if if_base is not None and (read_manifest(settings.index_dir) or {}).get("version", "") != if_base:
            return None
        return _compact(settings, store, embedder, progress)


def _compact(settings: Settings, store: Store, embedder: Embedder, progress: bool) -> CompactionReport:
    started = time.perf_counter()
    stages: dict[str, float] = {}
    model_key, dim = embedder.identity.key, embedder.identity.dim
    index_dir = settings.index_dir
    index_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_bases(index_dir)  # a compaction that died (we hold the lock, so none is running)
    previous = read_manifest(index_dir)

    snapshot = store.vectors.snapshot(model_key)
    names = sorted({c for c in snapshot.categories if c})
    code_of = {name: code for code, name in enumerate(names)}
    codes = np.array([code_of.get(c, NO_CATEGORY) for c in snapshot.categories], dtype=np.int32)
    order = np.lexsort((snapshot.ids, codes))  # by category, then id: a category is one block of rows
    ids, codes, prices = snapshot.ids[order], codes[order], snapshot.prices[order]
    row_of_id = rows_by_id(ids)
    stages["read ids"] = time.perf_counter() - started

    version = new_version()
    folder = partial_folder(index_dir, version)
    mark = time.perf_counter()
    vectors = _write_vectors(folder / "vectors.npy", store, model_key, dim, row_of_id, progress)
    stages["read vectors"] = time.perf_counter() - mark

    mark = time.perf_counter()
    factory = resolve_factory(settings.index_factory, len(ids))
    ann = build_ann(factory, vectors, ids, progress=progress) if len(ids) else None
    stages["build"] = time.perf_counter() - mark
    mark = time.perf_counter()
    tuning = tune(ann, factory, vectors, ids)
    stages["tune"] = time.perf_counter() - mark
    if ann is not None:
        faiss.write_index(ann, str(folder / "ann.faiss"))
    write_arrays(folder, ids, codes, prices)
    Postings.build(snapshot.attributes[i] for i in order).save(folder)
    del vectors, ann

    manifest = {
        **manifest_identity(embedder),
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_through": snapshot.head,
        "count": len(ids),
        "configured_factory": settings.index_factory,
        "factory": factory,
        "tuning": tuning.as_dict(),
        "categories": names,
        # What the vectors are of besides each photo (index.catalog_views as configured when built).
        "catalog_views": list(settings.catalog_views),
        # attributes.json and attribute_rows.npy are there (bases written before them cannot filter by attribute)
        "attribute_postings": True,
    }
    base = publish_base(index_dir, folder, manifest)
    if (purge_through := _settled_through(previous)) is not None:
        with write_lock(settings.data_dir, store):
            store.vectors.purge_tombstones(purge_through, PURGE_AFTER)
    if tuning.recall_at_10 is not None and tuning.recall_at_10 < 0.95:
        log.warning("%s reaches recall@10 %.3f only; consider index.factory = 'auto'", factory, tuning.recall_at_10)
    return CompactionReport(
        base=base,
        vectors=len(ids),
        built_through=snapshot.head,
        factory=factory,
        tuning=tuning.as_dict(),
        seconds=time.perf_counter() - started,
        stage_seconds={k: round(v, 2) for k, v in stages.items()},
    )


def _settled_through(previous: dict | None) -> int | None:
    """The change number through which tombstones may be purged: that of the base this compaction replaces, when
    it has been the current base for PURGE_AFTER (every server on every host has switched to it or past it),
    else None. Not the new base's: a server on another host may not see the new manifest for a while."""
    if not previous or "base" not in previous:
        return None
    try:
        created = datetime.fromisoformat(previous["created"])
    except (KeyError, TypeError, ValueError):
        return None
    if datetime.now(UTC) - created < PURGE_AFTER:
        return None
    return int(previous.get("built_through", 0))


def _write_vectors(
    path: Path, store: Store, model_key: str, dim: int, row_of_id: np.ndarray, progress: bool
) -> np.ndarray:
    """Stream the vectors into their rows of a memory-mapped .npy (bounded memory at any catalog size).
    A row deleted between the two reads stays zero: its deletion came after the snapshot's change number,
    so every server masks it when it replays the changes."""
    count = int((row_of_id >= 0).sum())
    if count == 0:
        np.save(path, np.zeros((0, dim), dtype=np.float32))
        return np.load(path)
    vectors = open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    with tqdm(total=count, desc="Compacting", unit="vec", disable=not progress) as bar:
        for ids, batch in store.vectors.stream(model_key, dim):
            inside = ids < len(row_of_id)
            rows = np.full(len(ids), -1, dtype=np.int64)
            rows[inside] = row_of_id[ids[inside]]
            known = rows >= 0  # rows added after the snapshot come in through the delta instead
            vectors[rows[known]] = batch[known]
            bar.update(int(known.sum()))
    vectors.flush()
    return vectors
