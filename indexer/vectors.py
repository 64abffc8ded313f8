"""The FAISS index on disk: build it from (id, vector) pairs, publish it atomically, load it.

Each published version is a FAISS file plus manifest.json naming it; the
manifest is replaced with one atomic rename, so a reader sees either the old
version or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

MANIFEST = "manifest.json"
# Older index files are kept this long so a service still reading one is not cut off.
KEEP_OLD_SECONDS = 300


def build_index(ids: np.ndarray, vectors: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """An IndexIDMap2 over an inner-product index: on unit vectors, scores are cosines."""
    dim = vectors.shape[1]
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        if len(vectors) < 1:
            raise ValueError(f"index factory {factory!r} needs training vectors, but the catalog is empty")
        inner.train(vectors)
    index = faiss.IndexIDMap2(inner)
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    return index


@dataclass(frozen=True)
class IndexVersion:
    index: faiss.Index
    manifest: dict
    manifest_stamp: tuple[int, int]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def publish_index(index_dir: Path, index: faiss.Index, manifest: dict) -> Path:
    """Write a new index version and make it the current one in a single rename."""
    index_dir.mkdir(parents=True, exist_ok=True)
    version = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
    index_file = f"vectors-{version}.faiss"
    _fsync_write(index_dir / index_file, faiss.serialize_index(index).tobytes())
    manifest = {**manifest, "index_file": index_file, "version": version, "count": int(index.ntotal)}
    partial = index_dir / f".{MANIFEST}.partial"
    _fsync_write(partial, json.dumps(manifest, indent=2).encode())
    partial.replace(index_dir / MANIFEST)
    _remove_old_versions(index_dir, keep=index_file)
    return index_dir / index_file


def _remove_old_versions(index_dir: Path, keep: str) -> None:
    cutoff = time.time() - KEEP_OLD_SECONDS
    for old in index_dir.glob("vectors-*.faiss"):
        if old.name != keep and old.stat().st_mtime < cutoff:
            old.unlink(missing_ok=True)


def manifest_stamp(index_dir: Path) -> tuple[int, int] | None:
    """Cheap change detector for the current version: (inode, mtime) of the manifest."""
    try:
        stat = (index_dir / MANIFEST).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def read_manifest(index_dir: Path) -> dict | None:
    try:
        return json.loads((index_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def load_index(index_dir: Path) -> IndexVersion | None:
    """The current published version, or None when nothing has been indexed yet."""
    stamp = manifest_stamp(index_dir)
    manifest = read_manifest(index_dir)
    if stamp is None or manifest is None:
        return None
    index = faiss.read_index(str(index_dir / manifest["index_file"]))
    return IndexVersion(index=index, manifest=manifest, manifest_stamp=stamp)
