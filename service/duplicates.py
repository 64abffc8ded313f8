"""The near-duplicate review: GET /api/duplicates (JSON) and GET /duplicates (a page) show the latest report of
`python -m indexer duplicates` (indexer.jobs.duplicates), a page of groups at a time, each with its products side by
side and a suggested copy to keep. Products deleted since the report are left out, and a group left with fewer than
two linked products with them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flask import Blueprint, Request, jsonify, render_template, request
from PIL import Image

from indexer.catalog import served_file
from indexer.jobs.duplicates import components
from indexer.storage.duplicates import PairRow, ReportSummary, ReviewedProduct
from service.api import catalog_search, sku_url
from service.errors import BadRequest

duplicates = Blueprint("duplicates", __name__)

DEFAULT_PER_PAGE = 20
# Groups per page at most: each group's photos are looked at (their headers) to suggest a copy to keep.
MAX_PER_PAGE = 100
# Products listed per group at most (the suggested copy first); `size` says how many the group holds.
MAX_GROUP_PRODUCTS = 100
NO_REPORT = "no duplicates report yet: run `make duplicates` (python -m indexer duplicates), then look again"


@dataclass(frozen=True)
class Photo:
    """What is known of a product's photo file: its pixels (0 when it cannot be read) and bytes."""

    width: int
    height: int
    bytes: int


@dataclass(frozen=True)
class ReviewedGroup:
    number: int
    size: int
    products: list[tuple[ReviewedProduct, Photo, int]]  # the product, its photo, its fields filled
    pairs: list[PairRow]
    keep: str


@dataclass(frozen=True)
class Review:
    report: ReportSummary | None
    threshold: float | None
    page: int
    per_page: int
    pages: int
    total_groups: int
    groups: list[ReviewedGroup]


def _whole(request: Request, name: str, default: int, most: int | None = None) -> int:
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1 or (most is not None and value > most):
        bounds = f"from 1 to {most}" if most is not None else "from 1"
        raise BadRequest(f"{name} must be a whole number {bounds}, not {raw[:40]!r}")
    return value


def _threshold(request: Request, report: ReportSummary | None) -> float | None:
    """The similarity from which pairs are shown: the report's threshold, or a higher one asked for."""
    raw = request.args.get("threshold", "").strip()
    if not raw or report is None:
        return None if report is None else report.threshold
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not report.threshold <= value <= 1.0:
        raise BadRequest(
            f"threshold must be a number from the report's {report.threshold:g} to 1, not {raw[:40]!r}; a lower "
            "one needs a new report: `make duplicates THRESHOLD=...`"
        )
    return value


