"""Write API for storefronts: add, replace or remove one product, visible to searches at once.

Off unless service.api_key (or API_KEY) is set; callers send "Authorization: Bearer <key>".
Each change goes through the core's one write path (indexer.writes), under the lock the indexer takes, so writers
(threads, processes, `make index`) are serialised and the change survives restarts. This server applies it before
answering; every other server applies it on its next request. Nothing rebuilds the index per write.
"""

from __future__ import annotations

import hmac
import io

from flask import Blueprint, current_app, jsonify, request
from PIL import Image
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, Unauthorized

from indexer.catalog import parse_price
from indexer.embedding.images import ACCEPTED_FORMATS
from indexer.errors import NotReady, UnknownProduct
from indexer.records import ProductFields, safe_link, sku_problem
from indexer.storage.schema import API
from indexer.writes import CatalogWriter
from service.api import catalog_search
from service.errors import BadRequest
from service.params import embed_upload, read_upload

FIELDS = ("title", "category", "price", "url")
MAX_SKU = 512

writes = Blueprint("writes", __name__)


@writes.before_request
def require_key() -> None:
    key = current_app.extensions["catalog_search"].settings.api_key
    if not key:
        raise Forbidden("the write API is off; set service.api_key (or API_KEY) to turn it on")
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), key.encode()):
        # WWW-Authenticate names the scheme to use, as a 401 must (RFC 9110).
        raise Unauthorized(
            "send the API key as 'Authorization: Bearer <key>'", www_authenticate=WWWAuthenticate("bearer")
        )


def _check_sku(sku: str) -> str:
    if not sku.strip() or len(sku) > MAX_SKU or any(ord(c) < 32 for c in sku):
        raise BadRequest(f"a sku is 1 to {MAX_SKU} printable characters")
    if problem := sku_problem(sku):
        raise BadRequest(problem)
    return sku


def _price(value: str | None) -> float | None:
    try:
        return parse_price(value)
    except ValueError:
        raise BadRequest(f"price must be a finite number, not {(value or '')[:40]!r}") from None


def _url(value: str) -> str | None:
    """The product's url: empty, or an absolute http(s) address (a page renders it as a link)."""
    if not value:
        return None
    if (link := safe_link(value)) is None:
        raise BadRequest(f"url must be an absolute http:// or https:// address, not {value[:60]!r}")
    return link


def _visible() -> dict:
    """Apply the change in this server before answering, and say what searches now see. A change that is
    saved but cannot be applied here yet is a 503 saying so: it becomes searchable once the server can."""
    search = catalog_search()
    try:
        view = search.current()
    except NotReady:
        raise
    except Exception as exc:
        current_app.logger.exception("a saved change could not be applied yet")
        raise NotReady(
            f"the change is saved, but this server could not apply it yet ({type(exc).__name__}); "
            "it becomes searchable as soon as the server can"
        ) from None
    return {"index_version": view.version, "items": len(view.live), "change": view.live.seen}


@writes.put("/api/products/<path:sku>")
def put_product(sku: str):
    """Add or replace a product: multipart 'image' plus title, category, price, url, other fields."""
    search = catalog_search()
    _check_sku(sku)
    if any("\x00" in name + value for name, value in request.form.items(multi=True)):
        # PostgreSQL stores no NUL in text or JSON: refused on every database, so both behave alike.
        raise BadRequest("product fields may not contain NUL characters")
    # The fields are checked before the photo is read and embedded: a refused write costs no model time.
    fields = {name: request.form.get(name, "").strip() for name in FIELDS}
    product = ProductFields(
        sku=sku,
        title=fields["title"] or sku,
        category=fields["category"] or None,
        price=_price(fields["price"]),
        url=_url(fields["url"]),
        attributes={k: v for k, v in request.form.items() if k not in FIELDS and v},
    )
    if problem := product.storage_problem():  # a field longer than the store holds
        raise BadRequest(problem)
    data = read_upload(request)
    # The view first: the photo is embedded as its vectors are, with its whitening, which a worker process loads
    # with the base (its first request may be this write). With nothing to search, a 503 here.
    view = search.current()
    views = search.settings.catalog_views
    vectors = embed_upload(data, view.embedder, views)
    image_format = _format_of(data)
    # Stored only while the index keeps the identity the photo was embedded with (a new base with another
    # whitening or model may come in meanwhile): else a 503 asking to send the write again.
    created = CatalogWriter(search.settings, search.store, API).put_upload(
        product,
        data,
        image_format,
        vectors,
        views,
        model=view.identity,
        current_model=lambda: search.current().identity,
    )
    return jsonify({"sku": sku, "created": created, **_visible()}), 201 if created else 200


@writes.delete("/api/products/<path:sku>")
def delete_product(sku: str):
    search = catalog_search()
    if not CatalogWriter(search.settings, search.store, API).write(removed=[sku]).removed:
        raise UnknownProduct(sku)
    return jsonify({"sku": sku, "deleted": True, **_visible()})


def _format_of(data: bytes) -> str:
    """The file type from the image's header (for the stored file's name and its Content-Type), of a photo that
    embed_upload decoded: one of the accepted formats."""
    with Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS)) as image:
        # Many phones' JPEGs (a second view, a depth map) read as MPO: stored as .mpo, /images would serve them
        # as application/octet-stream. Their first image is a plain JPEG, which is what browsers show.
        return "JPEG" if image.format == "MPO" else image.format or "img"
