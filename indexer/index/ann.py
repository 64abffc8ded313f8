"""Approximate nearest neighbours for a base segment: build a FAISS structure that proposes candidates,
tune it to a measured recall, and search it with per-call parameters (the caller re-ranks exactly).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass

import faiss
import numpy as np
from tqdm import tqdm

FLAT_LIMIT = 20_000  # below this many vectors "auto" means exact search
TARGET_RECALL = 0.95

NLIST_MIN, NLIST_MAX = 64, 4096
# k-means costs samples x nlist x dim per iteration; 40 points a list is plenty for coarse centroids,
# but codecs trained on the same sample (PQ: 256 centroids per sub-quantizer) want about 10k points.
TRAIN_PER_LIST = 40
TRAIN_MIN = 10_000
TRAIN_MAX = 100_000
ADD_CHUNK = 100_000
RERANK_DEPTHS = (50, 100, 200)
EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024)
EF_SEARCH_CAP = 4096  # widened efSearch stops here: beyond it a filtered search should scan exactly
# Exact scores of two float32 computations of the same dot product differ in the last bits.
SCORE_TOLERANCE = 1e-5

log = logging.getLogger(__name__)


class AnnError(ValueError):
    """A factory string that FAISS cannot build or search; the message says what to configure."""


def resolve_factory(configured: str, count: int) -> str:
    """'auto' -> 'Flat' below FLAT_LIMIT vectors, else f'IVF{nlist},SQ8' with nlist a power of two near sqrt(count),
    clamped to [64, 4096] (1,000,000 -> 1024). Any other string is returned as is (validated by build_ann)."""
    if configured.strip().lower() != "auto":
        return configured
    if count < FLAT_LIMIT:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(count)))
    return f"IVF{min(max(nlist, NLIST_MIN), NLIST_MAX)},SQ8"


def _is_flat(factory: str) -> bool:
    return factory.strip() == "Flat"


def _layers(index: faiss.Index) -> list[faiss.Index]:
    """The index and every index inside it, outermost first, each downcast to its concrete class."""
    chain = [faiss.downcast_index(index)]
    while True:
        top = chain[-1]
        if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexPreTransform):
            chain.append(faiss.downcast_index(top.index))
        elif isinstance(top, faiss.IndexRefine):
            chain.append(faiss.downcast_index(top.base_index))
        else:
            return chain


def _core(index: faiss.Index) -> faiss.Index:
    """The index that does the approximate search: under ID maps, transforms and refinement."""
    return _layers(index)[-1]


def _is_ivf(index: faiss.Index) -> bool:
    return isinstance(index, faiss.IndexIVF)


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF structure doing an index's approximate search (whose quantizer holds its cells), or None."""
    core = _core(index)
    return core if _is_ivf(core) else None


def _is_hnsw(index: faiss.Index) -> bool:
    # IndexHNSW2Level rejects every SearchParameters, so it is searched like an unknown type.
    return isinstance(index, faiss.IndexHNSW) and not isinstance(index, faiss.IndexHNSW2Level)


def _train_sample_size(core: faiss.Index, count: int) -> int:
    if _is_ivf(core):
        return min(count, max(TRAIN_PER_LIST * core.nlist, TRAIN_MIN))
    return min(count, TRAIN_MAX)


