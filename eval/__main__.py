"""`make eval`: how often the search finds products of the query's category.

    python -m eval --catalog ../shared/datasets/grocery-store --metadata catalog.csv --queries queries.csv

Queries go through the service itself (POST /api/search, or GET /api/products/<sku>/similar for
leave-one-out when no query set is given) on the index in DATA_DIR, so what is measured is what
shoppers get. With --words <column>, each photo is searched again with q set to that column of the
queries file, and those figures are written beside the photo-only ones. Writes eval/results.json and
eval/hardest.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from eval.protocols import K, catalog_path, product_labels, read_queries, repository_path, run_queries
from indexer.catalog import in_catalog
from indexer.config import REPO_ROOT, load_settings, run_with_config
from indexer.index.segments import read_manifest
from indexer.retrieval_metrics import hit_matrix, per_label, summarise
from indexer.storage.store import Store

OUT_DIR = REPO_ROOT / "eval"


def hardest_figure(rows: list[dict], app, path: Path, count: int) -> None:
    from service.preview import Panel, render_grid

    search = app.extensions["catalog_search"]
    grid = []
    for row in rows[:count]:
        panels = [Panel(Path(row["query_path"]), f"query: {row['label']}", "#2c3e50")]
        for result in row["results"][:5]:
            hit = result["label"] == row["label"]
            panels.append(Panel(search.image_path(result["sku"]), f"{result['label']}\nscore {result['score']:.3f}",
                                "#1e8449" if hit else "#c0392b"))  # fmt: skip
        grid.append(panels)
    if grid:
        path.write_bytes(render_grid(grid))


def words_figures(app, queries: list[dict], column: str, labels: dict, query_labels: list) -> dict[str, object]:
    """The same photos searched with q set to `column` of their rows: the summary, and the text_weight used."""
    results = run_queries(app, queries, [], words=column)
    hits = hit_matrix(query_labels, [[labels.get(r["sku"]) for r in rs] for rs in results], K)
    text_weight = app.extensions["catalog_search"].settings.text_weight
    return {"words": column, "text_weight": text_weight, "summary": summarise(hits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", required=True, help="the catalog folder that DATA_DIR's index was built from")
    parser.add_argument("--metadata", help="accepted for symmetry with `make index`; labels come from the index")
    parser.add_argument("--queries", help="CSV of query photos (image,<label>); default: leave-one-out")
    parser.add_argument("--label", default="category", help="the column that defines a hit (default: category)")
    parser.add_argument("--words", help="a column of the queries file: also search each photo with q set to it")
    parser.add_argument("--hardest", type=int, default=8, help="queries shown in eval/hardest.png")
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)

    from service import create_app

    settings = load_settings()
    catalog = Path(args.catalog).resolve()
    # A FAISS index has a base segment on disk; a Milvus collection is checked when the service loads it.
    manifest = read_manifest(settings.index_dir) if settings.index_backend == "faiss" else {}
    if manifest is None or not Store.open(settings).vectors.holds_catalog(str(catalog)):
        print(f"error: the index in {settings.data_dir} is missing or not of {catalog};"
              f" run `make index CATALOG={args.catalog}` first (same DATA_DIR)", file=sys.stderr)  # fmt: skip
        return 2
    app = create_app(settings)
    manifest = app.extensions["catalog_search"].current().manifest
    labels = product_labels(app, args.label)
    queries = None
    if args.words and not args.queries:
        parser.error("--words needs --queries (the column is read from the queries file)")
    if args.queries:
        queries = read_queries(in_catalog(catalog, args.queries), catalog, args.label, args.words)
    skus = sorted(labels)
    started = time.perf_counter()
    results = run_queries(app, queries, skus)
    seconds = time.perf_counter() - started
    query_labels = [q[args.label] for q in queries] if queries is not None else [labels[s] for s in skus]
    query_paths = [q["path"] for q in queries] if queries is not None else [
        str(app.extensions["catalog_search"].image_path(s)) for s in skus
    ]  # fmt: skip
    for result_list in results:
        for result in result_list:
            result["label"] = labels.get(result["sku"])
    hits = hit_matrix(query_labels, [[r["label"] for r in rs] for rs in results], K)
    with_words = words_figures(app, queries, args.words, labels, query_labels) if args.words else None

    summary = summarise(hits)
    table = per_label(query_labels, hits)
    ranked = sorted(range(len(results)), key=lambda i: (hits[i].any(), hits[i].argmax() if hits[i].any() else K,
                                                       -results[i][0]["score"] if results[i] else 0))  # fmt: skip
    hardest = [{"query_path": query_paths[i], "label": query_labels[i], "results": results[i][:5]}
               for i in ranked[: args.hardest]]  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "protocol": "queries" if queries is not None else "leave-one-out",
        "label": args.label,
        "catalog": repository_path(catalog),
        "queries_file": catalog_path(in_catalog(catalog, args.queries), catalog) if args.queries else None,
        "index": {
            **{
                key: manifest.get(key)
                for key in ("version", "model", "weights_sha256", "dim", "precision", "engine", "factory")
            },
            "items": app.extensions["catalog_search"].status()["items"],
        },
        "seconds": round(seconds, 1),
        "summary": summary,
        "with_words": with_words,
        "per_label": table,
        "hardest": [{**row, "query_path": catalog_path(row["query_path"], catalog)} for row in hardest],
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    hardest_figure(hardest, app, out / "hardest.png", args.hardest)

    print(f"{report['protocol']} on {catalog.name}, label '{args.label}', {summary['queries']} queries:")
    print("  R@1 {recall@1:.3f}  R@5 {recall@5:.3f}  R@10 {recall@10:.3f}  mAP@10 {map@10:.3f}".format(**summary))
    if with_words:
        print("  with words (q = {words}, text_weight {text_weight}):".format(**with_words))
        print("  R@1 {recall@1:.3f}  R@5 {recall@5:.3f}  R@10 {recall@10:.3f}  mAP@10 {map@10:.3f}".format(
            **with_words["summary"]))  # fmt: skip
    print("  worst labels:")
    for row in table[:10]:
        print(
            f"    {row['label']:<40} R@1 {row['recall@1']:.2f}  mAP@10 {row['map@10']:.2f}  ({row['queries']} queries)"
        )
    print(f"wrote {out / 'results.json'} and {out / 'hardest.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_with_config(main))
