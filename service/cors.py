"""CORS for storefronts: the configured origins may call the read API from a browser, never the write API."""

from __future__ import annotations

import re

from flask import Flask, Response, request
from flask_cors.core import get_cors_options, set_cors_headers
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

# The read API, by endpoint. GET /api/products/<sku> shares its URL with the write API's PUT and DELETE, so the
# gate is the endpoint a request reaches (for a preflight: the one the request it announces would reach), not
# its path.
READ_ENDPOINTS = frozenset(
    {"api.search_by_photo", "api.similar_products", "api.product_details", "api.categories", "api.product_image"}
    | {"recommend.recommend_products"}
    | {"batch.search_batch"}
)
# The storefront widget's script, whichever blueprint serves it.
WIDGET_PATH = "/widget.js"
READ_METHODS = ("GET", "HEAD", "POST")


def enable_cors(app: Flask, origins: tuple[str, ...]) -> None:
    """Answer cross-origin calls to the read API from `origins` (scheme://host[:port]); nothing when empty."""
    if not origins:
        return
    options = get_cors_options(
        app,
        {
            # flask-cors reads a string holding regex characters (an IPv6 host's brackets) as a pattern, and
            # matches patterns by prefix: exact, case-insensitive patterns leave no room for either.
            "origins": [re.compile(re.escape(origin) + r"\Z", re.IGNORECASE) for origin in origins],
            "methods": list(READ_METHODS),
            "always_send": False,  # no Origin header, no CORS headers
            "max_age": 600,
            "vary_header": False,  # Vary: Origin is set below, on every answer of the read API
        },
    )

    @app.after_request
    def allow_storefronts(response: Response) -> Response:
        if _reaches_read_api(app):
            # The answer depends on the Origin header: caches (the photos are cacheable) must keep them apart.
            response.vary.add("Origin")
            set_cors_headers(response, options)
        return response


def _reaches_read_api(app: Flask) -> bool:
    """Whether this request, or the request a preflight announces, goes to the read API."""
    method = request.method
    if method == "OPTIONS":
        method = request.headers.get("Access-Control-Request-Method", "").strip().upper()
        rule = _rule_for(app, method) if method else None  # an OPTIONS without it is no preflight
    else:
        rule = request.url_rule
    return rule is not None and method in READ_METHODS and (rule.endpoint in READ_ENDPOINTS or rule.rule == WIDGET_PATH)


def _rule_for(app: Flask, method: str) -> Rule | None:
    adapter = app.create_url_adapter(request)
    if adapter is None:
        return None
    try:
        rule, _ = adapter.match(method=method, return_rule=True)
    except HTTPException:  # no such URL, or not for that method
        return None
    return rule