def build_ann(
    factory: str, vectors: np.ndarray, ids: np.ndarray, *, seed: int = 0, progress: bool = False
) -> faiss.Index | None:
    """None for 'Flat'. Else a trained FAISS inner-product index over `vectors` with the given int64 ids.

    Training uses a seeded sample (bounded, so a million vectors train in minutes, not hours); vectors are added
    in chunks so memory stays bounded. Types without their own ids (HNSW, PQ, SQ, refine) get an IndexIDMap.
    Raises AnnError for a factory string FAISS cannot build or vectors too few to train it.
    """
    if _is_flat(factory):
        return None
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array, got shape {vectors.shape}")
    count, dim = vectors.shape
    if len(ids) != count:
        raise ValueError(f"{len(ids)} ids for {count} vectors")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise AnnError(
            f"FAISS cannot build the index factory {factory!r} for {dim}-d vectors ({_faiss_reason(exc)}); "
            "configure 'auto', 'Flat' or a FAISS factory string such as 'IVF1024,SQ8' or 'HNSW32'"
        ) from None
    core = _core(index)
    if not index.is_trained:
        _train(index, core, factory, vectors, seed)
    if not _has_own_ids(index):
        index = faiss.IndexIDMap(index)
    bar = tqdm(total=count, desc="Building ANN index", unit="vec", disable=not progress)
    with bar:
        for start in range(0, count, ADD_CHUNK):
            stop = min(start + ADD_CHUNK, count)
            chunk = np.ascontiguousarray(vectors[start:stop], dtype=np.float32)
            index.add_with_ids(chunk, np.ascontiguousarray(ids[start:stop], dtype=np.int64))
            bar.update(stop - start)
    return index


def _has_own_ids(index: faiss.Index) -> bool:
    """Whether add_with_ids works: an ID map or an IVF, possibly under transforms (which forward the ids).
    An IndexRefine does not take ids: its refinement looks vectors up by position."""
    for layer in _layers(index):
        if isinstance(layer, faiss.IndexIDMap | faiss.IndexIDMap2 | faiss.IndexIVF):
            return True
        if not isinstance(layer, faiss.IndexPreTransform):
            return False
    return False


def _train(index: faiss.Index, core: faiss.Index, factory: str, vectors: np.ndarray, seed: int) -> None:
    count = len(vectors)
    if count == 0:
        raise AnnError(f"the index factory {factory!r} needs training vectors, but the segment is empty")
    if _is_ivf(core):
        if count < core.nlist:
            fewer = max(1, 2 ** int(math.log2(max(1.0, math.sqrt(count)))))
            raise AnnError(
                f"the index factory {factory!r} has {core.nlist} lists but the segment has only {count} vectors "
                f"to train them; configure 'auto', 'Flat' or fewer lists (e.g. IVF{fewer})"
            )
        # Make FAISS's k-means follow the caller's seed as the sample does.
        core.cp.seed = seed
    for layer in _layers(index):
        if hasattr(layer, "do_polysemous_training"):
            # Polysemous training only reorders PQ codes for Hamming pre-filtering, which these searches never
            # use, and takes several times longer than the PQ k-means itself.
            layer.do_polysemous_training = False
    size = _train_sample_size(core, count)
    rows = np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False))
    sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    log.info("Training %s on %d of %d vectors", factory, size, count)
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise AnnError(
            f"FAISS cannot train the index factory {factory!r} on {size} vectors ({_faiss_reason(exc)}); "
            "configure 'auto', 'Flat' or a factory that needs fewer training vectors"
        ) from None


