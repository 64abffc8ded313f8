"""Products: their rows, the lookups the service makes by sku or by image id, and the writes that start from a
product (create or refresh products, put one product with its photo, delete one).

A write that changes a product and its image rows does both in one transaction, here, so a server never sees
one without the other; it takes one change number (indexer.storage.database) and stamps the image rows it
touched with it. The writes that start from image files are in indexer.storage.vectors. Writers hold
indexer.storage.locks.write_lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Engine

from indexer.records import ProductFields, ShownProduct
from indexer.storage.database import chunks, next_change
from indexer.storage.schema import API, HAS_LIVE_IMAGE, LIVE, Product, ProductImage
from indexer.storage.vectors import ImageVector


class Products:
    """The products of one database (Store.products)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # --- reads for the service -----------------------------------------------------------------

    def result_rows(self, image_ids: list[int]) -> dict[int, ShownProduct]:
        """The live product behind each image id, as a search result shows it (ids deleted since are absent)."""
        with self.engine.connect() as connection:
            rows = connection.execute(_RESULT_ROWS, {"ids": image_ids}).all()
        return {
            row.id: ShownProduct(sku=row.sku, title=row.title, category=row.category, price=row.price, url=row.url)
            for row in rows
        }

    def attributes_of(self, skus: Sequence[str]) -> dict[str, dict[str, str]]:
        """sku -> the product's attributes, for these skus (one read per chunk of skus; unknown skus are absent):
        what facets on attributes count, read for a search's matches only when such a facet is asked for."""
        found: dict[str, dict[str, str]] = {}
        with self.engine.connect() as connection:
            for part in chunks(list(dict.fromkeys(skus))):
                rows = connection.execute(select(Product.sku, Product.attributes).where(Product.sku.in_(part)))
                found |= {row.sku: row.attributes or {} for row in rows}
        return found

    def by_sku(self, sku: str) -> ShownProduct | None:
        """The product with this sku as its own page shows it (with its attributes) while it is live (has a live
        image); None otherwise."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(Product.sku, Product.title, Product.category, Product.price, Product.url, Product.attributes)
                .where(Product.sku == sku, HAS_LIVE_IMAGE)
                .limit(1)
            ).first()
        if row is None:
            return None
        return ShownProduct(
            sku=row.sku,
            title=row.title,
            category=row.category,
            price=row.price,
            url=row.url,
            attributes=row.attributes or {},
        )

    def is_live(self, sku: str) -> bool:
        """Whether the product has a live image (whatever its model)."""
        with self.engine.connect() as connection:
            return (
                connection.scalar(select(ProductImage.id).join(Product).where(Product.sku == sku, LIVE).limit(1))
                is not None
            )

    def image_path(self, sku: str) -> tuple[str, str] | None:
        """(path, rel_path) of a product's first live image: the stored file and its name in its catalog."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(ProductImage.path, ProductImage.rel_path)
                .join(Product)
                .where(Product.sku == sku, LIVE, ProductImage.view == "")
                .order_by(ProductImage.id)
                .limit(1)
            ).first()
        return None if row is None else (row.path, row.rel_path)

    def counts(self) -> tuple[int, int]:
        """(live photos, products with a live photo); extra views are not counted."""
        with self.engine.connect() as connection:
            images = connection.scalar(select(func.count()).where(LIVE, ProductImage.view == ""))
            products = connection.scalar(select(func.count(func.distinct(ProductImage.product_id))).where(LIVE))
        return int(images or 0), int(products or 0)

    def labels(self, label: str) -> dict[str, str | None]:
        """sku -> the product's category, or another metadata column (an attribute)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Product.sku, Product.category, Product.attributes).where(HAS_LIVE_IMAGE)
            ).all()
        if label == "category":
            return {sku: category for sku, category, _ in rows}
        return {sku: (attributes or {}).get(label) for sku, _, attributes in rows}

    # --- writes (hold write_lock) --------------------------------------------------------------

    def upsert(self, products: Iterable[ProductFields]) -> dict[str, int]:
        """Create or refresh products (the first of each sku wins); returns sku -> product id. A change to a
        field that results show, or to the attributes that filters match, takes a change number for the product's
        live images, so servers refresh it."""
        first: dict[str, ProductFields] = {}
        for product in products:
            first.setdefault(product.sku, product)
        ids: dict[str, int] = {}
        with self.engine.begin() as connection:
            change = None
            for skus in chunks(list(first)):
                stored = {
                    row.sku: row
                    for row in connection.execute(
                        select(
                            Product.id,
                            Product.sku,
                            Product.title,
                            Product.category,
                            Product.price,
                            Product.url,
                            Product.attributes,
                        ).where(Product.sku.in_(skus))
                    )
                }
                new = [first[s] for s in skus if s not in stored]
                if new:
                    connection.execute(insert(Product), [_product_values(p) for p in new])
                changed = [
                    (stored[s].id, first[s])
                    for s in skus
                    if s in stored
                    and (tuple(stored[s][2:6]), stored[s].attributes or {}) != (first[s].shown(), first[s].attributes)
                ]
                if changed:
                    connection.execute(
                        update(Product).where(Product.id == bindparam("pid")),
                        [{"pid": pid, **_product_values(p)} for pid, p in changed],
                    )
                    # every change here is one a server holds: a shown field, or the attributes its filters match
                    shown_changed = [pid for pid, _ in changed]
                    if shown_changed:
                        change = change or next_change(connection)
                        connection.execute(
                            update(ProductImage)
                            .where(ProductImage.product_id.in_(shown_changed), LIVE)
                            .values(change=change)
                        )
                ids |= {s: stored[s].id for s in skus if s in stored}
                if new:
                    ids |= dict(
                        connection.execute(
                            select(Product.sku, Product.id).where(Product.sku.in_([p.sku for p in new]))
                        ).all()
                    )
        return ids

    def put(
        self,
        product: ProductFields,
        image: ImageVector,
        model_key: str,
        source: str = API,
        views: Sequence[ImageVector] = (),
    ) -> tuple[bool, int]:
        """Add or replace a product with one photo (and its extra views' vectors: rows of the same rel_path, each
        with its `view`), in one transaction: its other images become tombstones, the same photo again revives
        its rows. Returns (created, change number)."""
        with self.engine.begin() as connection:
            change = next_change(connection)
            product_id = connection.scalar(select(Product.id).where(Product.sku == product.sku))
            created = product_id is None or not connection.scalar(
                select(ProductImage.id).where(ProductImage.product_id == product_id, LIVE).limit(1)
            )
            if product_id is None:
                product_id = connection.execute(
                    insert(Product).values(**_product_values(product))
                ).inserted_primary_key[0]
            else:
                connection.execute(update(Product).where(Product.id == product_id).values(**_product_values(product)))
            now = datetime.now(UTC)
            rows = [image, *views]
            connection.execute(
                update(ProductImage)
                .where(
                    ProductImage.product_id == product_id,
                    (ProductImage.rel_path != image.rel_path) | ProductImage.view.not_in([r.view for r in rows]),
                    LIVE,
                )
                .values(deleted_at=now, change=change)
            )
            existing = dict(
                connection.execute(
                    select(ProductImage.view, ProductImage.id).where(
                        ProductImage.rel_path == image.rel_path, ProductImage.product_id == product_id
                    )
                ).all()
            )
            shared = {  # the photo's and its views' rows differ only in their view and vector
                "product_id": product_id,
                "path": image.path,
                "sha256": image.sha256,
                "model_key": model_key,
                "source": source,
                "deleted_at": None,
                "change": change,
                "updated_at": now,
            }
            for row in rows:
                values = {**shared, "embedding": np.asarray(row.vector, dtype=np.float32).tobytes()}
                if row.view not in existing:
                    connection.execute(insert(ProductImage).values(rel_path=image.rel_path, view=row.view, **values))
                else:
                    connection.execute(
                        update(ProductImage).where(ProductImage.id == existing[row.view]).values(**values)
                    )
        return created, change

    def delete(self, sku: str) -> int | None:
        """Tombstone a product's live images; the change number, or None when there was nothing live."""
        with self.engine.begin() as connection:
            ids = (
                connection.execute(select(ProductImage.id).join(Product).where(Product.sku == sku, LIVE))
                .scalars()
                .all()
            )
            if not ids:
                return None
            change = next_change(connection)
            connection.execute(
                update(ProductImage).where(ProductImage.id.in_(ids)).values(deleted_at=datetime.now(UTC), change=change)
            )
        return change


def _product_values(product: ProductFields) -> dict[str, object]:
    return {
        "sku": product.sku,
        "title": product.title,
        "category": product.category,
        "price": product.price,
        "url": product.url,
        "attributes": dict(product.attributes),
    }


_RESULT_ROWS = (
    select(ProductImage.id, Product.sku, Product.title, Product.category, Product.price, Product.url)
    .join(Product)
    .where(ProductImage.id.in_(bindparam("ids", expanding=True)), LIVE)
)
