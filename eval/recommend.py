"""`make eval RECOMMEND=1`: the two rules of POST /api/recommend, measured on the index in DATA_DIR.

    python -m eval.recommend --catalog ../shared/datasets/grocery-store [--trials 10] [--seed 0]

Leave-one-out over the catalog's own products: for each trial, two products of a category are liked and one product
of its nearest other category (by the cosine of the categories' mean vectors) is unliked. Each trial asks the
service (POST /api/recommend, through the app itself) for 10 results, by each rule, with and without the unlike;
the examples are never results. A trial counts the share of those 10 of the liked category (precision@10), of the
unliked one, and whether the first is of the liked one. Writes eval/recommend/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from bench.record import provenance
from eval.protocols import K, product_labels, repository_path
from indexer.config import REPO_ROOT, cpu_count, load_settings, run_with_config
from indexer.storage.store import Store

OUT_DIR = REPO_ROOT / "eval" / "recommend"
# (name, rule, whether the unlike is sent, the unlike weight): each rule with and without the unlike, and the
# average vector's weight at a few values.
CONFIGURATIONS = [
    ("average_vector, like only", "average_vector", False, None),
    *((f"average_vector, unlike weight {w}", "average_vector", True, w) for w in (0.1, 0.25, 0.5, 0.75, 1.0)),
    ("best_score, like only", "best_score", False, None),
    ("best_score, with unlike", "best_score", True, None),
]


def nearest_categories(store: Store, model_key: str, dim: int) -> dict[str, tuple[str, float]]:
    """category -> its nearest other category and their cosine, by the categories' normalised mean vectors."""
    sums: dict[str, np.ndarray] = {}
    for _, vectors, categories in store.vectors.labelled(model_key, dim, views=False):
        for vector, category in zip(vectors, categories, strict=True):
            if category is not None:
                sums[category] = sums.get(category, 0) + vector
    names = sorted(sums)
    centroids = np.stack([sums[name] / np.linalg.norm(sums[name]) for name in names])
    similarity = centroids @ centroids.T
    np.fill_diagonal(similarity, -np.inf)
    return {name: (names[int(row.argmax())], float(row.max())) for name, row in zip(names, similarity, strict=True)}


def trials(labels: dict[str, str | None], nearest: dict, per_category: int, seed: int) -> list[dict]:
    """Two liked products of a category and one unliked of its nearest, `per_category` times a category (each
    category with at least three products: two liked and one to find)."""
    rng = random.Random(seed)
    by_category: dict[str, list[str]] = {}
    for sku, category in sorted(labels.items()):
        if category is not None:
            by_category.setdefault(category, []).append(sku)
    chosen = []
    for category in sorted(by_category):
        skus, other = by_category[category], nearest[category][0]
        if len(skus) < 3:
            continue
        for _ in range(per_category):
            like = rng.sample(skus, 2)
            chosen.append({"category": category, "unliked_category": other, "like": like,
                           "unlike": [rng.choice(by_category[other])]})  # fmt: skip
    return chosen


def measured(app, trial: dict, with_unlike: bool, labels: dict) -> dict[str, float]:
    body = {"like": trial["like"], "k": K, **({"unlike": trial["unlike"]} if with_unlike else {})}
    response = app.test_client().post("/api/recommend", json=body)
    if response.status_code != 200:
        raise SystemExit(f"error: {body}: {response.status_code} {response.get_json()}")
    found = [labels.get(result["sku"]) for result in response.get_json()["results"]]
    return {
        "precision@10": sum(label == trial["category"] for label in found) / K,
        "unliked@10": sum(label == trial["unliked_category"] for label in found) / K,
        "hit@1": float(bool(found) and found[0] == trial["category"]),
        "took_ms": response.get_json()["took_ms"],
    }


def mean(measures: list[dict[str, float]], key: str) -> float | None:
    return round(float(np.mean([m[key] for m in measures])), 4) if measures else None