def _faiss_reason(exc: RuntimeError) -> str:
    """The useful part of a FAISS C++ exception: its message without the source location and failed condition."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    text = re.sub(r"^Error in .* at \S+:\d+: (Error: )?", "", text)
    return re.sub(r"^'.*?' failed: ", "", text).strip()


@dataclass(frozen=True)
class SearchTuning:
    """How a segment's ANN structure is searched, and the recall that setting was measured to reach."""

    factory: str
    nprobe: int | None = None  # IVF types
    ef_search: int | None = None  # HNSW types
    rerank: int = 0  # candidates taken from the FAISS structure, then re-ranked exactly
    recall_at_10: float | None = None  # measured against exact search on held-out queries (None for Flat: exact)
    queries: int = 0

    def as_dict(self) -> dict:
        """JSON-able, for the manifest and /readyz."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchTuning:
        """The inverse of as_dict; keys it does not know (from a newer version) are ignored."""

        def optional(key: str, kind: type) -> int | float | None:
            value = data.get(key)
            return None if value is None else kind(value)

        return cls(
            factory=str(data["factory"]),
            nprobe=optional("nprobe", int),
            ef_search=optional("ef_search", int),
            rerank=int(data.get("rerank") or 0),
            recall_at_10=optional("recall_at_10", float),
            queries=int(data.get("queries") or 0),
        )


def search_params(
    index: faiss.Index, tuning: SearchTuning, selector: faiss.IDSelector | None = None, widen: float = 1.0
) -> faiss.SearchParameters | None:
    """The SearchParameters object this index type needs, with `tuning`'s nprobe/efSearch and the selector.

    Looks through IndexIDMap/IndexIDMap2, IndexPreTransform and IndexRefine. `widen` >= 1 multiplies nprobe
    (capped at nlist) and efSearch (capped at EF_SEARCH_CAP) for filtered searches where only a fraction of the
    vectors qualify. None when the index needs no parameters. Raises AnnError when a selector is given but this
    index type cannot filter inside FAISS (flat PQ, fast-scan, NSG): candidates() filters those itself.
    Build a new object for every search: FAISS writes into it during the search, so it must not be shared.
    """
    params, filtered = _params(index, tuning, selector, max(1.0, widen))
    if selector is not None and not filtered:
        raise AnnError(
            f"the FAISS index {type(_core(index)).__name__} ({tuning.factory!r}) cannot filter by id inside FAISS; "
            "configure an IVF, HNSW or SQ factory (e.g. 'IVF1024,SQ8') for filtered searches"
        )
    return params


def _params(
    index: faiss.Index, tuning: SearchTuning, selector: faiss.IDSelector | None, widen: float
) -> tuple[faiss.SearchParameters | None, bool]:
    """(params, whether the selector is applied) for `index`, the selector being in `index`'s own id space."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        translated = None
        if selector is not None:
            # The ID map swaps the selector of the params object it is given for one over its internal ids, but
            # nested params (an IndexRefine's base_index_params) reach the inner index untranslated.
            translated = faiss.IDSelectorTranslated(index.id_map, selector)
            translated.referenced_objects = [selector, index]
        params, filtered = _params(inner, tuning, translated, widen)
        if params is None and selector is not None:
            return None, False
        if params is not None and selector is not None:
            params.sel = selector
        return params, filtered
    if isinstance(index, faiss.IndexPreTransform):
        # The transform changes vectors, not ids, and passes the same params object to its inner index.
        return _params(index.index, tuning, selector, widen)
    if isinstance(index, faiss.IndexRefine):
        base, filtered = _params(index.base_index, tuning, selector, widen)
        if base is None:
            return None, selector is None
        refine = faiss.IndexRefineSearchParameters()
        refine.k_factor = index.k_factor
        refine.base_index_params = base
        return refine, filtered
    if _is_ivf(index):
        nprobe = tuning.nprobe if tuning.nprobe is not None else index.nprobe
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, math.ceil(min(nprobe * widen, index.nlist)))
    elif _is_hnsw(index):
        ef = tuning.ef_search if tuning.ef_search is not None else index.hnsw.efSearch
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(1, math.ceil(min(ef * widen, max(ef, EF_SEARCH_CAP))))
    elif isinstance(index, faiss.IndexFlat | faiss.IndexScalarQuantizer):
        if selector is None:
            return None, True
        params = faiss.SearchParameters()
    else:
        # Flat PQ, fast-scan, NSG, additive quantizers: FAISS rejects params (or selectors) for these.
        return None, selector is None
    if selector is not None:
        params.sel = selector
    return params, True