def read_review(request: Request) -> Review:
    """The page of the latest report that the request asks for (page, per_page, threshold); 400 for a page past the
    last one, a per_page over MAX_PER_PAGE, or a threshold below the report's or above 1."""
    page = _whole(request, "page", 1)
    per_page = _whole(request, "per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE)
    search = catalog_search()
    stored = search.store.duplicates
    latest = stored.latest()
    report_id, report = latest if latest is not None else (None, None)
    threshold = _threshold(request, report)
    total = stored.group_count(report_id, threshold) if report_id is not None else 0
    pages = math.ceil(total / per_page)
    if page > max(pages, 1):
        raise BadRequest(f"page {page} is past the last page ({max(pages, 1)}) of {per_page} groups a page")
    groups: list[ReviewedGroup] = []
    if total:
        numbers = stored.group_numbers(report_id, threshold, (page - 1) * per_page, per_page)
        pairs = stored.pairs_of(report_id, numbers, threshold)
        products = stored.live_products([sku for pair in pairs for sku in pair[1:3]])
        uploads = search.settings.data_dir / "uploads"
        for number in numbers:
            live = [p for p in pairs if p.group == number and p.sku in products and p.other_sku in products]
            groups += [_group(number, part, products, uploads) for part in _linked(live)]
    return Review(report, threshold, page, per_page, pages, total, groups)


def _linked(pairs: list[PairRow]) -> list[list[PairRow]]:
    """The pairs of one stored group split into the sets still linked (a deleted product may have split it)."""
    skus = sorted({sku for pair in pairs for sku in pair[1:3]})
    index = {sku: n for n, sku in enumerate(skus)}
    first = np.array([index[pair.sku] for pair in pairs], dtype=np.int64)
    second = np.array([index[pair.other_sku] for pair in pairs], dtype=np.int64)
    parts: dict[int, list[PairRow]] = {}
    for pair, label in zip(pairs, components(first, second, len(skus))[first], strict=True):
        parts.setdefault(int(label), []).append(pair)
    return list(parts.values())


def _group(number: int, pairs: list[PairRow], products: dict[str, ReviewedProduct], uploads: Path) -> ReviewedGroup:
    skus = sorted({sku for pair in pairs for sku in pair[1:3]})
    shown = [(products[sku], _photo(products[sku], uploads), _fields(products[sku])) for sku in skus]
    # The copy to keep: the most fields filled, then the most pixels, then the largest file (max keeps the first of
    # equals: the first sku).
    keep = max(shown, key=lambda item: (item[2], item[1].width * item[1].height, item[1].bytes))
    ordered = [keep] + [item for item in shown if item is not keep]
    listed = {item[0].product.sku for item in ordered[:MAX_GROUP_PRODUCTS]}
    return ReviewedGroup(
        number=number,
        size=len(shown),
        products=ordered[:MAX_GROUP_PRODUCTS],
        pairs=[pair for pair in pairs if pair.sku in listed and pair.other_sku in listed],
        keep=keep[0].product.sku,
    )


def _fields(reviewed: ReviewedProduct) -> int:
    """How many of a product's fields are filled: a title other than its sku, category, price, a link, and each
    attribute with a value."""
    product = reviewed.product
    shown = [product.title != product.sku, bool(product.category), product.price is not None, product.link is not None]
    return sum(shown) + sum(1 for value in (product.attributes or {}).values() if str(value).strip())


def _photo(reviewed: ReviewedProduct, uploads: Path) -> Photo:
    """The photo's size from its header (nothing is decoded), and its bytes; 0 for what cannot be read."""
    path = served_file(reviewed.path, reviewed.rel_path, uploads)
    if path is None:
        return Photo(0, 0, 0)
    try:
        with Image.open(path) as image:
            width, height = image.size
        return Photo(width, height, path.stat().st_size)
    except (OSError, ValueError, Image.DecompressionBombError):
        return Photo(0, 0, reviewed.file_size or 0)


def review_json(review: Review) -> dict[str, object]:
    image_url, product_url = sku_url("api.product_image"), sku_url("pages.product_page")
    answer: dict[str, object] = {
        "report": review.report.as_dict() if review.report else None,
        "threshold": review.threshold,
        "page": review.page,
        "per_page": review.per_page,
        "pages": review.pages,
        "total_groups": review.total_groups,
        "groups": [
            {
                "group": group.number,
                "size": group.size,
                "keep": group.keep,
                "products": [
                    {
                        **reviewed.product.as_dict(),
                        "image_url": image_url(reviewed.product.sku),
                        "product_url": product_url(reviewed.product.sku),
                        "photo": {"width": photo.width, "height": photo.height, "bytes": photo.bytes},
                        "fields": fields,
                    }
                    for reviewed, photo, fields in group.products
                ],
                "pairs": [{"sku": p.sku, "other_sku": p.other_sku, "similarity": p.similarity} for p in group.pairs],
            }
            for group in review.groups
        ],
    }
    if review.report is None:
        answer["message"] = NO_REPORT
    return answer


@duplicates.get("/api/duplicates")
def duplicates_json():
    return jsonify(review_json(read_review(request)))


@duplicates.get("/duplicates")
def duplicates_page():
    return render_template("duplicates.html", review=read_review(request))
