"""Image rows and the change log they make: vectors written by file, the rows changed after a change number,
snapshots and streams of a model's live vectors, file stats, catalog reconciling and tombstones.

A write here is one transaction; one that changes what a server shows takes one change number in it
(indexer.storage.database) and stamps every row it touches with it. The writes that start from a product
(by sku, with its images in the same transaction) are in indexer.storage.products. Writers hold
indexer.storage.locks.write_lock; readers never block them (SQLite WAL; PostgreSQL's MVCC).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from indexer.storage.database import chunks, next_change, read_head
from indexer.storage.schema import API, CATALOG, HAS_IMAGE, LIVE, Product, ProductImage


class KnownFile(NamedTuple):
    """What the store remembers of a live image file: enough to skip it when it has not changed."""

    sha256: str
    model_key: str
    size: int | None
    mtime_ns: int | None
    # Its extra views' rows (index.catalog_views).
    views: frozenset[str] = frozenset()
    # The products whose photo it is (variants share a photo, each with its own rows).
    products: frozenset[int] = frozenset()


@dataclass(frozen=True)
class ImageVector:
    """One image's embedding (or one of its extra views'), ready to store."""

    rel_path: str
    path: str
    sha256: str
    vector: np.ndarray
    # None for Products.put, which stores the image under the product it writes
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
    # each live row's product attributes (what attribute filters match), in the order of `ids`
    attributes: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids) + len(self.removed)


@dataclass
class Snapshot:
    """Every live vector of one model, with its image id, product category, price and attributes, as of change
    `head`."""

    head: int
    ids: np.ndarray
    categories: list[str | None]
    prices: np.ndarray
    attributes: list[dict] = field(default_factory=list)


class Vectors:
    """The image rows of one database (Store.vectors)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    # --- changes -------------------------------------------------------------------------------

    def pending_changes(self, since: int) -> int:
        """Image rows changed after change number `since` (what a delta holds)."""
        with self.engine.connect() as connection:
            return int(connection.scalar(select(func.count()).where(ProductImage.change > since)) or 0)

    def changes_since(self, seen: int, model_key: str, dim: int) -> Changes:
        """Rows changed after `seen`. Reading head first makes this safe without a snapshot: a row changed
        again meanwhile is read in its newer state and read once more next time, and applying is idempotent.
        Vectors of another model are left out: they belong to an index that a new model will build."""
        with self.engine.connect() as connection:
            head = read_head(connection)
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
                    Product.attributes,
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
            attributes=[r[6] or {} for r in live],
        )

    def snapshot(self, model_key: str) -> Snapshot:
        """Ids, categories, prices and attributes of every live vector of the model, by id (without the vectors)."""
        with self.engine.connect() as connection:
            head = read_head(connection)
            rows = connection.execute(
                select(ProductImage.id, Product.category, Product.price, Product.attributes)
                .join(Product)
                .where(LIVE, ProductImage.model_key == model_key)
                .order_by(ProductImage.id)
            ).all()
        return Snapshot(
            head=head,
            ids=np.array([r[0] for r in rows], dtype=np.int64),
            categories=[r[1] for r in rows],
            prices=_prices(r[2] for r in rows),
            attributes=[r[3] or {} for r in rows],
        )

    # --- reads ---------------------------------------------------------------------------------

    def stream(self, model_key: str, dim: int, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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

    def labelled(
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

    def of_product(self, sku: str, model_key: str, dim: int) -> np.ndarray | None:
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

    def holds_catalog(self, root: str) -> bool:
        """Whether live catalog images were indexed from this folder."""
        with self.engine.connect() as connection:
            found = connection.scalar(
                select(ProductImage.id)
                .where(ProductImage.source == CATALOG, LIVE, ProductImage.path.startswith(root.rstrip("/") + "/"))
                .limit(1)
            )
        return found is not None

    def known_files(self, source: str = CATALOG) -> dict[str, KnownFile]:
        """rel_path -> what is stored of each live image of that source, with the extra views it has and the
        products it is the photo of. A file whose variants' rows disagree (bytes or model) is left out, so it is
        embedded again and all its rows rewritten."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(
                    ProductImage.rel_path,
                    ProductImage.view,
                    ProductImage.product_id,
                    ProductImage.sha256,
                    ProductImage.model_key,
                    ProductImage.file_size,
                    ProductImage.file_mtime_ns,
                ).where(ProductImage.source == source, LIVE)
            ).all()
        files: dict[str, KnownFile] = {}
        owners: dict[str, set[int]] = {}
        mixed: set[str] = set()
        for rel_path, view, product_id, *rest in rows:
            if view == "":
                known = files.setdefault(rel_path, KnownFile(*rest))
                mixed |= {rel_path} if known[:2] != tuple(rest[:2]) else set()
                owners.setdefault(rel_path, set()).add(product_id)
        extra: dict[str, set[str]] = {}
        for rel_path, view, _, _, model_key, *_ in rows:
            # a view of another model than its photo's is stale: left out, so the photo is embedded again
            if view and rel_path in files and model_key == files[rel_path].model_key:
                extra.setdefault(rel_path, set()).add(view)
        return {
            rel_path: known._replace(views=frozenset(extra.get(rel_path, ())), products=frozenset(owners[rel_path]))
            for rel_path, known in files.items()
            if rel_path not in mixed
        }

    # --- writes (hold write_lock) --------------------------------------------------------------

    def upsert(self, images: Sequence[ImageVector], model_key: str, source: str = CATALOG) -> int:
        """Insert or replace image rows by (rel_path, view, product) (a returning file revives its old rows and ids),
        under one change number. `images` holds every row of each (file, product) it names (the photo and its extra
        views): that product's other live rows of the file (views no longer configured) become tombstones; other
        products' rows of the file (its other variants) are left as they are. Returns the change number."""
        if not images:
            return self._head()
        by_file: dict[str, list[ImageVector]] = {}
        for image in {(i.rel_path, i.view, i.product_id): i for i in images}.values():  # a row named twice: the last
            by_file.setdefault(image.rel_path, []).append(image)
        with self.engine.begin() as connection:
            change = next_change(connection)
            for paths in chunks(list(by_file)):
                part = [image for path in paths for image in by_file[path]]
                stored = connection.execute(
                    select(
                        ProductImage.rel_path,
                        ProductImage.view,
                        ProductImage.product_id,
                        ProductImage.id,
                        ProductImage.deleted_at,
                    ).where(ProductImage.rel_path.in_(paths))
                ).all()
                existing = {(rel_path, view, product): row_id for rel_path, view, product, row_id, _ in stored}
                written = {(i.rel_path, i.view, i.product_id) for i in part}
                owners = {(i.rel_path, i.product_id) for i in part}
                now = datetime.now(UTC)
                dropped = [row_id for rel_path, view, product, row_id, gone in stored
                           if gone is None and (rel_path, product) in owners
                           and (rel_path, view, product) not in written]  # fmt: skip
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
                keys = [(i.rel_path, i.view, i.product_id) for i in part]
                fresh = [
                    {**v, "rel_path": key[0], "view": key[1], "source": source}
                    for key, v in zip(keys, values, strict=True)
                    if key not in existing
                ]
                again = [
                    {**v, "row_id": existing[key], "source": source}
                    for key, v in zip(keys, values, strict=True)
                    if key in existing
                ]
                if fresh:
                    connection.execute(insert(ProductImage), fresh)
                if again:
                    connection.execute(update(ProductImage).where(ProductImage.id == bindparam("row_id")), again)
        return change

    def replace(self, ids: np.ndarray, vectors: np.ndarray, model_key: str) -> int:
        """New vectors (of another model: a whitened one) for existing rows, under one change number."""
        with self.engine.begin() as connection:
            change = next_change(connection)
            now = datetime.now(UTC)
            for part in chunks(range(len(ids))):
                connection.execute(
                    update(ProductImage).where(ProductImage.id == bindparam("row_id")),
                    [
                        {"row_id": int(ids[i]), "model_key": model_key, "change": change, "updated_at": now,
                         "embedding": np.asarray(vectors[i], dtype=np.float32).tobytes()}
                        for i in part
                    ],
                )  # fmt: skip
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

    def live_by_model(self) -> dict[str, int]:
        """Live image rows by the model their vectors are of: more than one while `make index` embeds the catalog
        with a new model."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(ProductImage.model_key, func.count()).where(LIVE).group_by(ProductImage.model_key)
            ).all()
        return {key: int(count) for key, count in rows}

    def uploads_of_other_models(self, model_key: str) -> list[tuple[int, str, str]]:
        """(id, path, view) of the live rows of photos written through the API whose vectors are of another model
        than `model_key`'s: what a change of model must embed again from their files."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(ProductImage.id, ProductImage.path, ProductImage.view)
                .where(ProductImage.source == API, LIVE, ProductImage.model_key != model_key)
                .order_by(ProductImage.id)
            ).all()
        return [(int(image_id), path, view) for image_id, path, view in rows]

    def relocate_uploads(self, folder: Path) -> int:
        """Point the rows of photos written through the API at `folder` (a restored data folder's uploads/), where
        files of the same names are: what a restore does before any server reads the rows; no change number, the
        photos' bytes and vectors being the same. Returns the rows moved."""
        with self.engine.begin() as connection:
            rows = connection.execute(select(ProductImage.id, ProductImage.path).where(ProductImage.source == API))
            moved = [{"image": image, "path": str(folder / PurePosixPath(path).name)} for image, path in rows]
            if moved:
                connection.execute(
                    update(ProductImage).where(ProductImage.id == bindparam("image")).values(path=bindparam("path")),
                    moved,
                )
        return len(moved)

    def reconcile_catalog(
        self,
        keep: dict[str, tuple[frozenset[int], str]],
        root: str,
        *,
        remove: bool = True,
        most_removed: float | None = None,
    ) -> Reconciled:
        """Bring the catalog rows of folder `root` in line with `keep` (rel_path -> (the ids of the products whose
        photo it is, its absolute path)): re-point kept rows whose path changed (a moved catalog keeps its rows and
        ids); give each product that names a stored photo but has no rows of it (a new variant, a photo that moved to
        another sku) rows copied from the photo's others, so it is not embedded again; and, when `remove`, tombstone
        the folder's live rows that `keep` does not name (photos gone, variants gone). Rows of other folders are
        never removed. When more than `most_removed` (a fraction) of the folder's product photos would go, nothing
        changes and the result says so (`refused`). A photo's extra views follow it; the counts are of photos, one
        per product that names it."""
        inside = root.rstrip("/") + "/"
        with self.engine.begin() as connection:
            stale, stale_paths, moved, in_folder = [], [], [], 0
            have: dict[str, set[int]] = {}
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
                if rel_path in keep and product_id in keep[rel_path][0]:
                    have.setdefault(rel_path, set()).add(product_id)
                    if keep[rel_path][1] != path:
                        moved.append({"row_id": row_id, "path": keep[rel_path][1]})
                elif path.startswith(inside):
                    in_folder += view == ""
                    if remove:
                        stale.append(row_id)
                        if view == "":
                            stale_paths.append(rel_path)
            in_folder += sum(len(products) for products, _ in keep.values())
            result = Reconciled(len(stale_paths), in_folder, sorted(set(stale_paths))[:10])
            if most_removed is not None and len(stale_paths) > most_removed * in_folder:
                return Reconciled(0, in_folder, result.sample, refused=len(stale_paths))
            missing = {
                rel_path: (products - have[rel_path] if rel_path in have else products, path)
                for rel_path, (products, path) in keep.items()
                if rel_path not in have or products - have[rel_path]
            }
            if stale or moved or missing:
                change = next_change(connection)
                now = datetime.now(UTC)
                # before the tombstones: a photo whose sku changed is copied from its old product's rows
                _copy_to_variants(connection, missing, change, now)
                for part in chunks(stale):
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
            connection.execute(delete(Product).where(~HAS_IMAGE))
        return result

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
            for part in chunks(sorted(set(owners))):
                connection.execute(delete(Product).where(Product.id.in_(part), ~HAS_IMAGE))
        return purged

    def _head(self) -> int:
        with self.engine.connect() as connection:
            return read_head(connection)


def _copy_to_variants(
    connection: Connection, missing: dict[str, tuple[frozenset[int], str]], change: int, now: datetime
) -> None:
    """Rows for products that name a stored photo without having rows of it (rel_path -> (their ids, the file's
    path)): copies of one live catalog product's rows of the photo (its vector and its extra views'), under
    `change`; a product's own old rows of the photo are revived (the same ids). A file without live rows (one
    that could not be embedded) gets none."""
    for paths in chunks(list(missing)):
        rows = connection.execute(
            select(
                ProductImage.rel_path,
                ProductImage.view,
                ProductImage.product_id,
                ProductImage.id,
                ProductImage.deleted_at.is_(None) & (ProductImage.source == CATALOG),
            ).where(ProductImage.rel_path.in_(paths))
        ).all()
        existing = {(rel_path, view, product): row_id for rel_path, view, product, row_id, _ in rows}
        template: dict[str, int] = {}  # rel_path -> the product whose rows are copied
        for rel_path, view, product, _, live in rows:
            if live and view == "":
                template[rel_path] = min(product, template.get(rel_path, product))
        sources = connection.execute(
            select(
                ProductImage.rel_path,
                ProductImage.product_id,
                ProductImage.view,
                ProductImage.sha256,
                ProductImage.model_key,
                ProductImage.embedding,
                ProductImage.file_size,
                ProductImage.file_mtime_ns,
            ).where(
                ProductImage.rel_path.in_(list(template)),
                ProductImage.product_id.in_(set(template.values())),
                LIVE,
            )
        ).all()
        fresh, again = [], []
        for rel_path, owner, view, sha256, model_key, embedding, size, mtime_ns in sources:
            if template[rel_path] != owner:
                continue
            for product in missing[rel_path][0]:
                values = {
                    "product_id": product, "path": missing[rel_path][1], "sha256": sha256, "model_key": model_key,
                    "source": CATALOG, "embedding": embedding, "file_size": size, "file_mtime_ns": mtime_ns,
                    "deleted_at": None, "change": change, "updated_at": now,
                }  # fmt: skip
                if (row_id := existing.get((rel_path, view, product))) is None:
                    fresh.append({**values, "rel_path": rel_path, "view": view})
                else:
                    again.append({**values, "row_id": row_id})
        if fresh:
            connection.execute(insert(ProductImage), fresh)
        if again:
            connection.execute(update(ProductImage).where(ProductImage.id == bindparam("row_id")), again)


def _prices(values: Iterable[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float32)


def _empty(dim: int) -> tuple:
    return (
        np.zeros(0, np.int64),
        np.zeros((0, dim), np.float32),
        [],
        np.zeros(0, np.float32),
        np.zeros(0, np.int64),
    )
