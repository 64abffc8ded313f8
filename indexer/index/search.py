"""Searching the catalog: a query vector in, products out, over the live index (base segment + delta).

What a request searches is an IndexView: a base with its delta, its row cache, and the embedder that makes
vectors as the base's were made (its whitening and model identity). A request takes the current view once, embeds
its query with the view's embedder and searches that view, so it cannot mix two. A new base makes a new view,
which replaces the old one for the requests that start after it; nothing in a view is switched to another base,
whitening or model.

Each request checks two cheap things: whether a new base was published (a stat of the manifest) and whether
the store's change number moved (one indexed read). New changes of the view's identity are applied to its delta
before the search, so a write through any server, or a `make index`, is visible on every server without a restart
or a reload. With index.backend = "milvus" the same view searches a Milvus collection instead
(indexer.index.milvus_store), which the same change numbers keep up to date; pymilvus is imported only then.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError, SQLAlchemyError

from indexer.catalog import served_file
from indexer.config import REPO_ROOT, Settings, process_memory_mb
from indexer.embedding.model import Embedder, ModelIdentity
from indexer.errors import NotReady, UnknownProduct
from indexer.index.compaction import compaction_due, index_whitening
from indexer.index.facets import Facet, FacetRequest, count_facets
from indexer.index.fusion import FUSION_DEPTH, WordsRankings, fuse, words_alone
from indexer.index.live_index import NO_FILTERS, Filters, LiveIndex
from indexer.index.rows import ProductRows
from indexer.index.segments import load_base, manifest_stamp, remove_unused_bases, resident_estimate_mb
from indexer.index.vector_index import VectorIndex
from indexer.records import ShownProduct
from indexer.storage.locks import compaction_running
from indexer.storage.store import Store
from indexer.storage.text import Words

log = logging.getLogger(__name__)
# Several images of one product collapse into one result, so fetch a few more neighbours (and as many again
# for each extra view of a catalog photo, index.catalog_views).
OVERFETCH = 3
# /readyz counts the rows of each model at most this often, to show a change of model under way.
MODEL_CHANGE_EVERY_S = 5.0
# Networks of other published indexes a server keeps loaded (the one before a model change, to switch back at once).
NETWORKS_KEPT = 2
# While the database cannot be read, searches answer from what this server holds, and it looks again this often.
DATABASE_RETRY_S = 1.0
# What a database that cannot be reached (stopped, restarting, a file that cannot be read) raises.
DATABASE_AWAY = (OperationalError, InterfaceError)
# A process that answers no request (one of a server's idle workers, a quiet replica) would hold the base it last
# searched, and with it the old files' disk space and memory, until its next request: it looks this often.
FOLLOW_BASE_EVERY_S = 2.0


@dataclass(frozen=True)
class IndexView:
    """What one request searches, and what it embeds its query with: a base and its delta (the live index, which
    applies the changes committed to vectors of the view's identity), the products behind its ids, and the embedder
    whose whitening and model identity the base was built with. Made for one base, never switched to another."""

    live: VectorIndex  # LiveIndex (FAISS), or with index.backend = "milvus" a MilvusIndex
    rows: ProductRows
    embedder: Embedder

    @property
    def identity(self) -> ModelIdentity:
        """What the view's vectors are, and what its embedder makes."""
        return self.embedder.identity

    @property
    def manifest(self) -> dict:
        return self.live.base.manifest

    @property
    def version(self) -> str:
        """The base version and the change number applied on top of it."""
        return f"{self.manifest.get('version')}+{self.live.seen}"


# OpenMP's thread count is per thread, so each request thread sets its own, once.
_faiss_threads = threading.local()


def model_mismatch(manifest: dict, running: ModelIdentity) -> str | None:
    """Why this server must not search the index (built with another model or precision), or None."""
    built_with = ModelIdentity.from_dict(manifest)
    if built_with == running:
        return None
    same_network = (built_with.name, built_with.weights_sha256) == (running.name, running.weights_sha256)
    if same_network and built_with.precision != running.precision:
        return (
            f"the index was built at {built_with.precision} precision and this service runs {running.precision} "
            f"(model.precision / PRECISION); set PRECISION={built_with.precision} or re-run `make index` "
            f"with PRECISION={running.precision}"
        )
    if built_with.network_key == running.network_key and built_with.whitening_sha256 != running.whitening_sha256:
        return (
            f"the index was built with the whitening {built_with.whitening} {built_with.whitening_sha256}, which the "
            "catalog's database does not hold (a database of another catalog?): point DATABASE_URL at the index's "
            "database, or re-run `make index`"
        )
    return (
        f"the index was built with {built_with.as_dict()} but the service runs {running.as_dict()}; "
        "re-run `make index` with this model or configure the model the index was built with"
    )


class CatalogSearch:
    """Follows the published bases and the store's changes, and searches the view a request holds. `embedder` runs
    the network: each view gets its own, followed by its base's whitening (the engine shared); none is changed."""

    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: Store,
        load_network: Callable[[ModelIdentity], Embedder | None] | None = None,
    ):
        self.settings = settings
        self.embedder = embedder
        self.store = store
        # Loads the network of an index built with another model than `embedder`'s (None: serve only that one).
        self._load_network = load_network
        self._networks: OrderedDict[str, Embedder] = OrderedDict()  # network key -> those loaded, newest last
        self._model_counts: tuple[float, dict[str, int]] | None = None  # (when, live rows by model key)
        self._lock = threading.Lock()
        self._view: IndexView | None = None
        self._stamp: tuple[int, int] | None = None
        # The live index last brought up to date, and the store's change marker read just before that.
        self._up_to_date: tuple[object, int] | None = None
        self._problem: str | None = None
        self._compactor: subprocess.Popen | None = None
        # Errors a request answers with 503 (try again) rather than 500: Milvus out of reach, when configured.
        self._unavailable: tuple[type[Exception], ...] = ()
        # Since when (time.time()) the database could not be read, the reason, and the last try (monotonic); None
        # while it can.
        self._stale: tuple[float, str, float] | None = None
        self._words_rankings = WordsRankings()
        if settings.index_backend == "milvus":
            from indexer.index.milvus_store import MilvusUnavailable

            self._unavailable = (MilvusUnavailable,)
        else:
            threading.Thread(target=_follow_bases, args=(weakref.ref(self),), name="follow-base", daemon=True).start()

    # --- the live index ----------------------------------------------------------------------------

    def current(self) -> IndexView:
        """The newest base, with every committed change applied."""
        view = self._follow_base()
        if view is None:
            raise NotReady(self._problem or "not ready")
        try:
            self._refresh(view)
        except self._unavailable as exc:
            raise NotReady(str(exc)) from None
        return view

    def _follow_base(self) -> IndexView | None:
        """Switch to a newly published base (one stat of the manifest when there is none)."""
        stamp = manifest_stamp(self.settings.index_dir) if self.settings.index_backend == "faiss" else None
        if self._view is None or stamp != self._stamp:
            with self._lock:
                if self._view is None or stamp != self._stamp:
                    try:
                        view = self._load()
                    except DATABASE_AWAY as exc:
                        if self._view is None:
                            raise
                        self._database_away(exc)  # serve the base it has; the next look tries again
                        return self._view
                    self._stamp = stamp
                    self._switch(view)
        return self._view

    def _refresh(self, view: IndexView) -> None:
        """Apply the changes committed since this server last looked: nothing to read when the store's change
        marker has not moved since then, else one indexed read (and the rows changed, when there are some). While
        the database cannot be read, the view stays as it is (stale), and the database is tried again every
        DATABASE_RETRY_S; once it answers, every change made meanwhile is applied."""
        if (stale := self._stale) is not None and time.monotonic() - stale[2] < DATABASE_RETRY_S:
            return
        try:
            self._apply_changes(view)
        except DATABASE_AWAY as exc:
            self._database_away(exc)
            return
        if stale is not None:
            self._stale = None
            log.warning("the catalog database answers again after %.0f s: caught up to change %d",
                        time.time() - stale[0], view.live.seen)  # fmt: skip

    def _database_away(self, exc: Exception) -> None:
        """Note that the database cannot be read now: searches go on from what this server holds."""
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if self._stale is None:
            seen = self._view.live.seen if self._view else "none"
            log.error("the catalog database cannot be read (%s): searching the index as of change %s until it answers",
                      reason, seen)  # fmt: skip
            self._stale = (time.time(), reason, time.monotonic())
        else:
            self._stale = (self._stale[0], self._stale[1], time.monotonic())

    def _model_change(self, view: IndexView) -> dict | None:
        """While `make index` embeds the catalog with another model than the one served: how far it is (rows whose
        vectors are of each other model, of all live rows); None when every row is of the served model. Read at most
        every MODEL_CHANGE_EVERY_S (a count over every row)."""
        now = time.monotonic()
        if self._model_counts is None or now - self._model_counts[0] > MODEL_CHANGE_EVERY_S:
            try:
                self._model_counts = (now, self.store.vectors.live_by_model())
            except DATABASE_AWAY:
                return None
        counts = self._model_counts[1]
        others = {key: count for key, count in counts.items() if key != view.identity.key}
        if not others:
            return None
        return {"serving": view.identity.key, "rows_of_other_models": others, "rows": sum(counts.values())}

    def stale_seconds(self) -> float | None:
        """How long the database has been unreadable, searches answering from what this server holds; None while
        it reads."""
        return None if (stale := self._stale) is None else time.time() - stale[0]

    def _apply_changes(self, view: IndexView) -> None:
        # Read before the changes: a commit that lands after it moves it again, and is read on the next look.
        marker = self.store.change_marker()
        up_to_date = self._up_to_date
        if marker is not None and up_to_date is not None and up_to_date[0] is view.live and up_to_date[1] == marker:
            return
        identity = view.identity
        changes = self.store.vectors.changes_since(view.live.seen, identity.key, identity.dim)
        if changes.head > view.live.seen:
            view.rows.forget(view.live.apply(changes))
            if view.live.delta_size >= self.settings.compact_after:
                self._start_compaction(view)
        if marker is not None:
            # Another thread may store an older marker over it: the next look then reads once more, harmlessly.
            self._up_to_date = (view.live, marker)

    def _load(self) -> IndexView | None:
        if self.settings.index_backend == "milvus":
            return self._load_milvus()
        if refusal := self._over_budget():
            log.error(refusal)
            if self._view is not None:
                return self._view  # keep serving the base it has, with every change applied
            self._problem = refusal
            return None
        base = load_base(self.settings.index_dir)
        if base is None:
            self._problem = (
                f"no index in {self.settings.index_dir} yet: run `make index CATALOG=<folder of product photos>`"
            )
            return None
        if problem := self.store.schema_problem():
            base.release()
            self._problem = problem  # e.g. new code started without `make migrate`
            return None
        embedder = self._embedder_for([base.manifest])
        if problem := model_mismatch(base.manifest, embedder.identity):
            base.release()
            self._problem = problem
            return None
        self._problem = None
        return IndexView(LiveIndex(base), ProductRows(self.store), embedder)

    def _load_milvus(self) -> IndexView | None:
        """The model's Milvus collection, brought up to the store's head; None (and the reason) when there is none."""
        from indexer.index.milvus_store import MilvusIndex, MilvusUnavailable, built_identities

        if problem := self.store.schema_problem():
            self._problem = problem
            return None
        try:
            built = built_identities(self.settings)
            embedder = self._embedder_for(built)
            about = {"engine": embedder.engine.name, "model_version": embedder.version}
            live = MilvusIndex.open(self.settings, self.store, embedder.identity, about)
            if live is None:
                running = embedder.identity
                others = [model_mismatch(identity, running) for identity in built]
                self._problem = next((o for o in others if o), None) or (
                    f"no Milvus collection for this model at {self.settings.milvus_target} yet: run "
                    "`make index CATALOG=<folder of product photos>` with the same VECTOR_STORE and MILVUS_URI"
                )
                return None
        except MilvusUnavailable as exc:
            log.error("%s", exc)
            self._problem = str(exc)
            return None
        self._problem = None
        return IndexView(live, ProductRows(self.store), embedder)

    def _embedder_for(self, built: list[dict]) -> Embedder:
        """The embedder for an index: the network followed by the whitening the index was built with (the catalog's
        database keeps each one; `make index` may have fitted it after this server started). The network alone
        when no index of this network names one the database holds: model_mismatch then says why."""
        network = self._network_for(built)
        found, whitening = index_whitening(self.store, network.network.key, built)
        whitening = whitening if found else None
        previous = self._view.embedder.whitening if self._view is not None else None
        if found and (whitening and whitening.sha256) != (previous and previous.sha256):
            log.info("searching with the index's whitening: %s", whitening.name if whitening else "none")
        return network.with_whitening(whitening)

    def _network_for(self, built: list[dict]) -> Embedder:
        """The network the published index was built with: this server's own, or another the models folder holds
        (a fine-tuned version, another precision: `make index` built it while this server served the one before),
        loaded once and kept (the last NETWORKS_KEPT). This server's own when the folder holds no such network:
        model_mismatch then says why."""
        if not built or self._load_network is None:
            return self.embedder
        wanted = ModelIdentity.from_dict(built[0])
        if wanted.network_key == self.embedder.network.network_key:
            return self.embedder
        if (kept := self._networks.get(wanted.network_key)) is not None:
            self._networks.move_to_end(wanted.network_key)
            return kept
        loaded = self._load_network(wanted)
        if loaded is None:
            return self.embedder
        log.warning("the published index was built with %s: searching it with that network from the models folder",
                    wanted.network_key)  # fmt: skip
        self._networks[wanted.network_key] = loaded
        while len(self._networks) > NETWORKS_KEPT:
            self._networks.popitem(last=False)
        return loaded

    def _over_budget(self) -> str | None:
        """Why the current base must not be loaded (it would take this server past service.memory_budget_mb),
        or None. Checked before loading: better a clear refusal than the kernel's out-of-memory killer."""
        budget = self.settings.memory_budget_mb
        if not budget:
            return None
        needed, resident = resident_estimate_mb(self.settings.index_dir), process_memory_mb()
        if resident + needed <= budget:
            return None
        return (
            f"not loading the index base in {self.settings.index_dir}: it needs about {needed:,.0f} MB on top of "
            f"the {resident:,.0f} MB this server uses, over service.memory_budget_mb = {budget:,} MB; raise the "
            "budget (MEMORY_BUDGET_MB) or choose an index.factory that needs less memory"
        )

    def _switch(self, view: IndexView | None) -> None:
        if view is self._view:
            return
        old = self._view
        self._view = view
        if old is not None:
            # Requests still searching the old base keep its memory map; the lock only tells compaction that
            # this server no longer needs the files.
            old.live.base.release()
            remove_unused_bases(self.settings.index_dir)

    def _start_compaction(self, view: IndexView) -> None:
        """Fold a grown delta into a new base in a separate process: off the request path, and out of this
        server's memory. One at a time (the compaction lock), and only when still due. Servers on several hosts
        may decide on it at once: --if-base makes the process compact only while the base it was due for is
        still the current one, so one of them compacts and the others find the new base and stop."""
        if self._compactor is not None and self._compactor.poll() is None:
            return
        data_dir = self.settings.data_dir
        if compaction_running(data_dir, self.store) or compaction_due(self.settings, self.store, view.embedder) is None:
            return
        # Not --if-due: this server has just checked, with its own settings (its data folder and database).
        command = [sys.executable, "-m", "indexer", "--data-dir", str(data_dir), "compact", "--quiet"]
        command += ["--if-base", str(view.manifest.get("version", ""))]
        env = {**os.environ, "DATABASE_URL": self.settings.database_url} if self.settings.database_url else None
        with open(data_dir / "compaction.log", "ab") as log:  # the child keeps its own descriptor
            self._compactor = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log, start_new_session=True
            )

    def status(self) -> dict[str, object]:
        try:
            view = self.current()
        except NotReady as exc:
            return {"ready": False, "reason": str(exc), "model": self.embedder.identity.as_dict()}
        manifest, embedder = view.manifest, view.embedder
        return {
            "ready": True,
            "items": len(view.live),
            "model": view.identity.as_dict(),
            "model_version": embedder.version,
            "engine": embedder.engine.name,
            "index_version": view.version,
            "index_created": manifest.get("created"),
            "factory": manifest.get("factory"),
            "search": manifest.get("tuning"),
            "base": {"items": len(view.live.base), "built_through": view.live.base.built_through},
            # what the filtered-search plans cost on this base, as measured when it was loaded
            "plan_costs": costs.as_dict() if (costs := getattr(view.live, "costs", None)) else None,
            "change": view.live.seen,
            "delta": view.live.delta_size,
            "deleted_from_base": view.live.masked_count,
            "model_change": self._model_change(view),
            # while the database cannot be read: since when, and why (searches answer from what this server holds)
            "stale": None
            if (stale := self._stale) is None
            else {
                "since": datetime.fromtimestamp(stale[0], UTC).isoformat(timespec="seconds"),
                "seconds": round(time.time() - stale[0], 1),
                "reason": stale[1],
            },
        }

    # --- searching ---------------------------------------------------------------------------------

    def search(
        self,
        view: IndexView,
        vector: np.ndarray,
        k: int,
        filters: Filters = NO_FILTERS,
        exclude_sku: str | None = None,
        words: Words | None = None,
    ) -> list[ShownProduct]:
        """The k best products for a unit query vector made by view.embedder, best first, one per product, each
        with its score. With `words`, the best FUSION_DEPTH of the photo's and of the words' rankings fused
        (indexer.index.fusion), each result saying how it matched."""
        if words is not None:
            depth = max(k, FUSION_DEPTH)
            visual = self.search(view, vector, depth, filters, exclude_sku)
            text = self.words_ranking(view, words, depth + 1, filters)
            text = [product for product in text if product.sku != exclude_sku][:depth]
            return fuse(visual, text, k, self.settings.text_weight)
        ids, scores = self.neighbours(view, vector, self.rows_for(k), filters)
        return self.matches(view, ids, scores, k, exclude_sku)

    def rows_for(self, k: int) -> int:
        """Image rows to fetch for k products: a product's several images (and views) collapse into one result."""
        return (k + 1) * OVERFETCH * (1 + len(self.settings.catalog_views))

    def neighbours(
        self, view: IndexView, vector: np.ndarray, count: int, filters: Filters
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ids and cosine scores of the `count` live images nearest to `vector` that pass the filters, best
        first: the one filtered search of the view's vectors that every search goes through."""
        if not getattr(_faiss_threads, "set", False):
            # Requests already run in parallel, and an idle OpenMP team spins on the cores
            # that the interpreters need.
            faiss.omp_set_num_threads(1)
            _faiss_threads.set = True
        try:
            return view.live.search(vector, count, filters)
        except self._unavailable as exc:
            raise NotReady(str(exc)) from None

    def search_words(self, view: IndexView, words: Words, k: int, filters: Filters = NO_FILTERS) -> list[ShownProduct]:
        """The k live products that hold every word, most relevant first (the full-text index's relevance as
        their score), with the filters applied."""
        return words_alone(self.words_ranking(view, words, k, filters))

    def words_ranking(self, view: IndexView, words: Words, depth: int, filters: Filters) -> list[ShownProduct]:
        """The full-text index's `depth` best products for the words and filters, as of the change `view` has
        applied (read once per change: fusion.WordsRankings)."""
        read = partial(self.store.text.search, words, depth, filters)
        return self._words_rankings.get(view.live.seen, (words, filters, depth), read)

    def similar(
        self, view: IndexView, sku: str, k: int, filters: Filters = NO_FILTERS, words: Words | None = None
    ) -> list[ShownProduct]:
        """'More like this': neighbours of a catalog product's own vector (read from the store), without itself;
        with `words`, fused with the products that hold them."""
        return self.search(view, self.product_vector(view, sku), k, filters, exclude_sku=sku, words=words)

    def product_vector(self, view: IndexView, sku: str) -> np.ndarray:
        """A catalog product's own vector, of the view's model: its first live photo's, read from the store (while
        the database cannot be read, as this server holds it); UnknownProduct when there is no such product."""
        identity = view.identity
        try:
            vector = self.store.vectors.of_product(sku, identity.key, identity.dim)
        except DATABASE_AWAY as exc:
            self._database_away(exc)
            # The product's vector as this server holds it: its first photo among the rows it holds.
            held = view.rows.image_ids_of(sku)
            vector = view.live.vector_of(held[0]) if held else None
            if vector is None:
                raise NotReady(
                    f"the catalog database cannot be read right now and this server does not hold {sku!r}: try "
                    "again shortly"
                ) from None
        if vector is None:
            if self.store.products.is_live(sku):
                raise NotReady("the product's photo is being embedded with the current model; try again shortly")
            raise UnknownProduct(sku)
        return vector

    def matches(
        self, view: IndexView, ids: np.ndarray, scores: np.ndarray, k: int, exclude_sku: str | None = None
    ) -> list[ShownProduct]:
        """The k best products of these image ids and their scores (best first): one result per product, its best."""
        found = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)]
        matches: list[ShownProduct] = []
        seen: set[str] = set()
        # The rows of the first k + 1 neighbours first (each is a product of its own, usually, and one may be the
        # product asked about); those of the over-fetched rest only when some of these were the same product.
        for chunk in (found[: k + 1], found[k + 1 :]):
            products = self._rows(view, [i for i, _ in chunk])
            for image_id, score in chunk:
                product = products.get(image_id)
                # None: deleted after the change this search saw
                if product is None or product.sku in seen or product.sku == exclude_sku:
                    continue
                seen.add(product.sku)
                matches.append(product.scored(score))
                if len(matches) == k:
                    return matches
        return matches

    def _rows(self, view: IndexView, image_ids: list[int]) -> dict[int, ShownProduct | None]:
        """The products behind these image ids; while the database cannot be read, those this server holds (a
        search then leaves out the rest: it has no product to show for them)."""
        try:
            return view.rows.get(image_ids)
        except DATABASE_AWAY as exc:
            self._database_away(exc)
            return view.rows.held(image_ids)

    def facets(self, matches: list[ShownProduct], asked: FacetRequest) -> dict[str, Facet]:
        """The facets asked for, counted over `matches` (indexer.index.facets); the matches' attributes are read
        (one query) only when an attribute facet is asked for."""
        skus = [m.sku for m in matches] if asked.attributes else []
        return count_facets(matches, asked, self.store.products.attributes_of(skus) if skus else {})

    # --- catalog lookups ---------------------------------------------------------------------------

    def product(self, sku: str) -> ShownProduct:
        """A live product as its own page shows it, with its attributes."""
        product = self.store.products.by_sku(sku)
        if product is None:
            raise UnknownProduct(sku)
        return product

    def image_path(self, sku: str) -> Path:
        """The stored file of a product's first image, checked now: a file that has left its catalog folder (or
        the write API's uploads) since, through a link or otherwise, is unknown."""
        stored = self.store.products.image_path(sku)
        path = None if stored is None else served_file(*stored, uploads=self.settings.data_dir / "uploads")
        if path is None:
            raise UnknownProduct(sku)
        return path

    def categories(self, view: IndexView | None = None) -> list[str]:
        """The categories of live products, kept by the live index (no database read)."""
        return (view or self.current()).live.live_categories()

    # --- failures ----------------------------------------------------------------------------------

    def unavailable(self, exc: Exception) -> NotReady | None:
        """What a request that failed with `exc` should answer when the failure is a wait rather than a fault: a
        database this search cannot read (away, locked, never migrated) is NotReady, saying what to do; None for
        anything else."""
        if not isinstance(exc, OperationalError | ProgrammingError):
            return None
        try:
            problem = self.store.schema_problem()
        except SQLAlchemyError:  # the database is away altogether
            problem = None
        if isinstance(exc, OperationalError):
            return NotReady(problem or "the catalog database is unavailable right now; try again shortly")
        # PostgreSQL reports a table that is not there (a database never migrated) as a programming error.
        return NotReady(problem) if problem else None


def _follow_bases(search_ref: weakref.ref[CatalogSearch]) -> None:
    """Load the base in a process that has had no request yet, and switch an idle process to each new base (so
    that the old one can be removed); ends with its search. A worker that loaded its base before the database went
    away answers from it through the outage; one that had not yet could not."""
    while True:
        time.sleep(FOLLOW_BASE_EVERY_S)
        search = search_ref()
        if search is None:
            return
        try:
            search._follow_base()
        except DATABASE_AWAY:  # no base loaded yet and the database away: the next look tries again
            pass
        except Exception:  # the next request meets the same problem and answers it; keep following
            log.exception("could not switch to the new index base")
        del search  # between looks the thread must not keep the search (and its memory maps) alive
