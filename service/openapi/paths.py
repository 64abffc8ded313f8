"""The paths of the OpenAPI document: every endpoint's operations, each naming the Flask view that serves it."""

from __future__ import annotations

from service.openapi.parts import (
    BOX,
    ERRORS,
    FACET_PARAMS,
    FILTER_PARAMS,
    FILTERS,
    HTML,
    IMAGE_URL,
    NOT_MODIFIED,
    PHOTO,
    PNG,
    SEARCH_PARAMS,
    SKU,
    TOKEN,
    WORDS_PARAM,
    error,
    errors,
    json_response,
    multipart,
    param,
    query_param,
    search_body,
)
from service.openapi.schemas import Schema, ref
from service.search_photo import RAW_IMAGE_TYPES

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
            f"whole body (Content-Type {', '.join(RAW_IMAGE_TYPES)}), with the other fields in the query string. "
            "`q` adds words beside the photo, or searches by words alone when no photo is named. `facets` adds "
            "counts per category, price band and attribute value of the best `facet_depth` matches.",
            "parameters": [*SEARCH_PARAMS, WORDS_PARAM, *FACET_PARAMS],
            "requestBody": search_body(
                "The photo (or its address, or a recent query's token), or words (q), and optional filters.",
                raw=True,
                words=True,
            ),
            "responses": {
                "200": json_response("The matches.", ref("SearchResults")),
                **errors(400, 404, 413, 502, 503),
            },
        }
    },
    "/api/search/preview.png": {
        "get": {
            "operationId": "search_preview",
            "x-endpoint": "api.search_preview",
            "tags": ["search"],
            "summary": "Preview grid of a recent search or of a product's similar products",
            "description": "A Matplotlib grid of a query and its matches. One of `query` (a token from a search), "
            "`image_url`, or `sku` (a product and its similar products) is required; `box` applies to a photo. At "
            "most service.preview_max_k matches are drawn (default 24): a larger `k` draws that many.",
            "parameters": [
                query_param("query", TOKEN),
                query_param("image_url", IMAGE_URL),
                param("sku", "query", {"type": "string"}, "A catalog product: its photo and similar products."),
                *FILTER_PARAMS,
                query_param("box", BOX),
            ],
            "responses": {"200": PNG, **errors(400, 404, 502, 503)},
        },
        "post": {
            "operationId": "search_preview_of_photo",
            "x-endpoint": "api.search_preview",
            "tags": ["search"],
            "summary": "Preview grid of a search by photo",
            "description": "At most service.preview_max_k matches are drawn (24 by default): a larger `k`, that many.",
            "parameters": SEARCH_PARAMS,
            "requestBody": search_body("As for POST /api/search.", raw=True),
            "responses": {"200": PNG, **errors(400, 404, 413, 502, 503)},
        },
    },
    "/api/products/{sku}/similar": {
        "get": {
            "operationId": "similar_products",
            "x-endpoint": "api.similar_products",
            "tags": ["search"],
            "summary": "More like this",
            "description": "The products that look most like a catalog product, itself excluded; with `q`, fused "
            "with the products that hold the words.",
            "parameters": [
                SKU,
                *FILTER_PARAMS,
                WORDS_PARAM,
                *FACET_PARAMS,
                param(
                    "unknown",
                    "query",
                    {"type": "string", "enum": ["empty"]},
                    "`empty`: an unknown sku answers 200 with no results instead of 404 (what the widget asks).",
                ),
            ],
            "responses": {
                "200": json_response("The matches.", ref("SimilarResults")),
                **errors(400, 404),
                "503": error(f"{ERRORS[503]} Also while the product's photo is being embedded.", retry=True),
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
            "responses": {"200": json_response("The product.", ref("Product")), **errors(404, 503)},
        },
        "put": {
            "operationId": "put_product",
            "x-endpoint": "writes.put_product",
            "tags": ["writes"],
            "summary": "Add or replace a product",
            "description": "Answers once the product is durable and searchable on this server (every other server "
            "applies it on its next request). Form fields other than the named ones are kept as attributes.",
            "security": [{"bearerAuth": []}],
            "requestBody": multipart(
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
                "200": json_response("The product replaced an existing one.", ref("PutResult")),
                "201": json_response("The product was created.", ref("PutResult")),
                **errors(400, 401, 403, 413, 503),
                # Flask's <path:sku> does not match a line break: such a URL names no route at all.
                "404": error("No such URL: a sku is printable text; one with a line break matches no route."),
            },
        },
        "delete": {
            "operationId": "delete_product",
            "x-endpoint": "writes.delete_product",
            "tags": ["writes"],
            "summary": "Remove a product",
            "security": [{"bearerAuth": []}],
            "responses": {
                "200": json_response("The product is gone from results on this server.", ref("DeleteResult")),
                **errors(401, 403, 404, 503),
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
                "200": json_response(
                    "The categories of live products.",
                    {
                        "type": "object",
                        "required": ["categories"],
                        "additionalProperties": False,
                        "properties": {"categories": {"type": "array", "items": {"type": "string"}}},
                    },
                ),
                **errors(503),
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
                **errors(404, 503, html=True),
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
                "200": json_response(
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
                "200": json_response("Ready.", ref("Ready")),
                "503": json_response("Not ready; `reason` says why and what to do.", ref("NotReady")),
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
            "responses": {"200": json_response("OpenAPI 3.1.", {"type": "object", "required": ["openapi", "paths"]})},
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
            "summary": "The results page for a photo, words, or both",
            "requestBody": search_body("As for POST /api/search (the search form).", required=False, words=True),
            "responses": {
                "200": HTML,
                **{
                    str(status): {**HTML, "description": f"The page again, saying what went wrong: {ERRORS[status]}"}
                    for status in (400, 404, 502, 503)
                },
                "413": error(ERRORS[413], html=True),
            },
        },
    },
    "/products/{sku}": {
        "get": {
            "operationId": "product_page",
            "x-endpoint": "pages.product_page",
            "tags": ["pages"],
            "summary": "A product's page, with similar products",
            "parameters": [SKU, query_param("k", FILTERS["k"])],
            "responses": {"200": HTML, **errors(400, 404, 503, html=True)},
        }
    },
}

URI_TOO_LONG: Schema = {
    "description": "The URL is longer than the HTTP server accepts (64 KB); Granian itself answers, "
    "with an empty body. Send long values (a box, many filters) in a POST form instead.",
}


def with_uri_limit(paths: Schema) -> Schema:
    """Every operation whose URL carries parameters may meet the server's limit on its length."""
    for item in paths.values():
        for method, operation in item.items():
            if method != "parameters" and (operation.get("parameters") or item.get("parameters")):
                operation["responses"]["414"] = {"$ref": "#/components/responses/UriTooLong"}
    return paths