def print_table(rows: dict[str, dict], contested: int) -> None:
    print(f"  {'configuration':<36} {'precision@10':>12} {'unliked@10':>10} {'hit@1':>6} {'ms':>5}   "
          f"contested ({contested}): precision@10, unliked@10")  # fmt: skip
    for name, row in rows.items():
        figures = f"{row['precision@10']:>12.3f} {row['unliked@10']:>10.3f} {row['hit@1']:>6.3f} {row['took_ms']:>5.1f}"
        print(f"  {name:<36} {figures}   {row['contested']['precision@10']:.3f}, {row['contested']['unliked@10']:.3f}")


def configured_apps(settings) -> Iterator[tuple[str, object, bool]]:
    """(name, an app serving that configuration, whether its requests send the unlike), one model for all."""
    from service import create_app

    embedder = None
    for name, rule, with_unlike, weight in CONFIGURATIONS:
        overrides = {"recommend_rule": rule} | ({} if weight is None else {"unlike_weight": weight})
        app = create_app(settings.with_overrides(**overrides), embedder)
        embedder = app.extensions["catalog_search"].embedder
        yield name, app, with_unlike


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", required=True, help="the catalog folder that DATA_DIR's index was built from")
    parser.add_argument("--trials", type=int, default=10, help="trials per category (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)

    from tqdm import tqdm

    settings = load_settings()
    catalog = Path(args.catalog).resolve()
    store = Store.open(settings)
    if not store.vectors.holds_catalog(str(catalog)):
        print(f"error: the index in {settings.data_dir} is not of {catalog}; run `make index CATALOG={args.catalog}`"
              " first (same DATA_DIR)", file=sys.stderr)  # fmt: skip
        return 2
    found: dict[str, list[dict]] = {}
    rows: dict[str, dict] = {}
    for name, app, with_unlike in configured_apps(settings):
        search = app.extensions["catalog_search"]
        identity = search.current().identity
        if not rows:  # the same trials for every configuration
            labels = product_labels(app, "category")
            nearest = nearest_categories(store, identity.key, identity.dim)
            chosen = trials(labels, nearest, args.trials, args.seed)
        with ThreadPoolExecutor(max_workers=cpu_count()) as pool:
            work = pool.map(partial(measured, app, with_unlike=with_unlike, labels=labels), chosen)
            found[name] = list(tqdm(work, total=len(chosen), desc=name, unit="trial"))
        rule, weight = search.settings.recommend_rule, search.settings.unlike_weight
        rows[name] = {"rule": rule, "unlike": with_unlike, "unlike_weight": weight if with_unlike else None}
        if rule == "best_score":
            rows[name]["unlike_weight"] = None  # the rule has none
    # The trials where the unlike has something to do: a product of the unliked category in either rule's top 10
    # without it.
    contested = [i for i in range(len(chosen)) if any(found[n][i]["unliked@10"] for n in found if "like only" in n)]
    for name, row in rows.items():
        row |= {key: mean(found[name], key) for key in found[name][0]}
        row["contested"] = {
            key: mean([found[name][i] for i in contested], key) for key in ("precision@10", "unliked@10")
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        **provenance(),
        "protocol": "leave-one-out: 2 liked products of a category, 1 unliked of its nearest category, top 10",
        "catalog": repository_path(catalog),
        "index": {key: search.current().manifest.get(key) for key in ("version", "model", "precision", "factory")},
        "trials": len(chosen),
        "contested_trials": len(contested),
        "categories": len({trial["category"] for trial in chosen}),
        "seed": args.seed,
        "results": rows,
        "nearest_categories": {
            name: {"nearest": other, "cosine": round(cosine, 4)} for name, (other, cosine) in sorted(nearest.items())
        },
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{len(chosen)} trials over {report['categories']} categories of {catalog.name} (commit {report['commit']}):")
    print_table(rows, len(contested))
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_with_config(main))
