"""Retrieval metrics over ranked result lists: a hit is a result with the query's label."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def hit_matrix(query_labels: list[str], result_labels: list[list[str | None]], k: int) -> np.ndarray:
    """(queries, k) booleans: whether the i-th result has the query's label (missing results are misses)."""
    hits = np.zeros((len(query_labels), k), dtype=bool)
    for row, (label, results) in enumerate(zip(query_labels, result_labels, strict=True)):
        for rank, result in enumerate(results[:k]):
            hits[row, rank] = result == label
    return hits


def recall_at(hits: np.ndarray, k: int) -> float:
    """Share of queries with at least one hit in the top k."""
    return float(hits[:, :k].any(axis=1).mean()) if len(hits) else 0.0


def average_precision(hits_row: np.ndarray) -> float:
    """Mean of precision@i over the ranks i that hold a hit (0 when there is none)."""
    ranks = np.flatnonzero(hits_row)
    if len(ranks) == 0:
        return 0.0
    return float(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))


def mean_average_precision(hits: np.ndarray, k: int = 10) -> float:
    return float(np.mean([average_precision(row[:k]) for row in hits])) if len(hits) else 0.0


def summarise(hits: np.ndarray) -> dict[str, float]:
    return {
        "queries": len(hits),
        "recall@1": round(recall_at(hits, 1), 4),
        "recall@5": round(recall_at(hits, 5), 4),
        "recall@10": round(recall_at(hits, 10), 4),
        "map@10": round(mean_average_precision(hits, 10), 4),
    }


def per_label(query_labels: list[str], hits: np.ndarray) -> list[dict]:
    """The summary for each label, worst Recall@1 first."""
    rows = defaultdict(list)
    for index, label in enumerate(query_labels):
        rows[label].append(index)
    table = [{"label": label, **summarise(hits[indexes])} for label, indexes in rows.items()]
    return sorted(table, key=lambda row: (row["recall@1"], row["map@10"], row["label"]))
