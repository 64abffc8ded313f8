"""POST /api/search/batch: photos (uploads or image_urls) and catalog skus searched in one request. Each item is
answered as its own request would be (POST /api/search for a photo, GET /api/products/<sku>/similar for a sku), in
the order sent; an item that fails carries its own error, and the others are answered.

The body is read part by part, in order (Werkzeug's form parsing keeps files and fields apart and loses their
order), within service.max_batch_bytes, each photo within max_upload_bytes. Photos are remembered as a single
search's are (each photo item has its `query` token); the items are embedded and searched on as many threads as
the process has interpreters, one image per forward pass each: measured faster than one batched forward pass of the
network (docs/speed.md, "Batches").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Request, Response, current_app, jsonify, make_response, request
from werkzeug.datastructures import CombinedMultiDict, MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from indexer.config import Settings
from indexer.errors import NotReady, UnknownProduct
from indexer.index.live_index import Filters
from indexer.index.search import CatalogSearch, IndexView
from indexer.records import ShownProduct
from indexer.storage.text import Words
from service.api import catalog_search, filters_json, results_json
from service.errors import BadRequest
from service.params import read_filters, read_k, read_words
from service.recent_queries import Query, RecentQueries
from service.search_photo import fetch_photo

batch = Blueprint("batch", __name__)

BATCH_PATH = "/api/search/batch"
HOW = (
    "repeated 'image' file parts, 'image_url' and 'sku' fields (the items, answered in the order sent), and k, "
    "category, min_price, max_price, attr.<name> and q for all of them"
)
# The fields of a single search that name one photo or count one search's matches: no batch item shares them.
SINGLE_ONLY = ("query", "box", "facets", "facet_depth")
READ_BYTES = 64 * 1024
# image_urls fetched at once: a fetch mostly waits on the network (each within service.fetch_timeout_s).
FETCHES_AT_ONCE = 8
# What an item can fail with, answered in its place: what the same request alone would get as a 4xx, 502 or 503.
ITEM_ERRORS = (BadRequest, UnknownProduct, NotReady, HTTPException)


@dataclass(frozen=True)
class Item:
    """One item of a batch: a photo's bytes ('image'), an address ('image_url') or a catalog sku ('sku'); or, for
    a photo refused as it was read, that item's error."""

    kind: str
    value: bytes | str
    error: dict[str, object] | None = None


@dataclass
class _Part:
    """A part of the body as it arrives: its bytes up to `limit`, and its whole size."""

    name: str
    filename: str | None
    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size <= self.limit:
            self.chunks.append(data)
        else:
            self.chunks = []  # over its limit: nothing of it is kept

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def item_error(exc: Exception) -> dict[str, object]:
    """An item's failure as its answer: the error and message the same request alone would get, and its status."""
    if isinstance(exc, HTTPException):
        return {"error": exc.name.lower().replace(" ", "_"), "message": exc.description or exc.name, "status": exc.code}
    if isinstance(exc, UnknownProduct):
        return {"error": "not_found", "message": f"no product with sku {exc.args[0][:200]!r}", "status": 404}
    if isinstance(exc, NotReady):
        return {"error": "not_ready", "message": str(exc), "status": 503}
    return {"error": "bad_request", "message": str(exc), "status": 400}


def read_batch(request: Request, settings: Settings) -> tuple[list[Item], MultiDict]:
    """The items in the order sent, and the other fields; 400 for a body that is no multipart form, for no item or
    more than service.max_batch, or for a field of a single search only; 413 past service.max_batch_bytes, or for a
    field larger than Flask's MAX_FORM_MEMORY_SIZE, or more parts than its MAX_FORM_PARTS."""
    boundary = request.mimetype_params.get("boundary", "")
    if request.mimetype != "multipart/form-data" or not boundary:
        raise BadRequest(f"send the batch as multipart/form-data: {HOW}")
    request.max_content_length = settings.max_batch_bytes  # this route's own cap (werkzeug answers 413 past it)
    config = current_app.config
    decoder = MultipartDecoder(boundary.encode("latin-1"), max_parts=config["MAX_FORM_PARTS"])
    items: list[Item] = []
    fields: MultiDict = MultiDict()
    part: _Part | None = None
    stream = request.stream
    while True:
        chunk = stream.read(READ_BYTES)
        try:
            decoder.receive_data(chunk or None)
            event = decoder.next_event()
            while not isinstance(event, NeedData | Epilogue):
                if isinstance(event, Field | File):
                    photo = event.name == "image"
                    limit = settings.max_upload_bytes if photo else config["MAX_FORM_MEMORY_SIZE"]
                    part = _Part(event.name, getattr(event, "filename", None), limit)
                elif isinstance(event, Data) and part is not None:
                    part.add(event.data)
                    if part.size > part.limit and part.name != "image":
                        raise RequestEntityTooLarge(f"the form field {part.name[:40]!r} is larger than the limit of "
                                                    f"{part.limit:,} bytes")  # fmt: skip
                    if not event.more_data:
                        _add_part(part, items, fields, settings)
                event = decoder.next_event()
        except (BadRequest, HTTPException):
            raise
        except ValueError as exc:  # the decoder's: a body that does not follow multipart/form-data
            raise BadRequest(f"the body is not a readable multipart/form-data form ({exc}); send {HOW}") from None
        if not chunk or isinstance(event, Epilogue):
            break
    if not items:
        raise BadRequest(f"the batch holds no item; send {HOW}")
    return items, fields


