"""/similar at every selectivity: category, price, attribute and text filters holding each of bench.synthetic.SHARES
of the catalog, and an attribute filter with words together; each point's p50 against the unfiltered p50 of the
same run, and its recall@10 against an exact filtered scan (numpy over the matching rows).

Words are not a filter: `/similar?q=` fuses the product's neighbours with the words' ranking (the best
FUSION_DEPTH of each, indexer.index.fusion). A text point's words are held by that share of the catalog; its exact
answer is the same fusion of the exact neighbours (within the point's filters) with the words' ranking as the
server gives it for words alone (POST /api/search with q and the same filters, which the server ranks by the same
query)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from tqdm import tqdm

from bench.scale import K
from bench.scale.products import Products, exact_filtered
from bench.synthetic import SHARES, band_of, category_of, row_of, word_of
from bench.timing import ratio, stats
from indexer.config import load_settings
from indexer.index.fusion import FUSION_DEPTH, fuse
from indexer.records import ShownProduct
from tests.support.http import Client

KINDS = ("category", "price", "attribute", "text", "attribute+text")


@dataclass
class Point:
    kind: str
    share: float
    params: dict[str, str]
    passes: np.ndarray | None  # which rows the filters allow (None: all)
    words: str | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ms: list[float] = field(default_factory=list)
    recalls: list[float] = field(default_factory=list)
    errors: int = 0
    violations: int = 0
    text: list[ShownProduct] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return FUSION_DEPTH if self.words else K


def points(products: Products) -> list[Point]:
    """Every point of the sweep, its filters as sent and the rows they allow."""
    made = []
    for share in SHARES:
        low, high, _ = products.price_range(0.5 - share / 2, 0.5 + share / 2)
        priced = (products.prices >= low) & (products.prices <= high)
        band = {"attr.band": band_of(share)}
        made += [
            Point("category", share, {"category": category_of(share)}, products.in_category(category_of(share))),
            Point("price", share, {"min_price": f"{low:.2f}", "max_price": f"{high:.2f}"}, priced),
            Point("attribute", share, band, products.in_band(band_of(share))),
            Point("text", share, {"q": word_of(share)}, None, word_of(share)),
            Point(
                "attribute+text", share, {**band, "q": word_of(share)}, products.in_band(band_of(share)), word_of(share)
            ),
        ]
    return made


def words_ranking(client: Client, point: Point) -> list[ShownProduct]:
    """The words' ranking the server fuses, FUSION_DEPTH + 1 deep (the product asked about is left out of it)."""
    body = urlencode({**point.params, "k": FUSION_DEPTH}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, data, _ = client.call("POST", "/api/search", body, headers)
    if status != 200 or data is None:
        raise RuntimeError(f"words alone ({point.params}) answered {status}: {str(data)[:300]}")
    return [ShownProduct(r["sku"], r.get("title", ""), score=r["score"]) for r in data["results"]]


def measure_sweep(client: Client, products: Products, vectors: Path, requests: int, avoid: np.ndarray,
                  seed: int) -> dict:  # fmt: skip
    """Each point's /similar on `requests` products of its own, interleaved with unfiltered ones."""
    sweep = points(products)
    rng = np.random.default_rng([seed, len(products.codes), 27])
    pool = np.setdiff1d(np.arange(len(products.codes)), avoid)
    picked = rng.choice(pool, size=requests * (len(sweep) + 1), replace=False)
    unfiltered = Point("unfiltered", 1.0, {}, None, rows=picked[:requests])
    for number, point in enumerate(sweep, 1):
        point.rows = picked[number * requests : (number + 1) * requests]
        if point.words:
            point.text = words_ranking(client, point)
    answers: dict[tuple[int, int], list[str]] = {}
    for number in tqdm(range(requests), desc="/similar sweep", leave=False):
        for index, point in enumerate([unfiltered, *sweep]):
            sku = f"syn-{int(point.rows[number]):07d}"
            status, data, ms = client.similar(sku, **point.params)
            if status != 200 or data is None:
                point.errors += 1
                continue
            point.ms.append(ms)
            found = [r["sku"] for r in data["results"] if r["sku"] != sku]
            answers[(index, number)] = found
            if point.passes is not None:
                point.violations += sum(not point.passes[row_of(s)] for s in found if row_of(s) is not None)
    everything = [unfiltered, *sweep]
    queries = np.concatenate([p.rows for p in everything])
    exact = exact_filtered(vectors, queries, [p.passes for p in everything for _ in p.rows],
                           [p.depth for p in everything for _ in p.rows])  # fmt: skip
    weight = load_settings().text_weight
    at = 0
    for index, point in enumerate(everything):
        for number in range(len(point.rows)):
            best = exact[at + number]
            if point.words:
                sku = f"syn-{int(point.rows[number]):07d}"
                visual = [ShownProduct(f"syn-{r:07d}", "", score=0.0) for r in best]
                text = [p for p in point.text if p.sku != sku][:FUSION_DEPTH]
                wanted = [p.sku for p in fuse(visual, text, K, weight)]
            else:
                wanted = [f"syn-{r:07d}" for r in best[:K]]
            if (index, number) in answers and wanted:
                point.recalls.append(len(set(answers[(index, number)][:K]) & set(wanted)) / len(wanted))
        at += len(point.rows)
    base = stats(unfiltered.ms)["p50_ms"]
    return {
        "requests": requests,
        "unfiltered": {**stats(unfiltered.ms), **_recall(unfiltered)},
        "points": [
            {
                "kind": p.kind,
                "share": p.share,
                "held": _held(p, products),
                "params": p.params,
                **stats(p.ms),
                "over_unfiltered_p50": ratio(stats(p.ms)["p50_ms"], base),
                **_recall(p),
                "errors": p.errors,
                "violations": p.violations,
            }
            for p in sweep
        ],
    }


def _held(point: Point, products: Products) -> float:
    """The share of the catalog the point's filters (or, for words alone, its words) really hold."""
    held = products.with_word(point.share) if point.passes is None else point.passes
    return round(float(held.mean()), 4)


def _recall(point: Point) -> dict:
    if not point.recalls:
        return {"recall_at_10": None, "recall_at_10_min": None}
    return {"recall_at_10": round(float(np.mean(point.recalls)), 4),
            "recall_at_10_min": round(float(np.min(point.recalls)), 2)}  # fmt: skip
