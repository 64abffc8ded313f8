"""The products behind image ids, as search results show them: read from the store once and kept (bounded),
forgotten when they change.

Every search turns about forty image ids into product rows. Reading them from SQLite each time cost more CPU
than the FAISS search itself. A row changes only through a committed change, and the live index reports the
ids each change touched, so the cache forgets exactly those.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

from indexer.records import ShownProduct
from indexer.storage.store import Store

# About 0.5 KB each: the cache stays under ~10 MB however large the catalog.
MAX_ROWS = 20_000


class ProductRows:
    """Image id -> its live product (None for an image deleted since); one per index view. Least recently used
    rows leave first once max_rows are held."""

    def __init__(self, store: Store, max_rows: int = MAX_ROWS):
        self.store = store
        self.max_rows = max_rows
        self._rows: OrderedDict[int, ShownProduct | None] = OrderedDict()
        self._lock = threading.Lock()
        # Bumped by forget(): rows read before a change was applied must not be cached after it.
        self._generation = 0

    def get(self, image_ids: list[int]) -> dict[int, ShownProduct | None]:
        found: dict[int, ShownProduct | None] = {}
        with self._lock:
            for image_id in image_ids:
                if image_id in self._rows:
                    self._rows.move_to_end(image_id)
                    found[image_id] = self._rows[image_id]
        missing = [i for i in image_ids if i not in found]
        if missing:
            generation = self._generation
            read = dict.fromkeys(missing) | self.store.products.result_rows(missing)
            found |= read
            with self._lock:
                if generation != self._generation:
                    return found
                self._rows.update(read)
                while len(self._rows) > self.max_rows:
                    self._rows.popitem(last=False)
        return found

    def held(self, image_ids: list[int]) -> dict[int, ShownProduct | None]:
        """The rows of these ids that are held, without reading the database (which may be away)."""
        with self._lock:
            return {image_id: self._rows[image_id] for image_id in image_ids if image_id in self._rows}

    def image_ids_of(self, sku: str) -> list[int]:
        """The held image ids of a product, lowest first (its first photo first), without reading the database."""
        with self._lock:
            return sorted(i for i, product in self._rows.items() if product is not None and product.sku == sku)

    def forget(self, image_ids: Iterable[int]) -> None:
        with self._lock:
            self._generation += 1
            for image_id in image_ids:
                self._rows.pop(int(image_id), None)
