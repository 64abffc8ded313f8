"""OpenAPI 3.1 description of every endpoint, kept by hand beside the views and served at GET /openapi.json.

Each operation's x-endpoint names the Flask view that serves it; tests/test_openapi.py holds the paths to Flask's
URL map in both directions and fuzzes the real server with the document (Schemathesis).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from indexer.config import PRECISIONS
from service.query_photo import RAW_IMAGE_TYPES

openapi = Blueprint("openapi", __name__)

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


def _json(description: str, schema: Schema, **extra: Any) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _error(description: str, *, html: bool = False, retry: bool = False, challenge: bool = False) -> Schema:
    """An error answer. Paths under /api/ always answer JSON; the others (pages, photos, health) answer a short
    HTML page unless the client prefers JSON (Accept: application/json)."""
    content: Schema = {JSON: {"schema": _ref("Error")}}
    if html:
        content["text/html"] = {"schema": {"type": "string"}}
    response: Schema = {"description": description, "content": content}
    if retry:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    if challenge:
        response["headers"] = {"WWW-Authenticate": {"$ref": "#/components/headers/WWWAuthenticate"}}
    return response


def _errors(*statuses: int, html: bool = False) -> dict[str, Schema]:
    return {
        str(status): _error(ERRORS[status], html=html, retry=status == 503, challenge=status == 401)
        for status in statuses
    }


ERRORS = {
    400: "The request is unusable: a missing, empty or unreadable image, more than one of image, image_url and "
    "query, an image_url that is refused, or a bad k, category, price bound or box. The message says what to send "
    "instead.",
    401: "The API key is missing or wrong.",
    403: "The write API is off: no service.api_key (or API_KEY) is configured.",
    404: "No product with that sku (or the query token is no longer remembered).",
    413: "The upload is larger than service.max_upload_bytes.",
    502: "image_url could not be fetched: the name did not resolve, nobody answered in time, or its server answered "
    "with an error.",
    503: "Not ready: no index yet, an index built by another model, a database schema older than the code, a base "
    "over service.memory_budget_mb, or a write that could not be saved (nothing was changed). Retry after "
    "Retry-After seconds.",
}


def _param(name: str, where: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


SKU = _param(
    "sku",
    "path",
    {"type": "string", "minLength": 1},
    "The product's sku. It may contain slashes (`shoes/red-runner`): the rest of the path is the sku.",
    required=True,
)
FILTERS: Schema = {
    "k": {
        "type": "integer",
        "minimum": 1,
        "description": "Results wanted (default service.default_k); larger values are capped at service.max_k.",
    },
    "category": {"type": "string", "description": "Only products of this category (GET /api/categories)."},
    "min_price": {"type": "number", "description": "Lowest price, inclusive; products without a price never pass."},
    "max_price": {"type": "number", "description": "Highest price, inclusive; not below min_price."},
}
BOX: Schema = {
    "type": "string",
    # Four comma-separated parts, or nothing (the whole photo); the numbers themselves are checked by the server.
    "pattern": r"^\s*$|^[^,]*(,[^,]*){3}$",
    "description": "The region of the photo to search for, as fractions of its width and height: `x0,y0,x1,y1` "
    "with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, covering enough of the photo; empty for the whole photo.",
    "examples": ["0.1,0.2,0.6,0.9"],
}
TOKEN: Schema = {
    "type": "string",
    "description": "The `query` token of a recent search: the service remembers its photo for a while.",
}
IMAGE_URL: Schema = {
    "type": "string",
    "description": "The http or https address of a photo for the service to fetch and search with, within "
    "service.fetch_timeout_s and max_upload_bytes; private and loopback addresses are refused unless "
    "service.fetch_allow_private.",
}
PHOTO: Schema = {
    "type": "string",
    "format": "binary",
    "description": "The photo (JPEG, PNG, WebP, ...), at most service.max_upload_bytes.",
}
RAW_PHOTO: Schema = {
    "type": "string",
    "format": "binary",
    "description": "The photo's bytes as the whole body, at most service.max_upload_bytes; the other fields then "
    "come in the query string.",
}


def _query_param(name: str, schema: Schema) -> Schema:
    return _param(name, "query", {k: v for k, v in schema.items() if k != "description"}, schema["description"])


FILTER_PARAMS = [_query_param(name, schema) for name, schema in FILTERS.items()]
# The fields a raw photo body leaves to the query string (a form may send them there too).
SEARCH_PARAMS = [*FILTER_PARAMS, _query_param("box", BOX)]


def _multipart(properties: Schema, description: str, *, required: bool = True, extra: Schema | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **(extra or {})}
    return {
        "required": required,
        "description": description,
        "content": {"multipart/form-data": {"schema": schema, "encoding": {"image": {"contentType": "image/*"}}}},
    }


# The shown fields of a product (indexer.records.ShownProduct), in results and on their own.
PRODUCT_FIELDS: Schema = {
    "sku": {"type": "string"},
    "title": {"type": "string"},
    "category": _nullable("string"),
    "price": _nullable("number"),
    "url": _nullable("string"),
}
RESULT: Schema = {
    "type": "object",
    "required": [*PRODUCT_FIELDS, "score", "image_url", "product_url"],
    "additionalProperties": False,
    "properties": {
        **PRODUCT_FIELDS,
        "score": {"type": "number", "description": "Cosine similarity to the query (higher is closer)."},
        "image_url": {"type": "string", "description": "The product's photo (GET /images/{sku})."},
        "product_url": {"type": "string", "description": "The product's page (GET /products/{sku})."},
    },
}
FILTERS_ECHO: Schema = {
    "k": {"type": "integer", "minimum": 1},
    "category": _nullable("string"),
    "min_price": _nullable("number"),
    "max_price": _nullable("number"),
}
SEARCH_RESULTS: Schema = {
    "type": "object",
    "required": ["results", "k", "category", "min_price", "max_price", "box", "query", "index_version", "took_ms"],
    "additionalProperties": False,
    "properties": {
        "results": {"type": "array", "items": _ref("Result"), "description": "Best first, one per product."},
        **FILTERS_ECHO,
        "box": {
            "type": ["array", "null"],
            "items": {"type": "number", "minimum": 0, "maximum": 1},
            "minItems": 4,
            "maxItems": 4,
            "description": "The region searched for, x0, y0, x1, y1; null for the whole photo.",
        },
        "query": {
            "type": "string",
            "description": "Token for this photo: GET /api/search/preview.png?query=, "
            "or POST /api/search with query= to search again without uploading it.",
        },
        "index_version": {"type": "string", "description": "The base version + the change number applied."},
        "took_ms": {"type": "number"},
    },
}
SIMILAR_RESULTS: Schema = {
    "type": "object",
    "required": ["sku", "results", "k", "category", "min_price", "max_price", "took_ms"],
    "additionalProperties": False,
    "properties": {
        "sku": {"type": "string"},
        "results": {"type": "array", "items": _ref("Result")},
        **FILTERS_ECHO,
        "took_ms": {"type": "number"},
    },
}
PRODUCT: Schema = {
    "type": "object",
    "required": [*PRODUCT_FIELDS, "attributes", "image_url"],
    "additionalProperties": False,
    "properties": {
        **PRODUCT_FIELDS,
        "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
        "image_url": {"type": "string"},
    },
}
MODEL: Schema = {
    "type": "object",
    "required": ["model", "weights_sha256", "dim", "precision"],
    "properties": {
        "model": {"type": "string"},
        "weights_sha256": {"type": "string"},
        "dim": {"type": "integer"},
        "precision": {"type": "string", "enum": list(PRECISIONS)},
        "quantized_sha256": {"type": "string", "description": "the int8 model file's sha256 (its calibration)"},
    },
}
TUNING: Schema = {
    "type": ["object", "null"],
    "description": "How the base is searched, and the recall@10 that setting reached against exact search.",
    "properties": {
        "factory": {"type": "string"},
        "nprobe": _nullable("integer"),
        "ef_search": _nullable("integer"),
        "rerank": {"type": "integer"},
        "recall_at_10": _nullable("number"),
        "queries": {"type": "integer"},
    },
}
READY: Schema = {
    "type": "object",
    "required": ["ready", "items", "model", "model_version", "engine", "index_version", "search", "change"],
    "properties": {
        "ready": {"const": True},
        "items": {"type": "integer", "description": "Searchable images."},
        "model": _ref("Model"),
        "model_version": {"type": "string", "description": "`plain`, or the fine-tuned version in use."},
        "engine": {"type": "string"},
        "index_version": {"type": "string"},
        "index_created": _nullable("string"),
        "factory": _nullable("string"),
        "search": TUNING,
        "base": {
            "type": "object",
            "required": ["items", "built_through"],
            "properties": {"items": {"type": "integer"}, "built_through": {"type": "integer"}},
        },
        "change": {"type": "integer", "description": "The newest change number applied."},
        "delta": {"type": "integer", "description": "Changed images held outside the base."},
        "deleted_from_base": {"type": "integer"},
    },
}
NOT_READY: Schema = {
    "type": "object",
    "required": ["ready", "reason", "model"],
    "properties": {"ready": {"const": False}, "reason": {"type": "string"}, "model": _ref("Model")},
}
VISIBLE: Schema = {
    "index_version": {"type": "string", "description": "The index version that includes the change."},
    "items": {"type": "integer"},
    "change": {"type": "integer", "description": "The change number that includes the change."},
}
PUT_RESULT: Schema = {
    "type": "object",
    "required": ["sku", "created", "index_version", "items", "change"],
    "additionalProperties": False,
    "properties": {"sku": {"type": "string"}, "created": {"type": "boolean"}, **VISIBLE},
}
DELETE_RESULT: Schema = {
    "type": "object",
    "required": ["sku", "deleted", "index_version", "items", "change"],
    "additionalProperties": False,
    "properties": {"sku": {"type": "string"}, "deleted": {"const": True}, **VISIBLE},
}
ERROR: Schema = {
    "type": "object",
    "required": ["error", "message"],
    "additionalProperties": False,
    "properties": {
        "error": {"type": "string", "description": "Machine-readable: bad_request, not_found, not_ready, ..."},
        "message": {"type": "string", "description": "What went wrong and what to do, for people."},
    },
}

NOT_MODIFIED = {"description": "Not modified since the copy the client holds (If-None-Match, If-Modified-Since)."}
PNG = {"description": "The grid as a PNG.", "content": {"image/png": {"schema": {"type": "string"}}}}
HTML = {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}
SEARCH_FIELDS: Schema = {"image": PHOTO, "image_url": IMAGE_URL, "query": TOKEN, **FILTERS, "box": BOX}
# Exactly one of them names the photo; an empty or blank image_url or query counts as absent (what a form sends).
NAMED_BY = {
    "image": {"required": ["image"]},
    "image_url": {"required": ["image_url"], "properties": {"image_url": {"pattern": r"\S"}}},
    "query": {"required": ["query"], "properties": {"query": {"pattern": r"\S"}}},
}


def _search_body(description: str, *, required: bool = True, raw: bool = False) -> Schema:
    """The photo and filters of a search: multipart with an upload, or url-encoded with image_url or query; with
    raw, also the photo itself as the body (RAW_IMAGE_TYPES)."""
    body = _multipart(SEARCH_FIELDS, description, required=required, extra={"oneOf": list(NAMED_BY.values())})
    body["content"]["application/x-www-form-urlencoded"] = {
        "schema": {
            "type": "object",
            "properties": {name: field for name, field in SEARCH_FIELDS.items() if name != "image"},
            "oneOf": [NAMED_BY["image_url"], NAMED_BY["query"]],
        }
    }
    if raw:
        body["content"].update({media_type: {"schema": RAW_PHOTO} for media_type in RAW_IMAGE_TYPES})
    return body


PATHS: Schema = {
    "/api/search": {
        "post": {
            "operationId": "search_by_photo",
            "x-endpoint": "api.search_by_photo",
            "tags": ["search"],
            "summary": "Search by photo",
            "description": "The catalog products that look most like a photo, best first. Send the photo as `image`, "
            "or its address as `image_url`, or the `query` token of a recent search (one of them); `box` searches "
            "for a region of it. The fields may also come in the query string. Or send the photo's bytes as the "
            f"whole body (Content-Type {', '.join(RAW_IMAGE_TYPES)}), with the other fields in the query string.",
            "parameters": SEARCH_PARAMS,
            "requestBody": _search_body(
                "The photo (or its address, or a recent query's token) and optional filters.", raw=True
            ),
            "responses": {"200": _json("The matches.", _ref("SearchResults")), **_errors(400, 404, 413, 502, 503)},
        }
    },
    "/api/search/preview.png": {
        "get": {
            "operationId": "search_preview",
            "x-endpoint": "api.search_preview",
            "tags": ["search"],
            "summary": "Preview grid of a recent search or of a product's similar products",
            "description": "A Matplotlib grid of a query and its matches. One of `query` (a token from a search), "
            "`image_url`, or `sku` (a product and its similar products) is required; `box` applies to a photo.",
            "parameters": [
                _query_param("query", TOKEN),
                _query_param("image_url", IMAGE_URL),
                _param("sku", "query", {"type": "string"}, "A catalog product: its photo and similar products."),
                *FILTER_PARAMS,
                _query_param("box", BOX),
            ],
            "responses": {"200": PNG, **_errors(400, 404, 502, 503)},
        },
        "post": {
            "operationId": "search_preview_of_photo",
            "x-endpoint": "api.search_preview",
            "tags": ["search"],
            "summary": "Preview grid of a search by photo",
            "parameters": SEARCH_PARAMS,
            "requestBody": _search_body("As for POST /api/search.", raw=True),
            "responses": {"200": PNG, **_errors(400, 404, 413, 502, 503)},
        },
    },
    "/api/products/{sku}/similar": {
        "get": {
            "operationId": "similar_products",
            "x-endpoint": "api.similar_products",
            "tags": ["search"],
            "summary": "More like this",
            "description": "The products that look most like a catalog product, itself excluded.",
            "parameters": [
                SKU,
                *FILTER_PARAMS,
                _param(
                    "unknown",
                    "query",
                    {"type": "string", "enum": ["empty"]},
                    "`empty`: an unknown sku answers 200 with no results instead of 404 (what the widget asks).",
                ),
            ],
            "responses": {
                "200": _json("The matches.", _ref("SimilarResults")),
                **_errors(400, 404),
                "503": _error(f"{ERRORS[503]} Also while the product's photo is being embedded.", retry=True),
            },
        }
    },
    "/api/products/{sku}": {
        "parameters": [SKU],
        "get": {
            "operationId": "product_details",
            "x-endpoint": "api.product_details",
            "tags": ["catalog"],
            "summary": "A product's metadata",
            "responses": {"200": _json("The product.", _ref("Product")), **_errors(404, 503)},
        },
        "put": {
            "operationId": "put_product",
            "x-endpoint": "writes.put_product",
            "tags": ["writes"],
            "summary": "Add or replace a product",
            "description": "Answers once the product is durable and searchable on this server (every other server "
            "applies it on its next request). Form fields other than the named ones are kept as attributes.",
            "security": [{"bearerAuth": []}],
            "requestBody": _multipart(
                {
                    "image": PHOTO,
                    "title": {"type": "string", "description": "Default: the sku."},
                    "category": {"type": "string"},
                    "price": {"type": "number"},
                    "url": {"type": "string"},
                },
                "The product's photo, its fields, and any further attributes (text).",
                extra={"required": ["image"], "additionalProperties": {"type": "string"}},
            ),
            "responses": {
                "200": _json("The product replaced an existing one.", _ref("PutResult")),
                "201": _json("The product was created.", _ref("PutResult")),
                **_errors(400, 401, 403, 413, 503),
                # Flask's <path:sku> does not match a line break: such a URL names no route at all.
                "404": _error("No such URL: a sku is printable text; one with a line break matches no route."),
            },
        },
        "delete": {
            "operationId": "delete_product",
            "x-endpoint": "writes.delete_product",
            "tags": ["writes"],
            "summary": "Remove a product",
            "security": [{"bearerAuth": []}],
            "responses": {
                "200": _json("The product is gone from results on this server.", _ref("DeleteResult")),
                **_errors(401, 403, 404, 503),
            },
        },
    },
    "/api/categories": {
        "get": {
            "operationId": "categories",
            "x-endpoint": "api.categories",
            "tags": ["catalog"],
            "summary": "The catalog's categories",
            "responses": {
                "200": _json(
                    "The categories of live products.",
                    {
                        "type": "object",
                        "required": ["categories"],
                        "additionalProperties": False,
                        "properties": {"categories": {"type": "array", "items": {"type": "string"}}},
                    },
                ),
                **_errors(503),
            },
        }
    },
    "/images/{sku}": {
        "get": {
            "operationId": "product_image",
            "x-endpoint": "api.product_image",
            "tags": ["catalog"],
            "summary": "A product's photo",
            "description": "The file the indexer or the write API recorded for the product (cached for an hour).",
            "parameters": [SKU],
            "responses": {
                "200": {
                    "description": "The photo; application/octet-stream for the rare formats (TGA, ...) that have "
                    "no image media type.",
                    "content": {
                        "image/*": {"schema": {"type": "string"}},
                        "application/octet-stream": {"schema": {"type": "string"}},
                    },
                },
                "304": NOT_MODIFIED,
                **_errors(404, 503, html=True),
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "x-endpoint": "api.healthz",
            "tags": ["operations"],
            "summary": "The process is alive",
            "responses": {
                "200": _json(
                    "Alive.",
                    {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}},
                )
            },
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "x-endpoint": "api.readyz",
            "tags": ["operations"],
            "summary": "Ready to search",
            "description": "200 once the model and an index are loaded, with what is served; else 503 with the reason.",
            "responses": {
                "200": _json("Ready.", _ref("Ready")),
                "503": _json("Not ready; `reason` says why and what to do.", _ref("NotReady")),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "x-endpoint": "metrics.scrape",
            "tags": ["operations"],
            "summary": "Metrics for Prometheus",
            "description": "Requests per endpoint, embedding and search time, the live index and writes, summed over "
            "the server's workers. The Prometheus text format, or OpenMetrics when the Accept header asks for it.",
            "responses": {
                "200": {
                    "description": "The metrics.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                }
            },
        }
    },
    "/widget.js": {
        "get": {
            "operationId": "widget_script",
            "x-endpoint": "widget.widget_script",
            "tags": ["pages"],
            "summary": "The storefront widget script",
            "responses": {
                "200": {
                    "description": "The script.",
                    "content": {"application/javascript": {"schema": {"type": "string"}}},
                },
                "304": NOT_MODIFIED,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi_json",
            "x-endpoint": "openapi.openapi_json",
            "tags": ["operations"],
            "summary": "This description",
            "responses": {"200": _json("OpenAPI 3.1.", {"type": "object", "required": ["openapi", "paths"]})},
        }
    },
    "/": {
        "get": {
            "operationId": "search_page",
            "x-endpoint": "pages.search_page",
            "tags": ["pages"],
            "summary": "The search page",
            "responses": {"200": HTML},
        },
        "post": {
            "operationId": "results_page",
            "x-endpoint": "pages.search_page",
            "tags": ["pages"],
            "summary": "The results page for a photo",
            "requestBody": _search_body("As for POST /api/search (the search form).", required=False),
            "responses": {
                "200": HTML,
                **{
                    str(status): {**HTML, "description": f"The page again, saying what went wrong: {ERRORS[status]}"}
                    for status in (400, 404, 502, 503)
                },
                "413": _error(ERRORS[413], html=True),
            },
        },
    },
    "/products/{sku}": {
        "get": {
            "operationId": "product_page",
            "x-endpoint": "pages.product_page",
            "tags": ["pages"],
            "summary": "A product's page, with similar products",
            "parameters": [SKU, _query_param("k", FILTERS["k"])],
            "responses": {"200": HTML, **_errors(400, 404, 503, html=True)},
        }
    },
}

URI_TOO_LONG: Schema = {
    "description": "The URL is longer than the HTTP server accepts (64 KB); Granian itself answers, "
    "with an empty body. Send long values (a box, many filters) in a POST form instead.",
}


def _with_uri_limit(paths: Schema) -> Schema:
    """Every operation whose URL carries parameters may meet the server's limit on its length."""
    for item in paths.values():
        for method, operation in item.items():
            if method != "parameters" and (operation.get("parameters") or item.get("parameters")):
                operation["responses"]["414"] = {"$ref": "#/components/responses/UriTooLong"}
    return paths


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
    "paths": _with_uri_limit(PATHS),
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
