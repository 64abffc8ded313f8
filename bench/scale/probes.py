"""The measurements against a running server: /similar with and without filters (and its recall), photo
searches, writes timed until visible, and mixed writes while memory is sampled."""

from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from bench.scale import K
from bench.scale.products import Products
from bench.synthetic import row_of
from bench.timing import ratio, stats, until_seen
from tests.support.http import Client, result_skus

# A deleted product's witness lists this many neighbours (the service's default max_k).
WITNESS_K = 100


def measure_similar(
    client: Client, samples: dict[str, np.ndarray], products: Products, exact: np.ndarray, warm_up: list[int], seed: int
) -> dict:
    """/similar?k=10 unfiltered, in the product's own category, in another category and in a price
    range, each kind on products of its own (a product asked about twice would be answered from
    warm caches) and interleaved, so that a slow patch of the machine hits all four alike; recall@10
    of the unfiltered answers against exact search (exact: its sample's true neighbours); results
    that break their filter counted."""
    rng = np.random.default_rng(seed)
    low, high, share = products.price_range()
    price = {"min_price": f"{low:.2f}", "max_price": f"{high:.2f}"}
    kinds: dict[str, list[float]] = {kind: [] for kind in samples}
    errors = dict.fromkeys(kinds, 0)
    violations = dict.fromkeys(kinds, 0)
    short = dict.fromkeys(kinds, 0)
    recalls: list[float] = []
    for row in warm_up:  # the first use of each filter may build a cache
        client.similar(f"syn-{row:07d}")
        client.similar(f"syn-{row:07d}", category=products.category(row))
        client.similar(f"syn-{row:07d}", **price)
    for number in tqdm(range(len(samples["unfiltered"])), desc="/similar", leave=False):
        other = products.categories[int(rng.integers(len(products.categories)))]
        for kind, sample in samples.items():
            row = int(sample[number])
            sku = f"syn-{row:07d}"
            filters = {
                "unfiltered": {},
                "category_own": {"category": products.category(row)},
                "category_other": {"category": other},
                "price_range": price,
            }[kind]
            status, data, ms = client.similar(sku, **filters)
            if status != 200:
                errors[kind] += 1
                continue
            kinds[kind].append(ms)
            found = [r for r in data["results"] if r["sku"] != sku]
            short[kind] += len(found) < K
            for result in found:
                if "category" in filters and result.get("category") != filters["category"]:
                    violations[kind] += 1
                value = result.get("price")
                if kind == "price_range" and (value is None or not low <= value <= high):
                    violations[kind] += 1
            if kind == "unfiltered":
                returned = {row_of(r["sku"]) for r in found}
                recalls.append(len(returned & set(exact[number].tolist())) / K)
    base = stats(kinds["unfiltered"])["p50_ms"]
    report = {}
    for kind, values in kinds.items():
        report[kind] = {**stats(values), "errors": errors[kind], "fewer_than_k": short[kind]}
        if kind != "unfiltered":
            report[kind] |= {
                "over_unfiltered_p50": ratio(report[kind]["p50_ms"], base),
                "violations": violations[kind],
            }
    report["price_range"] |= {"min_price": round(low, 2), "max_price": round(high, 2), "share": round(share, 3)}
    report["recall_at_10"] = {
        "mean": round(float(np.mean(recalls)), 4) if recalls else None,
        "min": round(float(np.min(recalls)), 2) if recalls else None,
        "queries": len(recalls),
    }
    return report


def measure_search(client: Client, photos: list[bytes], embedder, similar_p50: float | None) -> dict:
    """POST /api/search with distinct real photos (more than the server's recent-query cache holds),
    each after embedding the same photo in-process (1 thread): the reference is one embedding plus
    one /similar, the search that needs no embedding."""
    client.search(photos[-1])  # warm-up
    http_ms, embed_ms, errors = [], [], 0
    for photo in tqdm(photos, desc="/api/search", leave=False):
        started = time.perf_counter()
        embedder.embed_image(photo)
        embed_ms.append((time.perf_counter() - started) * 1000)
        status, _, ms = client.search(photo)
        if status == 200:
            http_ms.append(ms)
        else:
            errors += 1
    embed_p50 = float(np.median(embed_ms))
    reference = embed_p50 + similar_p50 if similar_p50 is not None else None
    report = {**stats(http_ms), "errors": errors, "embed_in_process_p50_ms": round(embed_p50, 2)}
    report["reference_ms"] = round(reference, 2) if reference else None
    report["over_reference"] = ratio(report["p50_ms"], reference)
    return report


