"""Near-identical photos among the vectors an index holds, found through the index itself, never by comparing every
photo with every other: each live photo's nearest neighbours from the base segment's FAISS structure (thousands of
queries per batched search, with the base's tuned parameters, widened), exactly from a Flat base (small catalogs),
and from an exact scan of the delta. Candidates are scored again exactly from the live vectors, so a similarity
reported is the cosine itself, whatever codes the FAISS structure keeps.

The job that turns these photo pairs into groups of products is indexer.jobs.duplicates.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

from indexer.index.ann import SearchTuning, search_params
from indexer.index.segments import BaseSegment, rows_by_id
from indexer.storage.vectors import Changes

# Neighbours asked for per photo. A photo and its near-copies are few; a photo whose neighbours are all near-copies
# (variants' rows of one photo, extra views, a photo copied many times) is searched again with four times as many,
# up to MOST_NEIGHBOURS, while its neighbours so far name fewer than NEIGHBOURS // 2 other photos: groups are the
# connected pairs, so a photo copied a thousand times is linked to its copies through 16 of them each, not through
# half a million pairs.
NEIGHBOURS = 16
MOST_NEIGHBOURS = 256
# Queries per FAISS search call: 2,048 x 1024 float32 is 8 MB, and each call uses every FAISS thread.
QUERY_CHUNK = 2048
# The base's tuning reaches recall@10 0.95 for any query; a near-copy that fell into a neighbouring IVF list needs a
# few lists more. On 300,000 clustered 1024-d vectors (IVF512,SQ8, tuned nprobe 1) with 2,000 planted near-copies at
# cosine 0.93-0.99, nprobe 1 found 97.4 % of them, 2: 99.45 %, 4: 99.95 % (at 83, 183 and 311 us a photo on 2
# cores). So at least LEAST_NPROBE lists (IVF), and for HNSW (not measured) an efSearch of 4 x the neighbours asked
# for; a wider tuning stays as it is.
LEAST_NPROBE = 4
LEAST_EF_SEARCH = 4 * NEIGHBOURS
# Candidates whose approximate score (the FAISS structure's codes: SQ8, PQ) is this far below the threshold are
# still scored exactly; SQ8 errs by about 0.01 on unit vectors.
APPROXIMATE_MARGIN = 0.05
# Searches that return scores for these int64 ids: (queries, k) -> (scores, ids), -1 where none.
Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


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
    """Every pair of photos at cosine similarity `threshold` or more that the index finds: each photo's image id in
    `query_ids` (one live image row per photo) is searched for; `photo_of_id` gives the photo of each image id (-1:
    not a photo of the table, such as an extra view, or another photo's variant rows under the same code). A photo
    is never paired with itself. `threads`: FAISS's threads for this job (0: as it is)."""
    query_ids = np.asarray(query_ids, dtype=np.int64)
    sources = _sources(live)
    found_keys, found_scores = [], []
    photos = max(int(photo_of_id.max()) + 1, 1) if len(photo_of_id) else 1
    with _faiss_threads(threads), tqdm(total=len(query_ids), desc="Near-duplicates", unit="photo",
                                       disable=not progress) as bar:  # fmt: skip
        for start in range(0, len(query_ids), QUERY_CHUNK):
            chunk = query_ids[start : start + QUERY_CHUNK]
            live_rows, queries = live.vectors_of(chunk)
            chunk, queries = chunk[live_rows], queries[live_rows]
            own = _photo(photo_of_id, chunk)
            for search, size in sources:
                query_at, candidate = _neighbours(search, size, queries, own, photo_of_id, threshold)
                scores = _exact_scores(live, queries[query_at], candidate)
                other = _photo(photo_of_id, candidate)
                keep = (scores >= threshold) & (other >= 0) & (other != own[query_at])
                first = np.minimum(own[query_at][keep], other[keep])
                second = np.maximum(own[query_at][keep], other[keep])
                found_keys.append(first * photos + second)
                found_scores.append(scores[keep])
            bar.update(len(query_ids[start : start + QUERY_CHUNK]))
    keys = np.concatenate(found_keys) if found_keys else np.zeros(0, np.int64)
    scores = np.concatenate(found_scores) if found_scores else np.zeros(0, np.float32)
    order = np.lexsort((-scores, keys))  # each pair's best score first (both directions score the same)
    keys, scores = keys[order], scores[order]
    first_of_pair = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    keys, scores = keys[first_of_pair], scores[first_of_pair]
    return PhotoPairs(keys // photos, keys % photos, scores.astype(np.float32))


def _sources(live: LiveVectors) -> list[tuple[Search, int]]:
    """The searches a photo's neighbours come from, with how many vectors each holds: the base (its FAISS structure,
    or exactly without one) and the delta (exactly)."""
    base = live.base
    sources: list[tuple[Search, int]] = []
    if len(base):
        if base.ann is not None:
            index, tuning, widen = base.ann, base.tuning, _widening(base.tuning)

            def approximate(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
                # a new parameters object per call: FAISS writes into it while searching
                return index.search(queries, k, params=search_params(index, tuning, widen=widen))

            sources.append((approximate, int(index.ntotal)))
        else:
            sources.append((_exact_search(base.vectors, base.ids), len(base)))
    if len(live.delta_ids):
        sources.append((_exact_search(live.delta_vectors, live.delta_ids), len(live.delta_ids)))
    return sources


def _widening(tuning: SearchTuning) -> float:
    """How much wider than its tuning the base is searched: to LEAST_NPROBE lists, or an efSearch of LEAST_EF_SEARCH."""
    if tuning.nprobe:
        return max(1.0, LEAST_NPROBE / tuning.nprobe)
    if tuning.ef_search:
        return max(1.0, LEAST_EF_SEARCH / tuning.ef_search)
    return 1.0


def _exact_search(vectors: np.ndarray, ids: np.ndarray) -> Search:
    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, at = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
        return scores, np.where(at >= 0, ids[np.maximum(at, 0)], -1)

    return search


def _neighbours(
    search: Search, size: int, queries: np.ndarray, own: np.ndarray, photo_of_id: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, candidate ids): the neighbours of each query that may be at the threshold, by the source's
    (possibly approximate) scores. A query whose neighbours all are, yet name few other photos, is searched again
    with more (NEIGHBOURS, MOST_NEIGHBOURS)."""
    near = threshold - APPROXIMATE_MARGIN
    pending = np.arange(len(queries))
    k = NEIGHBOURS
    found_at, found_ids = [], []
    while len(pending):
        wanted = min(k, size)
        scores, ids = search(np.ascontiguousarray(queries[pending]), wanted)
        close = (ids >= 0) & (scores >= near)
        rows, columns = np.nonzero(close)
        found_at.append(pending[rows])
        found_ids.append(ids[rows, columns])
        if wanted >= min(MOST_NEIGHBOURS, size):
            break
        # Searched again: every neighbour close, and few of them other photos than the query's own.
        others = _photo(photo_of_id, ids)
        others = np.where(close & (others >= 0) & (others != own[pending][:, None]), others, -1)
        again = close.all(axis=1) & (_distinct(others) < NEIGHBOURS // 2)
        pending, k = pending[again], k * 4
    return np.concatenate(found_at), np.concatenate(found_ids)


def _distinct(codes: np.ndarray) -> np.ndarray:
    """Per row, how many distinct values >= 0 it holds."""
    ordered = np.sort(codes, axis=1)
    fresh = np.ones_like(ordered, dtype=bool)
    fresh[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (fresh & (ordered >= 0)).sum(axis=1)


def _photo(photo_of_id: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The photo code of each image id, -1 for ids the table does not know."""
    inside = (ids >= 0) & (ids < len(photo_of_id))
    return np.where(inside, photo_of_id[np.where(inside, ids, 0)], -1)


def _exact_scores(live: LiveVectors, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Each query's cosine with its candidate's live vector; -inf where the candidate is no longer live."""
    if not len(candidates):
        return np.zeros(0, np.float32)
    order = np.argsort(candidates, kind="stable")  # the memory map read in order: each page once
    live_rows, vectors = live.vectors_of(candidates[order])
    scores = np.empty(len(candidates), dtype=np.float32)
    scores[order] = np.where(live_rows, np.einsum("nd,nd->n", queries[order], vectors), -np.inf)
    return scores


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
