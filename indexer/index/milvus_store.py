"""Milvus as the vector store (index.backend = "milvus"): a thin wrapper over one Milvus collection per model.

The database stays the source of truth for products. The collection holds what a search needs, keyed by image id:
the vector, the product's category and its price, so that Milvus applies deletions and filters itself (an exact
FLAT index with inner product, which is cosine similarity on these unit vectors). It follows the store's change
numbers as FAISS servers do: a writer (`make index`, or the server that took a write) or a server that finds the
collection behind the store's head applies the changes committed since the number recorded in the collection's
properties, under the writers' lock (indexer.storage.locks.write_lock), then records the new number. Applying is
idempotent, and under that lock changes are applied in commit order, so every server searches the same state.

A path ending in .db is Milvus Lite, embedded in this process (one process at a time per file); an address such as
http://host:19530 is a Milvus server or cluster that every server and indexer shares.

pymilvus is imported here only, and this module only when index.backend = "milvus".
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from indexer.config import ConfigError, Settings, is_milvus_lite
from indexer.errors import AttributesUnavailable
from indexer.index.live_index import NO_FILTERS, Filters
from indexer.storage.locks import write_lock
from indexer.storage.store import Store
from indexer.storage.vectors import Changes

# pymilvus reads MILVUS_URI when imported, for a default connection of its own, and refuses a file (Milvus Lite)
# there. Our settings have read it already and pass it to the client, so pymilvus is imported without it.
_uri = os.environ.pop("MILVUS_URI", None)
try:
    from pymilvus import DataType, MilvusClient, MilvusException
except ModuleNotFoundError as exc:  # pymilvus is not in the default install (requirements.txt)
    raise ConfigError(
        f'index.backend (or VECTOR_STORE) is "milvus", whose client is not installed here ({exc}): '
        "pip install -r requirements-milvus.txt (make does when VECTOR_STORE=milvus)"
    ) from exc
finally:
    if _uri is not None:
        os.environ["MILVUS_URI"] = _uri

if TYPE_CHECKING:
    from indexer.embedding.model import ModelIdentity

# Collection properties: the change number the collection holds every change through, and the model's identity.
SYNCED = "visual_search.synced_through"
MODEL = "visual_search.model"
# Rows per upsert request (a 1024-d vector is ~20 KB of request; servers take up to 64 MB per request).
BATCH = 1_000
# The most results one Milvus search returns.
MAX_LIMIT = 16_384
CATEGORY_LENGTH = 1_024  # the database's column holds 256 characters; Milvus counts bytes
PRICE_LIMIT = float(np.finfo(np.float32).max)
ABSENT = -2  # an image id without a live vector (codes >= 0 are categories, -1 is none)

_clients: dict[tuple[str, str], MilvusClient] = {}
_loaded: set[tuple[str, str]] = set()
_clients_lock = threading.Lock()


class MilvusUnavailable(ConfigError):
    """Milvus cannot be reached, opened or used; the message says why (and what to do). A server answers 503."""


@contextmanager
def _reported(settings: Settings) -> Iterator[None]:
    """Milvus's errors as MilvusUnavailable, naming the Milvus (without credentials)."""
    try:
        yield
    except MilvusException as exc:
        raise MilvusUnavailable(f"Milvus at {shown_uri(settings.milvus_target)}: {exc.message}") from None


def shown_uri(uri: str) -> str:
    """The URI without credentials, for logs and /readyz."""
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


def client(settings: Settings) -> MilvusClient:
    """This process's client for the configured Milvus (one per URI, shared by threads)."""
    uri = settings.milvus_target
    key = (uri, settings.milvus_token)
    with _clients_lock:
        if key not in _clients:
            if is_milvus_lite(uri):
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                _clients[key] = MilvusClient(uri=uri, token=settings.milvus_token)
            except MilvusException as exc:
                hint = (
                    " (Milvus Lite serves one process at a time: stop the other one, or use a Milvus server, "
                    "MILVUS_URI=http://host:19530)"
                    if is_milvus_lite(uri)
                    else ""
                )
                raise MilvusUnavailable(f"cannot open Milvus at {shown_uri(uri)}: {exc.message}{hint}") from None
        return _clients[key]