def measure_visibility(client: Client, photos: list[bytes], targets: list[tuple[str, str | None]], tag: str) -> dict:
    """PUT new products with real photos, then DELETE existing ones: from sending the request until
    a photo search shows the new sku, or until the deleted sku is gone (its GET answers 404 and a
    neighbour's /similar that showed it no longer does)."""

    def put(item: tuple[int, bytes]) -> tuple[int, object, float]:
        number, photo = item
        fields = {"title": f"Bench product {number}", "category": "bench", "price": "9.99"}
        return client.put(f"bench-{tag}-new-{number}", photo, fields)

    def shown(item: tuple[int, bytes]) -> bool:
        number, photo = item
        return f"bench-{tag}-new-{number}" in result_skus(client.search(photo)[1])

    def gone(item: tuple[str, str | None]) -> bool:
        sku, witness = item
        if client.product_status(sku) != 404:
            return False
        if witness is None:
            return True
        status, data, _ = client.similar(witness, k=WITNESS_K)
        return status == 200 and sku not in result_skus(data)

    # Until visible includes the check that saw it (for a PUT, a photo search: one embedding), so the
    # request's own latency is reported beside it.
    report: dict[str, dict] = {
        "put": until_seen("PUT until visible", list(enumerate(photos)), put, shown, "not_visible_within_s"),
        "delete": until_seen(
            "DELETE until gone", targets, lambda item: client.delete(item[0]), gone, "not_gone_within_s"
        ),
    }
    report["delete"]["with_witness"] = sum(w is not None for _, w in targets)
    return report


def delete_targets(client: Client, pool: np.ndarray, count: int, avoid: set[int]) -> list[tuple[str, str | None]]:
    """`count` products to delete, each with a witness: one of its three nearest neighbours whose
    /similar?k=100 shows it now, so that its disappearance from results can be checked. Many
    products are in no neighbour's list (the hubs are), so they are drawn from a larger pool;
    products without a witness fill up the count (checked by their 404 alone)."""
    chosen: dict[str, str | None] = {}
    witnesses: set[str] = set()
    skus = [f"syn-{row:07d}" for row in pool]
    deadline = time.monotonic() + 300
    for sku in skus:
        if len(chosen) == count or time.monotonic() > deadline:
            break
        if sku in witnesses:
            continue
        status, data, _ = client.similar(sku)
        neighbours = result_skus(data)[:3] if status == 200 else []
        for candidate in neighbours:
            if candidate in chosen or row_of(candidate) in avoid:
                continue
            if sku in result_skus(client.similar(candidate, k=WITNESS_K)[1]):
                chosen[sku] = candidate
                witnesses.add(candidate)
                break
    for sku in skus:
        if len(chosen) == count:
            break
        if sku not in chosen and sku not in witnesses:
            chosen[sku] = None
    return list(chosen.items())


def mixed_writes(client: Client, photos: list[bytes], replace_rows: list[int], delete_rows: list[int], tag: str,
                 count: int, products: Products) -> dict:  # fmt: skip
    """`count` writes in turn: PUT a new product, PUT over an existing one (new photo and fields),
    DELETE an existing one; each request's own latency and status."""
    latencies: dict[str, list[float]] = {"put_new": [], "put_replace": [], "delete": []}
    errors: list[str] = []
    deadline = time.monotonic() + 1800
    for number in tqdm(range(count), desc="Mixed writes", leave=False):
        if time.monotonic() > deadline:
            break
        kind = ("put_new", "put_replace", "delete")[number % 3]
        photo = photos[number % len(photos)]
        if kind == "put_new":
            status, data, ms = client.put(f"bench-{tag}-mix-{number}", photo, {"title": "Mixed", "price": "3.50"})
        elif kind == "put_replace":
            row = replace_rows[number // 3]
            fields = {"title": f"Replaced {row}", "category": products.category(row), "price": "12.00"}
            status, data, ms = client.put(f"syn-{row:07d}", photo, fields)
        else:
            status, data, ms = client.delete(f"syn-{delete_rows[number // 3]:07d}")
        if status in (200, 201):
            latencies[kind].append(ms)
        else:
            errors.append(f"{kind} {status}: {str(data)[:200]}")
    return {
        **{kind: stats(values) for kind, values in latencies.items()},
        "writes": sum(len(v) for v in latencies.values()),
        "errors": len(errors),
        "error_examples": errors[:3],
    }
