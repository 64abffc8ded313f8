"""Words beside a photo: the visual ranking and the words' ranking (indexer.storage.text) fused by reciprocal rank
fusion, score = 1/(RRF_K + visual rank) + text_weight/(RRF_K + text rank), a term for each ranking a product is in.
Each result keeps how it matched (records.Match). The words' rankings a server keeps, per change number, are here
too (WordsRankings)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from indexer.records import Match, ShownProduct

# The constant of reciprocal rank fusion (Cormack et al., 2009; what Elasticsearch, Weaviate and Milvus use).
RRF_K = 60
# How deep each ranking takes part in the fusion: the best this many products of the photo and of the words (or
# k, when more are asked for). A product deeper than this in one ranking gets no term from it.
FUSION_DEPTH = 100
# The words' rankings a server keeps, the least recently used dropped first. A ranking depends on the words, the
# filters and the catalog's state, not on the photo: a storefront's popular words recur with every photo, and ranking
# words that many products hold means scoring each of them (FTS5's bm25, PostgreSQL's ts_rank_cd), hundreds of
# milliseconds at a million products.
WORDS_RANKINGS = 256


class WordsRankings:
    """The full-text index's rankings, each read once per change number and then kept (WORDS_RANKINGS): a write
    moves the change number, so a ranking read before it is never served after it. Safe to use from many threads."""

    def __init__(self, size: int = WORDS_RANKINGS):
        self.size = size
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple, list[ShownProduct]] = OrderedDict()

    def get(self, change: int, asked: tuple, read: Callable[[], list[ShownProduct]]) -> list[ShownProduct]:
        """The ranking for `asked` (the words, filters and depth) at `change`: kept, or read() and kept."""
        key = (change, *asked)
        with self._lock:
            if (ranking := self._kept.get(key)) is not None:
                self._kept.move_to_end(key)
                return ranking
        ranking = read()  # outside the lock: other searches go on meanwhile
        with self._lock:
            self._kept[key] = ranking
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return ranking


def fuse(visual: list[ShownProduct], text: list[ShownProduct], k: int, text_weight: float) -> list[ShownProduct]:
    """The k best products of both rankings (each best first, one entry per product), by their fused score; ties
    go to the better visual rank, then the better text rank."""
    visual_ranks = {product.sku: rank for rank, product in enumerate(visual, 1)}
    text_ranks = shared_ranks(text)
    products = {product.sku: product for product in (*text, *visual)}  # the visual result's fields win

    def fused(sku: str) -> float:
        score = 0.0
        if (rank := visual_ranks.get(sku)) is not None:
            score += 1.0 / (RRF_K + rank)
        if (rank := text_ranks.get(sku)) is not None:
            score += text_weight / (RRF_K + rank)
        return score

    inf = float("inf")
    order = sorted(products, key=lambda s: (-fused(s), visual_ranks.get(s, inf), text_ranks.get(s, inf)))
    visual_scores = {product.sku: product.score for product in visual}
    return [
        products[sku].scored(fused(sku), Match(visual_ranks.get(sku), visual_scores.get(sku), text_ranks.get(sku)))
        for sku in order[:k]
    ]


def shared_ranks(text: list[ShownProduct]) -> dict[str, int]:
    """sku -> rank in the words' ranking (best first), equally relevant products sharing the better rank ("1, 2,
    2, 4"): the order among equals is arbitrary, and would otherwise favour some of them over the others."""
    ranks: dict[str, int] = {}
    previous = None
    for position, product in enumerate(text, 1):
        if previous is None or product.score != previous[0]:
            previous = (product.score, position)
        ranks[product.sku] = previous[1]
    return ranks


def words_alone(text: list[ShownProduct]) -> list[ShownProduct]:
    """The words' ranking as results: each keeps its relevance as its score, and says its text rank."""
    return [product.scored(product.score or 0.0, Match(text_rank=rank)) for rank, product in enumerate(text, 1)]
