"""The OpenAPI description of POST /api/search/batch (service/batch.py): its path and its answers' schemas, merged
into the document's paths and components."""

from __future__ import annotations

from service.openapi.parts import FILTER_PARAMS, FILTERS, IMAGE_URL, PHOTO, WORDS, WORDS_PARAM, error, json_response
from service.openapi.schemas import Schema, ref

ITEM_FIELDS: Schema = {
    "image": {"type": "array", "items": PHOTO, "description": "Photos to search with, one part each."},
    "image_url": {"type": "array", "items": IMAGE_URL, "description": "Addresses of photos, one field each."},
    "sku": {
        "type": "array",
        "items": {"type": "string"},
        "description": "Catalog products whose similar products are wanted, one field each.",
    },
}
BATCH_BODY: Schema = {
    "required": True,
    "description": "The items, as repeated `image` file parts and `image_url` and `sku` fields in any mix, "
    "answered in the order they come in the body; and the fields every item is searched with.",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {**ITEM_FIELDS, **FILTERS, "q": WORDS},
                "anyOf": [{"required": [name]} for name in ITEM_FIELDS],
            },
            "encoding": {"image": {"contentType": "image/*"}},
        }
    },
}
BATCH_ITEM_ERROR: Schema = {
    "type": "object",
    "required": ["error", "message", "status"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "string",
            "description": "bad_request, not_found, bad_gateway, request_entity_too_large, ...",
        },
        "message": {"type": "string", "description": "What went wrong with this item, as its own request would say."},
        "status": {
            "type": "integer",
            "minimum": 400,
            "maximum": 599,
            "description": "The status the item's own request would have got.",
        },
    },
}
BATCH_RESULTS: Schema = {
    "type": "object",
    "required": ["items", "took_ms"],
    "additionalProperties": False,
    "properties": {
        "items": {
            "type": "array",
            "description": "One answer per item, in the order sent: a photo's as POST /api/search answers (with its "
            "own `query` token and took_ms), a sku's as GET /api/products/{sku}/similar, or the item's error.",
            "items": {"anyOf": [ref("SearchResults"), ref("SimilarResults"), ref("BatchItemError")]},
        },
        "took_ms": {"type": "number", "description": "The whole batch."},
    },
}
BATCH_SCHEMAS: Schema = {"BatchResults": BATCH_RESULTS, "BatchItemError": BATCH_ITEM_ERROR}

BATCH_PATHS: Schema = {
    "/api/search/batch": {
        "post": {
            "operationId": "search_batch",
            "x-endpoint": "batch.search_batch",
            "tags": ["search"],
            "summary": "Several photos and products searched in one request",
            "description": "Up to service.max_batch (32) items: photos (`image` parts, each at most "
            "service.max_upload_bytes, or `image_url`s) and catalog `sku`s, in a body of at most "
            "service.max_batch_bytes (40 MB). `k`, the filters and `q` apply to every item. Each item is answered as "
            "its own request would be, in the order sent; an item that fails (a broken photo, a refused or failing "
            "image_url, an unknown sku) carries its own error and status, and the batch still answers 200. `query`, "
            "`box`, `facets` and `facet_depth` belong to single searches (400 here).",
            "parameters": [*FILTER_PARAMS, WORDS_PARAM],
            "requestBody": BATCH_BODY,
            "responses": {
                "200": json_response("An answer per item, in the order sent.", ref("BatchResults")),
                "400": error(
                    "The batch is unusable: not a multipart form, no item, more than service.max_batch items, a "
                    "file part not named `image`, a field of a single search only, or a bad k, category, price "
                    "bound, attribute or q (shared by every item). The message says what to send instead."
                ),
                "413": error(
                    "The body is larger than service.max_batch_bytes, a field other than a photo is larger than "
                    "the form's limit, or the form has too many parts (a photo over service.max_upload_bytes is "
                    "that item's error)."
                ),
                "503": error("Not ready: no index yet (see GET /readyz). Retry after Retry-After seconds.", retry=True),
            },
        }
    }
}
