"""Base segments on disk: an immutable snapshot of every live vector, written by compaction, read by servers.

A base is a folder `base-<version>/` holding the vectors (memory-mapped by servers, sorted by category so a
category is one contiguous block), their image ids, category codes and prices, attribute postings
(indexer.index.attributes), and an optional approximate structure (ann.faiss) that proposes candidates for exact
re-ranking. manifest.json names the current base and the change number it was built through; it is replaced with
one atomic rename. Servers hold a shared lock on the base they use, so old bases are removed as soon as nobody uses
them.

The index folder may be shared by servers on several hosts (NFSv4): Linux's NFS client turns flock into a lock
on the whole file that the NFS server arbitrates across clients, so the in-use locks work between hosts. Such
an exclusive lock needs the file open for writing, and a file that another host deletes is gone under that
host's memory map (it gets SIGBUS or ESTALE, unlike an unlinked file on a local disk), so no base that any
server holds is ever deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from indexer.index.ann import SearchTuning
from indexer.index.attributes import Postings

MANIFEST = "manifest.json"
IN_USE = "in-use.lock"
NO_CATEGORY = -1


FLOAT32_MAX = float(np.finfo(np.float32).max)


def fsync_write(path: Path, data: bytes) -> None:
    """Write a whole file and flush it to disk before returning."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"


def rows_by_id(ids: np.ndarray) -> np.ndarray:
    """image id -> its row in `ids` (a dense table, -1 where an id is absent)."""
    table = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
    table[ids] = np.arange(len(ids))
    return table


