"""Search over the published index: a query vector in, products out.

Holds the embedding model and the current index version; picks up a newly
published version on the next request (a stat of the manifest), so
`make index` never needs a service restart.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from indexer.config import Settings
from indexer.model import Embedder
from indexer.schema import LIVE, Product, ProductImage, live_product_ids, schema_behind
from indexer.vectors import IndexVersion, load_index, manifest_stamp
from service.product_rows import ProductRows

# Several images of one product collapse into one result, so fetch a few more neighbours.
OVERFETCH = 3


class NotReady(RuntimeError):
    """There is no usable index yet; the message says what to do."""


class UnknownProduct(LookupError):
    pass


@dataclass(frozen=True)
class Match:
    sku: str
    title: str
    category: str | None
    price: float | None
    url: str | None
    score: float

    def as_dict(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "url": self.url,
            "score": round(self.score, 6),
        }


# OpenMP's thread count is per thread, so each request thread sets its own, once.
_faiss_threads = threading.local()


class CatalogSearch:
    def __init__(self, settings: Settings, embedder: Embedder, sessions: sessionmaker):
        self.settings = settings
        self.embedder = embedder
        self.sessions = sessions
        self._lock = threading.Lock()
        self._version: IndexVersion | None = None
        self._problem: str | None = None
        self._categories: tuple[tuple[int, int], list[str]] | None = None
        self._rows: ProductRows | None = None

    # --- index version -------------------------------------------------------------------

    def current(self) -> IndexVersion:
        """The newest published index version, reloaded when `make index` publishes another."""
        stamp = manifest_stamp(self.settings.index_dir)
        version = self._version
        if version is None or version.manifest_stamp != stamp:
            with self._lock:
                if self._version is None or self._version.manifest_stamp != stamp:
                    self._version = self._load()
            version = self._version
        if version is None:
            raise NotReady(self._problem or "not ready")
        return version

    def _load(self) -> IndexVersion | None:
        version = load_index(self.settings.index_dir)
        if version is not None and (behind := schema_behind(self.sessions.kw["bind"])):
            self._problem = behind  # e.g. new code started without `make migrate`
            return None
        if version is None:
            self._problem = (
                f"no index in {self.settings.index_dir} yet: run `make index CATALOG=<folder of product photos>`"
            )
            return None
        built_with = {k: version.manifest.get(k) for k in ("model", "weights_sha256", "dim")}
        if built_with != self.embedder.identity.as_dict():
            self._problem = (
                f"the index was built with {built_with} but the service runs "
                f"{self.embedder.identity.as_dict()}; re-run `make index` with this model "
                "or configure the model the index was built with"
            )
            return None
        self._problem = None
        return version

    def status(self) -> dict[str, object]:
        try:
            version = self.current()
        except NotReady as exc:
            return {"ready": False, "reason": str(exc), "model": self.embedder.identity.as_dict()}
        manifest = version.manifest
        return {
            "ready": True,
            "items": int(version.index.ntotal),
            "model": self.embedder.identity.as_dict(),
            "model_version": self.embedder.version,
            "engine": self.embedder.engine.name,
            "index_version": manifest.get("version"),
            "index_created": manifest.get("created"),
            "factory": manifest.get("factory"),
        }

    # --- searching -----------------------------------------------------------------------

    def search(
        self,
        vector: np.ndarray,
        k: int,
        category: str | None = None,
        exclude_sku: str | None = None,
        version: IndexVersion | None = None,
    ) -> list[Match]:
        """The k best products for a unit query vector, best first, one entry per product,
        from the given index version (default: the current one)."""
        version = version or self.current()
        params = None
        if category is not None:
            ids = self._image_ids(category=category)
            if len(ids) == 0:
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
        fetch = min(int(version.index.ntotal), (k + 1) * OVERFETCH)
        if fetch == 0:
            return []
        if not getattr(_faiss_threads, "set", False):
            # Requests already run in parallel, and an idle OpenMP team spins on the cores
            # that the interpreters need.
            faiss.omp_set_num_threads(1)
            _faiss_threads.set = True
        scores, ids = version.index.search(np.asarray(vector, np.float32)[None], fetch, params=params)
        return self._matches(version, ids[0], scores[0], k, exclude_sku)

    def similar(self, sku: str, k: int, category: str | None = None) -> list[Match]:
        """'More like this': neighbours of a catalog product's own vector, without itself."""
        version = self.current()
        with self.sessions() as session:
            image_ids = session.scalars(
                select(ProductImage.id).join(Product).where(Product.sku == sku, LIVE).order_by(ProductImage.id)
            ).all()
        if not image_ids:
            raise UnknownProduct(sku)
        try:
            vector = version.index.reconstruct(int(image_ids[0]))
        except RuntimeError:  # indexed rows and the published version can differ for a moment
            raise NotReady("the product is not in the current index version yet; try again shortly") from None
        return self.search(vector, k, category=category, exclude_sku=sku)

    def _image_ids(self, category: str) -> np.ndarray:
        with self.sessions() as session:
            ids = session.scalars(select(ProductImage.id).join(Product).where(Product.category == category, LIVE)).all()
        return np.asarray(ids, dtype=np.int64)

    def _product_rows(self, version: IndexVersion) -> ProductRows:
        rows = self._rows
        if rows is None or rows.version_stamp != version.manifest_stamp:
            rows = self._rows = ProductRows(self.sessions.kw["bind"], version.manifest_stamp)
        return rows

    def _matches(
        self, version: IndexVersion, ids: np.ndarray, scores: np.ndarray, k: int, exclude_sku: str | None
    ) -> list[Match]:
        found = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0]
        products = self._product_rows(version).get([i for i, _ in found])
        matches: list[Match] = []
        seen: set[str] = set()
        for image_id, score in found:
            product = products.get(image_id)
            # A tombstoned (or purged) id: deleted after this index version was built.
            if product is None or product.sku in seen or product.sku == exclude_sku:
                continue
            seen.add(product.sku)
            matches.append(Match(*product, score=score))
            if len(matches) == k:
                break
        return matches

    # --- catalog lookups -----------------------------------------------------------------

    def product(self, sku: str) -> Product:
        with self.sessions() as session:
            product = session.scalar(select(Product).where(Product.sku == sku, Product.id.in_(live_product_ids())))
        if product is None:
            raise UnknownProduct(sku)
        return product

    def image_path(self, sku: str) -> Path:
        """The catalog file of a product's first image; only paths stored by the indexer."""
        with self.sessions() as session:
            path = session.scalar(
                select(ProductImage.path)
                .join(Product)
                .where(Product.sku == sku, LIVE)
                .order_by(ProductImage.id)
                .limit(1)
            )
        if path is None or not Path(path).is_file():
            raise UnknownProduct(sku)
        return Path(path)

    def categories(self, version: IndexVersion | None = None) -> list[str]:
        """The catalog's categories, read once per index version (default: the current one)."""
        version = version or self.current()
        cached = self._categories
        if cached is not None and cached[0] == version.manifest_stamp:
            return cached[1]
        with self.sessions() as session:
            live = select(Product.category).where(Product.id.in_(live_product_ids())).distinct()
            categories = sorted(c for c in session.scalars(live) if c)
        self._categories = (version.manifest_stamp, categories)
        return categories
