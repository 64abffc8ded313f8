"""POST /api/recommend: products like the liked ones and unlike the unliked ones (catalog skus, or the query tokens
of earlier searches), with the filters and words a search takes. The rule is indexer.index.recommend's."""

from __future__ import annotations

import json
import time

import numpy as np
from flask import Blueprint, current_app, jsonify, request

from indexer.errors import UnknownProduct
from indexer.index.recommend import Examples, recommend
from indexer.index.search import CatalogSearch, IndexView
from service.api import catalog_search, filters_json, results_json
from service.errors import BadRequest
from service.params import json_fields, json_type, read_filters, read_k, read_words
from service.recent_queries import TOKEN, RecentQueries

recommendations = Blueprint("recommend", __name__)

# The body's fields besides like, unlike, attributes and unknown: read as a search's form fields (service.params).
SEARCH_FIELDS = ("k", "category", "min_price", "max_price", "q")
FIELDS = ("like", "unlike", *SEARCH_FIELDS, "attributes", "unknown")
# What an unknown sku or forgotten token does: a 400 naming it, or (the widget's choice) it is left out.
UNKNOWN = ("error", "ignore")
EXAMPLE = '{"like": ["SKU-1", "SKU-2"], "unlike": ["SKU-3"], "k": 8}'


@recommendations.post("/api/recommend")
def recommend_products():
    started = time.perf_counter()
    search = catalog_search()
    view = search.current()  # once per request: the examples are read, and the search made, in the same state
    body = read_body()
    most = search.settings.recommend_max_items
    like, unlike = read_items(body, "like", most), read_items(body, "unlike", most)
    if both := sorted(set(like) & set(unlike)):
        raise BadRequest(f"{both[0][:80]!r} is both liked and unliked; name it in one of like and unlike")
    unknown = body.get("unknown", "error")
    if unknown not in UNKNOWN:
        raise BadRequest(f'unknown must be "error" (the default: a 400 naming it) or "ignore", not {unknown!r:.40}')
    fields = json_fields(body, SEARCH_FIELDS)
    k = read_k(fields, search.settings.default_k, search.settings.max_k)
    filters = read_filters(fields, lambda: search.categories(view), view.live.attribute_names)
    words = read_words(fields)
    recent = current_app.extensions["recent_queries"]
    ignored: list[str] = []
    liked = examples_of(search, view, recent, like, ignored if unknown == "ignore" else None)
    unliked = examples_of(search, view, recent, unlike, ignored if unknown == "ignore" else None)
    matches = []
    if liked:
        examples = Examples(
            liked=np.stack([vector for _, vector in liked]),
            unliked=np.stack([vector for _, vector in unliked]) if unliked else np.zeros((0, view.identity.dim)),
            skus=frozenset(sku for sku, _ in liked + unliked if sku is not None),
        )
        matches = recommend(search, view, examples, k, filters, words)
    return jsonify(
        {
            "results": results_json(matches),
            "like": like,
            "unlike": unlike,
            "ignored": ignored,
            "k": k,
            **filters_json(filters),
            "q": fields.get("q") if words is not None else None,
            "rule": search.settings.recommend_rule,
            "index_version": view.version,
            "took_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    )


def read_body() -> dict[str, object]:
    """The JSON object the request holds, with none but the known fields; 400 otherwise."""
    if not request.is_json:
        raise BadRequest(f"send a JSON object with Content-Type: application/json, e.g. {EXAMPLE}")
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        raise BadRequest(f"the body is not valid JSON; send an object such as {EXAMPLE}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, not {json_type(body)}; e.g. {EXAMPLE}")
    for name in body:
        if name not in FIELDS:
            raise BadRequest(f"unknown field {name[:40]!r}; a recommendation takes {', '.join(FIELDS)}")
    return body


def read_items(body: dict[str, object], name: str, most: int) -> list[str]:
    """The like (one or more) or unlike (any, or none) list: skus or query tokens, each named once, in order."""
    items = body.get(name)
    if items is None and name == "unlike":
        return []
    if not isinstance(items, list) or (name == "like" and not items):
        raise BadRequest(f"{name} must list one or more skus or query tokens of earlier searches, e.g. {EXAMPLE}")
    if len(items) > most:
        raise BadRequest(f"{name} names {len(items)} items; at most {most} (service.recommend_max_items)")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            shown = "a blank string" if isinstance(item, str) else json_type(item)
            raise BadRequest(f"each item of {name} is a sku or a query token (a non-blank string), not {shown}")
    return list(dict.fromkeys(items))


def examples_of(
    search: CatalogSearch, view: IndexView, recent: RecentQueries, items: list[str], ignored: list[str] | None
) -> list[tuple[str | None, np.ndarray]]:
    """Each item's sku (None for a query token) and vector, of the view's model: a catalog product's own, else a
    remembered query photo's. An item that is neither is a 400 naming it, or with `ignored` is added to it."""
    found = []
    for item in items:
        try:
            found.append((item, search.product_vector(view, item)))
            continue
        except UnknownProduct:
            pass
        query = recent.get(item) if TOKEN.fullmatch(item) else None
        if query is not None:
            found.append((None, recent.embedded(query, view.embedder).vector))
        elif ignored is not None:
            ignored.append(item)
        else:
            raise BadRequest(
                f"{item[:80]!r} is neither a product's sku nor the query token of a search still remembered; "
                'send skus of the catalog, or search the photo again for a new token (or send "unknown": "ignore")'
            )
    return found
