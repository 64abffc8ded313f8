"""`python -m bench.scale`: the anchors and the synthetic catalogs, each catalog measured, the re-run check, and
the report written to bench/scale.json and bench/scale.png."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import scale
from bench.record import portable, provenance
from bench.scale import log
from bench.scale.catalog import measure_catalog, sample_size
from bench.scale.commands import has_import_vectors
from bench.scale.report import chart, checks, summary
from bench.scale.rerun import measure_rerun
from bench.synthetic import (
    Photo,
    SyntheticCatalog,
    cached_or_generate,
    catalog_metadata,
    cosine_to_anchors,
    embed_photos,
    prefix,
    real_photos,
)
from bench.timing import phase
from indexer.config import REPO_ROOT, load_settings, run_with_config
from indexer.embedding.model import load_embedder

SMALL = 10_000
# The grocery-store dataset beside the repo, as `make bench` uses it.
DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=scale.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--products", type=int, default=1_000_000, help="N, the large catalog (default 1,000,000)")
    parser.add_argument("--small", type=int, default=SMALL, help="the catalog measured beside it (default 10,000)")
    parser.add_argument(
        "--rerun-files",
        type=int,
        default=None,
        help="photos for the re-run check (default 100,000 when N >= 1,000,000, else 0: skipped)",
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "scale.json"), help="the chart goes beside it")
    parser.add_argument("--work-dir", help="keep the synthetic data and data folders here (default: a temporary one)")
    parser.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="real photos for the anchors and the queries")
    parser.add_argument("--anchors", type=int, default=300, help="real photos embedded as cluster anchors")
    parser.add_argument("--requests", type=int, default=200, help="products asked /similar about (and recall)")
    parser.add_argument(
        "--sweep-requests",
        type=int,
        default=40,
        help="products asked /similar about at each point of the selectivity sweep (0: no sweep)",
    )
    parser.add_argument("--searches", type=int, default=100, help="photo searches")
    parser.add_argument("--writes", type=int, default=20, help="PUTs and DELETEs timed until visible")
    parser.add_argument("--rss-writes", type=int, default=100, help="mixed writes while memory is sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--import-timeout", type=float, default=4 * 3600, help="seconds")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds")
    args = parser.parse_args(argv)
    if args.rerun_files is None:
        args.rerun_files = 100_000 if args.products >= 1_000_000 else 0
    if min(args.products, args.small) < sample_size(args):
        parser.error("--products and --small must be at least 4 x requests + 10 x writes + rss-writes (samples)")
    if args.anchors <= args.searches + args.writes:
        parser.error("--anchors must be more than searches + writes: each PUT and search has a photo of its own")
    return args


def anchor_photos(args: argparse.Namespace, embedder, results: dict) -> tuple[list[Photo], np.ndarray] | None:
    """Real photos, each embedded: the anchors the synthetic vectors cluster around, and the photos that the
    searches and PUTs send. None (said why) when there are too few."""
    with phase(results["phase_seconds"], "anchors"):
        source, photos = real_photos(args.anchors, Path(args.photos), args.seed)
        if len(photos) <= args.searches + args.writes:
            log(f"{source} has {len(photos)} usable photos; --searches + --writes must be fewer")
            return None
        anchors = embed_photos(embedder, photos)
    categories = [photo.category for photo in photos]
    results["anchors"] = {"source": source, "photos": len(photos), "categories": len(set(categories))}
    return photos, anchors


def synthetic_catalogs(
    args: argparse.Namespace, work: Path, embedder, photos: list[Photo], anchors: np.ndarray, results: dict
) -> list[SyntheticCatalog]:
    """The large catalog (reused from a kept --work-dir when its inputs are the same) and the small one, its first
    rows."""
    with phase(results["phase_seconds"], "generate"):
        identity = {"model": embedder.identity.as_dict(), "source": results["anchors"]["source"]}
        categories = [photo.category for photo in photos]
        large, reused = cached_or_generate(work / f"synthetic-{args.products}", args.products, anchors, categories,
                                           args.seed, identity)  # fmt: skip
        catalogs = [large]
        if args.small < args.products:
            catalogs.insert(0, prefix(large, work / f"synthetic-{args.small}", args.small))
    results["synthetic"] = {"reused": reused, "vectors_bytes": large.vectors.stat().st_size,
                            "cosine": cosine_to_anchors(large, anchors, seed=args.seed)}  # fmt: skip
    return catalogs


def measure_catalogs(
    args: argparse.Namespace, work: Path, catalogs: list[SyntheticCatalog], photos: list[Photo], embedder, results: dict
) -> bool:
    """Each catalog measured in turn, into results["catalogs"]; whether all of them were."""
    measured = True
    for catalog in catalogs:
        with phase(results["phase_seconds"], f"catalog_{catalog.count}"):
            try:
                results["catalogs"][str(catalog.count)] = measure_catalog(
                    catalog, work, [p.data for p in photos], embedder, args
                )
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
                measured = False
                log(f"{catalog.count:,} products failed: {exc}")
                results["catalogs"][str(catalog.count)] = {"products": catalog.count, "error": str(exc)[-4000:]}
    return measured


def rerun_check(args: argparse.Namespace, work: Path, results: dict) -> bool:
    """The re-run check, when --rerun-files asks for it, into results["rerun"]; whether it ran without error."""
    if not args.rerun_files:
        results["rerun"] = None
        return True
    with phase(results["phase_seconds"], "rerun"):
        try:
            results["rerun"] = measure_rerun(work, args.rerun_files, args.seed, args)
        except (RuntimeError, OSError) as exc:
            log(f"re-run check failed: {exc}")
            results["rerun"] = {"files": args.rerun_files, "error": str(exc)[-4000:]}
            return False
    return True


def write_report(results: dict, out: Path, work: Path, photos: Path) -> None:
    """The results (their paths relative to the repository, the work folder as <work-dir>), the chart and the
    summary."""
    results["checks"] = checks(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(portable(results, work, (photos,)), indent=2))
    chart(results, out.with_suffix(".png"))
    print(summary(results))
    log(f"wrote {out} and {out.with_suffix('.png')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if not has_import_vectors():
        log("`python -m indexer import-vectors` does not exist in this checkout yet")
        return 2
    results: dict = {**provenance(),
                     "products": args.products, "small": min(args.small, args.products), "seed": args.seed,
                     "catalogs": {}, "phase_seconds": {}}  # fmt: skip
    everything = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", ignore_cleanup_errors=True) as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # One single-threaded interpreter: as the server's request threads run theirs. An int8 model not yet
        # calibrated is calibrated on the real photos.
        photo_folder = Path(args.photos) if Path(args.photos).is_dir() else None
        metadata = catalog_metadata(photo_folder) if photo_folder else None
        embedder = load_embedder(load_settings().with_overrides(model_threads=1), catalog=photo_folder,
                                 metadata=metadata)  # fmt: skip
        anchored = anchor_photos(args, embedder, results)
        if anchored is None:
            return 2
        photos, anchors = anchored
        catalogs = synthetic_catalogs(args, work, embedder, photos, anchors, results)
        measured = measure_catalogs(args, work, catalogs, photos, embedder, results)
        reran = rerun_check(args, work, results)
    results["phase_seconds"]["total"] = round(time.perf_counter() - everything, 1)
    write_report(results, Path(args.out), work, Path(args.photos))
    return 0 if measured and reran else 1


if __name__ == "__main__":
    sys.exit(run_with_config(main))
