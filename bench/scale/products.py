"""What a synthetic catalog's answers are checked against: each product's category and price, and the exact
nearest neighbours of the products asked about."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Rows of the base vectors per exact-search pass: 65,536 x 1024 float32 is 256 MB.
EXACT_CHUNK = 65_536


class Products:
    """The category and price of every row of a synthetic products CSV."""

    def __init__(self, path: Path):
        codes, prices, names = [], [], {}
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                codes.append(names.setdefault(row["category"], len(names)))
                prices.append(float(row["price"]) if row["price"] else np.nan)
        self.categories = list(names)
        self.codes = np.asarray(codes, dtype=np.int32)
        self.prices = np.asarray(prices, dtype=np.float64)

    def category(self, row: int) -> str:
        return self.categories[self.codes[row]]

    def price_range(self, low_quantile: float = 0.40, high_quantile: float = 0.55) -> tuple[float, float, float]:
        """A price range holding about 15 % of the products, and the share it really holds."""
        # Rounded to cents as sent, so that the check of the results uses the bounds the server got.
        low, high = (round(float(np.nanquantile(self.prices, q)), 2) for q in (low_quantile, high_quantile))
        share = float(np.mean((self.prices >= low) & (self.prices <= high)))
        return low, high, share


def exact_neighbours(vectors: Path, rows: np.ndarray, k: int, progress: bool = True) -> np.ndarray:
    """The k nearest rows (inner product) of each given row among all rows but itself, in chunks of
    the memory-mapped vectors so that a 4 GB file never has to fit in memory at once."""
    import faiss

    base = np.load(vectors, mmap_mode="r")
    queries = np.ascontiguousarray(base[rows], dtype=np.float32)
    best_scores = np.full((len(rows), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(rows), 0), dtype=np.int64)
    starts = range(0, len(base), EXACT_CHUNK)
    for start in tqdm(starts, desc="Exact neighbours", disable=not progress or len(starts) < 4):
        chunk = np.ascontiguousarray(base[start : start + EXACT_CHUNK], dtype=np.float32)
        scores, ids = faiss.knn(queries, chunk, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        ids = ids + start
        scores[ids == rows[:, None]] = -np.inf  # the query itself
        best_scores, best_ids = np.hstack([best_scores, scores]), np.hstack([best_ids, ids])
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids
