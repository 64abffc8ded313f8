"""Write API for storefronts: add, replace or remove one product, visible to searches at once.

Off unless service.api_key (or API_KEY) is set; callers send "Authorization: Bearer <key>".
Each change is committed to SQLite and published as a new index version under the same lock
the indexer takes, so writers (threads, processes, `make index`) are serialised, and the
change survives restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from datetime import UTC, datetime
from pathlib import Path

from flask import Blueprint, current_app, jsonify, request
from PIL import Image
from sqlalchemy import select, update
from werkzeug.exceptions import Forbidden, Unauthorized

from indexer.catalog import parse_price
from indexer.indexing import publish_from_database
from indexer.locking import write_lock
from indexer.schema import LIVE, Product, ProductImage
from indexer.vectors import read_manifest
from service.api import catalog_search
from service.errors import BadRequest
from service.queries import embed_upload, read_upload
from service.search import UnknownProduct

API = "api"  # ProductImage.source of rows written here
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
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")


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


def _publish() -> dict:
    search = catalog_search()
    catalog = (read_manifest(search.settings.index_dir) or {}).get("catalog", "")
    images, products = publish_from_database(search.settings, search.sessions, search.embedder, catalog)
    version = search.current()  # this worker serves the new version from the next line on
    return {"index_version": version.manifest.get("version"), "items": images, "products": products}


@writes.put("/api/products/<path:sku>")
def put_product(sku: str):
    """Add or replace a product: multipart 'image' plus title, category, price, url, other fields."""
    search = catalog_search()
    _check_sku(sku)
    data = read_upload(request)
    vector = embed_upload(data, search.embedder)
    image_format = _format_of(data)
    fields = {name: request.form.get(name, "").strip() for name in FIELDS}
    attributes = {k: v for k, v in request.form.items() if k not in FIELDS and v}
    path = _store_photo(data, image_format)
    digest = path.stem
    rel_path = f"api/{digest}/{sku}"
    with write_lock(search.settings.data_dir):
        with search.sessions.begin() as session:
            product = session.scalar(select(Product).where(Product.sku == sku))
            created = product is None or not session.scalar(
                select(ProductImage.id).where(ProductImage.product_id == product.id, LIVE).limit(1)
            )
            product = product or Product(sku=sku, attributes={})
            product.title = fields["title"] or sku
            product.category = fields["category"] or None
            product.price = _price(fields["price"])
            product.url = fields["url"] or None
            product.attributes = attributes
            session.add(product)
            session.flush()
            # The product's other images become tombstones; the same photo again revives its row.
            session.execute(
                update(ProductImage)
                .where(ProductImage.product_id == product.id, ProductImage.rel_path != rel_path, LIVE)
                .values(deleted_at=datetime.now(UTC))
            )
            row = session.scalar(select(ProductImage).where(ProductImage.rel_path == rel_path))
            row = row or ProductImage(rel_path=rel_path, source=API)
            row.product_id, row.path, row.sha256, row.deleted_at = product.id, str(path), digest, None
            row.model_key = search.embedder.identity.key
            row.embedding = vector.astype("float32").tobytes()
            session.add(row)
        published = _publish()
    return jsonify({"sku": sku, "created": created, **published}), 201 if created else 200


@writes.delete("/api/products/<path:sku>")
def delete_product(sku: str):
    search = catalog_search()
    with write_lock(search.settings.data_dir):
        with search.sessions.begin() as session:
            live = session.scalars(select(ProductImage).join(Product).where(Product.sku == sku, LIVE)).all()
            if not live:
                raise UnknownProduct(sku)
            for image in live:  # tombstones: ids in index versions still in use keep resolving
                image.deleted_at = datetime.now(UTC)
        published = _publish()
    return jsonify({"sku": sku, "deleted": True, **published})


def _format_of(data: bytes) -> str:
    """The file type from the image's header (for the stored file's name and its Content-Type)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.format or "img"
