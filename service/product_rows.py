"""The products behind FAISS ids, read from SQLite once per index version and kept (bounded).

Every search turns about forty image ids into product rows. Reading them from SQLite each
time cost more CPU than the FAISS search itself. What a search may show only changes when a
new index version is published (`make index` and the write API both publish one), so each
version keeps its own cache, and a new version starts with an empty one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Engine

from indexer.schema import LIVE, RESULT_COLUMNS, Product, ProductImage

# About 0.5 KB each: the cache stays under ~10 MB however large the catalog.
MAX_ROWS = 20_000


class ProductRow(NamedTuple):  # RESULT_COLUMNS, in order
    sku: str
    title: str
    category: str | None
    price: float | None
    url: str | None


_ROWS = (
    select(ProductImage.id, *RESULT_COLUMNS)
    .join(Product)
    .where(ProductImage.id.in_(bindparam("ids", expanding=True)), LIVE)
)


class ProductRows:
    """Image id -> its live product row (None for an image deleted since), for one index version.
    Least recently used rows leave first once max_rows are held."""

    def __init__(self, database: Engine, version_stamp: object, max_rows: int = MAX_ROWS):
        self.database = database
        self.version_stamp = version_stamp
        self.max_rows = max_rows
        self._rows: OrderedDict[int, ProductRow | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_ids: list[int]) -> dict[int, ProductRow | None]:
        found: dict[int, ProductRow | None] = {}
        with self._lock:
            for image_id in image_ids:
                if image_id in self._rows:
                    self._rows.move_to_end(image_id)
                    found[image_id] = self._rows[image_id]
        missing = [i for i in image_ids if i not in found]
        if missing:
            with self.database.connect() as connection:
                rows = connection.execute(_ROWS, {"ids": missing}).all()
            read = dict.fromkeys(missing) | {row[0]: ProductRow(*row[1:]) for row in rows}
            found |= read
            with self._lock:
                self._rows.update(read)
                while len(self._rows) > self.max_rows:
                    self._rows.popitem(last=False)
        return found
