"""The catalog store: one database engine, and what is kept in it by concern.

    store.products   products and the writes that start from one (indexer.storage.products)
    store.vectors    image rows, their vectors and the change log (indexer.storage.vectors)
    store.models     whitenings and other model metadata (indexer.storage.models)
    store.text       the full-text index of the products' words, and searching it (indexer.storage.text)
    store.duplicates the latest near-duplicate report (indexer.storage.duplicates)

The store itself opens the database and reads the change number ("head") that every committed write takes
(indexer.storage.database); the writers' and compaction's locks are in indexer.storage.locks.
"""

from __future__ import annotations

import sqlite3
import threading

from sqlalchemy.engine import Engine

from indexer.config import Settings
from indexer.storage.database import make_engine, migrate, read_head, schema_behind
from indexer.storage.duplicates import Duplicates
from indexer.storage.models import Models
from indexer.storage.products import Products
from indexer.storage.text import ProductText
from indexer.storage.vectors import Vectors


class Store:
    """One database: its engine, and its products, vectors and model rows as attributes."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.products = Products(engine)
        self.vectors = Vectors(engine)
        self.models = Models(engine)
        self.text = ProductText(engine)
        self.duplicates = Duplicates(engine)
        # SQLite: a connection of its own for change_marker, opened at the first call.
        self._marker_connection = None
        self._marker_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings, *, upgrade: bool = True) -> Store:
        """The configured database, migrated to the newest schema first (unless upgrade=False)."""
        engine = make_engine(settings.db_url)
        # Alembic (imported and run) only when the schema is behind: it adds ~0.2 s to every start.
        if upgrade and schema_behind(engine):
            migrate(settings.db_url)
        return cls(engine)

    def schema_problem(self) -> str | None:
        return schema_behind(self.engine)

    def head(self) -> int:
        """The newest committed change number."""
        with self.engine.connect() as connection:
            return read_head(connection)

    def change_marker(self) -> int | None:
        """A number that differs from the last one read whenever another connection has committed since: SQLite's
        data_version, on a connection kept for it (a server reads it before every search, and it costs a fraction
        of reading head through a query). None where there is no such number (PostgreSQL) or it could not be
        read: read head then."""
        if self.engine.dialect.name != "sqlite":
            return None
        with self._marker_lock:
            try:
                if self._marker_connection is None:
                    # Never writes, and never holds a transaction open: each read sees the newest commit.
                    self._marker_connection = self.engine.raw_connection()
                cursor = self._marker_connection.cursor()
                try:
                    return int(cursor.execute("PRAGMA data_version").fetchone()[0])
                finally:
                    cursor.close()
            except sqlite3.Error:
                if self._marker_connection is not None:
                    connection, self._marker_connection = self._marker_connection, None
                    connection.invalidate()  # not back into the pool: it may be broken
                return None  # the caller reads head, which fails with the reason if the database is away
