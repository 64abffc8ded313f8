"""The ANN structure of a base segment: factory choice, build, recall tuning and filtered, thread-safe search."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from indexer.index.ann import (
    EF_SEARCH_CAP,
    FLAT_LIMIT,
    TARGET_RECALL,
    AnnError,
    SearchTuning,
    build_ann,
    candidates,
    resolve_factory,
    search_params,
    tune,
)

DIM = 64
COUNT = 20_000
FRESH = 100  # extra vectors from the same mixture, never indexed: independent queries


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """On a shared 2-core machine FAISS's OpenMP workers spin-wait for a core another process holds, which made
    k-means here 3-5 times slower and erratic; one thread keeps these tests quick and steady."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered_unit_vectors(count: int, dim: int = DIM, centres: int = 300, seed: int = 0) -> np.ndarray:
    """Unit vectors like image embeddings: clusters of uneven size and tightness around random unit centres,
    each cluster spread along a few directions of its own plus a little isotropic noise (nearest-neighbour
    cosines about 0.9, the 10th about 0.85)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((centres, dim))
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    rank = 8
    directions = rng.standard_normal((centres, dim, rank)) / np.sqrt(dim)
    weight = 1 / np.arange(1, centres + 1) ** 0.8
    cluster = rng.choice(centres, size=count, p=weight / weight.sum())
    spread = rng.uniform(0.5, 1.5, size=centres)[cluster, None] * 0.6 / np.sqrt(rank)
    offsets = np.einsum("ndr,nr->nd", directions[cluster], rng.standard_normal((count, rank)) * spread)
    x = centre[cluster] + offsets + rng.standard_normal((count, dim)) * (0.15 / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def mixture() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, ids, fresh queries): ids are neither row numbers nor sorted, so id handling is exercised."""
    x = clustered_unit_vectors(COUNT + FRESH)
    ids = np.random.default_rng(1).permutation(COUNT).astype(np.int64) * 7 + 1000
    return x[:COUNT], ids, x[COUNT:]


@pytest.fixture(scope="module")
def small() -> tuple[np.ndarray, np.ndarray]:
    x = clustered_unit_vectors(5_000, centres=100, seed=2)
    return x, np.arange(5_000, dtype=np.int64) * 3 + 5


def exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ query
    top = np.argpartition(-scores, k)[:k]
    return ids[top[np.argsort(-scores[top], kind="stable")]]


def reranked(vectors: np.ndarray, ids: np.ndarray, found: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    rows = np.flatnonzero(np.isin(ids, found))
    return ids[rows[np.argsort(-(vectors[rows] @ query), kind="stable")[:k]]]


def test_auto_is_exact_below_the_flat_limit_and_ivf_sq8_above():
    assert resolve_factory("auto", 0) == "Flat"
    assert resolve_factory("auto", FLAT_LIMIT - 1) == "Flat"
    assert resolve_factory("auto", FLAT_LIMIT).endswith(",SQ8")
    assert resolve_factory("auto", FLAT_LIMIT).startswith("IVF")


@pytest.mark.parametrize(
    ("count", "factory"),
    [(1_000_000, "IVF1024,SQ8"), (20_000, "IVF128,SQ8"), (200_000, "IVF512,SQ8"), (50_000, "IVF256,SQ8")],
)
def test_auto_nlist_is_a_power_of_two_near_the_square_root_of_the_count(count, factory):
    assert resolve_factory("auto", count) == factory


def test_auto_nlist_is_clamped_to_64_and_4096():
    assert resolve_factory("auto", 100_000_000) == "IVF4096,SQ8"
    assert resolve_factory("auto", 10**12) == "IVF4096,SQ8"
    assert resolve_factory(" AUTO ", 3_000_000) == "IVF2048,SQ8"


@pytest.mark.parametrize("configured", ["Flat", "HNSW32", "IVF256,PQ16,RFlat", "whatever build_ann rejects"])
def test_a_configured_factory_string_passes_through(configured):
    assert resolve_factory(configured, 1_000_000) == configured


def test_flat_builds_nothing_and_is_exact(small):
    vectors, ids = small
    assert build_ann("Flat", vectors, ids) is None
    tuning = tune(None, "Flat", vectors, ids)
    assert tuning == SearchTuning(factory="Flat", recall_at_10=1.0, queries=0)


def cached_builds(vectors: np.ndarray, ids: np.ndarray, queries: int):
    """Indexes built and tuned once per factory, for the tests that share them."""
    cache: dict[str, tuple[faiss.Index, SearchTuning]] = {}

    def get(factory: str) -> tuple[faiss.Index, SearchTuning]:
        if factory not in cache:
            index = build_ann(factory, vectors, ids)
            cache[factory] = (index, tune(index, factory, vectors, ids, queries=queries))
        return cache[factory]

    return get


@pytest.fixture(scope="module")
def built(mixture):
    return cached_builds(*mixture[:2], queries=200)


@pytest.fixture(scope="module")
def small_built(small):
    return cached_builds(*small, queries=50)


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "IVF64,PQ16", "HNSW16", "SQ8"])
def test_tuning_reaches_the_target_recall_and_fresh_queries_agree(factory, built, mixture):
    vectors, ids, fresh = mixture
    index, tuning = built(factory)
    assert index.ntotal == COUNT
    assert tuning.factory == factory and tuning.queries == 200 and tuning.rerank in (50, 100, 200)
    assert tuning.recall_at_10 >= TARGET_RECALL
    assert (tuning.nprobe is not None) == factory.startswith("IVF")
    assert (tuning.ef_search is not None) == factory.startswith("HNSW")

    # An independent check: queries that are not in the segment, candidates re-ranked exactly as a server does.
    hits = 0
    for query in fresh:
        found = candidates(index, tuning, query, 10)
        assert found.dtype == np.int64 and 10 <= len(found) <= max(10, tuning.rerank)
        assert np.isin(found, ids).all()
        hits += len(np.intersect1d(reranked(vectors, ids, found, query, 10), exact_top(vectors, ids, query, 10)))
    assert hits / (10 * len(fresh)) >= 0.9