def read_manifest(index_dir: Path) -> dict | None:
    try:
        return json.loads((index_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def manifest_stamp(index_dir: Path) -> tuple[int, int] | None:
    """Cheap change detector for the current base: (inode, mtime) of the manifest."""
    try:
        stat = (index_dir / MANIFEST).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def partial_folder(index_dir: Path, version: str) -> Path:
    """Where a base is written before publish_base renames it into place."""
    folder = index_dir / f".partial-base-{version}"
    folder.mkdir(parents=True)
    return folder


def write_arrays(folder: Path, ids: np.ndarray, category_codes: np.ndarray, prices: np.ndarray) -> None:
    for name, array in (("ids", ids), ("category", category_codes), ("price", prices)):
        np.save(folder / f"{name}.npy", array)


def publish_base(index_dir: Path, partial: Path, manifest: dict) -> str:
    """Rename a fully written base into place, then point the manifest at it (one atomic rename each)."""
    version = manifest["version"]
    for file in partial.iterdir():  # fsync the data before the rename makes it visible
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    final = index_dir / f"base-{version}"
    partial.rename(final)
    staging = index_dir / f".{MANIFEST}.partial"
    fsync_write(staging, json.dumps({**manifest, "base": final.name}, indent=2).encode())
    staging.replace(index_dir / MANIFEST)
    remove_unused_bases(index_dir)
    return final.name


def remove_unused_bases(index_dir: Path) -> list[str]:
    """Keep the current base and every base a server still holds; delete the rest. A server holding an old
    base switches to the current one on its next request (or, idle, within seconds), releases the old one and
    calls this again.
    Requests of this host still searching a base just released keep reading it (an unlinked file lives on
    while mapped). Returns the folders removed."""
    current = (read_manifest(index_dir) or {}).get("base")
    removed = []
    for folder in sorted(p for p in index_dir.glob("base-*") if p.name != current):
        if _in_use(folder):
            continue  # possibly by a server on another host, whose memory map would not survive the deletion
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def remove_partial_bases(index_dir: Path) -> None:
    """Leftovers of a compaction that died; call it holding the compaction lock."""
    for leftover in index_dir.glob(".partial-base-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _in_use(folder: Path) -> bool:
    """Whether a server (of any host, on a shared folder) holds the base. Opened for writing: over NFS an
    exclusive lock needs it (EBADF otherwise). When in doubt (another error), the base counts as in use."""
    try:
        descriptor = os.open(folder / IN_USE, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held; anything else: cannot tell
        return True
    finally:
        os.close(descriptor)  # closing releases the lock we may have taken
    return False


def resident_estimate_mb(index_dir: Path) -> float:
    """What loading the current base adds to a server's resident memory: the arrays it reads whole (ids,
    categories, prices, and an id -> row table) and an approximate structure FAISS cannot memory-map.
    The vectors themselves are memory-mapped and shared through the page cache."""
    manifest = read_manifest(index_dir)
    if manifest is None or "base" not in manifest:
        return 0.0
    folder = index_dir / manifest["base"]
    arrays = sum((folder / f"{name}.npy").stat().st_size for name in ("ids", "category", "price"))
    ann = folder / "ann.faiss"
    # IVF lists are memory-mapped; other structures (HNSW graphs, flat codes) are read into memory.
    in_memory = ann.exists() and not manifest.get("factory", "").upper().startswith("IVF")
    return (2 * arrays + (ann.stat().st_size if in_memory else 0)) / 1e6


@dataclass
class BaseSegment:
    """One loaded base: vectors memory-mapped (sorted by category, then id), ids, category codes, prices."""

    name: str
    manifest: dict
    vectors: np.ndarray
    ids: np.ndarray
    category_codes: np.ndarray
    prices: np.ndarray
    categories: list[str]
    ann: faiss.Index | None
    tuning: SearchTuning
    # category code -> [start, end) rows of that category
    blocks: dict[int, tuple[int, int]]
    # image id -> row, -1 where absent
    row_of_id: np.ndarray
    # rows ordered by price (those without a price last) and their prices, so a price range is two binary
    # searches instead of a pass over every price
    price_order: np.ndarray
    sorted_prices: np.ndarray
    ids_by_price: np.ndarray
    # which rows hold each attribute value (indexer.index.attributes); None for a base written before bases had
    # them: attribute filters then refuse (AttributesUnavailable) until a compaction writes a new base
    postings: Postings | None = None
    _lock_descriptor: int | None = None

    @property
    def built_through(self) -> int:
        return int(self.manifest.get("built_through", 0))

    def __len__(self) -> int:
        return len(self.ids)

    def rows_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Rows of these ids in this base, -1 for ids it does not hold."""
        inside = (image_ids >= 0) & (image_ids < len(self.row_of_id))
        rows = np.full(len(image_ids), -1, dtype=np.int64)
        rows[inside] = self.row_of_id[image_ids[inside]]
        return rows

    def price_range(self, low: float | None, high: float | None) -> tuple[int, int]:
        """[start, end) in price order (price_order, ids_by_price) of the rows whose price is within
        [low, high] (a bound may be None); rows without a price never are."""
        prices = self.sorted_prices  # NaN (no price) sorts last, so a search never lands past the priced rows
        # bounds as float32 like the prices: a float64 bound would make numpy convert every price first (and
        # beyond float32's range a bound is infinite, said so rather than by an overflow warning)
        start = 0 if low is None else int(np.searchsorted(prices, _float32(low), side="left"))
        end = int(np.searchsorted(prices, _float32(np.inf if high is None else high), side="right"))
        return start, end

    def release(self) -> None:
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)
            self._lock_descriptor = None


def load_base(index_dir: Path) -> BaseSegment | None:
    """The current base, memory-mapped and held (shared lock) until released; None when there is none."""
    manifest = read_manifest(index_dir)
    if manifest is None or "base" not in manifest:
        return None
    folder = index_dir / manifest["base"]
    descriptor = os.open(folder / IN_USE, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    try:
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        ids = np.load(folder / "ids.npy")
        codes = np.load(folder / "category.npy")
        prices = np.load(folder / "price.npy")
        postings = Postings.load(folder)
        ann = None
        if (folder / "ann.faiss").exists():
            # Memory-mapped where FAISS can (IVF lists): servers share the page cache instead of copies.
            try:
                ann = faiss.read_index(str(folder / "ann.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                ann = faiss.read_index(str(folder / "ann.faiss"))
    except BaseException:
        os.close(descriptor)
        raise
    row_of_id = rows_by_id(ids)
    blocks: dict[int, tuple[int, int]] = {}
    if len(codes):
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        ends = np.r_[starts[1:], len(codes)]
        blocks = {int(codes[s]): (int(s), int(e)) for s, e in zip(starts, ends, strict=True)}
    return BaseSegment(
        name=manifest["base"],
        manifest=manifest,
        vectors=vectors,
        ids=ids,
        category_codes=codes,
        prices=prices,
        categories=list(manifest.get("categories", [])),
        ann=ann,
        tuning=SearchTuning.from_dict(manifest.get("tuning") or {"factory": "Flat"}),
        blocks=blocks,
        row_of_id=row_of_id,
        price_order=(order := np.argsort(prices, kind="stable")),
        sorted_prices=prices[order],
        ids_by_price=ids[order],
        postings=postings,
        _lock_descriptor=descriptor,
    )


def _float32(bound: float) -> np.float32:
    """A price bound as float32, infinite where it is beyond float32's range."""
    return np.float32(bound) if abs(bound) <= FLOAT32_MAX else np.float32(np.copysign(np.inf, bound))
