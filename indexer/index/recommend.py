"""More like these, less like those: the products nearest to liked examples and away from unliked ones, by one of
two rules (service.recommend_rule), through the one filtered search of CatalogSearch.

- "average_vector": one search for normalize(mean(liked) - unlike_weight x mean(unliked)); a result's score is its
  cosine similarity to that vector.
- "best_score" (as Qdrant's of that name): the candidates are the nearest images of each liked example; each is
  scored by its best cosine similarity to a liked example when that beats its best to an unliked one, and otherwise
  ranks below every such product, the lower the nearer it is to an unliked one (-1 - ((1 + best unliked) / 2)^2).

Both were measured on the grocery catalog (eval/recommend.py, eval/README.md "Recommend"): "average_vector" at an
unlike weight of 0.25, the default, kept the most of the liked category in the top 10 and cut the unliked one's by 60 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.config import RECOMMEND_RULES
from indexer.errors import UnknownProduct
from indexer.index.fusion import FUSION_DEPTH, fuse
from indexer.index.live_index import NO_FILTERS, Filters
from indexer.index.search import CatalogSearch, IndexView
from indexer.records import ShownProduct
from indexer.storage.text import Words

# best_score widens its candidates (each liked example's nearest images) fourfold while a product outside them could
# still outrank the k-th result, up to this many images per liked example.
MAX_CANDIDATES = 10_000
# A mean of liked and unliked vectors shorter than this points nowhere (the same products liked and unliked).
NO_DIRECTION = 1e-6


@dataclass(frozen=True)
class Examples:
    """What a recommendation starts from: unit vectors of the view's model, and the catalog products among the
    examples (never results)."""

    liked: np.ndarray  # (n >= 1, dim)
    unliked: np.ndarray  # (m >= 0, dim)
    skus: frozenset[str] = frozenset()


def recommend(
    search: CatalogSearch,
    view: IndexView,
    examples: Examples,
    k: int,
    filters: Filters = NO_FILTERS,
    words: Words | None = None,
    rule: str | None = None,
    unlike_weight: float | None = None,
) -> list[ShownProduct]:
    """The k best products for the examples by `rule` (default service.recommend_rule), best first, one per product,
    the examples' own products left out; with `words`, fused with the products that hold them as a search is."""
    settings = search.settings
    rule = rule or settings.recommend_rule
    if rule not in RECOMMEND_RULES:
        raise ValueError(f"unknown recommend rule {rule!r}; choose {' or '.join(RECOMMEND_RULES)}")
    weight = settings.unlike_weight if unlike_weight is None else unlike_weight
    depth = max(k, FUSION_DEPTH) if words is not None else k
    # Each example's product may be among the best: ask for that many more.
    count = depth + len(examples.skus)
    if rule == "average_vector":
        ranking = _average_vector(search, view, examples, count, filters, weight)
    else:
        ranking = _best_score(search, view, examples, count, filters)
    visual = [product for product in ranking if product.sku not in examples.skus][:depth]
    if words is None:
        return visual[:k]
    text = search.words_ranking(view, words, count, filters)
    text = [product for product in text if product.sku not in examples.skus][:depth]
    return fuse(visual, text, k, settings.text_weight)


def average_query(examples: Examples, unlike_weight: float) -> np.ndarray | None:
    """normalize(mean(liked) - unlike_weight x mean(unliked)); the liked mean alone when that points nowhere (the
    same products liked and unliked), None when it too does."""
    liked = examples.liked.mean(axis=0)
    query = liked - unlike_weight * examples.unliked.mean(axis=0) if len(examples.unliked) else liked
    for vector in (query, liked):
        norm = float(np.linalg.norm(vector))
        if norm > NO_DIRECTION:
            return (vector / norm).astype(np.float32)
    return None


def best_scores(vectors: np.ndarray, examples: Examples) -> np.ndarray:
    """Each vector's best_score: its best cosine similarity to a liked example when that beats its best to an
    unliked one, else -1 - ((1 + best unliked) / 2)^2, below any cosine."""
    liked = (vectors @ examples.liked.T).max(axis=1)
    if not len(examples.unliked):
        return liked
    unliked = (vectors @ examples.unliked.T).max(axis=1)
    return np.where(liked > unliked, liked, -1.0 - ((1.0 + unliked) / 2.0) ** 2).astype(np.float32)


def _average_vector(
    search: CatalogSearch, view: IndexView, examples: Examples, count: int, filters: Filters, weight: float
) -> list[ShownProduct]:
    query = average_query(examples, weight)
    return [] if query is None else search.search(view, query, count, filters)


def _best_score(
    search: CatalogSearch, view: IndexView, examples: Examples, count: int, filters: Filters
) -> list[ShownProduct]:
    rows = search.rows_for(count)
    while True:
        found = [search.neighbours(view, vector, rows, filters) for vector in examples.liked]
        ids = np.unique(np.concatenate([ids for ids, _ in found]))
        held = [view.live.vector_of(int(image_id)) for image_id in ids]
        if len(ids) and all(vector is None for vector in held):
            held = _stored_vectors(search, view, ids)  # the vectors are in a Milvus collection, not in this server
        kept = [i for i, vector in enumerate(held) if vector is not None]  # None: deleted since
        ids = ids[kept]
        scores = best_scores(np.stack([held[i] for i in kept]), examples) if kept else np.zeros(0, np.float32)
        order = np.argsort(-scores, kind="stable")
        matches = search.matches(view, ids[order], scores[order], count)
        # An image outside the candidates is no nearer to liked example i than the last of its full list: none can
        # outrank a k-th result at least as good as the best of those.
        full = [float(scores_i[-1]) for _, scores_i in found if len(scores_i) == rows]
        if not full or (len(matches) == count and matches[-1].score >= max(full)) or rows >= MAX_CANDIDATES:
            return matches
        rows = min(rows * 4, MAX_CANDIDATES)


def _stored_vectors(search: CatalogSearch, view: IndexView, ids: np.ndarray) -> list[np.ndarray | None]:
    """The images' vectors where this server holds none (index.backend = "milvus"): each one's product's own, read
    from the store as /similar reads it; None for an image whose product is gone."""
    products = view.rows.get([int(image_id) for image_id in ids])
    vectors: dict[str, np.ndarray | None] = {}
    for product in products.values():
        if product is not None and product.sku not in vectors:
            try:
                vectors[product.sku] = search.product_vector(view, product.sku)
            except UnknownProduct:
                vectors[product.sku] = None
    return [None if (product := products.get(int(image_id))) is None else vectors[product.sku] for image_id in ids]
