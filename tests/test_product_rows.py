"""Product rows behind image ids: read from the real database (SQLite, PostgreSQL) once, bounded, least recently
used out, and forgotten when a change touches them."""

from __future__ import annotations

from sqlalchemy import select

from indexer.index.rows import ProductRows
from indexer.jobs.indexing import index_catalog
from indexer.records import ShownProduct
from indexer.storage.schema import ProductImage
from indexer.storage.store import Store
from tests.conftest import both_databases, statements_reading


@both_databases
def test_rows_are_read_once_and_the_least_recently_used_leave_first(settings, embedder, skimage_catalog):
    index_catalog(settings, embedder, skimage_catalog, progress=False)
    store = Store.open(settings, upgrade=False)
    with store.engine.connect() as connection:
        first, second, third = connection.scalars(select(ProductImage.id).order_by(ProductImage.id)).all()[:3]
    rows = ProductRows(store, max_rows=2)
    with statements_reading(store.engine, "FROM images JOIN products") as reads:
        found = rows.get([first, second, third, 10_000])
        assert len(reads) == 1
        assert isinstance(found[first], ShownProduct) and found[first].sku and found[10_000] is None
        assert rows.get([third]) == {third: found[third]} and len(reads) == 1  # kept: the most recent
        assert rows.get([first]) == {first: found[first]} and len(reads) == 2  # gone: over max_rows
        rows.forget([first])
        assert rows.get([first]) == {first: found[first]} and len(reads) == 3  # forgotten: read again
