"""The catalog tables (SQLAlchemy 2 ORM), the engine, and schema migration. indexer.store reads and writes them.

An image row's id is its vector's id in the index, and the row keeps the vector itself, so the index can
always be rebuilt from the database. Alembic migrations in migrations/ create and evolve these tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, LargeBinary, String, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from indexer.config import REPO_ROOT

# The newest migration in migrations/versions (a test checks that it is Alembic's head).
SCHEMA_REVISION = "0004"


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
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    images: Mapped[list[ProductImage]] = relationship(
        back_populates="product", cascade="all, delete-orphan", order_by="ProductImage.id"
    )


class ProductImage(Base):
    __tablename__ = "images"

    # Also the vector's id in the FAISS index.
    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), index=True)
    # Relative to the catalog folder; the absolute path is what the service reads.
    rel_path: Mapped[str] = mapped_column(String(2048), unique=True)
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    model_key: Mapped[str] = mapped_column(String(128))
    # "catalog" rows follow the catalog folder (make index); "api" rows belong to the write API.
    source: Mapped[str] = mapped_column(String(16), default="catalog", server_default="catalog", index=True)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    # Set when the image leaves the catalog: the row stays (hidden) while index versions that
    # may still be in use refer to its id, then it is purged.
    deleted_at: Mapped[datetime | None] = mapped_column(index=True)
    # The change number of the row's last change (vector, tombstone, or a shown product field):
    # servers apply the rows changed after the last number they saw.
    change: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0", index=True)
    # The file's size and mtime when last read: a re-run reads only files whose stat differs.
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    file_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    product: Mapped[Product] = relationship(back_populates="images")


class StoreState(Base):
    """Named counters; "head" is the newest committed change number."""

    __tablename__ = "store_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


# Images that searches may show; products are live while they have one.
LIVE = ProductImage.deleted_at.is_(None)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            # WAL lets the service read while the indexer writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


def migrate(url: str) -> None:
    """Bring the database schema to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    engine = make_engine(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    engine.dispose()


def schema_behind(engine: Engine) -> str | None:
    """None when the database is at this code's migration (SCHEMA_REVISION); else what to do.
    Reads alembic_version directly: the service should not carry Alembic in memory."""
    try:
        with engine.connect() as connection:
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError:  # no alembic_version table: never migrated
        current = None
    if current == SCHEMA_REVISION:
        return None
    return f"the database schema is at {current or 'nothing'}, this code needs {SCHEMA_REVISION}: run `make migrate`"
