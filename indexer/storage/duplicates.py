"""The latest near-duplicate report (indexer.jobs.duplicates) in the database: replaced whole, with its pairs, by
each run in one transaction; read back a page of groups at a time, with the products of those groups that are still
live, for the review page and GET /api/duplicates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Engine

from indexer.records import ShownProduct
from indexer.storage.database import chunks
from indexer.storage.schema import LIVE, DuplicatePair, DuplicateReport, Product, ProductImage


@dataclass(frozen=True)
class ReportSummary:
    """What a report compared and found: when, the change number its vectors were as of, its threshold, whether
    pairs had to share a category and whether their photos were compared, and its counts (photos and products
    compared, groups and pairs found)."""

    created: datetime
    change: int
    threshold: float
    category_only: bool
    photo_check: bool
    photos: int
    products: int
    groups: int
    pairs: int
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "created": self.created.isoformat(timespec="seconds")}


# ReportSummary's fields after `created`, as the report row's columns.
_SUMMARY_COUNTS = (
    "change",
    "threshold",
    "category_only",
    "photo_check",
    "photos",
    "products",
    "groups",
    "pairs",
    "seconds",
)


class PairRow(NamedTuple):
    """Two products of a group (sku < other_sku) and the cosine similarity of their closest photos."""

    group: int
    sku: str
    other_sku: str
    similarity: float


@dataclass(frozen=True)
class ReviewedProduct:
    """A live product of a group as the review shows it (with its attributes), and its first photo's file."""

    product: ShownProduct
    path: str
    rel_path: str
    file_size: int | None


class Duplicates:
    """The near-duplicate report of one database (Store.duplicates)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def replace(self, summary: ReportSummary, pairs: Sequence[PairRow]) -> None:
        """Make this the latest report: the old one and its pairs go in the same transaction."""
        with self.engine.begin() as connection:
            connection.execute(delete(DuplicatePair))
            connection.execute(delete(DuplicateReport))
            values = asdict(summary)
            values["created_at"] = values.pop("created")
            report_id = connection.execute(insert(DuplicateReport).values(**values)).inserted_primary_key[0]
            for part in chunks(pairs):
                connection.execute(
                    insert(DuplicatePair),
                    [
                        {"report_id": report_id, "group_number": group, "sku": sku, "other_sku": other,
                         "similarity": float(similarity)}
                        for group, sku, other, similarity in part
                    ],
                )  # fmt: skip

    def latest(self) -> tuple[int, ReportSummary] | None:
        """(its id, the latest report's summary), or None when no report was made yet."""
        columns = [getattr(DuplicateReport, name) for name in ("id", "created_at", *_SUMMARY_COUNTS)]
        with self.engine.connect() as connection:
            row = connection.execute(select(*columns).order_by(DuplicateReport.id.desc()).limit(1)).first()
        if row is None:
            return None
        report_id, created, *counts = row
        created = created if created.tzinfo else created.replace(tzinfo=UTC)  # SQLite: naive UTC
        return int(report_id), ReportSummary(created, *counts)

    def group_count(self, report_id: int, min_similarity: float) -> int:
        """How many of the report's groups hold a pair at min_similarity or more."""
        groups = func.count(func.distinct(DuplicatePair.group_number))
        strong = (DuplicatePair.report_id == report_id) & (DuplicatePair.similarity >= min_similarity)
        with self.engine.connect() as connection:
            return int(connection.scalar(select(groups).where(strong)) or 0)

    def group_numbers(self, report_id: int, min_similarity: float, offset: int, limit: int) -> list[int]:
        """The numbers of `limit` of the report's groups that hold a pair at min_similarity or more, from `offset`,
        in order."""
        with self.engine.connect() as connection:
            numbers = connection.execute(
                select(DuplicatePair.group_number)
                .where(DuplicatePair.report_id == report_id, DuplicatePair.similarity >= min_similarity)
                .group_by(DuplicatePair.group_number)
                .order_by(DuplicatePair.group_number)
                .offset(offset)
                .limit(limit)
            ).scalars()
            return [int(number) for number in numbers]

    def pairs_of(self, report_id: int, groups: Sequence[int], min_similarity: float) -> list[PairRow]:
        """The pairs of these groups at min_similarity or more, by group, most similar first."""
        found: list[PairRow] = []
        with self.engine.connect() as connection:
            for part in chunks(list(groups)):
                rows = connection.execute(
                    select(
                        DuplicatePair.group_number, DuplicatePair.sku, DuplicatePair.other_sku, DuplicatePair.similarity
                    ).where(
                        DuplicatePair.report_id == report_id,
                        DuplicatePair.group_number.in_(part),
                        DuplicatePair.similarity >= min_similarity,
                    )
                )
                found += [PairRow(int(g), sku, other, float(s)) for g, sku, other, s in rows]
        return sorted(found, key=lambda pair: (pair.group, -pair.similarity, pair.sku, pair.other_sku))

    def live_products(self, skus: Sequence[str]) -> dict[str, ReviewedProduct]:
        """sku -> the product and its first live photo's file, for those of these skus that are live now."""
        found: dict[str, ReviewedProduct] = {}
        with self.engine.connect() as connection:
            for part in chunks(sorted(set(skus))):
                rows = connection.execute(
                    select(
                        Product.sku,
                        Product.title,
                        Product.category,
                        Product.price,
                        Product.url,
                        Product.attributes,
                        ProductImage.path,
                        ProductImage.rel_path,
                        ProductImage.file_size,
                    )
                    .join(ProductImage)
                    .where(Product.sku.in_(part), LIVE, ProductImage.view == "")
                    .order_by(ProductImage.id.desc())  # the last row of a sku wins: its first photo
                )
                for sku, title, category, price, url, attributes, path, rel_path, size in rows:
                    shown = ShownProduct(sku, title, category, price, url, attributes=attributes or {})
                    found[sku] = ReviewedProduct(shown, path, rel_path, size)
        return found
