"""Prometheus metrics at GET /metrics: requests per endpoint, embedding and search time, the live index, writes.

Under the production server every worker records into files in PROMETHEUS_MULTIPROC_DIR (set by service/server.py)
and a scrape sums them; without it (Flask's test client) the process's own registry is served.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import wraps

import numpy as np
from flask import Blueprint, Flask, Response, g, request
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from indexer.embedding.engines import Engine
from indexer.embedding.model import Embedder
from indexer.errors import NotReady
from indexer.index.search import CatalogSearch
from service.api import catalog_search

log = logging.getLogger(__name__)

# Labels hold only Flask endpoint names, methods and status codes: never a path, a sku or a key.
REQUESTS = Counter(
    "visual_search_http_requests_total",
    "HTTP requests answered, by Flask endpoint ('unmatched' for unknown URLs), method and status.",
    ["endpoint", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "visual_search_http_request_duration_seconds",
    "Time from routing to the response, by Flask endpoint, method and status.",
    ["endpoint", "method", "status"],
)
EMBEDDING_SECONDS = Histogram(
    "visual_search_embedding_seconds",
    "Time to decode and embed one uploaded photo (a search query or a product written through the API).",
    buckets=(0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SEARCH_SECONDS = Histogram(
    "visual_search_search_seconds",
    "Time to search the live index for one query vector, the matched products' rows included.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
INFERENCE_CPU_SECONDS = Counter(
    "visual_search_inference_cpu_seconds",
    "CPU time of the network's forward passes, on the request threads that ran them: all of it with one "
    "inference thread per interpreter (model.threads = 0 or 1, the server's default), else the calling thread's share.",
)
WRITES = Counter(
    "visual_search_writes_total", "Write API requests, by kind (put, delete) and status.", ["kind", "status"]
)

WRITE_KINDS = {"writes.put_product": "put", "writes.delete_product": "delete"}
# Any other method string a client invents would be a new label value each time.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

metrics = Blueprint("metrics", __name__)


def instrument(app: Flask) -> None:
    """Count and time every request and search, and serve GET /metrics; embeddings are timed by the search's
    embedder (TimedEmbedder), which every index view's embedder is made from."""
    search: CatalogSearch = app.extensions["catalog_search"]
    search.search = _timed(search.search, SEARCH_SECONDS)  # similar() goes through it too
    app.before_request(_start_clock)
    app.after_request(_count)
    app.register_blueprint(metrics)


@metrics.get("/metrics")
def scrape() -> Response:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # every worker's counts, summed
    else:
        registry.register(REGISTRY)  # this process's: a registry is a collector too
    registry.register(IndexCollector(catalog_search()))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), content_type=content_type, headers={"Cache-Control": "no-store"})


class TimedEmbedder(Embedder):
    """The service's embedder, recording how long each uploaded photo takes to decode and embed, and the CPU time
    of the network alone (what the rest of a request costs is then the server's CPU time less that). Its
    with_whitening keeps the timing: the index views' embedders are timed too."""

    @classmethod
    def of(cls, embedder: Embedder) -> TimedEmbedder:
        """A timed embedder with the same network, whitening and engine (behind a clock); the one given is left as
        it is, and one already timed is returned as it is (never timed twice)."""
        if isinstance(embedder, cls):
            return embedder
        engine = InferenceClock(embedder.engine)
        return cls(engine, embedder.network, embedder.tflite_sha256, embedder.version, embedder.whitening)

    def embed_image(self, *args: object, **kwargs: object) -> np.ndarray:
        return self._timed(super().embed_image, *args, **kwargs)

    def embed_views(self, *args: object, **kwargs: object) -> np.ndarray:
        return self._timed(super().embed_views, *args, **kwargs)

    @staticmethod
    def _timed(embed: Callable[..., np.ndarray], *args: object, **kwargs: object) -> np.ndarray:
        started = time.perf_counter()
        vectors = embed(*args, **kwargs)
        # Only photos that embedded: an unreadable upload fails in microseconds and would flatter the figure.
        EMBEDDING_SECONDS.observe(time.perf_counter() - started)
        return vectors


class InferenceClock:
    """An engine whose forward passes add their thread CPU time to INFERENCE_CPU_SECONDS."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        started = time.thread_time()  # CPU time, not wall: waiting for an interpreter or a core is not inference
        features = self._engine.features(pixels)
        INFERENCE_CPU_SECONDS.inc(time.thread_time() - started)
        return features


def _timed(function: Callable, histogram: Histogram) -> Callable:
    @wraps(function)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        histogram.observe(time.perf_counter() - started)
        return result

    return timed


def _start_clock() -> None:
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    endpoint = request.url_rule.endpoint if request.url_rule else "unmatched"
    method = request.method if request.method in METHODS else "other"
    status = str(response.status_code)
    REQUESTS.labels(endpoint, method, status).inc()
    if (started := g.get("metrics_started")) is not None:
        REQUEST_SECONDS.labels(endpoint, method, status).observe(time.perf_counter() - started)
    if endpoint in WRITE_KINDS and method in ("PUT", "DELETE"):
        WRITES.labels(WRITE_KINDS[endpoint], status).inc()
    return response


class IndexCollector(Collector):
    """The live index as this server sees it at scrape time, with every committed change applied, so that any
    worker answers for all of them (they all apply the same changes) and no gauge has to be merged across them."""

    def __init__(self, search: CatalogSearch):
        self._search = search

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("visual_search_index_ready", "1 when an index is loaded and searchable, else 0.")
        try:
            view = self._search.current()
        except NotReady:
            view = None
        except Exception:  # a scrape reports the index as not ready rather than failing
            log.exception("the index could not be read for /metrics")
            view = None
        ready.add_metric([], 0 if view is None else 1)
        yield ready
        if view is None:
            return
        live, manifest = view.live, view.manifest
        yield _gauge(
            "visual_search_index_items",
            "Images searchable now: the base's, less those masked, plus the delta.",
            len(live),
        )
        yield _gauge("visual_search_index_base_items", "Images in the base segment.", len(live.base))
        yield _gauge("visual_search_index_change", "The store's change number this server has applied.", live.seen)
        yield _gauge(
            "visual_search_index_delta_items", "Changed images in the delta, waiting for compaction.", live.delta_size
        )
        yield _gauge(
            "visual_search_index_masked_images",
            "Images of the base deleted or replaced since it was built.",
            live.masked_count,
        )
        yield _gauge(
            "visual_search_index_stale_seconds",
            "Seconds since the catalog database could last be read, while it cannot (searches then answer from what "
            "this server holds); 0 while it can.",
            self._search.stale_seconds() or 0.0,
        )
        yield InfoMetricFamily(
            "visual_search_index_base",
            "The base segment served: its version and FAISS factory.",
            value={"version": str(manifest.get("version")), "factory": str(manifest.get("factory"))},
        )
        if created := manifest.get("created"):
            built = datetime.fromisoformat(created)
            built = built if built.tzinfo else built.replace(tzinfo=UTC)  # compaction writes UTC
            age = (datetime.now(UTC) - built).total_seconds()
            yield _gauge("visual_search_index_base_age_seconds", "Seconds since the base segment was built.", age)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
