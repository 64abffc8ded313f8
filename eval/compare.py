"""`make eval COMPARE=1`: every retrieval configuration side by side, each in its own index.

    python -m eval.compare --catalog ../shared/datasets/grocery-store --metadata catalog.csv --queries queries.csv

For the plain model and, when `make finetune` has made one, the fine-tuned model, each without and with the
catalog's whitening, and with the whitening and extra catalog views (--views, flip and crop unless "none"):
`make index` into <work>/<configuration>, then the shop-photo queries (fine labels, and
coarse ones with --coarse-label), leave-one-out, and the in-process query latency (p50 of POST /api/search, one
at a time). Writes eval/configurations.json; the table goes to docs/model.md and eval/README.md. Last, it checks
that the configuration this checkout serves (the one `make finetune` chose on held-out photos) is the best of the
four without extra views on the queries too, within the margin `make finetune` requires.
"""

from __future__ import annotations

import os

# As the server runs (service/server.py), before numpy loads OpenBLAS: its idle threads spin after each
# matrix-vector product of an exact search, and on a busy machine that more than doubled the measured latency.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from eval.protocols import K, catalog_path, product_labels, read_queries, repository_path, run_queries
from indexer.catalog import in_catalog
from indexer.config import REPO_ROOT, Settings, catalog_views, load_settings, run_with_config
from indexer.jobs.held_out import MARGIN, Candidate, best_of
from indexer.retrieval_metrics import hit_matrix, per_label, summarise

OUT_FILE = REPO_ROOT / "eval" / "configurations.json"
# Query photos timed one at a time for the latency column.
LATENCY_QUERIES = 200


def configurations(
    settings: Settings, only: str | None = None, views: tuple[str, ...] = ()
) -> list[tuple[str, Settings]]:
    """(name, settings) for plain and fine-tuned (when one is active), each without and with whitening, and
    with whitening and the extra catalog views when any are given."""
    networks = [("plain", settings.with_overrides(finetuned=None))]
    if settings.finetuned is not None:
        networks.append(("finetuned", settings))
    options = [("", {"whitening": False}), ("+whitening", {"whitening": True})]
    if views:
        options.append(("+whitening+views", {"whitening": True, "catalog_views": views}))
    return [
        (name + suffix, network.with_overrides(**{"catalog_views": (), **overrides}))
        for name, network in networks
        if only in (None, name)
        for suffix, overrides in options
    ]


def baseline_of(name: str) -> str:
    """The configuration one option fewer: what a configuration's largest category loss is measured against."""
    return name.removesuffix("+views") if name.endswith("+views") else name.removesuffix("+whitening")


def build_index(settings: Settings, catalog: Path, metadata: Path | None) -> float:
    """`make index` into settings.data_dir; returns its wall-clock seconds."""
    from indexer.embedding.model import load_embedder
    from indexer.jobs.indexing import index_catalog
    from indexer.storage.database import migrate

    started = time.perf_counter()
    migrate(settings.db_url)
    cores = settings.sharing_cores(settings.embed_workers)
    embedder = load_embedder(cores, concurrency=cores.embed_workers, catalog=catalog, metadata=metadata)
    index_catalog(cores, embedder, catalog, metadata, progress=False)
    return time.perf_counter() - started


def query_latency_ms(app, paths: list[str]) -> float:
    """p50 of one POST /api/search at a time (raw body: no multipart), in-process, after a warm-up."""
    client = app.test_client()
    times = []
    for path in paths[:1] + paths:
        photo = Path(path).read_bytes()
        started = time.perf_counter()
        response = client.post("/api/search", data=photo, content_type="image/jpeg", query_string={"k": K})
        times.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise SystemExit(f"error: {path}: {response.status_code} {response.get_json()}")
    return round(float(np.median(times[1:])) * 1000, 2)


