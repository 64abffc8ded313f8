"""JSON API: search by photo, "more like this", catalog photos, health and readiness."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache

from flask import Blueprint, Response, current_app, jsonify, request, send_file, url_for
from werkzeug.routing import PathConverter

from indexer.errors import UnknownProduct
from indexer.index.facets import FacetRequest
from indexer.index.live_index import Filters
from indexer.index.search import CatalogSearch, IndexView
from indexer.records import ShownProduct
from service.errors import BadRequest
from service.params import read_facets, read_filters, read_k, read_words
from service.preview import render_preview
from service.search_photo import SOURCES, names_a_photo, read_search_query

api = Blueprint("api", __name__)


def catalog_search() -> CatalogSearch:
    return current_app.extensions["catalog_search"]


def sku_url(endpoint: str) -> Callable[[str], str]:
    """url_for(endpoint, sku=...) as a function that builds the rule once per app and mount point, and quotes
    each sku once: a search links every result twice, and a url_for per link was a noticeable part of a
    search's CPU time."""
    made = current_app.extensions.setdefault("sku_urls", {})
    key = (endpoint, request.script_root)
    if key not in made:
        marker = "__sku__"  # url_for leaves it as it is
        prefix, suffix = url_for(endpoint, sku=marker).split(marker)
        # How url_for itself quotes a <path:sku>; skus repeat across searches.
        quote = lru_cache(maxsize=20_000)(PathConverter(current_app.url_map).to_url)
        made[key] = lambda sku: prefix + quote(sku) + suffix
    return made[key]


def results_json(matches: list[ShownProduct]) -> list[dict[str, object]]:
    image_url, product_url = sku_url("api.product_image"), sku_url("pages.product_page")
    return [{**m.as_dict(), "image_url": image_url(m.sku), "product_url": product_url(m.sku)} for m in matches]


def _search_inputs(view: IndexView, most: int | None = None) -> tuple[int, Filters]:
    """k (at most `most`, else service.max_k) and the filters."""
    search = catalog_search()
    k = read_k(request, min(search.settings.default_k, most or search.settings.max_k), most or search.settings.max_k)
    return k, read_filters(request, lambda: search.categories(view), view.live.attribute_names)


def _facets_inputs(k: int) -> tuple[FacetRequest | None, int, int]:
    """The facets asked for, the matches they count (facet_depth), and how many matches to search for: k, or
    the facet depth when facets are asked for and it is larger (the results are the first k of them)."""
    settings = catalog_search().settings
    asked, depth = read_facets(request, settings.facet_depth, settings.max_facet_depth)
    return asked, depth, max(k, depth) if asked else k


def _facets_json(matches: list[ShownProduct], asked: FacetRequest | None, depth: int) -> dict[str, object]:
    """The answer's facets, counted over the best `depth` matches; nothing when none was asked for."""
    if asked is None:
        return {}
    return {"facets": catalog_search().facets(matches[:depth], asked), "facet_depth": depth}


def filters_json(filters: Filters) -> dict[str, object]:
    return {
        "category": filters.category,
        "min_price": filters.min_price,
        "max_price": filters.max_price,
        # name -> the values asked for, case-folded as they are matched
        "attributes": {name: sorted(values) for name, values in filters.attributes},
    }


@api.post("/api/search")
def search_by_photo():
    started = time.perf_counter()
    search = catalog_search()
    # Once per request: the query is embedded as this view's vectors were, and searched in it. A 503 before reading
    # the upload when there is nothing to search.
    view = search.current()
    k, filters = _search_inputs(view)
    asked, depth, wanted = _facets_inputs(k)
    words = read_words(request)
    query = None
    if words is not None and not names_a_photo(request):
        if request.values.get("box", "").strip():
            raise BadRequest("box applies to a photo (image, image_url or query); q alone searches words")
        matches = search.search_words(view, words, wanted, filters)
    else:
        if words is None and not names_a_photo(request):
            raise BadRequest(f"send the photo as {SOURCES}; or words to search for as q")
        recent = current_app.extensions["recent_queries"]
        query = read_search_query(request, search.settings, view.embedder, recent)
        matches = search.search(view, query.vector, wanted, filters, words=words)
    return jsonify(
        {
            "results": results_json(matches[:k]),
            "k": k,
            **filters_json(filters),
            "q": request.values.get("q") if words is not None else None,
            "query": query.token if query else None,
            "box": query.box.as_list() if query and query.box else None,
            "index_version": view.version,
            **_facets_json(matches, asked, depth),
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    )


@api.get("/api/products/<path:sku>/similar")
def similar_products(sku: str):
    started = time.perf_counter()
    search = catalog_search()
    view = search.current()  # once per request: the filters and the search see the same state
    k, filters = _search_inputs(view)
    asked, depth, wanted = _facets_inputs(k)
    words = read_words(request)
    try:
        matches = search.similar(view, sku, wanted, filters, words)
    except UnknownProduct:
        # The widget asks this way: a 404 would put a red "failed to load" line in the shop's console.
        if request.args.get("unknown") != "empty":
            raise
        matches = []
    return jsonify(
        {
            "sku": sku,
            "results": results_json(matches[:k]),
            "k": k,
            **filters_json(filters),
            "q": request.values.get("q") if words is not None else None,
            **_facets_json(matches, asked, depth),
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    )


@api.get("/api/products/<path:sku>")
def product_details(sku: str):
    product = catalog_search().product(sku)
    return jsonify({**product.as_dict(), "image_url": url_for("api.product_image", sku=product.sku)})


@api.get("/api/categories")
def categories():
    return jsonify({"categories": catalog_search().categories()})


@api.get("/images/<path:sku>")
def product_image(sku: str):
    # The path comes from the database row the indexer wrote, never from the request.
    return send_file(catalog_search().image_path(sku), max_age=3600)


@api.route("/api/search/preview.png", methods=["GET", "POST"])
def search_preview():
    """A Matplotlib grid of a query and its matches: POST a photo or image_url, or GET with ?query=<token> or
    ?sku=; a box searches (and shows) that region of the photo."""
    search = catalog_search()
    view = search.current()
    # Each panel costs tens of ms of CPU: a k above service.preview_max_k is drawn as that many.
    k, filters = _search_inputs(view, search.settings.preview_max_k)
    recent = current_app.extensions["recent_queries"]
    if request.method == "POST" or request.args.get("query") or request.args.get("image_url"):
        query = read_search_query(request, search.settings, view.embedder, recent)
        thumbnail, matches = query.thumbnail(), search.search(view, query.vector, k, filters)
    elif sku := request.args.get("sku"):
        if request.args.get("box"):
            raise BadRequest("box applies to a photo (image, image_url or query), not to sku")
        thumbnail, matches = search.image_path(sku), search.similar(view, sku, k, filters)
    else:
        raise BadRequest(
            "POST a photo as 'image' (or its image_url), or GET with ?query=<token from a search> or ?sku=<sku>"
        )
    png = render_preview(thumbnail, [(m, search.image_path(m.sku)) for m in matches])
    return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})


@api.after_app_request
def mark_stale(response: Response) -> Response:
    """While the catalog database cannot be read, every answer says for how long (whole seconds): searches come
    from the index and products as this server last saw them."""
    if (seconds := catalog_search().stale_seconds()) is not None:
        response.headers["X-Index-Stale"] = str(int(seconds))
    return response


@api.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    status = catalog_search().status()
    return jsonify(status), 200 if status["ready"] else 503