def candidates(
    index: faiss.Index,
    tuning: SearchTuning,
    query: np.ndarray,
    count: int,
    selector: faiss.IDSelector | None = None,
    widen: float = 1.0,
) -> np.ndarray:
    """Up to max(count, tuning.rerank) candidate ids (int64, -1s removed) for one (dim,) float32 query,
    searched with search_params(...). The caller re-ranks them exactly. Safe to call from many threads."""
    wanted = min(max(count, tuning.rerank), index.ntotal)
    if wanted <= 0:
        return np.empty(0, dtype=np.int64)
    x = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
    params, filtered = _params(index, tuning, selector, max(1.0, widen))
    if selector is None or filtered:
        _, labels = index.search(x, wanted, params=params)
        found = labels[0]
        return found[found >= 0]
    # This type cannot filter inside FAISS: over-fetch by the expected fraction of selected ids, then filter.
    fetch = min(index.ntotal, math.ceil(min(wanted * max(1.0, widen) * 2, index.ntotal)))
    _, labels = index.search(x, fetch, params=params)
    found = labels[0]
    keep = [label for label in found[found >= 0].tolist() if selector.is_member(label)]
    return np.asarray(keep[:wanted], dtype=np.int64)


def tune(
    index: faiss.Index | None,
    factory: str,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    target: float = TARGET_RECALL,
    queries: int = 200,
    k: int = 10,
    seed: int = 0,
) -> SearchTuning:
    """The cheapest search setting of `index` that reaches `target` recall@k, measured on held-out queries.

    The queries are a seeded sample of the segment's own vectors; the ground truth is exact top-k by inner
    product over all vectors except the query itself, and the ANN answer is the index's candidates (except the
    query) re-ranked exactly with `vectors`. If no setting reaches the target, the best one is returned and a
    warning says what to configure instead. For Flat (index None) the search is exact: recall 1.0.
    """
    if index is None:
        return SearchTuning(factory="Flat", recall_at_10=1.0, queries=0)
    count = len(vectors)
    if index.ntotal != count or len(ids) != count:
        raise ValueError(f"the index holds {index.ntotal} vectors, but {count} vectors and {len(ids)} ids were given")
    core = _core(index)
    depths = tuple(depth for depth in RERANK_DEPTHS if depth < count) or (max(count - 1, 0),)
    k = min(k, count - 1)
    if k < 1:
        return SearchTuning(
            factory=factory, nprobe=_default_nprobe(core), ef_search=_default_ef(core), rerank=depths[0]
        )

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(count, size=min(max(queries, 1), count), replace=False))
    ids = np.asarray(ids, dtype=np.int64)
    query_vectors = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    kth_best = _exact_kth_scores(query_vectors, rows, vectors, k)
    row_of = _RowLookup(ids)

    if _is_ivf(core):
        steps = [2**i for i in range(int(math.log2(core.nlist)) + 1)]
        if steps[-1] != core.nlist:
            steps.append(core.nlist)
        settings = [{"nprobe": step} for step in steps]
    elif _is_hnsw(core):
        settings = [{"ef_search": step} for step in EF_SEARCH_STEPS]
    else:
        settings = [{}]

    # Cheapest means the smallest nprobe/efSearch, then the smallest re-rank depth: each extra IVF list scans
    # ntotal/nlist codes per query, far more work than re-ranking 50 more candidates exactly. A deeper re-rank
    # hardly ever lowers recall, so the deepest is tried first and shallower ones only once it reaches the target.
    def measure(setting: dict, depth: int) -> SearchTuning:
        trial = SearchTuning(factory=factory, rerank=depth, queries=len(rows), **setting)
        recall = _recall(index, trial, query_vectors, ids[rows], kth_best, vectors, row_of, k)
        return SearchTuning(**{**trial.as_dict(), "recall_at_10": round(recall, 4)})

    best: SearchTuning | None = None
    for setting in settings:
        deepest = measure(setting, max(depths))
        if best is None or deepest.recall_at_10 > best.recall_at_10:
            best = deepest
        if deepest.recall_at_10 < target:
            continue
        for depth in sorted(depths)[:-1]:
            shallower = measure(setting, depth)
            if shallower.recall_at_10 >= target:
                return shallower
        return deepest
    assert best is not None
    knobs = ", ".join(f"{key}={getattr(best, key)}" for key in ("nprobe", "ef_search", "rerank") if getattr(best, key))
    log.warning(
        "ANN index %r reaches recall@%d of only %.3f (target %.2f) even at %s; configure a finer encoding "
        "(SQ8 or Flat instead of PQ), more HNSW links (e.g. HNSW32), or 'Flat' for exact search",
        factory,
        k,
        best.recall_at_10,
        target,
        knobs,
    )
    return best


