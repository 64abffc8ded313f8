"""OpenAPI 3.1 description of every endpoint, kept by hand beside the views and served at GET /openapi.json.

Each operation's x-endpoint names the Flask view that serves it; tests/test_openapi.py holds the paths to Flask's
URL map in both directions and fuzzes the real server with the document (Schemathesis).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from service.openapi.batch import BATCH_PATHS, BATCH_SCHEMAS
from service.openapi.duplicates import DUPLICATES_PATHS, DUPLICATES_SCHEMAS
from service.openapi.paths import PATHS, URI_TOO_LONG, with_uri_limit
from service.openapi.recommend import RECOMMEND_PATHS, RECOMMEND_SCHEMAS
from service.openapi.schemas import (
    DELETE_RESULT,
    ERROR,
    MODEL,
    NOT_READY,
    PRODUCT,
    PUT_RESULT,
    READY,
    RESULT,
    SEARCH_RESULTS,
    SIMILAR_RESULTS,
    Schema,
)

openapi = Blueprint("openapi", __name__)

SPEC: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "Visual product search",
        "version": "1",
        "description": "Send a photo, get the catalog's most similar products. Errors are JSON "
        '`{"error": ..., "message": ...}` on /api/ paths (and wherever the client prefers JSON). An empty form or '
        "query field counts as absent, as HTML forms send them.",
    },
    "tags": [
        {"name": "search", "description": "Search by photo and more like this."},
        {"name": "catalog", "description": "Products, categories and photos."},
        {"name": "writes", "description": "The write API for storefronts (off until an API key is configured)."},
        {"name": "pages", "description": "For people: HTML pages and the storefront widget."},
        {"name": "operations", "description": "Health, readiness, metrics and this description."},
    ],
    "paths": with_uri_limit({**PATHS, **BATCH_PATHS, **RECOMMEND_PATHS, **DUPLICATES_PATHS}),
    "components": {
        "responses": {"UriTooLong": URI_TOO_LONG},
        "schemas": {
            "Error": ERROR,
            "Result": RESULT,
            "SearchResults": SEARCH_RESULTS,
            "SimilarResults": SIMILAR_RESULTS,
            "Product": PRODUCT,
            "Model": MODEL,
            "Ready": READY,
            "NotReady": NOT_READY,
            "PutResult": PUT_RESULT,
            "DeleteResult": DELETE_RESULT,
            **BATCH_SCHEMAS,
            **RECOMMEND_SCHEMAS,
            **DUPLICATES_SCHEMAS,
        },
        "headers": {
            "RetryAfter": {
                "description": "Seconds to wait before retrying.",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            },
            "WWWAuthenticate": {
                "description": "The scheme to authenticate with: `Bearer`.",
                "required": True,
                "schema": {"type": "string"},
            },
        },
        "securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "service.api_key (or API_KEY)."}
        },
    },
}


@openapi.get("/openapi.json")
def openapi_json() -> Response:
    # Relative to where the service is mounted, as the links in results are.
    return jsonify({**SPEC, "servers": [{"url": request.script_root or "/"}]})
