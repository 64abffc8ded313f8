"""Model metadata kept in the database: the whitenings fitted on the catalog (indexer.embedding.whitening), so
every server and indexer sharing the database uses the same one. They take no change number: a new whitening
reaches the index through the vectors it replaces (indexer.storage.vectors)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from indexer.storage.schema import WhiteningRow


class Models:
    """The model metadata rows of one database (Store.models)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def save_whitening(self, network_key: str, sha256: str, name: str, data: bytes) -> None:
        """Keep a fitted whitening; it becomes the one in use for this network (the newest)."""
        with self.engine.begin() as connection:
            connection.execute(delete(WhiteningRow).where(WhiteningRow.sha256 == sha256))
            connection.execute(insert(WhiteningRow).values(
                sha256=sha256, network_key=network_key, name=name, data=data, created_at=datetime.now(UTC)
            ))  # fmt: skip

    def whitening_data(self, *, sha256: str | None = None, network_key: str | None = None) -> bytes | None:
        """A whitening by its sha256, or the one in use for a network (its newest); None when there is none."""
        query = select(WhiteningRow.data)
        if sha256 is not None:
            query = query.where(WhiteningRow.sha256 == sha256)
        else:
            query = query.where(WhiteningRow.network_key == network_key).order_by(WhiteningRow.created_at.desc())
        with self.engine.connect() as connection:
            return connection.scalar(query.limit(1))
