"""The retrieval metrics against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.retrieval_metrics import (
    average_precision,
    hit_matrix,
    mean_average_precision,
    per_label,
    recall_at,
    summarise,
)


def test_hit_matrix_marks_results_with_the_query_label_and_pads_short_lists():
    hits = hit_matrix(["a", "b"], [["a", "b", "a"], ["b"]], k=3)
    np.testing.assert_array_equal(hits, [[True, False, True], [True, False, False]])


def test_recall_at_k_counts_queries_with_any_hit_in_the_top_k():
    hits = np.array([[False, True, False], [False, False, False], [True, False, False], [False, False, True]])
    assert recall_at(hits, 1) == 0.25
    assert recall_at(hits, 2) == 0.5
    assert recall_at(hits, 3) == 0.75


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([1, 0, 0, 0], 1.0),  # one hit at rank 1
        ([0, 1, 0, 1], (1 / 2 + 2 / 4) / 2),  # hits at ranks 2 and 4: precisions 1/2 and 2/4
        ([1, 1, 0, 1], (1 + 1 + 3 / 4) / 3),
        ([0, 0, 0, 0], 0.0),
    ],
)
def test_average_precision_by_hand(row, expected):
    assert average_precision(np.array(row, dtype=bool)) == pytest.approx(expected)


def test_mean_average_precision_only_looks_at_the_top_k():
    hits = np.array([[0, 0, 1], [1, 0, 0]], dtype=bool)
    assert mean_average_precision(hits, k=2) == pytest.approx(0.5)
    assert mean_average_precision(hits, k=3) == pytest.approx((1 / 3 + 1) / 2)


def test_per_label_table_lists_the_worst_label_first():
    labels = ["apple", "apple", "pear"]
    hits = np.array([[1, 0], [1, 0], [0, 1]], dtype=bool)
    table = per_label(labels, hits)
    assert [row["label"] for row in table] == ["pear", "apple"]
    assert table[0]["recall@1"] == 0.0 and table[1]["recall@1"] == 1.0


def test_summary_of_an_empty_query_set_is_zero():
    assert summarise(np.zeros((0, 10), dtype=bool))["recall@1"] == 0.0
