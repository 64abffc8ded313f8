"""The one way products and their vectors are added, replaced and removed: `make index`, `import-vectors` and the
write API all go through CatalogWriter.write, which takes the writers' lock, checks the vectors' model, calls the
store, and turns a failing disk or database into SaveFailed (nothing was changed, try again).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from indexer.config import Settings
from indexer.errors import NotReady
from indexer.records import ProductFields
from indexer.storage.locks import write_lock
from indexer.storage.schema import CATALOG
from indexer.storage.store import Store
from indexer.storage.vectors import ImageVector, Reconciled

if TYPE_CHECKING:
    from indexer.embedding.model import ModelIdentity

log = logging.getLogger(__name__)


class SaveFailed(NotReady):
    """A change that could not be saved (a full or failing disk, a database error): the store's transaction rolled
    back, so nothing was changed and the caller can try again."""

    @classmethod
    def because(cls, exc: OSError | SQLAlchemyError) -> SaveFailed:
        if isinstance(exc, OperationalError | InterfaceError):
            reason = "the catalog database is unavailable right now"
        else:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return cls(f"the change could not be saved ({reason}); nothing was changed, try again later")


class ModelChanged(NotReady):
    """The index changed models (or whitening) while the vectors were made: stored, they would not match it."""

    def __init__(self) -> None:
        super().__init__("the index changed models while the photo was embedded; send the write again")


@dataclass(frozen=True)
class Photo:
    """One photo of a product with its vectors, ready to store: `vectors` is (1 + len(views), dim), the photo's
    own vector and then each extra catalog view's (index.catalog_views), in `views` order."""

    sku: str
    rel_path: str
    path: str
    sha256: str
    vectors: np.ndarray
    views: tuple[str, ...] = ()
    # The file's size and mtime, so that `make index` skips it while they stay the same.
    size: int | None = None
    mtime_ns: int | None = None

    def rows(self, product_id: int | None) -> list[ImageVector]:
        """The store's rows: the photo's, then one per extra view."""
        names = ("", *self.views)
        return [
            ImageVector(
                rel_path=self.rel_path,
                path=self.path,
                sha256=self.sha256,
                vector=vector,
                product_id=product_id,
                size=self.size,
                mtime_ns=self.mtime_ns,
                view=view,
            )
            for view, vector in zip(names, self.vectors, strict=True)
        ]


@dataclass(frozen=True)
class Written:
    """What a write did: the last change number it took (None: none), the skus it created (known when it replaced
    each product's photos) and the skus whose live photos it removed."""

    change: int | None = None
    created: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()