def test_refine_wrappers_are_tuned_through_their_base_index(small_built):
    index, tuning = small_built("IVF32,PQ8x4,RFlat")
    assert isinstance(faiss.downcast_index(index), faiss.IndexIDMap)  # refinement looks vectors up by position
    assert tuning.nprobe is not None and tuning.recall_at_10 >= TARGET_RECALL


def test_a_tiny_segment_is_tuned_with_what_it_has():
    vectors = clustered_unit_vectors(30, centres=3, seed=3)
    ids = np.arange(100, 130, dtype=np.int64)
    index = build_ann("HNSW16", vectors, ids)
    tuning = tune(index, "HNSW16", vectors, ids)
    assert tuning.rerank == 29 and tuning.queries == 30 and tuning.recall_at_10 == 1.0
    assert sorted(candidates(index, tuning, vectors[0], 50)) == list(ids)


def test_an_unreachable_target_returns_the_best_setting_with_a_warning(small, small_built, caplog):
    vectors, ids = small
    index, _ = small_built("IVF32,SQ8")
    with caplog.at_level(logging.WARNING, logger="indexer.index.ann"):
        tuning = tune(index, "IVF32,SQ8", vectors, ids, target=1.01, queries=50)
    assert 0.9 <= tuning.recall_at_10 <= 1.0 and tuning.rerank == 200
    [record] = caplog.records
    assert "'IVF32,SQ8'" in record.getMessage() and "configure" in record.getMessage()
    assert f"{tuning.recall_at_10:.3f}" in record.getMessage()


# Factories whose FAISS search takes the selector itself, in every wrapper arrangement build_ann produces.
FILTERING = ["IVF32,Flat", "IVF32,SQ8", "HNSW16", "SQ8", "IDMap2,HNSW16", "IVF32,PQ8x4,RFlat", "PCA32,IVF32,Flat"]


