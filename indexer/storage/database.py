"""Opening the database: the engine, its migration to this code's schema, and the change number ("head").

Every committed write takes the next change number inside its own transaction (`next_change`) and stamps the
image rows it touched with it, so a server brings itself up to date by reading only the rows changed after the
last number it saw. The statements are the same on SQLite and PostgreSQL; what differs says so where it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy import BigInteger, Connection, create_engine, event, func, literal, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError

from indexer.config import REPO_ROOT
from indexer.storage.locks import MIGRATION_LOCK_KEY
from indexer.storage.schema import StoreState

# The newest migration in migrations/versions (a test checks that it is Alembic's head).
SCHEMA_REVISION = "0009"
# Rows per statement: SQLite takes up to 32,766 bound parameters.
CHUNK = 2_000
# Seconds before a connection attempt to PostgreSQL is given up (libpq connect_timeout).
PG_CONNECT_TIMEOUT_S = 5


def _casefold(value: object) -> object:
    return value.casefold() if isinstance(value, str) else value


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
    else:
        # A database that restarted has closed the pooled connections: each is tested (one round trip) before use
        # and replaced, rather than failing the request that draws it. One that cannot be reached is given up
        # on after PG_CONNECT_TIMEOUT_S rather than the operating system's minutes.
        engine = create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            # WAL lets the service read while the indexer writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
            # SQLite's lower() folds ASCII only; attribute filters on words compare values as str.casefold does.
            connection.create_function("casefold", 1, _casefold, deterministic=True)

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


# --- change numbers ----------------------------------------------------------------------------

# Built once: every search reads head, and building the statement cost more CPU than running it.
_HEAD = select(StoreState.value).where(StoreState.name == "head")


def read_head(connection: Connection) -> int:
    """The newest committed change number (as of the connection's transaction)."""
    return int(connection.scalar(_HEAD) or 0)


def next_change(connection: Connection) -> int:
    """The next change number, taken inside the caller's write transaction."""
    connection.execute(update(StoreState).where(StoreState.name == "head").values(value=StoreState.value + 1))
    return read_head(connection)


def chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    """`items` a statement's worth at a time."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
