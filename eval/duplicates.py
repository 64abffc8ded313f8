"""`make eval DUPLICATES=1`: how well the near-duplicate finder (indexer.jobs.duplicates) finds planted near-copies
of real catalog photos, by threshold, to choose index.duplicates_threshold from a measurement.

    python -m eval.duplicates --catalog ../shared/datasets/grocery-store --metadata catalog.csv

In a scratch folder outside the repository (--work), 300 near-copies of distinct catalog photos are written, 60 for
each of five edits (JPEG re-encoding at quality 15, resizing to 40 %, a 5 % crop from each side, brightness x 1.3, a
white border of 8 %), each copy a product of its own (a new sku, its photo's category). The catalog is indexed as
its metadata says, then the copies as a second catalog folder (`make index ADD=1`), both with `python -m indexer
index` into the scratch data folder and the configured model (the repository's models/), and the finder runs at
each threshold, with its photo check and without (the vectors alone); at the threshold chosen, the photo check's
own level (photo_match.MATCH) is swept too. A planted pair is found when the finder pairs the copy with its photo's
product. Precision counts as false only the pairs that are neither planted nor of two genuinely identical photos:
the photos (a copy's: the one it was made from) whose 16 x 16 greyscale thumbnails differ by at most SAME_PHOTO_DIFF
on average (of 255), a stricter test than the photo check's; the catalog's own identical photos found are listed in
the results. Writes eval/duplicates/results.json and curve.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from eval.protocols import repository_path
from indexer.catalog import in_catalog
from indexer.config import REPO_ROOT, cpu_count, load_settings, run_with_config

OUT_DIR = REPO_ROOT / "eval" / "duplicates"
PLANTED_EACH = 60
SEED = 0
THRESHOLDS = [round(t, 3) for t in np.arange(0.50, 0.995, 0.02)]
MATCH_LEVELS = (0.8, 0.84, 0.86, 0.88, 0.9, 0.92, 0.94, 0.96)
# Two photos are genuinely the same when their 16 x 16 greyscale thumbnails differ by at most this on average (of
# 255): re-encoded, resized or lightly recompressed copies of one photo differ by 1-3, two photos of the same
# product taken apart by tens.
SAME_PHOTO_DIFF = 6.0
TARGET_RECALL, TARGET_PRECISION = 0.95, 0.90


def _jpeg(image: Image.Image) -> tuple[Image.Image, int]:
    return image, 15


def _resize(image: Image.Image) -> tuple[Image.Image, int]:
    return image.resize((max(1, round(image.width * 0.4)), max(1, round(image.height * 0.4))), Image.LANCZOS), 90


def _crop(image: Image.Image) -> tuple[Image.Image, int]:
    dx, dy = round(image.width * 0.05), round(image.height * 0.05)
    return image.crop((dx, dy, image.width - dx, image.height - dy)), 90


def _brightness(image: Image.Image) -> tuple[Image.Image, int]:
    return ImageEnhance.Brightness(image).enhance(1.3), 90


def _border(image: Image.Image) -> tuple[Image.Image, int]:
    return ImageOps.expand(image, border=round(max(image.size) * 0.08), fill="white"), 90


# Each edit: the copy of a photo, and the JPEG quality it is saved at.
EDITS = {
    "jpeg_q15": _jpeg,
    "resize_40": _resize,
    "crop_5": _crop,
    "brightness_1.3": _brightness,
    "white_border_8": _border,
}


def plant(catalog: Path, rows: list[dict[str, str]], folder: Path) -> dict[str, dict[str, str]]:
    """Write the near-copies and their products.csv into `folder`: planted sku -> its edit and the original's row."""
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(len(rows), size=PLANTED_EACH * len(EDITS), replace=False)
    planted, products = {}, []
    for number, row_at in enumerate(chosen):
        edit = list(EDITS)[number // PLANTED_EACH]
        row = rows[int(row_at)]
        with Image.open(catalog / row["image"]) as photo:
            copy, quality = EDITS[edit](ImageOps.exif_transpose(photo).convert("RGB"))
        sku = f"planted-{edit}-{number % PLANTED_EACH:02d}"
        image = f"{edit}/{Path(row['image']).stem}.jpg"
        (folder / edit).mkdir(parents=True, exist_ok=True)
        copy.save(folder / image, quality=quality)
        products.append({"sku": sku, "image": image, "title": f"{row['title']} (copy)", "category": row["category"]})
        planted[sku] = {"edit": edit, "original": row["sku"], "original_image": row["image"]}
    with open(folder / "products.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sku", "image", "title", "category"])
        writer.writeheader()
        writer.writerows(products)
    return planted