def close(settings: Settings) -> None:
    """Drop this process's client; for Milvus Lite, also stop its embedded server (its data stays in the file)."""
    uri = settings.milvus_target
    with _clients_lock:
        found = _clients.pop((uri, settings.milvus_token), None)
        _loaded.difference_update({key for key in _loaded if key[0] == uri})
    if found is not None:
        found.close()
    if is_milvus_lite(uri):
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(uri)


def collection_name(settings: Settings, identity: ModelIdentity) -> str:
    """One collection per model: vectors of two models never meet in one search."""
    return f"{settings.milvus_collection}_{hashlib.sha256(identity.key.encode()).hexdigest()[:16]}"


def _price(value: float) -> float | None:
    """A price as Milvus stores it: float32, clamped to float32's range as the FAISS index's float32 prices
    overflow to infinity (so the same products pass a bound); None without a price."""
    if np.isnan(value):
        return None
    return float(np.float32(min(max(value, -PRICE_LIMIT), PRICE_LIMIT)))


def _literal(value: float) -> str:
    """A price bound in a filter expression: rounded to float32 like the stored prices (all its digits: Milvus may
    compare in double precision), without an exponent."""
    return np.format_float_positional(np.float64(np.float32(_price(value))), trim="0")


def expression(filters: Filters) -> str:
    """The filters as a Milvus boolean expression ("" for none). A product without a price is in no range."""
    parts = []
    if filters.category is not None:
        parts.append(f"category == {json.dumps(filters.category, ensure_ascii=False)}")
    if filters.min_price is not None:
        parts.append(f"price >= {_literal(filters.min_price)}")
    if filters.max_price is not None:
        parts.append(f"price <= {_literal(filters.max_price)}")
    return " and ".join(parts)


@dataclass(frozen=True)
class SyncReport:
    collection: str
    uri: str
    vectors: int | None
    synced_through: int
    applied: int
    seconds: float

    def summary(self) -> str:
        holds = f"holds {self.vectors} vectors" if self.vectors is not None else "is up to date"
        return (
            f"Milvus collection {self.collection} at {shown_uri(self.uri)} {holds} through change "
            f"{self.synced_through} ({self.applied} changed images applied in {self.seconds:.1f} s)"
        )


