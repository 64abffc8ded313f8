"""Reading a search request: the uploaded photo, k, and the category and price filters.

Recent uploads are remembered (a small in-memory LRU keyed by the photo's
sha256) so that a results page can link to its preview grid without the
shopper uploading the photo again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flask import Request
from PIL import Image

from indexer.images import ImageError, thumbnail
from indexer.live_index import Filters
from indexer.model import Embedder
from service.errors import BadRequest


@dataclass(frozen=True)
class Query:
    token: str
    photo: bytes
    # The whole photo's vector; None while only regions of it were searched (each is embedded on its own).
    vector: np.ndarray | None

    def thumbnail(self) -> Image.Image:
        """Made only when a page or preview shows the photo, not on every search."""
        return thumbnail(self.photo)


def read_upload(request: Request) -> bytes:
    upload = request.files.get("image")
    if upload is None:
        raise BadRequest("send the photo as a multipart/form-data file field named 'image'")
    data = upload.read()
    if not data:
        raise BadRequest("the uploaded image is empty (0 bytes)")
    return data


def read_k(request: Request, default: int, most: int) -> int:
    raw = request.values.get("k", "").strip()
    if not raw:
        return default
    try:
        k = int(raw)
    except ValueError:
        raise BadRequest(f"k must be a whole number from 1 to {most}, not {raw[:40]!r}") from None
    if k < 1:
        raise BadRequest(f"k must be a whole number from 1 to {most}")
    return min(k, most)


def read_category(request: Request, known: list[str] | Callable[[], list[str]]) -> str | None:
    """The category filter, checked against the known categories (a callable: listed only when one is asked for)."""
    category = request.values.get("category", "").strip() or None
    if category is not None and category not in (known() if callable(known) else known):
        raise BadRequest(f"unknown category {category[:80]!r}; GET /api/categories lists them")
    return category


def read_price_bound(request: Request, name: str) -> float | None:
    raw = request.values.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise BadRequest(f"{name} must be a number, not {raw[:40]!r}")
    return value


def read_filters(request: Request, known_categories: list[str] | Callable[[], list[str]]) -> Filters:
    """category, min_price and max_price from the query string or form; 400 when they make no sense."""
    filters = Filters(
        category=read_category(request, known_categories),
        min_price=read_price_bound(request, "min_price"),
        max_price=read_price_bound(request, "max_price"),
    )
    if filters.min_price is not None and filters.max_price is not None and filters.min_price > filters.max_price:
        raise BadRequest("min_price is above max_price")
    return filters


def embed_upload(data: bytes, embedder: Embedder) -> np.ndarray:
    """The upload's vector, or a 400 that says why the bytes are not a usable photo."""
    try:
        return embedder.embed_image(data)
    except ImageError as exc:
        raise BadRequest(f"the upload is not a usable image: {exc}") from None


class RecentQueries:
    """The last few query photos with their vectors, by the sha256 of their bytes, so that a
    results page can link to its preview. Bounded in count and in bytes held."""

    def __init__(self, size: int = 64, max_bytes: int = 32_000_000):
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, Query] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, embedder: Embedder | None) -> Query:
        """Remember an uploaded photo, embedded whole once (with an embedder), or return it from the cache.
        Without an embedder the photo is remembered unembedded: a region search needs only the region."""
        token = hashlib.sha256(data).hexdigest()
        with self._lock:
            known = self._items.get(token)
            if known is not None:
                self._items.move_to_end(token)
                if known.vector is not None or embedder is None:
                    return known
        query = Query(token=token, photo=data, vector=None if embedder is None else embed_upload(data, embedder))
        with self._lock:
            if token not in self._items:
                self._bytes += len(data)
            self._items[token] = query
            while self._items and (len(self._items) > self._size or self._bytes > self._max_bytes):
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted.photo)
        return query

    def get(self, token: str) -> Query | None:
        with self._lock:
            return self._items.get(token)
