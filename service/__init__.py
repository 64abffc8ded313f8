"""Vectors -> search: the Flask service that finds catalog products that look like a photo.

python -m service     # what `make serve` runs: service.server's Granian workers, each calling create_app()
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flask import Flask

from indexer.config import Settings, cpu_count, load_settings

if TYPE_CHECKING:
    from indexer.embedding.model import Embedder


def create_app(settings: Settings | None = None, embedder: Embedder | None = None) -> Flask:
    """Application factory: settings and the model are loaded once, here, not at import time (nor numpy: the
    server's main process imports this package, and sets up the environment its workers load numpy with)."""
    from indexer.embedding.images import limit_decoding
    from indexer.embedding.model import ModelIdentity, load_embedder, load_network_for
    from indexer.index.search import CatalogSearch
    from indexer.storage.store import Store
    from service.api import api
    from service.batch import batch
    from service.cors import enable_cors
    from service.duplicates import duplicates
    from service.errors import register_error_handlers
    from service.headers import add_security_headers
    from service.metrics import TimedEmbedder, instrument
    from service.openapi import openapi
    from service.pages import pages
    from service.recent_queries import QueryFolder, RecentQueries
    from service.recommend import recommendations
    from service.search_photo import ServiceRequest
    from service.widget import widget
    from service.writes import writes

    settings = settings or load_settings()
    limit_decoding(settings.image_max_mb)  # the bytes this process's request threads may decode at once
    # No /static route: the one static file (widget.js) has its own URL and caching.
    app = Flask(__name__, static_folder=None)
    app.request_class = ServiceRequest
    app.config.update(MAX_CONTENT_LENGTH=settings.max_upload_bytes)
    app.json.sort_keys = False  # keep each result's fields in their documented order
    app.logger.setLevel(logging.INFO)
    # Up to one interpreter per core, lent to the request threads, the cores divided among every worker process's
    # interpreters (one thread each at one per core); each holds its own copy of the packed weights.
    interpreters = min(cpu_count(), settings.server_threads)
    cores = settings.sharing_cores(interpreters * settings.server_workers)
    if embedder is None:
        embedder = load_embedder(cores, create_export=False, concurrency=interpreters)

    def load_network(identity: ModelIdentity) -> Embedder | None:
        """Another model's network, when `make index` publishes an index built with it (timed as this one)."""
        network = load_network_for(cores, identity, concurrency=interpreters)
        return None if network is None else TimedEmbedder.of(network)

    # `make serve` migrates first; a service never changes the schema under a running indexer. The embedder given
    # may be shared (tests): the search gets a timed one of its own, and never changes either.
    search = CatalogSearch(
        settings, TimedEmbedder.of(embedder), Store.open(settings, upgrade=False), load_network=load_network
    )
    app.extensions["catalog_search"] = search
    # Query photos by token, in memory and (query_ttl_s > 0) in the data folder that every worker and host shares.
    folder = None
    if settings.query_ttl_s > 0:
        folder = QueryFolder(
            settings.data_dir / "queries",
            settings.query_ttl_s,
            max_bytes=settings.query_store_mb * 1_000_000,
            processes=settings.server_workers,
        )
    app.extensions["recent_queries"] = RecentQueries(folder)
    app.register_blueprint(api)
    app.register_blueprint(batch)
    app.register_blueprint(pages)
    app.register_blueprint(writes)
    app.register_blueprint(openapi)
    app.register_blueprint(widget)
    app.register_blueprint(recommendations)
    app.register_blueprint(duplicates)
    register_error_handlers(app)
    enable_cors(app, settings.cors_origins)
    add_security_headers(app)
    instrument(app)
    return app
