"""HTML pages for people: upload a photo and browse the matches, product pages with similar items."""

from __future__ import annotations

import base64
import io

from flask import Blueprint, current_app, render_template, request
from werkzeug.exceptions import HTTPException

from indexer.errors import AttributesUnavailable, NotReady
from indexer.index.facets import PAGE_FACETS
from service.api import catalog_search
from service.errors import BadRequest
from service.params import read_facets, read_filters, read_k, read_words
from service.refine import refine_groups, search_state
from service.search_photo import names_a_photo, read_search_query

pages = Blueprint("pages", __name__)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@pages.route("/", methods=["GET", "POST"])
def search_page():
    search = catalog_search()
    status = search.status()
    context = {
        "status": status,
        "categories": search.categories() if status["ready"] else [],
        "k": search.settings.default_k,
        "category": None,
        "q": "",
        "query": None,
        # the attribute filters searched with, kept by every form of the page: (name, value) pairs
        "attributes": [],
        "attribute_args": {},
        "matches": None,
        "refine": [],
        "state": [],
        "error": None,
    }
    if request.method == "POST":
        try:
            view = search.current()  # the query is embedded as this view's vectors were, and searched in it
            context["k"] = read_k(request, search.settings.default_k, search.settings.max_k)
            filters = read_filters(request, context["categories"], view.live.attribute_names)
            context["category"] = filters.category
            context["attributes"] = [(name, value) for name, values in filters.attributes for value in sorted(values)]
            context["attribute_args"] = {f"attr.{name}": sorted(values) for name, values in filters.attributes}
            words = read_words(request, blank_is_none=True)  # the words box, left empty, is no words
            context["q"] = request.values.get("q", "") if words is not None else ""
            # The refine list: the facets asked for, else category and price; the results are the first k.
            asked, depth = read_facets(request, search.settings.facet_depth, search.settings.max_facet_depth)
            wanted = max(context["k"], depth)
            query = None
            if words is None or names_a_photo(request):
                recent = current_app.extensions["recent_queries"]
                query = read_search_query(request, search.settings, view.embedder, recent)
        except (BadRequest, AttributesUnavailable, NotReady) as exc:
            context["error"] = str(exc)
            return render_template("search.html", **context), 503 if isinstance(exc, NotReady) else 400
        except HTTPException as exc:  # a forgotten query token (404), an image_url that failed (502)
            context["error"] = exc.description
            return render_template("search.html", **context), exc.code
        if query is None:
            matches = search.search_words(view, words, wanted, filters)
        else:
            matches = search.search(view, query.vector, wanted, filters, words=words)
            # The whole photo, with the box drawn on it: the shopper drags a new box on this picture.
            context.update(query=query, query_image=_data_url(query.query.thumbnail()))
        context["matches"] = matches[: context["k"]]
        # What runs this search again: the refine list, and a box dragged on the photo, add to it.
        context["state"] = state = search_state(request, query.token if query else None)
        context["refine"] = refine_groups(search.facets(matches[:depth], asked or PAGE_FACETS), state)
    return render_template("search.html", **context)


@pages.get("/products/<path:sku>")
def product_page(sku: str):
    search = catalog_search()
    product = search.product(sku)
    k = read_k(request, search.settings.default_k, search.settings.max_k)
    return render_template("product.html", product=product, matches=search.similar(search.current(), sku, k), k=k)
