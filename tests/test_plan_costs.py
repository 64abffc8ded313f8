"""The plan of a filtered search is chosen by cost: the constants measured on a real base, and the choice they
make at the extremes (from fixed constants, so that nothing here depends on how fast the machine is)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from indexer.index.ann import build_ann, tune
from indexer.index.costs import OVERFETCH_MAX, Costs
from indexer.index.live_index import plan

# The constants as `make bench-scale` measured them at 1,000,000 products of 1024 dimensions (IVF1024,SQ8).
MILLION = Costs(rows=1_000_000, scan_row=0.25e-6, gather_row=0.9e-6, ann_fixed=300e-6, ann_effort=900e-6,
                widen_cap=64.0, skip_ratio=0.02, bitmap_row=2e-9, rerank=100, has_ann=True)  # fmt: skip
FLAT = Costs(rows=1_000_000, scan_row=0.25e-6, gather_row=0.9e-6)


def test_a_few_matching_rows_are_gathered_and_scored_exactly():
    assert plan(MILLION, 10, MILLION.rows, 11) == "gather"
    assert plan(MILLION, 1_000, MILLION.rows, 11) == "gather"  # 0.1 %: a millisecond of scattered rows


def test_no_more_rows_than_are_asked_for_are_always_scored_exactly():
    # every one of them is a result, which an approximate structure might miss
    assert plan(MILLION, 90, MILLION.rows, 90) in ("gather", "scan")
    assert plan(MILLION, 90, 90, 303) in ("gather", "scan")


def test_a_small_category_block_is_scanned():
    assert plan(MILLION, 300, 300, 11) in ("gather", "scan")


def test_half_the_catalog_goes_through_the_approximate_structure():
    assert plan(MILLION, 500_000, MILLION.rows, 11) in ("ann", "overfetch")
    assert plan(MILLION, 500_000, 500_000, 11, cached=True) in ("ann", "overfetch")  # a category's block


def test_a_selector_to_make_costs_what_it_costs():
    # half the base matching: scoring twice the lists' vectors beats making a bitmap only when that is dear
    dear = Costs(**{**MILLION.__dict__, "bitmap_row": 5e-9, "ann_effort": 100e-6})
    assert plan(dear, 500_000, dear.rows, 11) == "overfetch"
    assert plan(dear, 500_000, dear.rows, 11, cached=True) == "ann"


def test_over_fetching_never_asks_for_more_than_its_limit():
    assert MILLION.overfetch(100, 100 * 1.5 / OVERFETCH_MAX / 2) is None
    assert MILLION.overfetch(100, 0.5) is not None


def test_without_an_approximate_structure_every_plan_is_exact():
    for matches in (10, 1_000, 20_000, 500_000, 1_000_000):
        assert plan(FLAT, matches, FLAT.rows, 11) in ("gather", "scan")
    assert plan(FLAT, 500_000, FLAT.rows, 11) == "scan"  # half of a block: scanned in order, not gathered


def test_widening_keeps_as_many_matching_vectors_visited_up_to_every_list():
    assert MILLION.widen(0.5) == 2
    assert MILLION.widen(0.001) == MILLION.widen_cap


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    vectors = centres[rng.integers(0, 40, 6_000)] + 0.3 * rng.standard_normal((6_000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(10, 6_010, dtype=np.int64)
    ann = build_ann("IVF64,SQ8", vectors, ids)
    return vectors, ids, ann, tune(ann, "IVF64,SQ8", vectors, ids, queries=50)


def test_the_constants_are_measured_on_the_base_itself(base):
    vectors, ids, ann, tuning = base
    costs = Costs.measure(vectors, ids, ann, tuning)
    assert costs.has_ann and costs.rows == len(vectors) and costs.rerank == tuning.rerank
    assert costs.widen_cap == 64 / tuning.nprobe
    for value in (costs.scan_row, costs.gather_row, costs.ann_effort, costs.bitmap_row):
        assert math.isfinite(value) and value > 0
    assert 0 <= costs.skip_ratio <= 1 and costs.ann_fixed >= 0
    assert set(costs.as_dict()) >= {"scan_row_us", "gather_row_us", "ann_effort_us", "skip_ratio"}
    # whatever they are, a handful of rows is never searched approximately
    assert plan(costs, 5, len(vectors), 11) in ("gather", "scan")


def test_a_base_without_an_approximate_structure_measures_only_the_exact_plans(base):
    vectors, ids, _, _ = base
    costs = Costs.measure(vectors, ids, None, None)
    assert not costs.has_ann and costs.scan_row > 0 and costs.gather_row > 0
    assert plan(costs, 3_000, len(vectors), 11) in ("gather", "scan")
