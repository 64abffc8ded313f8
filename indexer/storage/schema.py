"""The catalog tables (SQLAlchemy 2 ORM), the engine, and schema migration. indexer.storage.store reads and writes them.

An image row's id is its vector's id in the index, and the row keeps the vector itself, so the index can
always be rebuilt from the database. Alembic migrations in migrations/ create and evolve these tables, on
SQLite (the default, a file in the data folder) and on PostgreSQL (`DATABASE_URL=postgresql+psycopg://...`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from indexer.config import REPO_ROOT
from indexer.storage.locks import MIGRATION_LOCK_KEY

# The newest migration in migrations/versions (a test checks that it is Alembic's head).
SCHEMA_REVISION = "0006"


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
    __table_args__ = (UniqueConstraint("rel_path", "view", name="uq_images_rel_path_view"),)

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
    # "catalog" rows follow the catalog folder (make index); "api" rows belong to the write API.
    source: Mapped[str] = mapped_column(String(16), default="catalog", server_default="catalog", index=True)
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

    elif engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def _postgresql_keepalives(connection, _record) -> None:
            # A writer's session holds the write lock (indexer.storage.locks): should its machine die without closing
            # the connection, the server ends the session, and so frees the lock, within about a minute.
            autocommit, connection.autocommit = connection.autocommit, True
            cursor = connection.cursor()
            cursor.execute(
                "SELECT set_config('tcp_keepalives_idle', '30', false), "
                "set_config('tcp_keepalives_interval', '10', false), set_config('tcp_keepalives_count', '3', false)"
            )
            cursor.close()
            connection.autocommit = autocommit

    return engine


def migrate(url: str) -> None:
    """Bring the database schema to the newest Alembic revision. On PostgreSQL the whole upgrade is one
    transaction (its DDL is transactional) under an advisory lock, so machines that migrate at the same
    time take turns and the later ones find nothing left to do."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    # Alembic reads the URL back through configparser, which takes % (a URL-escaped password) as interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    engine = make_engine(url)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(literal(MIGRATION_LOCK_KEY, BigInteger))))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    engine.dispose()


def shown_url(url: str) -> str:
    """The database URL to print or log: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def schema_behind(engine: Engine) -> str | None:
    """None when the database is at this code's migration (SCHEMA_REVISION); else what to do.
    Reads alembic_version directly: the service should not carry Alembic in memory."""
    try:
        with engine.connect() as connection:
            current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except ProgrammingError:  # PostgreSQL: no alembic_version table, never migrated
        current = None
    except OperationalError as exc:
        if "no such table" not in str(exc.orig):  # not SQLite's "never migrated": a server that cannot be reached
            return "the catalog database is unavailable right now; try again shortly"
        current = None
    if current == SCHEMA_REVISION:
        return None
    return f"the database schema is at {current or 'nothing'}, this code needs {SCHEMA_REVISION}: run `make migrate`"
