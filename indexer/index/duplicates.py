"""Near-identical photos among the vectors an index holds, found through the index's partition, never by comparing
every photo with every other: the base's IVF cells (its coarse quantizer; cells learned by k-means for a base
without them, one cell for a few thousand photos) split the photos, and each photo is compared exactly, by matrix
products, with the photos of its own cell that have it among their nearest cells, the delta's and the base's alike.
A similarity reported is the cosine of the stored vectors, whatever codes the FAISS structure keeps.

The job that turns these photo pairs into groups of products is indexer.jobs.duplicates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from indexer.index.ann import ivf_of
from indexer.index.segments import BaseSegment, rows_by_id
from indexer.storage.vectors import Changes

# A photo is compared with every photo of its nearest cells (this many). A near-copy's vector is close to its
# photo's, so it falls into the same cell or the next (bench/README.md, "Near-duplicates at scale": recall against an
# exact scan of a sample of the 1,000,000 1024-d vectors of `make bench-scale`).
CELLS_AROUND = 2
# Photos below which (a base without IVF cells) every photo is compared with every other, as one cell.
EXACT_PHOTOS = 20_000
# Photos sampled per cell to learn the cells by k-means, when the base has none.
TRAIN_PER_CELL = 64
# Photos assigned to their cells per quantizer search.
ASSIGN_CHUNK = 16_384
# Similarities computed at once (a block of a cell's photos against the photos around it): 32M float32, 128 MB.
BLOCK_SCORES = 32_000_000
# The nearest photos a photo keeps above the threshold. Groups are the connected pairs, so a photo copied a thousand
# times is linked to its copies through these, not through half a million pairs; and a dense cluster of vectors (the
# synthetic million of `make bench-scale` proposes 88 million pairs at 0.7 when each keeps 256) stays within memory.
MOST_PAIRS = 16


@dataclass(frozen=True)
class LiveVectors:
    """Every live vector of one index state: the base's rows (less those deleted or replaced since it was built) and
    the delta of vectors changed since, as the store's changes after the base give them."""

    base: BaseSegment
    masked: np.ndarray  # per base row: deleted or replaced since the base was built
    delta_ids: np.ndarray
    delta_vectors: np.ndarray
    head: int  # the change number these vectors are as of
    # image id -> its position in the delta, -1 where absent
    delta_position: np.ndarray

    @classmethod
    def of(cls, base: BaseSegment, changes: Changes) -> LiveVectors:
        """The base with the changes after it applied (as a server's LiveIndex applies them)."""
        touched = np.concatenate([changes.ids, changes.removed]).astype(np.int64)
        masked = np.zeros(len(base), dtype=bool)
        rows = base.rows_of(touched)
        masked[rows[rows >= 0]] = True
        ids = changes.ids.astype(np.int64)
        vectors = np.ascontiguousarray(changes.vectors, dtype=np.float32)
        head = max(changes.head, base.built_through)
        return cls(base, masked, ids, vectors, head, rows_by_id(ids))

    @property
    def dim(self) -> int:
        return int(self.base.vectors.shape[1]) if self.base.vectors.ndim == 2 else self.delta_vectors.shape[1]

    def is_live(self, ids: np.ndarray) -> np.ndarray:
        """Which of these image ids have a live vector (in the delta, or in the base and not masked)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.base.rows_of(ids)
        live = rows >= 0
        live[live] = ~self.masked[rows[live]]
        inside = (ids >= 0) & (ids < len(self.delta_position))
        live[inside] |= self.delta_position[ids[inside]] >= 0
        return live

    def vectors_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(which of these ids are live, their live vectors): the delta's where it has one, else the base's (rows that
        are not live hold whatever: the caller leaves them out)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.base.rows_of(ids)
        live = rows >= 0
        live[live] = ~self.masked[rows[live]]
        if len(self.base):
            # one gather from the memory map (in the page cache, as a server's): no ordering or copying twice
            vectors = np.asarray(self.base.vectors[np.where(live, rows, 0)], dtype=np.float32)
        else:
            vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        if len(self.delta_ids):
            inside = (ids >= 0) & (ids < len(self.delta_position))
            at = np.where(inside, self.delta_position[np.where(inside, ids, 0)], -1)
            in_delta = at >= 0
            vectors[in_delta] = self.delta_vectors[at[in_delta]]
            live |= in_delta
        return live, vectors


@dataclass(frozen=True)
class PhotoPairs:
    """Pairs of photos (codes of the caller's photo table, first < second) and their cosine similarity, each once."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def near_photo_pairs(
    live: LiveVectors,
    query_ids: np.ndarray,
    photo_of_id: np.ndarray,
    threshold: float,
    *,
    threads: int = 0,
    progress: bool = False,
) -> PhotoPairs:
    """Every pair of photos at cosine similarity `threshold` or more that the partition finds: each photo's image id
    in `query_ids` (one live image row per photo) is compared with the photos of its CELLS_AROUND nearest cells, and
    keeps its MOST_PAIRS nearest of them; `photo_of_id` gives the photo of each image id. A photo is never paired
    with itself. `threads`: FAISS's threads for this job (0: as they are)."""
    query_ids = np.asarray(query_ids, dtype=np.int64)
    query_ids = query_ids[live.is_live(query_ids)]
    own = _photo(photo_of_id, query_ids)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with _faiss_threads(threads):
        cells = _cells(live, query_ids, progress)
        with tqdm(total=len(query_ids), desc="Near-duplicates", unit="photo", disable=not progress) as bar:
            for members, around in cells.joins():
                vectors = live.vectors_of(query_ids[around])[1]
                inside = np.isin(around, members, assume_unique=True)
                # the photos around the cell against the photos in it: each photo meets every photo of its cells
                at, other, scores = _pairs_over(vectors, vectors[inside], threshold)
                query, candidate = around[at], around[inside][other]
                keep = own[query] != own[candidate]
                found.append((query[keep], candidate[keep], scores[keep]))
                bar.update(len(members))
    if not found:
        return PhotoPairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    query, candidate, scores = _nearest_of_each(*(np.concatenate(parts) for parts in zip(*found, strict=True)))
    photos = max(int(photo_of_id.max()) + 1, 1) if len(photo_of_id) else 1
    first, second = own[query], own[candidate]
    keys = np.minimum(first, second) * photos + np.maximum(first, second)
    order = np.lexsort((-scores, keys))  # each pair once (both directions score the same)
    keys, scores = keys[order], scores[order]
    first_of_pair = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    keys, scores = keys[first_of_pair], scores[first_of_pair]
    return PhotoPairs(keys // photos, keys % photos, scores.astype(np.float32))


def _nearest_of_each(
    query: np.ndarray, candidate: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's MOST_PAIRS best candidates over all its cells (each cell gave its own best)."""
    order = np.lexsort((-scores, query))
    query, candidate, scores = query[order], candidate[order], scores[order]
    starts = np.r_[0, np.flatnonzero(query[1:] != query[:-1]) + 1] if len(query) else np.zeros(0, np.int64)
    rank = np.arange(len(query)) - np.repeat(starts, np.diff(np.r_[starts, len(query)]))
    keep = rank < MOST_PAIRS
    return query[keep], candidate[keep], scores[keep]


@dataclass(frozen=True)
class Cells:
    """The photos (positions in the query list) by cell: each photo belongs to its nearest cell, and is compared with
    the photos of its CELLS_AROUND nearest cells (as an IVF search probing that many lists)."""

    nearest: np.ndarray  # (photos, CELLS_AROUND) cell numbers, nearest first
    count: int

    def joins(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(the photos whose nearest cell it is, the photos around it: every photo with it among its nearest), per
        cell, as sorted positions."""
        home = self.nearest[:, 0]
        by_home = np.argsort(home, kind="stable")
        home_starts = np.searchsorted(home[by_home], np.arange(self.count + 1))
        flat = self.nearest.ravel()
        by_cell = np.argsort(flat, kind="stable")
        cell_starts = np.searchsorted(flat[by_cell], np.arange(self.count + 1))
        positions = by_cell // self.nearest.shape[1]
        for cell in range(self.count):
            members = by_home[home_starts[cell] : home_starts[cell + 1]]
            if len(members):
                yield np.sort(members), np.sort(positions[cell_starts[cell] : cell_starts[cell + 1]])


def _cells(live: LiveVectors, query_ids: np.ndarray, progress: bool) -> Cells:
    """The partition the photos are joined in: the base's own IVF cells (its coarse quantizer) when it has them, one
    cell holding every photo when they are few, else cells learned now by k-means on a sample."""
    count = len(query_ids)
    quantizer = _ivf_quantizer(live.base)
    if quantizer is None and count <= EXACT_PHOTOS:
        return Cells(np.zeros((count, 1), dtype=np.int64), 1)
    if quantizer is None:
        quantizer = _learned_quantizer(live, query_ids)
    around = min(CELLS_AROUND, quantizer.ntotal)
    nearest = np.zeros((count, around), dtype=np.int64)
    for start in tqdm(range(0, count, ASSIGN_CHUNK), desc="Cells", unit="chunk", disable=not progress):
        vectors = live.vectors_of(query_ids[start : start + ASSIGN_CHUNK])[1]
        nearest[start : start + len(vectors)] = quantizer.search(vectors, around)[1]
    return Cells(nearest, int(quantizer.ntotal))


def _ivf_quantizer(base: BaseSegment) -> faiss.Index | None:
    """The coarse quantizer of the base's IVF structure (its cells' centroids), or None when it has none."""
    ivf = None if base.ann is None else ivf_of(base.ann)
    return None if ivf is None else faiss.downcast_index(ivf.quantizer)


def _learned_quantizer(live: LiveVectors, query_ids: np.ndarray) -> faiss.Index:
    """Cells for a base without IVF cells (HNSW, or another structure): k-means on a seeded sample, about the square
    root of the photos' count of cells, as an IVF index of "auto" would have."""
    count = len(query_ids)
    cells = 2 ** round(math.log2(math.sqrt(count)))
    sample = np.random.default_rng(0).choice(count, size=min(count, TRAIN_PER_CELL * cells), replace=False)
    vectors = live.vectors_of(query_ids[np.sort(sample)])[1]
    kmeans = faiss.Kmeans(vectors.shape[1], cells, niter=10, seed=0, spherical=True)
    kmeans.train(vectors)
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    quantizer.add(kmeans.centroids)
    return quantizer


def _pairs_over(
    queries: np.ndarray, vectors: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, vector row, cosine) of every query's vectors at the threshold or more, its MOST_PAIRS best; by
    blocks of queries, so that the similarity block stays near BLOCK_SCORES numbers."""
    rows = max(1, BLOCK_SCORES // max(1, len(vectors)))
    found = []
    for start in range(0, len(queries), rows):
        scores = queries[start : start + rows] @ vectors.T
        over = scores >= threshold
        crowded = np.flatnonzero(over.sum(axis=1) > MOST_PAIRS)
        if len(crowded):  # photos with many near ones: their best link them to the rest of their group
            best = np.argpartition(-scores[crowded], MOST_PAIRS, axis=1)[:, :MOST_PAIRS]
            over[crowded] = False
            over[crowded[:, None], best] = True
        at, other = np.nonzero(over)
        found.append((at + start, other, scores[at, other]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


def _photo(photo_of_id: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The photo code of each image id, -1 for ids the table does not know."""
    inside = (ids >= 0) & (ids < len(photo_of_id))
    return np.where(inside, photo_of_id[np.where(inside, ids, 0)], -1)


@contextmanager
def _faiss_threads(threads: int):
    """FAISS's OpenMP threads set to `threads` for the job, as they were afterwards (0: left as they are)."""
    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