def evaluate(settings: Settings, catalog: Path, queries_csv: Path, labels: list[str]) -> dict:
    """Each label's summary on the shop photos, leave-one-out's, the per-category R@1 and the latency."""
    from service import create_app

    app = create_app(settings)
    by_label = {label: product_labels(app, label) for label in labels}
    skus = sorted(by_label["category"])
    out: dict = {}
    for label in labels:
        queries = read_queries(queries_csv, catalog, label)
        results = run_queries(app, queries, skus)
        truth = [q[label] for q in queries]
        hits = hit_matrix(truth, [[by_label[label].get(r["sku"]) for r in rs] for rs in results], K)
        out[f"queries/{label}"] = summarise(hits)
        if label == "category":
            out["per_category_recall@1"] = {row["label"]: row["recall@1"] for row in per_label(truth, hits)}
            out["latency_p50_ms"] = query_latency_ms(app, [q["path"] for q in queries][:LATENCY_QUERIES])
    results = run_queries(app, None, skus)
    truth = [by_label["category"][s] for s in skus]
    hits = hit_matrix(truth, [[by_label["category"].get(r["sku"]) for r in rs] for rs in results], K)
    out["leave-one-out/category"] = summarise(hits)
    out["dim"] = app.extensions["catalog_search"].current().manifest.get("dim")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--metadata")
    parser.add_argument("--queries", required=True, help="CSV of query photos (image,category[,coarse label])")
    parser.add_argument("--coarse-label", help="a second, coarser label column of the queries (coarse_category)")
    parser.add_argument("--work-dir", default=str(REPO_ROOT / "data" / "eval-compare"), help="one index each")
    parser.add_argument("--only", choices=("plain", "finetuned"), help="one model's configurations")
    parser.add_argument("--views", default="flip,crop", help='extra catalog views to compare ("none": skip)')
    parser.add_argument("--out", default=str(OUT_FILE))
    args = parser.parse_args(argv)

    catalog = Path(args.catalog).resolve()
    metadata = in_catalog(catalog, args.metadata) if args.metadata else None
    queries_csv = in_catalog(catalog, args.queries)
    labels = ["category"] + ([args.coarse_label] if args.coarse_label else [])
    base = load_settings()
    report: dict = {
        "catalog": repository_path(catalog),
        "queries": catalog_path(queries_csv, catalog),
        "precision": base.precision,
        "runs": {},
    }
    views = catalog_views(args.views)
    for name, settings in configurations(base, args.only, views):
        settings = settings.with_overrides(data_dir=Path(args.work_dir) / name, database_url="")
        shutil.rmtree(settings.data_dir, ignore_errors=True)  # indexed anew: index_seconds is a whole run
        print(f"{name}: indexing {catalog.name} into {settings.data_dir} ...", file=sys.stderr, flush=True)
        seconds = build_index(settings, catalog, metadata)
        run = {"index_seconds": round(seconds, 1), **evaluate(settings, catalog, queries_csv, labels)}
        report["runs"][name] = run
        print(summary_line(name, run, labels), flush=True)
    for name, run in report["runs"].items():
        baseline = report["runs"][baseline_of(name)]
        if baseline is not run:
            run["largest_category_loss"] = largest_loss(baseline["per_category_recall@1"], run["per_category_recall@1"])
    report["active"] = active_check(base, report["runs"])
    if report["active"] is not None:
        print(active_line(report["active"]))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def active_name(settings: Settings) -> str:
    """The configuration these settings serve: the active model, with the whitening that model.whitening or the
    held-out measurement of `make finetune` chose."""
    return Candidate("finetuned" if settings.finetuned is not None else "plain", settings.whitens).name


def active_check(settings: Settings, runs: dict[str, dict]) -> dict | None:
    """Whether the active configuration is the best of the candidates `make finetune` chose among (each network
    without and with whitening) on the queries too, as it was on the held-out photos: best by R@1 with mAP@10 breaking
    near ties, or within the margin `make finetune` requires. None when the active one was not run (--only)."""
    active = active_name(settings)
    candidates = [
        Candidate(name.split("+")[0], name.endswith("+whitening"), run["queries/category"]["recall@1"],
                  run["queries/category"]["map@10"])
        for name, run in runs.items() if name.count("+") <= 1 and not name.endswith("+views")
    ]  # fmt: skip
    by_name = {candidate.name: candidate for candidate in candidates}
    if active not in by_name:
        return None
    best = best_of(candidates)
    behind = round(best.recall_at_1 - by_name[active].recall_at_1, 4)
    return {"configuration": active, "recall@1": by_name[active].recall_at_1, "best": best.name,
            "best_recall@1": best.recall_at_1, "behind": behind, "holds": behind <= MARGIN}  # fmt: skip


def active_line(check: dict) -> str:
    verdict = "holds" if check["holds"] else f"does not hold: more than {MARGIN} behind"
    return (f"check: the active configuration, {check['configuration']} (R@1 {check['recall@1']:.3f}), against the "
            f"best on the queries, {check['best']} ({check['best_recall@1']:.3f}): {verdict}")  # fmt: skip


def largest_loss(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    """The category whose R@1 fell most between two configurations."""
    label = min(before, key=lambda name: after.get(name, 0.0) - before[name])
    return {"category": label, "change": round(after.get(label, 0.0) - before[label], 4)}


def summary_line(name: str, run: dict, labels: list[str]) -> str:
    parts = [f"{name:<22}"]
    for label in labels:
        summary = run[f"queries/{label}"]
        parts.append(f"{label}: R@1 {summary['recall@1']:.3f} mAP@10 {summary['map@10']:.3f}")
    parts.append(f"leave-one-out R@1 {run['leave-one-out/category']['recall@1']:.3f}")
    parts.append(f"p50 {run['latency_p50_ms']:.1f} ms, index {run['index_seconds']:.0f} s")
    return "  ".join(parts)


if __name__ == "__main__":
    sys.exit(run_with_config(main))