class CatalogWriter:
    """Writes products and photos of one source (the catalog folder, the write API, a vector import) to the store.

    A job makes one and writes batch after batch (thousands of rows per transaction); the write API makes one per
    request and writes one product. It remembers the product ids its writes learned, so a job can write its
    products first and their photos batch by batch."""

    def __init__(self, settings: Settings, store: Store, source: str = CATALOG):
        self.settings = settings
        self.store = store
        self.source = source
        self.product_ids: dict[str, int] = {}

    def write(
        self,
        products: Sequence[ProductFields] = (),
        photos: Sequence[Photo] = (),
        *,
        model: ModelIdentity | None = None,
        replace_photos: bool = False,
        removed: Iterable[str] = (),
        restated: Sequence[tuple[str, int, int]] = (),
        current_model: Callable[[], ModelIdentity] | None = None,
        sync: bool = False,
    ) -> Written:
        """Add or refresh `products` (the first of each sku wins); add or replace `photos` (by file: a file's rows
        are its photo and its views), their vectors made with `model`; remove the live photos of the skus in
        `removed`; record the new size and mtime of files read again unchanged (`restated`: rel_path, size,
        mtime_ns). All under the writers' lock; with `replace_photos`, each product and its one photo in one
        transaction, its other photos becoming tombstones (the write API's PUT).

        `current_model`, when given, says which model the index now searches with; it is asked under the lock, and
        a write whose vectors are of another model raises ModelChanged (a NotReady: try again), having changed
        nothing. It must not take the writers' lock. With `sync`, an external vector store
        (index.backend = "milvus") is brought up to the new head before the lock is released.

        A disk or database failure raises SaveFailed (a NotReady): the failing transaction changed nothing."""
        if photos and model is None:
            raise ValueError("photos need the model their vectors were made with")
        saved = False
        try:
            with write_lock(self.settings.data_dir, self.store):
                _check_model(model, current_model)
                written = self._apply(products, photos, model, replace_photos, list(removed), restated)
                saved = True
                if sync:
                    sync_vector_store(self.settings, self.store, model)
        except (OSError, SQLAlchemyError) as exc:
            if saved:  # the change is committed; what failed is bringing the vector store up to it
                raise
            log.error("write failed, nothing changed: %s", exc)
            raise SaveFailed.because(exc) from exc
        return written

    def _apply(
        self,
        products: Sequence[ProductFields],
        photos: Sequence[Photo],
        model: ModelIdentity | None,
        replace_photos: bool,
        removed: list[str],
        restated: Sequence[tuple[str, int, int]],
    ) -> Written:
        """The store calls of one write (the caller holds the lock)."""
        change, created, gone = None, set(), set()
        if replace_photos:
            photo_of = {photo.sku: photo for photo in photos}
            for product in products:
                image, *views = photo_of[product.sku].rows(None)
                new, change = self.store.products.put(product, image, model.key, self.source, views)
                created |= {product.sku} if new else set()
        else:
            if products:
                self.product_ids |= self.store.products.upsert(products)
            if photos:
                rows = [row for photo in photos for row in photo.rows(self.product_ids[photo.sku])]
                change = self.store.vectors.upsert(rows, model.key, source=self.source)
        self.store.vectors.record_file_stats(restated)
        for sku in removed:
            # tombstones: a request still holding an older state can resolve every id it found
            if (removal := self.store.products.delete(sku)) is not None:
                change, gone = removal, gone | {sku}
        return Written(change, frozenset(created), frozenset(gone))

    def put_upload(
        self,
        product: ProductFields,
        data: bytes,
        image_format: str,
        vectors: np.ndarray,
        views: tuple[str, ...],
        *,
        model: ModelIdentity,
        current_model: Callable[[], ModelIdentity] | None = None,
    ) -> bool:
        """Add or replace a product with an uploaded photo and its vectors (as Photo.vectors): the file is kept under
        <data_dir>/uploads/, named by its content, then the product written as `write` does with replace_photos.
        Returns whether the product is new (had no live photo)."""
        _check_model(model, current_model)  # before the file: a write that will be refused leaves none
        try:
            path = store_upload(self.settings.data_dir, data, image_format)
        except OSError as exc:
            log.error("write failed, nothing changed: %s", exc)
            raise SaveFailed.because(exc) from exc
        photo = Photo(product.sku, f"api/{path.stem}/{product.sku}", str(path), path.stem, vectors, views)
        written = self.write([product], [photo], model=model, replace_photos=True, current_model=current_model)
        return product.sku in written.created

    def reconcile(
        self,
        keep: dict[str, tuple[frozenset[int], str]],
        root: str,
        *,
        remove: bool = True,
        most_removed: float | None = None,
    ) -> Reconciled:
        """Bring the catalog rows of folder `root` in line with `keep` (Store.reconcile_catalog), under the lock."""
        with write_lock(self.settings.data_dir, self.store):
            return self.store.vectors.reconcile_catalog(keep, root, remove=remove, most_removed=most_removed)


def _check_model(model: ModelIdentity | None, current_model: Callable[[], ModelIdentity] | None) -> None:
    if model is not None and current_model is not None and current_model() != model:
        raise ModelChanged()


def store_upload(data_dir: Path, data: bytes, image_format: str) -> Path:
    """Keep an uploaded photo under <data_dir>/uploads/, named by its content (the same bytes, the same file);
    written whole (fsync, then renamed into place), so a crash never leaves a partial photo under its name."""
    digest = hashlib.sha256(data).hexdigest()
    folder = data_dir / "uploads"
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


def sync_vector_store(settings: Settings, store: Store, model: ModelIdentity) -> None:
    """With index.backend = "milvus": bring its collection up to the store's head (call it holding write_lock).
    With FAISS, nothing: servers apply the changes to their deltas themselves, and compaction builds bases.
    pymilvus is imported only for Milvus."""
    if settings.index_backend == "milvus":
        from indexer.index.milvus_store import sync

        sync(settings, store, model)