def index(catalog: Path, metadata: Path | None, env: dict[str, str], *extra: str) -> float:
    """`python -m indexer index` into the scratch data folder; its seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "indexer", "index", "--catalog", str(catalog), "--quiet", *extra]
    if metadata is not None:
        command += ["--metadata", str(metadata)]
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def thumbnail(path: Path) -> np.ndarray:
    with Image.open(path) as photo:
        return np.asarray(ImageOps.exif_transpose(photo).convert("L").resize((16, 16), Image.BILINEAR), np.float32)


class SamePhoto:
    """Whether two catalog photos are genuinely the same photo (the thumbnail test), each thumbnail made once."""

    def __init__(self, catalog: Path):
        self.catalog = catalog
        self._thumbnails: dict[str, np.ndarray] = {}

    def __call__(self, first: str, second: str) -> bool:
        return first == second or float(np.abs(self._of(first) - self._of(second)).mean()) <= SAME_PHOTO_DIFF

    def _of(self, image: str) -> np.ndarray:
        if image not in self._thumbnails:
            self._thumbnails[image] = thumbnail(self.catalog / image)
        return self._thumbnails[image]


def measure(found: dict[tuple[str, str], float], planted: dict[str, dict[str, str]], source: dict[str, str],
            same: SamePhoto) -> dict:  # fmt: skip
    """For the pairs found (sku, other_sku) -> similarity: the recall of the planted pairs (all and per edit), the
    precision, and the pairs counted as same-photo or false."""
    wanted = {tuple(sorted((sku, p["original"]))): p["edit"] for sku, p in planted.items()}
    hits = [pair for pair in wanted if pair in found]
    same_photo, false = [], []
    for (first, second), similarity in found.items():
        if (first, second) not in wanted:
            entry = {"sku": first, "other_sku": second, "similarity": round(similarity, 4)}
            (same_photo if same(source[first], source[second]) else false).append(entry)
    missed = [{"sku": sku, **planted[sku]} for sku in sorted(planted) if tuple(sorted((sku, planted[sku]["original"])))
              not in found]  # fmt: skip
    return {
        "pairs": len(found),
        "planted_found": len(hits),
        "recall": round(len(hits) / len(wanted), 4),
        "precision": round((len(found) - len(false)) / len(found), 4) if found else 1.0,
        "recall_by_edit": {edit: round(sum(wanted[p] == edit for p in hits) / PLANTED_EACH, 4) for edit in EDITS},
        "same_photo_pairs": sorted(same_photo, key=lambda e: -e["similarity"]),
        "false_count": len(false),
        "false_pairs": sorted(false, key=lambda e: -e["similarity"])[:20],
        "missed": missed[:30],
    }


def match_sweep(report, store, planted: dict, source: dict, same: SamePhoto) -> list[dict]:
    """The pairs the vectors proposed at one threshold, kept at each level of the photo check: its measure."""
    from indexer.jobs.photo_match import match_scores, read_thumbnails

    pairs = [(pair.sku, pair.other_sku, pair.similarity) for pair in report.pairs]
    skus = sorted({sku for pair in pairs for sku in pair[:2]})
    at = {sku: number for number, sku in enumerate(skus)}
    row, thumbnails = read_thumbnails([store.products.image_path(sku)[0] for sku in skus])
    first = row[np.array([at[a] for a, _, _ in pairs], dtype=np.int64)]
    second = row[np.array([at[b] for _, b, _ in pairs], dtype=np.int64)]
    readable = (first >= 0) & (second >= 0)
    scores = np.full(len(pairs), -np.inf, dtype=np.float32)
    scores[readable] = match_scores(thumbnails, first[readable], second[readable])
    sweep = []
    for level in MATCH_LEVELS:
        kept = {(a, b): similarity for (a, b, similarity), score in zip(pairs, scores, strict=True) if score >= level}
        sweep.append({"match": level, **measure(kept, planted, source, same)})
    return sweep


def choose(rows: list[dict]) -> dict | None:
    """The threshold to ship: of those reaching both targets, the one with the best F1 (then the higher one, whose
    check decodes fewer photos)."""
    meeting = [r for r in rows if r["recall"] >= TARGET_RECALL and r["precision"] >= TARGET_PRECISION]
    if not meeting:
        return None
    return max(
        meeting, key=lambda r: (2 * r["recall"] * r["precision"] / (r["recall"] + r["precision"]), r["threshold"])
    )


def figure(checked: list[dict], vectors_only: list[dict], chosen: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = [r["threshold"] for r in checked]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.plot(thresholds, [r["recall"] for r in checked], "o-", color="#1f77b4", label="recall of the 300 planted pairs")
    ax.plot(thresholds, [r["precision"] for r in checked], "s-", color="#d62728", label="precision")
    ax.plot(thresholds, [r["recall"] for r in vectors_only], "--", color="#1f77b4", alpha=0.5,
            label="recall, vectors alone (no photo check)")  # fmt: skip
    ax.plot(thresholds, [r["precision"] for r in vectors_only], "--", color="#d62728", alpha=0.5,
            label="precision, vectors alone")  # fmt: skip
    for edit in EDITS:
        ax.plot(thresholds, [r["recall_by_edit"][edit] for r in checked], ":", linewidth=1, label=f"recall: {edit}")
    if chosen is not None:
        ax.axvline(chosen["threshold"], color="#1e8449", linestyle="--")
        ax.annotate(f"default {chosen['threshold']:.2f}", (chosen["threshold"], 0.5), color="#1e8449",
                    xytext=(4, 0), textcoords="offset points")  # fmt: skip
    ax.axhline(TARGET_RECALL, color="#999", linewidth=0.6)
    ax.axhline(TARGET_PRECISION, color="#999", linewidth=0.6, linestyle=":")
    ax.set_xlabel("index.duplicates_threshold (cosine similarity of the stored vectors)")
    ax.set_ylim(0, 1.02)
    ax.set_title("300 near-copies planted in the grocery catalog (photo check at its default)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def build(catalog: Path, metadata: Path, work: Path) -> tuple[list[dict], dict, dict[str, float]]:
    """The catalog with its planted copies, indexed in `work`: the catalog's rows, the planted copies, seconds."""
    shutil.rmtree(work, ignore_errors=True)
    with open(metadata, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    planted = plant(catalog, rows, work / "planted")
    env = {**os.environ, "DATA_DIR": str(work / "data")}
    for name in ("SEARCH_CONFIG", "CATALOG", "METADATA", "DATABASE_URL", "VECTOR_STORE"):
        env.pop(name, None)
    seconds = {
        "index catalog": index(catalog, metadata, env),
        "index copies": index(work / "planted", None, env, "--add"),
    }
    return rows, planted, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.duplicates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", required=True, help="the catalog folder (the grocery-store dataset)")
    parser.add_argument("--metadata", help="its products file (default: <catalog>/products.csv)")
    parser.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "duplicates-eval"),
        help="scratch folder outside the repository for the copies and the index (made anew)",
    )
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)

    from indexer.jobs.duplicates import find_duplicates
    from indexer.jobs.photo_match import MATCH
    from indexer.storage.store import Store

    catalog, work = Path(args.catalog).resolve(), Path(args.work).resolve()
    if work.is_relative_to(REPO_ROOT):
        parser.error("--work must be outside the repository")
    rows, planted, seconds = build(catalog, in_catalog(catalog, args.metadata) or catalog / "products.csv", work)
    settings = load_settings().with_overrides(data_dir=work / "data", database_url="", index_backend="faiss")
    store = Store.open(settings)
    # the photo each product's pair is judged by: its own, or for a copy the one it was made from
    source = {row["sku"]: row["image"] for row in rows} | {sku: p["original_image"] for sku, p in planted.items()}
    same = SamePhoto(catalog)
    checked, vectors_only, timings = [], [], []
    for threshold in THRESHOLDS:
        for photo_check, results in ((True, checked), (False, vectors_only)):
            report = find_duplicates(settings, store, threshold=threshold, photo_check=photo_check)
            found = {(pair.sku, pair.other_sku): pair.similarity for pair in report.pairs}
            results.append({"threshold": threshold, **measure(found, planted, source, same)})
            if photo_check:
                timings.append(report.summary.seconds)
    chosen = choose(checked)
    at = chosen["threshold"] if chosen else settings.duplicates_threshold
    unchecked = find_duplicates(settings, store, threshold=at, photo_check=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "commit": commit(),
        "machine": f"{cpu_count()} cores, {platform.machine()} ({_cpu_name()})",
        "catalog": repository_path(catalog),
        "photos": len(rows),
        "planted": {"each": PLANTED_EACH, "edits": list(EDITS), "seed": SEED},
        "model": {"precision": settings.precision, "whitening": settings.whitens, "dims": settings.whitening_dims},
        "same_photo_test": f"16x16 greyscale thumbnails differing by at most {SAME_PHOTO_DIFF} of 255 on average",
        "targets": {"recall": TARGET_RECALL, "precision": TARGET_PRECISION},
        "photo_match": MATCH,
        "chosen_threshold": chosen["threshold"] if chosen else None,
        "seconds": {
            **{name: round(value, 1) for name, value in seconds.items()},
            "finder with the photo check, median of the thresholds": float(np.median(timings)),
        },
        "thresholds": checked,
        "vectors_only": vectors_only,
        "photo_match_levels": {"threshold": at, "levels": match_sweep(unchecked, store, planted, source, same)},
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    figure(checked, vectors_only, chosen, out / "curve.png")
    print(
        "threshold  recall  precision  pairs  false  same-photo | vectors alone: recall precision  " + "  ".join(EDITS)
    )
    for r, v in zip(checked, vectors_only, strict=True):
        by_edit = "  ".join(f"{r['recall_by_edit'][edit]:.2f}" for edit in EDITS)
        print(f"{r['threshold']:9.2f}  {r['recall']:6.3f}  {r['precision']:9.3f}  {r['pairs']:5d}  "
              f"{r['false_count']:5d}  {len(r['same_photo_pairs']):10d} | {v['recall']:.3f} {v['precision']:.3f}  "
              f"{by_edit}")  # fmt: skip
    for level in report["photo_match_levels"]["levels"]:
        print(f"at threshold {at}: photo match {level['match']:.2f}: recall {level['recall']:.3f}, "
              f"precision {level['precision']:.3f}")  # fmt: skip
    print(f"chosen: {chosen['threshold'] if chosen else 'none reaches the targets'}; wrote {out / 'results.json'} and "
          f"{out / 'curve.png'}", file=sys.stderr)  # fmt: skip
    return 0


def _cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
    except OSError:
        return platform.processor() or "unknown CPU"
    return names[0] if names else "unknown CPU"


if __name__ == "__main__":
    sys.exit(run_with_config(main))
