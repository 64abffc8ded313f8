"""The catalog store: the only module that reads and writes the database (products, image vectors, tombstones).

Every committed write takes the next change number ("head") and stamps the image rows it touched with it,
so a server brings itself up to date by reading only the rows changed after the last number it saw.
Writers hold `indexer.storage.locks.write_lock`; readers never block them (SQLite WAL; PostgreSQL's MVCC).
The statements are the same on SQLite and PostgreSQL; what differs (advisory locks) says so where it is.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import numpy as np
from sqlalchemy import BigInteger, Connection, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from indexer.config import Settings
from indexer.records import ProductFields, ShownProduct
from indexer.storage.schema import (
    LIVE,
    Product,
    ProductImage,
    StoreState,
    WhiteningRow,
    make_engine,
    migrate,
    schema_behind,
)

# Where an image row came from: the catalog folder (`make index`), the write API, or a vector import.
CATALOG, API, IMPORT = "catalog", "api", "import"
# Rows per statement: SQLite takes up to 32,766 bound parameters.
CHUNK = 2_000


class KnownFile(NamedTuple):
    """What the store remembers of a live image file: enough to skip it when it has not changed."""

    sha256: str
    model_key: str
    size: int | None
    mtime_ns: int | None
    # Its extra views' rows (index.catalog_views).
    views: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ImageVector:
    """One image's embedding (or one of its extra views'), ready to store."""

    rel_path: str
    path: str
    sha256: str
    vector: np.ndarray
    # None for Store.put_product, which stores the image under the product it writes
    product_id: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    # "" for the photo, else the extra view (index.catalog_views) this vector is of.
    view: str = ""


@dataclass(frozen=True)
class Reconciled:
    """What reconciling a catalog folder did: rows tombstoned, the folder's rows, a sample of the removed
    paths, and, when it refused, how many it would have removed."""

    removed: int
    in_folder: int
    sample: list[str]
    refused: int = 0


@dataclass
class Changes:
    """Rows changed after some change number: live vectors of one model to add or replace, and ids to drop."""

    head: int
    ids: np.ndarray
    vectors: np.ndarray
    categories: list[str | None]
    prices: np.ndarray
    removed: np.ndarray

    def __len__(self) -> int:
        return len(self.ids) + len(self.removed)


@dataclass
class Snapshot:
    """Every live vector of one model, with its image id, product category and price, as of change `head`."""

    head: int
    ids: np.ndarray
    categories: list[str | None]
    prices: np.ndarray


def _prices(values: Iterable[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float32)


def _chunks(items: Sequence, size: int = CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Store:
    def __init__(self, engine: Engine):
        self.engine = engine
        # SQLite: a connection of its own for change_marker, opened at the first call.
        self._marker_connection = None
        self._marker_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings, *, upgrade: bool = True) -> Store:
        """The configured database, migrated to the newest schema first (unless upgrade=False)."""
        engine = make_engine(settings.db_url)
        # Alembic (imported and run) only when the schema is behind: it adds ~0.2 s to every start.
        if upgrade and schema_behind(engine):
            migrate(settings.db_url)
        return cls(engine)

    def schema_problem(self) -> str | None:
        return schema_behind(self.engine)

    @contextmanager
    def advisory_lock(self, key: int, *, wait: bool) -> Iterator[bool]:
        """PostgreSQL: hold the session-level advisory lock `key` while inside, on a connection of its own (so
        every machine that uses this database takes turns); yields False at once when another session holds it
        and wait is False. SQLite: yields True, its file lock (indexer.storage.locks) is the whole lock.
        Use it through indexer.storage.locks, which takes this machine's file lock first."""
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        key_value = literal(key, BigInteger)
        with self.engine.connect() as connection:
            # No transaction stays open while the lock is held: a session lock outlives transactions.
            connection.execution_options(isolation_level="AUTOCOMMIT")
            if wait:
                connection.execute(select(func.pg_advisory_lock(key_value)))
            elif not connection.scalar(select(func.pg_try_advisory_lock(key_value))):
                yield False
                return
            try:
                yield True
            finally:
                try:
                    connection.execute(select(func.pg_advisory_unlock(key_value)))
                except SQLAlchemyError:
                    connection.invalidate()  # closing the session releases its locks

    # --- change numbers ------------------------------------------------------------------------

    def head(self) -> int:
        with self.engine.connect() as connection:
            return _head(connection)

    def change_marker(self) -> int | None:
        """A number that differs from the last one read whenever another connection has committed since: SQLite's
        data_version, on a connection kept for it (a server reads it before every search, and it costs a fraction
        of reading head through a query). None where there is no such number (PostgreSQL) or it could not be
        read: read head then."""
        if self.engine.dialect.name != "sqlite":
            return None
        with self._marker_lock:
            try:
                if self._marker_connection is None:
                    # Never writes, and never holds a transaction open: each read sees the newest commit.
                    self._marker_connection = self.engine.raw_connection()
                cursor = self._marker_connection.cursor()
                try:
                    return int(cursor.execute("PRAGMA data_version").fetchone()[0])
                finally:
                    cursor.close()
            except sqlite3.Error:
                if self._marker_connection is not None:
                    connection, self._marker_connection = self._marker_connection, None
                    connection.invalidate()  # not back into the pool: it may be broken
                return None  # the caller reads head, which fails with the reason if the database is away

    @staticmethod
    def _next_change(connection: Connection) -> int:
        """The next change number, taken inside the caller's write transaction."""
        connection.execute(update(StoreState).where(StoreState.name == "head").values(value=StoreState.value + 1))
        return _head(connection)

    def pending_changes(self, since: int) -> int:
        """Image rows changed after change number `since` (what a delta holds)."""
        with self.engine.connect() as connection:
            return int(connection.scalar(select(func.count()).where(ProductImage.change > since)) or 0)

    def changes_since(self, seen: int, model_key: str, dim: int) -> Changes:
        """Rows changed after `seen`. Reading head first makes this safe without a snapshot: a row changed
        again meanwhile is read in its newer state and read once more next time, and applying is idempotent.
        Vectors of another model are left out: they belong to an index that a new model will build."""
        with self.engine.connect() as connection:
            head = _head(connection)
            if head <= seen:
                return Changes(seen, *_empty(dim))
            rows = connection.execute(
                select(
                    ProductImage.id,
                    ProductImage.deleted_at.is_not(None),
                    ProductImage.model_key,
                    ProductImage.embedding,
                    Product.category,
                    Product.price,
                )
                .join(Product)
                # no ORDER BY: SQLite would walk the whole table in id order instead of the change index
                .where(ProductImage.change > seen)
            ).all()
        live = [r for r in rows if not r[1] and r[2] == model_key]
        removed = np.array([r[0] for r in rows if r[1]], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[3] for r in live), dtype=np.float32).reshape(len(live), dim)
        return Changes(
            head=head,
            ids=np.array([r[0] for r in live], dtype=np.int64),
            vectors=vectors,
            categories=[r[4] for r in live],
            prices=_prices(r[5] for r in live),
            removed=removed,
        )

    def snapshot(self, model_key: str) -> Snapshot:
        """Ids, categories and prices of every live vector of the model, by id (without the vectors)."""
        with self.engine.connect() as connection:
            head = _head(connection)
            rows = connection.execute(
                select(ProductImage.id, Product.category, Product.price)
                .join(Product)
                .where(LIVE, ProductImage.model_key == model_key)
                .order_by(ProductImage.id)
            ).all()
        return Snapshot(
            head=head,
            ids=np.array([r[0] for r in rows], dtype=np.int64),
            categories=[r[1] for r in rows],
            prices=_prices(r[2] for r in rows),
        )

    def stream_vectors(self, model_key: str, dim: int, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of every live vector of the model, in id order, a batch at a time (bounded memory)."""
        with self.engine.connect() as connection:
            result = connection.execution_options(yield_per=batch).execute(
                select(ProductImage.id, ProductImage.embedding)
                .where(LIVE, ProductImage.model_key == model_key)
                .order_by(ProductImage.id)
            )
            for rows in result.partitions():
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)

    def labelled_vectors(
        self, model_key: str, dim: int, batch: int = 10_000, *, views: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str | None]]]:
        """(ids, vectors, their products' categories) of every live vector of the model (only the photos'
        without `views`), a batch at a time."""
        query = (
            select(ProductImage.id, ProductImage.embedding, Product.category)
            .join(Product)
            .where(LIVE, ProductImage.model_key == model_key)
            .order_by(ProductImage.id)
        )
        with self.engine.connect() as connection:
            result = connection.execution_options(yield_per=batch).execute(
                query if views else query.where(ProductImage.view == "")
            )
            for rows in result.partitions():
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                yield ids, vectors, [r[2] for r in rows]

    def replace_vectors(self, ids: np.ndarray, vectors: np.ndarray, model_key: str) -> int:
        """New vectors (of another model: a whitened one) for existing rows, under one change number."""
        with self.engine.begin() as connection:
            change = self._next_change(connection)
            now = datetime.now(UTC)
            for part in _chunks(range(len(ids))):
                connection.execute(
                    update(ProductImage).where(ProductImage.id == bindparam("row_id")),
                    [
                        {"row_id": int(ids[i]), "model_key": model_key, "change": change, "updated_at": now,
                         "embedding": np.asarray(vectors[i], dtype=np.float32).tobytes()}
                        for i in part
                    ],
                )  # fmt: skip
        return change

    # --- the catalog's whitening ----------------------------------------------------------------

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

    # --- reads for the service -----------------------------------------------------------------

    def result_rows(self, image_ids: list[int]) -> dict[int, ShownProduct]:
        """The live product behind each image id, as a search result shows it (ids deleted since are absent)."""
        with self.engine.connect() as connection:
            rows = connection.execute(_RESULT_ROWS, {"ids": image_ids}).all()
        return {
            row.id: ShownProduct(sku=row.sku, title=row.title, category=row.category, price=row.price, url=row.url)
            for row in rows
        }

    def product(self, sku: str) -> ShownProduct | None:
        """A live product as its own page shows it: with its attributes."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(Product.sku, Product.title, Product.category, Product.price, Product.url, Product.attributes)
                .where(Product.sku == sku, _HAS_LIVE_IMAGE)
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

    def image_path(self, sku: str) -> str | None:
        """The stored file of a product's first live image."""
        with self.engine.connect() as connection:
            return connection.scalar(
                select(ProductImage.path)
                .join(Product)
                .where(Product.sku == sku, LIVE, ProductImage.view == "")
                .order_by(ProductImage.id)
                .limit(1)
            )

    def vector_of(self, sku: str, model_key: str, dim: int) -> np.ndarray | None:
        """A product's own vector (its first live photo), for "more like this"."""
        with self.engine.connect() as connection:
            blob = connection.scalar(
                select(ProductImage.embedding)
                .join(Product)
                .where(Product.sku == sku, LIVE, ProductImage.model_key == model_key, ProductImage.view == "")
                .order_by(ProductImage.id)
                .limit(1)
            )
        return None if blob is None else np.frombuffer(blob, dtype=np.float32).reshape(dim)

    def has_product(self, sku: str) -> bool:
        with self.engine.connect() as connection:
            return (
                connection.scalar(select(ProductImage.id).join(Product).where(Product.sku == sku, LIVE).limit(1))
                is not None
            )

    def holds_catalog(self, root: str) -> bool:
        """Whether live catalog images were indexed from this folder."""
        with self.engine.connect() as connection:
            found = connection.scalar(
                select(ProductImage.id)
                .where(ProductImage.source == CATALOG, LIVE, ProductImage.path.startswith(root.rstrip("/") + "/"))
                .limit(1)
            )
        return found is not None

    def counts(self) -> tuple[int, int]:
        """(live photos, products with a live photo); extra views are not counted."""
        with self.engine.connect() as connection:
            images = connection.scalar(select(func.count()).where(LIVE, ProductImage.view == ""))
            products = connection.scalar(select(func.count(func.distinct(ProductImage.product_id))).where(LIVE))
        return int(images or 0), int(products or 0)

    def product_labels(self, label: str) -> dict[str, str | None]:
        """sku -> the product's category, or another metadata column (an attribute)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(Product.sku, Product.category, Product.attributes).where(_HAS_LIVE_IMAGE)
            ).all()
        if label == "category":
            return {sku: category for sku, category, _ in rows}
        return {sku: (attributes or {}).get(label) for sku, _, attributes in rows}

    def known_files(self, source: str = CATALOG) -> dict[str, KnownFile]:
        """rel_path -> what is stored of each live image of that source, with the extra views it has."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(
                    ProductImage.rel_path,
                    ProductImage.view,
                    ProductImage.sha256,
                    ProductImage.model_key,
                    ProductImage.file_size,
                    ProductImage.file_mtime_ns,
                ).where(ProductImage.source == source, LIVE)
            ).all()
        files = {rel_path: KnownFile(*rest) for rel_path, view, *rest in rows if view == ""}
        extra: dict[str, set[str]] = {}
        for rel_path, view, _, model_key, *_ in rows:
            # a view of another model than its photo's is stale: left out, so the photo is embedded again
            if view and rel_path in files and model_key == files[rel_path].model_key:
                extra.setdefault(rel_path, set()).add(view)
        for rel_path, names in extra.items():
            files[rel_path] = files[rel_path]._replace(views=frozenset(names))
        return files

    # --- writes (hold write_lock) --------------------------------------------------------------

    def upsert_products(self, products: Iterable[ProductFields]) -> dict[str, int]:
        """Create or refresh products (the first of each sku wins); returns sku -> product id. A change to a
        field that results show takes a change number for the product's live images, so servers refresh it."""
        first: dict[str, ProductFields] = {}
        for product in products:
            first.setdefault(product.sku, product)
        ids: dict[str, int] = {}
        with self.engine.begin() as connection:
            change = None
            for skus in _chunks(list(first)):
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
                    shown_changed = [pid for pid, p in changed if tuple(stored[p.sku][2:6]) != p.shown()]
                    if shown_changed:
                        change = change or self._next_change(connection)
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

    def store_vectors(self, images: Sequence[ImageVector], model_key: str, source: str = CATALOG) -> int:
        """Insert or replace image rows by (rel_path, view) (a returning file revives its old rows and ids), under
        one change number. `images` holds every row of each file it names (the photo and its extra views): the
        file's other live rows (views no longer configured) become tombstones. Returns the change number."""
        if not images:
            return self.head()
        by_file: dict[str, list[ImageVector]] = {}
        for image in images:
            by_file.setdefault(image.rel_path, []).append(image)
        with self.engine.begin() as connection:
            change = self._next_change(connection)
            for paths in _chunks(list(by_file)):
                part = [image for path in paths for image in by_file[path]]
                stored = connection.execute(
                    select(ProductImage.rel_path, ProductImage.view, ProductImage.id, ProductImage.deleted_at).where(
                        ProductImage.rel_path.in_(paths)
                    )
                ).all()
                existing = {(rel_path, view): row_id for rel_path, view, row_id, _ in stored}
                written = {(i.rel_path, i.view) for i in part}
                now = datetime.now(UTC)
                dropped = [row_id for rel_path, view, row_id, gone in stored
                           if gone is None and (rel_path, view) not in written]  # fmt: skip
                if dropped:
                    connection.execute(
                        update(ProductImage).where(ProductImage.id.in_(dropped)).values(deleted_at=now, change=change)
                    )
                values = [
                    {
                        "product_id": i.product_id,
                        "path": i.path,
                        "sha256": i.sha256,
                        "model_key": model_key,
                        "embedding": np.asarray(i.vector, dtype=np.float32).tobytes(),
                        "file_size": i.size,
                        "file_mtime_ns": i.mtime_ns,
                        "deleted_at": None,
                        "change": change,
                        "updated_at": now,
                    }
                    for i in part
                ]
                fresh = [
                    {**v, "rel_path": i.rel_path, "view": i.view, "source": source}
                    for i, v in zip(part, values, strict=True)
                    if (i.rel_path, i.view) not in existing
                ]
                again = [
                    {**v, "row_id": existing[i.rel_path, i.view], "source": source}
                    for i, v in zip(part, values, strict=True)
                    if (i.rel_path, i.view) in existing
                ]
                if fresh:
                    connection.execute(insert(ProductImage), fresh)
                if again:
                    connection.execute(update(ProductImage).where(ProductImage.id == bindparam("row_id")), again)
        return change

    def record_file_stats(self, stats: Sequence[tuple[str, int, int]]) -> None:
        """Remember (rel_path, size, mtime_ns) of files read again whose bytes had not changed: the vector is
        the same, so this takes no change number."""
        if not stats:
            return
        with self.engine.begin() as connection:
            connection.execute(
                update(ProductImage)
                .where(ProductImage.rel_path == bindparam("rp"), LIVE)
                .values(file_size=bindparam("size"), file_mtime_ns=bindparam("mtime")),
                [{"rp": rel_path, "size": size, "mtime": mtime} for rel_path, size, mtime in stats],
            )

    def reconcile_catalog(
        self, keep: dict[str, tuple[int, str]], root: str, *, remove: bool = True, most_removed: float | None = None
    ) -> Reconciled:
        """Bring the catalog rows of folder `root` in line with `keep` (rel_path -> (product id, absolute path)):
        re-point kept rows whose product or path changed (a moved catalog keeps its rows and ids), and, when
        `remove`, tombstone the folder's live rows not in `keep`. Rows of other folders are never removed. When
        more than `most_removed` (a fraction) of the folder's photos would go, nothing changes and the result says
        so (`refused`). A photo's extra views follow it; the counts are of photos."""
        inside = root.rstrip("/") + "/"
        with self.engine.begin() as connection:
            stale, stale_paths, moved, in_folder = [], [], [], 0
            rows = connection.execute(
                select(
                    ProductImage.id,
                    ProductImage.rel_path,
                    ProductImage.view,
                    ProductImage.product_id,
                    ProductImage.path,
                ).where(ProductImage.source == CATALOG, LIVE)
            )
            for row_id, rel_path, view, product_id, path in rows:
                if rel_path in keep:
                    if keep[rel_path] != (product_id, path):
                        moved.append({"row_id": row_id, "product_id": keep[rel_path][0], "path": keep[rel_path][1]})
                elif path.startswith(inside):
                    in_folder += view == ""
                    if remove:
                        stale.append(row_id)
                        if view == "":
                            stale_paths.append(rel_path)
            in_folder += len(keep)
            result = Reconciled(len(stale_paths), in_folder, sorted(stale_paths)[:10])
            if most_removed is not None and len(stale_paths) > most_removed * in_folder:
                return Reconciled(0, in_folder, result.sample, refused=len(stale_paths))
            if stale or moved:
                change = self._next_change(connection)
                now = datetime.now(UTC)
                for part in _chunks(stale):
                    connection.execute(
                        update(ProductImage).where(ProductImage.id.in_(part)).values(deleted_at=now, change=change)
                    )
                if moved:
                    connection.execute(
                        update(ProductImage).where(ProductImage.id == bindparam("row_id")),
                        [{**m, "change": change} for m in moved],
                    )
            # Products of this run none of whose photos could be read (the API writes a product and its image
            # in one transaction, so it never leaves one without).
            connection.execute(delete(Product).where(~_HAS_IMAGE))
        return result

    def put_product(
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
            change = self._next_change(connection)
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
                    select(ProductImage.view, ProductImage.id).where(ProductImage.rel_path == image.rel_path)
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

    def delete_product(self, sku: str) -> int | None:
        """Tombstone a product's live images; the change number, or None when there was nothing live."""
        with self.engine.begin() as connection:
            ids = (
                connection.execute(select(ProductImage.id).join(Product).where(Product.sku == sku, LIVE))
                .scalars()
                .all()
            )
            if not ids:
                return None
            change = self._next_change(connection)
            connection.execute(
                update(ProductImage).where(ProductImage.id.in_(ids)).values(deleted_at=datetime.now(UTC), change=change)
            )
        return change

    def purge_tombstones(self, through_change: int, older_than: timedelta) -> int:
        """Delete image rows tombstoned at or before change `through_change` (so no current base holds them) and
        long enough ago that every server has applied the deletion, then the products left without images."""
        cutoff = datetime.now(UTC) - older_than
        expired = (
            ProductImage.deleted_at.is_not(None)
            & (ProductImage.deleted_at < cutoff)
            & (ProductImage.change <= through_change)
        )
        with self.engine.begin() as connection:
            owners = connection.execute(select(ProductImage.product_id).where(expired)).scalars().all()
            purged = connection.execute(delete(ProductImage).where(expired)).rowcount
            # Only those products: one the indexer has just created may not have its images yet.
            for part in _chunks(sorted(set(owners))):
                connection.execute(delete(Product).where(Product.id.in_(part), ~_HAS_IMAGE))
        return purged


# Built once: every search reads head, and building the statement cost more CPU than running it.
_HEAD = select(StoreState.value).where(StoreState.name == "head")


def _head(connection: Connection) -> int:
    """The newest committed change number (as of the connection's transaction)."""
    return int(connection.scalar(_HEAD) or 0)


def _empty(dim: int) -> tuple:
    return (
        np.zeros(0, np.int64),
        np.zeros((0, dim), np.float32),
        [],
        np.zeros(0, np.float32),
        np.zeros(0, np.int64),
    )


def _product_values(product: ProductFields) -> dict[str, object]:
    return {
        "sku": product.sku,
        "title": product.title,
        "category": product.category,
        "price": product.price,
        "url": product.url,
        "attributes": dict(product.attributes),
    }


# A product is live while it has a live image. EXISTS, not IN (SELECT ...): SQLite would materialise the
# live image ids of the whole catalog (seconds at a million) for a lookup of one product.
_HAS_LIVE_IMAGE = select(ProductImage.id).where(ProductImage.product_id == Product.id, LIVE).exists()
# NOT EXISTS, not NOT IN (SELECT ...): PostgreSQL runs it as an anti-join; NOT IN over a subquery larger than
# work_mem would scan the subquery once per product.
_HAS_IMAGE = select(ProductImage.id).where(ProductImage.product_id == Product.id).exists()


_RESULT_ROWS = (
    select(ProductImage.id, Product.sku, Product.title, Product.category, Product.price, Product.url)
    .join(Product)
    .where(ProductImage.id.in_(bindparam("ids", expanding=True)), LIVE)
)
