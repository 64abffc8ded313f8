"""The catalog tables (SQLAlchemy 2 ORM) and the conditions every query shares (which rows are live).

An image row's id is its vector's id in the index, and the row keeps the vector itself, so the index can
always be rebuilt from the database. Alembic migrations in migrations/ create and evolve these tables, on
SQLite (the default, a file in the data folder) and on PostgreSQL (`DATABASE_URL=postgresql+psycopg://...`);
indexer.storage.database opens the engine and runs them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    UniqueConstraint,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Where an image row came from (its `source`): the catalog folder (`make index`), the write API, or a vector import.
CATALOG, API, IMPORT = "catalog", "api", "import"

# The types that differ between the two databases (the migrations spell out the same): JSON documents are
# JSONB on PostgreSQL; times carry their time zone (timestamptz; SQLite keeps the UTC wall-clock text either
# way); vectors are BLOB on SQLite, bytea on PostgreSQL.
JSON_DOCUMENT = JSON().with_variant(JSONB(), "postgresql")
TIMESTAMP = DateTime(timezone=True)


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(512), unique=True)
    title: Mapped[str] = mapped_column(String(1024))
    category: Mapped[str | None] = mapped_column(String(256), index=True)
    price: Mapped[float | None] = mapped_column(Float)
    url: Mapped[str | None] = mapped_column(String(2048))
    attributes: Mapped[dict] = mapped_column(JSON_DOCUMENT, default=dict)
    images: Mapped[list[ProductImage]] = relationship(
        back_populates="product", cascade="all, delete-orphan", order_by="ProductImage.id"
    )


class ProductImage(Base):
    __tablename__ = "images"
    # Variants: several products may share a photo, each with its own rows (one category and price per vector row
    # for the index's filters), so a photo's rows are unique per product; rel_path first serves lookups by file.
    __table_args__ = (UniqueConstraint("rel_path", "view", "product_id", name="uq_images_rel_path_view_product"),)

    # Also the vector's id in the FAISS index.
    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), index=True)
    # Relative to the catalog folder; the absolute path is what the service reads.
    rel_path: Mapped[str] = mapped_column(String(2048))
    # "" for the photo itself; else an extra view of it (index.catalog_views: "flip", "crop"), one more vector
    # of the same product that follows its photo (same file, same product, re-embedded and removed with it).
    view: Mapped[str] = mapped_column(String(16), default="", server_default="")
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    model_key: Mapped[str] = mapped_column(String(128))
    # CATALOG rows follow the catalog folder (make index); API rows belong to the write API; IMPORT rows to
    # import-vectors.
    source: Mapped[str] = mapped_column(String(16), default=CATALOG, server_default=CATALOG, index=True)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(TIMESTAMP, default=_now, onupdate=_now)
    # Set when the image leaves the catalog: the row stays (hidden) while index versions that
    # may still be in use refer to its id, then it is purged.
    deleted_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, index=True)
    # The change number of the row's last change (vector, tombstone, or a shown product field):
    # servers apply the rows changed after the last number they saw.
    change: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0", index=True)
    # The file's size and mtime when last read: a re-run reads only files whose stat differs.
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    file_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    product: Mapped[Product] = relationship(back_populates="images")


class WhiteningRow(Base):
    """A whitening fitted on the catalog (indexer.embedding.whitening); the newest of a network's is the one in use."""

    __tablename__ = "whitenings"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    network_key: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(32))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP, default=_now)


class StoreState(Base):
    """Named counters; "head" is the newest committed change number."""

    __tablename__ = "store_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class DuplicateReport(Base):
    """The latest near-duplicate report (indexer.jobs.duplicates): each run replaces it, with its pairs, in one
    transaction, so every server shows the same one and backups hold it."""

    __tablename__ = "duplicate_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP)
    # the change number whose vectors were compared
    change: Mapped[int] = mapped_column(BigInteger)
    threshold: Mapped[float] = mapped_column(Float)
    category_only: Mapped[bool] = mapped_column(Boolean)
    # whether each pair's photos were compared (indexer.jobs.photo_match), or the vectors alone decided
    photo_check: Mapped[bool] = mapped_column(Boolean)
    photos: Mapped[int] = mapped_column(BigInteger)
    products: Mapped[int] = mapped_column(BigInteger)
    groups: Mapped[int] = mapped_column(BigInteger)
    pairs: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)


class DuplicatePair(Base):
    """Two products of a report's group whose photos are near-identical, by sku (sku < other_sku), and the cosine
    similarity of their closest photos. Groups are numbered from 1, most similar first."""

    __tablename__ = "duplicate_pairs"
    __table_args__ = (Index("ix_duplicate_pairs_report_group", "report_id", "group_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("duplicate_reports.id", ondelete="CASCADE"))
    group_number: Mapped[int] = mapped_column(BigInteger)
    sku: Mapped[str] = mapped_column(String(512))
    other_sku: Mapped[str] = mapped_column(String(512))
    similarity: Mapped[float] = mapped_column(Float)


# Images that searches may show; products are live while they have one.
LIVE = ProductImage.deleted_at.is_(None)
# A product is live while it has a live image. EXISTS, not IN (SELECT ...): SQLite would materialise the
# live image ids of the whole catalog (seconds at a million) for a lookup of one product.
HAS_LIVE_IMAGE = select(ProductImage.id).where(ProductImage.product_id == Product.id, LIVE).exists()
# NOT EXISTS, not NOT IN (SELECT ...): PostgreSQL runs it as an anti-join; NOT IN over a subquery larger than
# work_mem would scan the subquery once per product.
HAS_IMAGE = select(ProductImage.id).where(ProductImage.product_id == Product.id).exists()