def _add_part(part: _Part, items: list[Item], fields: MultiDict, settings: Settings) -> None:
    """A whole part: an item (a photo, an image_url or a sku), or a shared field. A form's empty file input and a
    blank image_url or sku are no item, as a single search reads them."""
    if part.name == "image":
        if part.size > settings.max_upload_bytes:
            message = f"the photo is larger than the limit of {settings.max_upload_bytes:,} bytes"
            item = Item("image", b"", item_error(RequestEntityTooLarge(message)))
        elif part.size == 0 and not part.filename:
            return
        else:
            item = Item("image", b"".join(part.chunks))
    elif part.filename is not None:
        raise BadRequest(f"only 'image' parts may hold files, not {part.name[:40]!r}; send {HOW}")
    elif part.name in ("image_url", "sku"):
        if not (value := part.text().strip()):
            return
        item = Item(part.name, value)
    else:
        value = part.text()
        if part.name in SINGLE_ONLY and value.strip():
            raise BadRequest(f"{part.name} applies to a single search (POST /api/search), not to a batch; send {HOW}")
        fields.add(part.name, value)
        return
    if len(items) == settings.max_batch:
        raise BadRequest(
            f"a batch holds at most {settings.max_batch} items (service.max_batch); send the others in another batch"
        )
    items.append(item)


def _each(work: Callable[[int, Any], Any], inputs: dict[int, tuple[Any, float]], threads: int) -> dict[int, tuple]:
    """work(position, value) for each input (position -> (value, seconds so far)) that is no item error yet, on up
    to `threads` threads: its result, or its item error, and its seconds so far. Errors pass through as they are."""

    def run(position: int, value_and_seconds: tuple[Any, float]) -> tuple[Any, float]:
        value, seconds = value_and_seconds
        if isinstance(value, dict):
            return value, seconds
        started = time.perf_counter()
        try:
            value = work(position, value)
        except ITEM_ERRORS as exc:
            value = item_error(exc)
        return value, seconds + time.perf_counter() - started

    if threads <= 1 or len(inputs) <= 1:
        return {position: run(position, given) for position, given in inputs.items()}
    with ThreadPoolExecutor(max_workers=min(threads, len(inputs)), thread_name_prefix="batch") as pool:
        return dict(zip(inputs, pool.map(run, inputs, inputs.values()), strict=True))


@dataclass(frozen=True)
class _Batch:
    """What every item of a batch is searched with: one view of the index, k, the filters and the words."""

    search: CatalogSearch
    view: IndexView
    recent: RecentQueries
    k: int
    filters: Filters
    words: Words | None

    def searched(self, item: Item, value: bytes | str) -> tuple[Query | None, list[ShownProduct]]:
        """An item's matches, with its query for a photo: a sku's similar products, or a photo's, remembered (its
        token) and embedded as POST /api/search does with one, then searched."""
        if item.kind == "sku":
            return None, self.search.similar(self.view, str(value), self.k, self.filters, self.words)
        if not value:
            raise BadRequest("the uploaded image is empty (0 bytes)")
        query = self.recent.embedded(self.recent.add(value), self.view.embedder)
        return query, self.search.search(self.view, query.vector, self.k, self.filters, words=self.words)


def search_items(items: list[Item], shared: _Batch) -> dict[int, tuple]:
    """Each item's (query, matches) or its error, and the seconds it took, by position: the image_urls fetched at
    once, then every item searched on as many threads as the embedder has interpreters (one image per forward pass
    each, side by side)."""
    given = {position: (item.error or item.value, 0.0) for position, item in enumerate(items)}
    urls = {position: value for position, value in given.items() if items[position].kind == "image_url"}
    given |= _each(lambda _, url: fetch_photo(url, shared.search.settings), urls, FETCHES_AT_ONCE)
    threads = getattr(shared.view.embedder.engine, "interpreters", 1)
    return _each(lambda position, value: shared.searched(items[position], value), given, threads)


def _answer(item: Item, searched: tuple, echo: dict[str, object], view: IndexView) -> dict[str, object]:
    """One item's answer, shaped as its own request's (its took_ms: its own fetch, decoding, embedding and search),
    or its error."""
    found, seconds = searched
    if isinstance(found, dict):
        return found
    query, matches = found
    took_ms = round(seconds * 1000, 2)
    if query is None:
        return {"sku": item.value, "results": results_json(matches), **echo, "took_ms": took_ms}
    return {
        "results": results_json(matches),
        **echo,
        "query": query.token,
        "box": None,
        "index_version": view.version,
        "took_ms": took_ms,
    }


@batch.post(BATCH_PATH)
def search_batch():
    started = time.perf_counter()
    search = catalog_search()
    view = search.current()  # a 503 before reading the body when there is nothing to search
    settings = search.settings
    items, fields = read_batch(request, settings)
    values = CombinedMultiDict([request.args, fields])
    k = read_k(values, settings.default_k, settings.max_k)
    filters = read_filters(values, lambda: search.categories(view), view.live.attribute_names)
    words = read_words(values)
    echo = {"k": k, **filters_json(filters), "q": values.get("q") if words is not None else None}
    shared = _Batch(search, view, current_app.extensions["recent_queries"], k, filters, words)
    searched = search_items(items, shared)
    answers = [_answer(item, searched[position], echo, view) for position, item in enumerate(items)]
    return jsonify({"items": answers, "took_ms": round((time.perf_counter() - started) * 1000, 2)})


@batch.errorhandler(RequestEntityTooLarge)
def batch_too_large(exc: RequestEntityTooLarge) -> Response:
    message = exc.description
    if message == RequestEntityTooLarge.description:  # Werkzeug's own: the body's cap, or its count of parts
        settings = catalog_search().settings
        message = (
            f"a batch's body is at most {settings.max_batch_bytes:,} bytes (service.max_batch_bytes) in at most "
            f"{current_app.config['MAX_FORM_PARTS']:,} parts; send the photos in several batches"
        )
    return make_response(jsonify({"error": "request_entity_too_large", "message": message}), 413)