def _default_nprobe(core: faiss.Index) -> int | None:
    return core.nprobe if _is_ivf(core) else None


def _default_ef(core: faiss.Index) -> int | None:
    return core.hnsw.efSearch if _is_hnsw(core) else None


class _RowLookup:
    """Row numbers of ids in the segment's arrays (ids need not be sorted)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]

    def __call__(self, wanted: np.ndarray) -> np.ndarray:
        """Rows of `wanted` ids; -1 where an id is not in the segment."""
        pos = np.clip(np.searchsorted(self.sorted, wanted), 0, len(self.sorted) - 1)
        return np.where(self.sorted[pos] == wanted, self.order[pos], -1)


def _exact_kth_scores(query_vectors: np.ndarray, rows: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """Each query's k-th best inner product over all vectors except its own row."""
    count, dim = vectors.shape
    # Blocks of about 32 MB, so a memory-mapped million-vector segment is read once with bounded memory.
    block = max(1024, (32 << 20) // (4 * dim))
    best = np.full((len(query_vectors), k), -np.inf, dtype=np.float32)
    for start in range(0, count, block):
        stop = min(start + block, count)
        scores = query_vectors @ np.ascontiguousarray(vectors[start:stop], dtype=np.float32).T
        own = (rows >= start) & (rows < stop)
        scores[np.flatnonzero(own), rows[own] - start] = -np.inf
        merged = np.concatenate([best, scores], axis=1)
        best = -np.partition(-merged, k - 1, axis=1)[:, :k]
    return best.min(axis=1)


def _recall(
    index: faiss.Index,
    trial: SearchTuning,
    query_vectors: np.ndarray,
    query_ids: np.ndarray,
    kth_best: np.ndarray,
    vectors: np.ndarray,
    row_of: _RowLookup,
    k: int,
) -> float:
    """Recall@k of `trial`'s candidates, re-ranked exactly, against exact search; ties with the k-th count."""
    depth = trial.rerank
    fetch = min(depth + 1, index.ntotal)  # one more, as the query itself is usually among them
    params, _ = _params(index, trial, None, 1.0)
    try:
        _, labels = index.search(query_vectors, fetch, params=params)
    except RuntimeError as exc:
        raise AnnError(
            f"FAISS cannot search the index factory {trial.factory!r} ({_faiss_reason(exc)}); "
            "configure 'auto', 'Flat' or a FAISS factory string such as 'IVF1024,SQ8' or 'HNSW32'"
        ) from None
    labels[labels == query_ids[:, None]] = -1
    # Keep the first `depth` labels that are neither missing nor the query, in rank order.
    labels = np.take_along_axis(labels, np.argsort(labels < 0, axis=1, kind="stable"), axis=1)[:, :depth]
    rows = np.where(labels >= 0, row_of(labels), -1)
    hits = 0
    for start in range(0, len(rows), 50):
        chunk = rows[start : start + 50]
        valid = chunk >= 0
        gathered = np.zeros((*chunk.shape, vectors.shape[1]), dtype=np.float32)
        gathered[valid] = vectors[chunk[valid]]
        scores = np.einsum("qrd,qd->qr", gathered, query_vectors[start : start + 50])
        scores[~valid] = -np.inf
        top = -np.partition(-scores, min(k, depth) - 1, axis=1)[:, :k]
        hits += int((top >= kth_best[start : start + 50, None] - SCORE_TOLERANCE).sum())
    return hits / (len(rows) * k)