class MilvusVectors:
    """One model's collection: id, vector, category, price; an exact (FLAT) inner-product index."""

    def __init__(self, settings: Settings, name: str, dim: int):
        self.settings = settings
        self.client = client(settings)
        self.name = name
        self.dim = dim

    @classmethod
    def open(cls, settings: Settings, identity: ModelIdentity, *, create: bool = False) -> MilvusVectors | None:
        """The model's collection, loaded for searching; created when missing and `create`, else None."""
        vectors = cls(settings, collection_name(settings, identity), identity.dim)
        with _reported(settings):
            if not vectors.client.has_collection(vectors.name):
                if not create:
                    return None
                vectors._create(identity)
            vectors._load()
        return vectors

    def _create(self, identity: ModelIdentity) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("category", DataType.VARCHAR, max_length=CATEGORY_LENGTH, nullable=True)
        schema.add_field("price", DataType.FLOAT, nullable=True)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        self.client.create_collection(
            self.name,
            schema=schema,
            index_params=index,
            consistency_level="Strong",  # a search sees every write acknowledged before it
            properties={SYNCED: "0", MODEL: json.dumps(identity.as_dict(), sort_keys=True)},
        )

    def _load(self) -> None:
        key = (self.settings.milvus_target, self.name)
        if key in _loaded:
            return
        self.client.load_collection(self.name)  # a no-op when loaded; a reopened Milvus Lite file starts released
        with _clients_lock:
            _loaded.add(key)

    def properties(self) -> dict[str, str]:
        return self.client.describe_collection(self.name).get("properties") or {}

    @property
    def synced_through(self) -> int:
        """The change number whose changes (and all before) the collection holds."""
        return int(self.properties().get(SYNCED, 0))

    def mark_synced(self, change: int) -> None:
        self.client.alter_collection_properties(self.name, properties={SYNCED: str(change)})

    def count(self) -> int:
        rows = self.client.query(self.name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    def apply(self, changes: Changes) -> None:
        """Upsert the changed live vectors with their category and price; delete the removed ids."""
        if len(changes.removed):
            self.client.delete(self.name, ids=changes.removed.tolist())
        self.upsert(changes.ids, changes.vectors, changes.categories, changes.prices)

    def upsert(self, ids: np.ndarray, vectors: np.ndarray, categories: list[str | None], prices: np.ndarray) -> None:
        for start in range(0, len(ids), BATCH):
            end = start + BATCH
            rows = [
                {"id": int(i), "vector": v.tolist(), "category": c, "price": _price(p)}
                for i, v, c, p in zip(
                    ids[start:end], vectors[start:end], categories[start:end], prices[start:end], strict=True
                )
            ]
            self.client.upsert(self.name, rows)

    def clear(self) -> None:
        self.client.delete(self.name, filter="id >= 0")

    def search(self, query: np.ndarray, count: int, filters: Filters = NO_FILTERS) -> tuple[np.ndarray, np.ndarray]:
        """Ids and inner products of the `count` nearest vectors that pass the filters, best first."""
        hits = self.client.search(
            self.name,
            data=[np.asarray(query, dtype=np.float32).tolist()],
            limit=max(1, min(count, MAX_LIMIT)),
            filter=expression(filters),
            output_fields=["id"],  # none would return every field, vectors included
            search_params={"metric_type": "IP"},
        )[0]
        ids = np.array([hit["id"] for hit in hits], dtype=np.int64)
        return ids, np.array([hit["distance"] for hit in hits], dtype=np.float32)


def sync(
    settings: Settings,
    store: Store,
    identity: ModelIdentity,
    *,
    known: Changes | None = None,
    known_since: int = -1,
    vectors: MilvusVectors | None = None,
    count: bool = False,
) -> SyncReport:
    """Bring the model's collection up to the store's head, creating it first when missing. Call it holding
    write_lock: no change is committed meanwhile, so the changes are applied in commit order.

    A new collection (or one whose first load never finished) is loaded from a snapshot of the store, streaming
    the vectors (bounded memory at any size); after that only the changes since its change number are applied.
    `known` (changes read after `known_since` by a caller, e.g. a server) saves reading them again. With `count`,
    the report says how many vectors the collection holds (one more request)."""
    with _reported(settings):
        return _sync_collection(settings, store, identity, known, known_since, vectors, count)


def _sync_collection(
    settings: Settings,
    store: Store,
    identity: ModelIdentity,
    known: Changes | None,
    known_since: int,
    vectors: MilvusVectors | None,
    count: bool,
) -> SyncReport:
    started = time.perf_counter()
    vectors = vectors or MilvusVectors.open(settings, identity, create=True)
    assert vectors is not None
    through = vectors.synced_through
    applied = 0
    if through == 0:
        through, applied = _load_everything(vectors, store, identity)
    elif known is not None and known_since == through and known.head > through:
        vectors.apply(known)
        through, applied = known.head, len(known)
        vectors.mark_synced(through)
    if store.head() > through:
        changes = store.vectors.changes_since(through, identity.key, identity.dim)
        vectors.apply(changes)
        through, applied = changes.head, applied + len(changes)
        vectors.mark_synced(through)
    return SyncReport(
        vectors.name,
        settings.milvus_target,
        vectors.count() if count else None,
        through,
        applied,
        time.perf_counter() - started,
    )


def _load_everything(vectors: MilvusVectors, store: Store, identity: ModelIdentity) -> tuple[int, int]:
    """Every live vector of the model into an emptied collection, as of the store's head (no writer commits
    meanwhile: the caller holds the write lock). Returns (that change number, vectors loaded)."""
    snapshot = store.vectors.snapshot(identity.key)
    vectors.clear()  # leftovers of a load that died may include images deleted since
    position = {int(image_id): row for row, image_id in enumerate(snapshot.ids)}
    for ids, batch in store.vectors.stream(identity.key, identity.dim):
        rows = np.array([position[int(i)] for i in ids], dtype=np.int64)
        vectors.upsert(ids, batch, [snapshot.categories[r] for r in rows], snapshot.prices[rows])
    # An empty store stays at 0, so the next writer loads it again (from nothing: as cheap as a change).
    if snapshot.head:
        vectors.mark_synced(snapshot.head)
    return snapshot.head, len(snapshot.ids)


def sync_locked(settings: Settings, store: Store, identity: ModelIdentity, *, purge: bool = False) -> SyncReport:
    """sync() under the writers' lock, saying how many vectors the collection holds. With `purge`, then delete the
    database's tombstones that the collection has applied, once old enough that every server has seen them
    (as a FAISS compaction does; Milvus compacts its own segments)."""
    from indexer.index import compaction

    with write_lock(settings.data_dir, store):
        report = sync(settings, store, identity, count=True)
        if purge:
            store.vectors.purge_tombstones(report.synced_through, compaction.PURGE_AFTER)
    return report


def built_identities(settings: Settings) -> list[dict]:
    """The models of this configuration's other collections (for a server whose model has none: the message says
    which model the index was built with)."""
    found = []
    milvus = client(settings)
    with _reported(settings):
        for name in milvus.list_collections():
            if name.startswith(settings.milvus_collection + "_"):
                model = (milvus.describe_collection(name).get("properties") or {}).get(MODEL)
                if model:
                    found.append(json.loads(model))
    return found


class _Description:
    """What a server reports of the collection where a FAISS server reports its base segment."""

    def __init__(self, name: str, manifest: dict, index: MilvusIndex):
        self.name = name
        self.manifest = manifest
        self._index = index

    @property
    def built_through(self) -> int:
        return int(self.manifest["built_through"])

    def __len__(self) -> int:
        return len(self._index)

    def release(self) -> None:
        pass


class MilvusIndex:
    """What a server searches with index.backend = "milvus", a VectorIndex like LiveIndex: the model's collection,
    kept up with the store's change numbers, and each live image's category (in memory, for the category list)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        identity: ModelIdentity,
        vectors: MilvusVectors,
        about: dict | None = None,
    ):
        self.settings = settings
        self.store = store
        self.identity = identity
        self.vectors = vectors
        self._lock = threading.Lock()
        snapshot = store.vectors.snapshot(identity.key)
        self.categories: list[str] = sorted({c for c in snapshot.categories if c})
        self.code_of: dict[str, int] = {name: code for code, name in enumerate(self.categories)}
        self._code_by_id = np.full(0, ABSENT, dtype=np.int32)
        self._counts = np.zeros(len(self.categories), dtype=np.int64)
        self._live = 0
        self._set(snapshot.ids, np.array([self._code(c) for c in snapshot.categories], dtype=np.int32))
        self._seen = snapshot.head
        manifest = {
            **identity.as_dict(),
            "model_key": identity.key,
            "version": vectors.name,
            "backend": "milvus",
            "milvus_uri": shown_uri(settings.milvus_target),
            "factory": "Milvus FLAT (exact, inner product)",
            "tuning": {"factory": "FLAT"},
            "built_through": snapshot.head,
            **(about or {}),
        }
        self.base = _Description(vectors.name, manifest, self)

    @classmethod
    def open(
        cls, settings: Settings, store: Store, identity: ModelIdentity, about: dict | None = None
    ) -> MilvusIndex | None:
        """The server's view of the model's collection (brought up to the store's head), or None when `make index`
        has not created it yet. `about`: more for its manifest (the engine that embeds the queries)."""
        vectors = MilvusVectors.open(settings, identity)
        if vectors is None:
            return None
        index = cls(settings, store, identity, vectors, about)
        index._sync(None, -1, index.seen)
        return index

    @property
    def seen(self) -> int:
        return self._seen

    def __len__(self) -> int:
        return self._live

    delta_size = 0  # Milvus keeps its own segments: nothing for this server to compact
    masked_count = 0

    def live_categories(self) -> list[str]:
        counts = self._counts
        return sorted(name for code, name in enumerate(self.categories) if code < len(counts) and counts[code] > 0)

    def apply(self, changes: Changes) -> np.ndarray:
        """Bring the collection (when behind) and this server's view up to changes.head; returns the image ids
        whose state changed."""
        with self._lock:
            if changes.head <= self._seen:
                return np.zeros(0, np.int64)
            self._sync(changes, self._seen, changes.head)
            codes = np.array([self._code(name) for name in changes.categories], dtype=np.int32)
            self._set(changes.removed, np.full(len(changes.removed), ABSENT, dtype=np.int32))
            self._set(changes.ids, codes)
            self._seen = changes.head
            return np.concatenate([changes.ids, changes.removed])

    def _sync(self, known: Changes | None, known_since: int, head: int) -> None:
        """Make sure the collection holds every change through `head`: usually the writer has applied them already
        (one look at the collection's change number); else apply them here, under the writers' lock."""
        with _reported(self.settings):
            if self.vectors.synced_through >= head and head > 0:
                return
        with write_lock(self.settings.data_dir, self.store):
            sync(self.settings, self.store, self.identity, known=known, known_since=known_since, vectors=self.vectors)

    def _code(self, name: str | None) -> int:
        if name is None:
            return -1
        if name not in self.code_of:
            self.code_of[name] = len(self.categories)
            self.categories.append(name)
        return self.code_of[name]

    def _set(self, ids: np.ndarray, codes: np.ndarray) -> None:
        """Record each id's category code (ABSENT: no live vector), keeping the per-category counts."""
        if not len(ids):
            return
        if (size := int(ids.max()) + 1) > len(self._code_by_id):
            grown = np.full(max(size, 2 * len(self._code_by_id)), ABSENT, dtype=np.int32)
            grown[: len(self._code_by_id)] = self._code_by_id
            self._code_by_id = grown
        if len(self._counts) < len(self.categories):
            self._counts = np.concatenate([self._counts, np.zeros(len(self.categories) - len(self._counts), np.int64)])
        old = self._code_by_id[ids]
        np.subtract.at(self._counts, old[old >= 0], 1)
        np.add.at(self._counts, codes[codes >= 0], 1)
        self._live += int((codes != ABSENT).sum()) - int((old != ABSENT).sum())
        self._code_by_id[ids] = codes

    def attribute_names(self) -> list[str]:
        """Attribute filters are not offered here: the collection holds no attributes (a 400 that says so)."""
        raise AttributesUnavailable(
            "attribute filters (attr.<name>) need the FAISS index (index.backend = 'faiss'); this server searches "
            "Milvus, which filters by category and price only"
        )

    def vector_of(self, image_id: int) -> np.ndarray | None:
        """None: the vectors are in the collection, not in this server (a product's vector comes from the store)."""
        return None

    def search(self, query: np.ndarray, count: int, filters: Filters = NO_FILTERS) -> tuple[np.ndarray, np.ndarray]:
        """The ids and cosine scores of the `count` nearest live vectors passing the filters, best first."""
        if filters.attributes:
            self.attribute_names()
        if filters.category is not None and filters.category not in self.code_of:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        with _reported(self.settings):
            return self.vectors.search(query, count, filters)
