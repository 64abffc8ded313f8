"""What a synthetic catalog's answers are checked against: each product's category and price, and the exact
nearest neighbours of the products asked about."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.synthetic import SHARES, word_of

# Rows of the base vectors per exact-search pass: 65,536 x 1024 float32 is 256 MB.
EXACT_CHUNK = 65_536


class Products:
    """The category, price, "band" attribute and sweep words (bench.synthetic.SHARES) of every row of a synthetic
    products CSV."""

    def __init__(self, path: Path):
        codes, prices, bands, words, names, band_names = [], [], [], [], {}, {}
        wanted = [word_of(share) for share in SHARES]
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                codes.append(names.setdefault(row["category"], len(names)))
                prices.append(float(row["price"]) if row["price"] else np.nan)
                bands.append(band_names.setdefault(row.get("band") or "", len(band_names)))
                title = set(row["title"].replace(",", " ").split())
                words.append(sum(1 << bit for bit, word in enumerate(wanted) if word in title))
        self.categories = list(names)
        self.codes = np.asarray(codes, dtype=np.int32)
        self.prices = np.asarray(prices, dtype=np.float64)
        self.bands = list(band_names)
        self.band_codes = np.asarray(bands, dtype=np.int32)
        self.words = np.asarray(words, dtype=np.uint8)

    def in_category(self, name: str) -> np.ndarray:
        return self.codes == (self.categories.index(name) if name in self.categories else -1)

    def in_band(self, name: str) -> np.ndarray:
        return self.band_codes == (self.bands.index(name) if name in self.bands else -1)

    def with_word(self, share: float) -> np.ndarray:
        return (self.words & (1 << SHARES.index(share))) > 0

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


def exact_filtered(vectors: Path, queries: np.ndarray, passes: list[np.ndarray | None], depth: list[int],
                   progress: bool = True) -> list[np.ndarray]:  # fmt: skip
    """For each query row i: the depth[i] nearest rows (inner product, best first) among the rows that passes[i]
    allows (None: every row), itself excluded; one pass over the memory-mapped vectors for all of them."""
    base = np.load(vectors, mmap_mode="r")
    query_vectors = np.ascontiguousarray(base[queries], dtype=np.float32)
    best_scores = [np.zeros(0, np.float32) for _ in queries]
    best_rows = [np.zeros(0, np.int64) for _ in queries]
    chunk_rows = EXACT_CHUNK // 4
    starts = range(0, len(base), chunk_rows)
    for start in tqdm(starts, desc="Exact filtered neighbours", disable=not progress or len(starts) < 4):
        chunk = np.ascontiguousarray(base[start : start + chunk_rows], dtype=np.float32)
        scores = query_vectors @ chunk.T
        rows = np.arange(start, start + len(chunk))
        for i, query in enumerate(queries):
            keep = np.ones(len(chunk), dtype=bool) if passes[i] is None else passes[i][start : start + len(chunk)]
            keep = keep & (rows != query)
            merged_scores = np.concatenate([best_scores[i], scores[i][keep]])
            merged_rows = np.concatenate([best_rows[i], rows[keep]])
            if len(merged_scores) > depth[i]:
                top = np.argpartition(-merged_scores, depth[i] - 1)[: depth[i]]
                merged_scores, merged_rows = merged_scores[top], merged_rows[top]
            best_scores[i], best_rows[i] = merged_scores, merged_rows
    return [rows[np.argsort(-scores, kind="stable")] for scores, rows in zip(best_scores, best_rows, strict=True)]
