"""Write API for storefronts: add, replace or remove one product, visible to searches at once.

Off unless service.api_key (or API_KEY) is set; callers send "Authorization: Bearer <key>".
Each change is committed to the store under the lock the indexer takes, so writers (threads, processes,
`make index`) are serialised and the change survives restarts. This server applies it before answering;
every other server applies it on its next request. Nothing rebuilds the index per write.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from flask import Blueprint, current_app, jsonify, request
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, Unauthorized

from indexer.errors import NotReady, UnknownProduct
from indexer.jobs.catalog import ProductFields, parse_price
from indexer.storage.locks import write_lock
from indexer.storage.schema import API
from indexer.storage.vectors import ImageVector
from service.api import catalog_search
from service.errors import BadRequest
from service.queries import embed_upload, read_upload

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
    return sku


def _price(value: str | None) -> float | None:
    try:
        return parse_price(value)
    except ValueError:
        raise BadRequest(f"price must be a finite number, not {(value or '')[:40]!r}") from None


def _store_photo(data: bytes, image_format: str) -> Path:
    """Keep the uploaded photo under <data_dir>/uploads/, named by its content."""
    digest = hashlib.sha256(data).hexdigest()
    folder = catalog_search().settings.data_dir / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}.{(image_format or 'img').lower()}"
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    return path


@contextmanager
def _saving() -> Iterator[None]:
    """A change that cannot be saved (a full or failing disk, a database error) is a 503 with the reason;
    the store's transaction rolled back, so nothing was changed and the caller can retry."""
    try:
        yield
    except (OSError, SQLAlchemyError) as exc:
        current_app.logger.error("write failed, nothing changed: %s", exc)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise NotReady(f"the change could not be saved ({reason}); nothing was changed, try again later") from None


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
    data = read_upload(request)
    # The base first: the photo must be embedded as the index's vectors are, with its whitening, which a worker
    # process loads with the base (its first request may be this write). With nothing to search, a 503 here.
    search.current()
    identity = search.embedder.identity
    views = search.settings.catalog_views
    vectors = embed_upload(data, search.embedder, views)
    image_format = _format_of(data)
    fields = {name: request.form.get(name, "").strip() for name in FIELDS}
    product = ProductFields(
        sku=sku,
        title=fields["title"] or sku,
        category=fields["category"] or None,
        price=_price(fields["price"]),
        url=fields["url"] or None,
        attributes={k: v for k, v in request.form.items() if k not in FIELDS and v},
    )
    if search.embedder.identity != identity:  # a new base with another whitening came in meanwhile
        raise NotReady("the index changed models while the photo was embedded; send the write again")
    with _saving():
        path = _store_photo(data, image_format)
        image = ImageVector(rel_path=f"api/{path.stem}/{sku}", path=str(path), sha256=path.stem, vector=vectors[0])
        extra = [replace(image, vector=vector, view=view) for view, vector in zip(views, vectors[1:], strict=True)]
        with write_lock(search.settings.data_dir, search.store):
            created, _ = search.store.products.put(product, image, identity.key, API, extra)
    return jsonify({"sku": sku, "created": created, **_visible()}), 201 if created else 200


@writes.delete("/api/products/<path:sku>")
def delete_product(sku: str):
    search = catalog_search()
    with _saving(), write_lock(search.settings.data_dir, search.store):
        # tombstones: a request still holding an older state can resolve every id it found
        change = search.store.products.delete(sku)
    if change is None:
        raise UnknownProduct(sku)
    return jsonify({"sku": sku, "deleted": True, **_visible()})


def _format_of(data: bytes) -> str:
    """The file type from the image's header (for the stored file's name and its Content-Type)."""
    with Image.open(io.BytesIO(data)) as image:
        # Many phones' JPEGs (a second view, a depth map) read as MPO: stored as .mpo, /images would serve them
        # as application/octet-stream. Their first image is a plain JPEG, which is what browsers show.
        return "JPEG" if image.format == "MPO" else image.format or "img"
