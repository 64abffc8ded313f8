"""A catalog made from another by label, with a held-out part of every label as its queries.

    python -m eval.holdout --catalog ../shared/datasets/grocery-store --metadata catalog.csv \
        --label coarse_category --out data/coarse

writes data/coarse/products.csv (four fifths of each label's photos, with that label as their category) and
data/coarse/queries.csv (the other fifth), both naming photos relative to the catalog folder, for
`make finetune|index|eval CATALOG=<catalog> METADATA=data/coarse/products.csv [QUERIES=data/coarse/queries.csv]`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from indexer.catalog import in_catalog
from indexer.jobs.finetune import stratified_split


def split_catalog(metadata: Path, label: str, fraction: float, seed: int, out: Path) -> tuple[int, int]:
    """Write out/products.csv and out/queries.csv; returns how many photos each holds."""
    with open(metadata, newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get(label)]
    if not rows:
        raise SystemExit(f"error: {metadata} has no rows with a '{label}' column")
    catalog, held = stratified_split([row[label] for row in rows], fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "products.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**rows[i], "category": rows[i][label]} for i in catalog)
    with open(out / "queries.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "category"])
        writer.writeheader()
        writer.writerows({"image": rows[i]["image"], "category": rows[i][label]} for i in held)
    return len(catalog), len(held)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.holdout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--metadata", required=True, help="the catalog's CSV (image, and the label column)")
    parser.add_argument("--label", default="category", help="the column that becomes the category")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of each label held out as queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    metadata = in_catalog(Path(args.catalog), args.metadata)
    kept, held = split_catalog(metadata, args.label, args.fraction, args.seed, Path(args.out))
    print(f"wrote {args.out}/products.csv ({kept} photos) and {args.out}/queries.csv ({held} held out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