@pytest.mark.parametrize("factory", [*FILTERING, "PQ8x4"])
@pytest.mark.parametrize("kind", ["batch", "bitmap"])
def test_a_selector_restricts_candidates_to_the_selected_ids(factory, kind, small, small_built):
    vectors, ids = small
    index, tuning = small_built(factory)
    chosen = ids[np.random.default_rng(4).random(len(ids)) < 0.2]
    if kind == "batch":
        selector = faiss.IDSelectorBatch(chosen)
    else:
        bitmap = np.packbits(np.isin(np.arange(ids.max() + 1), chosen), bitorder="little")
        selector = faiss.IDSelectorBitmap(bitmap)
    for query in vectors[:20]:
        assert not np.isin(candidates(index, tuning, query, 10), chosen).all()  # so filtering is needed
        found = candidates(index, tuning, query, 10, selector=selector, widen=5.0)
        assert len(found) >= 10 and np.isin(found, chosen).all()
        best = reranked(vectors, ids, found, query, 1)
        assert best[0] == exact_top(vectors[np.isin(ids, chosen)], chosen, query, 1)[0]


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "HNSW16", "IVF32,PQ8x4,RFlat", "SQ8"])
def test_an_index_read_back_from_disk_searches_the_same(factory, small, small_built, tmp_path):
    vectors, ids = small
    index, tuning = small_built(factory)
    faiss.write_index(index, str(tmp_path / "ann.faiss"))
    try:  # as servers load it: memory-mapped where FAISS can
        loaded = faiss.read_index(str(tmp_path / "ann.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        loaded = faiss.read_index(str(tmp_path / "ann.faiss"))
    selector = faiss.IDSelectorBatch(ids[np.random.default_rng(5).random(len(ids)) < 0.3])
    for query in vectors[:10]:
        for chosen in (None, selector):
            expected = candidates(index, tuning, query, 10, selector=chosen, widen=2.0)
            np.testing.assert_array_equal(candidates(loaded, tuning, query, 10, selector=chosen, widen=2.0), expected)


def test_search_params_have_the_class_each_index_type_needs(small, small_built):
    vectors, ids = small
    selector = faiss.IDSelectorBatch(ids[:100])
    expected = {
        "IVF32,Flat": faiss.SearchParametersIVF,
        "PCA32,IVF32,Flat": faiss.SearchParametersIVF,
        "HNSW16": faiss.SearchParametersHNSW,
        "IDMap2,HNSW16": faiss.SearchParametersHNSW,
        "SQ8": faiss.SearchParameters,
        "IVF32,PQ8x4,RFlat": faiss.IndexRefineSearchParameters,
    }
    for factory, kind in expected.items():
        index, _ = small_built(factory)
        params = search_params(index, SearchTuning(factory, nprobe=4, ef_search=32), selector)
        assert type(params) is kind, factory
        # accepted (no "IndexIVF params have incorrect type") and applied
        _, labels = index.search(vectors[:2], 10, params=params)
        assert len(labels[labels >= 0]) and np.isin(labels[labels >= 0], ids[:100]).all(), factory
    # Without a selector an exhaustive type needs no parameters at all.
    assert search_params(small_built("SQ8")[0], SearchTuning("SQ8")) is None


def test_search_params_refuse_a_selector_where_faiss_cannot_filter(small, small_built):
    _, ids = small
    index, _ = small_built("PQ8x4")
    with pytest.raises(AnnError, match="cannot filter"):
        search_params(index, SearchTuning("PQ8x4"), faiss.IDSelectorBatch(ids[:10]))


def test_widen_multiplies_nprobe_and_ef_search_within_their_caps(small_built):
    ivf, _ = small_built("IVF32,Flat")
    tuning = SearchTuning("IVF32,Flat", nprobe=4, rerank=50)
    assert search_params(ivf, tuning).nprobe == 4
    assert search_params(ivf, tuning, widen=2.5).nprobe == 10
    assert search_params(ivf, tuning, widen=100.0).nprobe == 32  # nlist
    assert search_params(ivf, tuning, widen=float("inf")).nprobe == 32
    assert search_params(ivf, tuning, widen=0.5).nprobe == 4  # never narrower than tuned

    hnsw, _ = small_built("HNSW16")
    tuning = SearchTuning("HNSW16", ef_search=64, rerank=50)
    assert search_params(hnsw, tuning).efSearch == 64
    assert search_params(hnsw, tuning, widen=4.0).efSearch == 256
    assert search_params(hnsw, tuning, widen=1e6).efSearch == EF_SEARCH_CAP


def test_searches_leave_the_shared_index_alone_and_agree_across_threads(small, small_built):
    vectors, ids = small
    ivf, hnsw = small_built("IVF32,SQ8")[0], small_built("HNSW16")[0]
    ivf_core, hnsw_core = faiss.extract_index_ivf(ivf), faiss.downcast_index(hnsw.index)
    nprobe, ef = ivf_core.nprobe, hnsw_core.hnsw.efSearch
    selectors = [None, faiss.IDSelectorBatch(ids[::3]), faiss.IDSelectorBatch(ids[1::2])]
    jobs = [
        (index, SearchTuning("x", nprobe=probe, ef_search=probe * 8, rerank=20), query, selector)
        for index in (ivf, hnsw)
        for probe in (1, 8)
        for query in vectors[:10]
        for selector in selectors
    ]

    def run(job):
        index, tuning, query, selector = job
        return candidates(index, tuning, query, 10, selector=selector).tolist()

    serial = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, jobs * 3)) == serial * 3
    assert (ivf_core.nprobe, hnsw_core.hnsw.efSearch) == (nprobe, ef)


def test_an_unknown_factory_string_is_an_ann_error_naming_it(small):
    vectors, ids = small
    with pytest.raises(AnnError, match=r"'IVF64,Bogus'.*could not parse.*configure"):
        build_ann("IVF64,Bogus", vectors, ids)
    with pytest.raises(AnnError, match=r"'Nonsense'"):
        build_ann("Nonsense", vectors, ids)
    assert issubclass(AnnError, ValueError)


def test_too_few_vectors_to_train_is_an_ann_error_saying_what_to_configure(small):
    vectors, ids = small
    with pytest.raises(AnnError, match=r"'IVF4096,Flat' has 4096 lists .* only 1000 vectors.*IVF\d+"):
        build_ann("IVF4096,Flat", vectors[:1000], ids[:1000])
    with pytest.raises(AnnError, match=r"'PQ8' on 100 vectors"):
        build_ann("PQ8", vectors[:100], ids[:100])
    with pytest.raises(AnnError, match="empty"):
        build_ann("IVF32,SQ8", vectors[:0], ids[:0])


def test_search_tuning_round_trips_through_json():
    tuning = SearchTuning("IVF1024,SQ8", nprobe=16, rerank=100, recall_at_10=0.962, queries=200)
    data = json.loads(json.dumps(tuning.as_dict()))
    assert SearchTuning.from_dict(data) == tuning
    assert SearchTuning.from_dict({"factory": "Flat"}) == SearchTuning("Flat")
    assert SearchTuning.from_dict({**data, "added_later": 1}) == tuning  # a newer manifest still loads
