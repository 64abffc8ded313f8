"""The OpenAPI description of the near-duplicate review (service/duplicates.py): GET /api/duplicates and
GET /duplicates, with the answer's schema, merged into the document's paths and components."""

from __future__ import annotations

from service.duplicates import DEFAULT_PER_PAGE, MAX_GROUP_PRODUCTS, MAX_PER_PAGE
from service.openapi.parts import HTML, errors, json_response, param
from service.openapi.schemas import PRODUCT_FIELDS, Schema, nullable, ref

PAGING_PARAMS = [
    param(
        "page",
        "query",
        {"type": "integer", "minimum": 1},
        "The page of groups, from 1 (default 1); past the last page: 400.",
    ),
    param(
        "per_page",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_PER_PAGE},
        f"Groups a page (default {DEFAULT_PER_PAGE}, at most {MAX_PER_PAGE}; more: 400).",
    ),
    param(
        "threshold",
        "query",
        {"type": "number", "maximum": 1},
        "Show only pairs at this cosine similarity or more: from the report's threshold to 1 (default: the "
        "report's); outside that range: 400, as a lower threshold needs a new report (`make duplicates THRESHOLD=`).",
    ),
]
BAD_PAGE = (
    "page, per_page or threshold is not a number in its range: a page past the last one, per_page over "
    f"{MAX_PER_PAGE}, a threshold below the report's or above 1. The message says which."
)

REPORT: Schema = {
    "type": "object",
    "description": "The latest report of `python -m indexer duplicates`.",
    "required": [
        "created",
        "change",
        "threshold",
        "category_only",
        "photo_check",
        "photos",
        "products",
        "groups",
        "pairs",
    ],
    "properties": {
        "created": {"type": "string", "description": "When it was made (ISO 8601, UTC)."},
        "change": {"type": "integer", "description": "The change number whose vectors it compared."},
        "threshold": {
            "type": "number",
            "description": "The cosine similarity of the stored vectors from which photos were paired.",
        },
        "category_only": {"type": "boolean", "description": "Whether products were paired only within a category."},
        "photo_check": {
            "type": "boolean",
            "description": "Whether each pair's photos were compared (kept only when they are one picture), or the "
            "vectors alone decided (`--no-photo-check`).",
        },
        "photos": {"type": "integer", "description": "Photos compared."},
        "products": {"type": "integer", "description": "Products compared."},
        "groups": {"type": "integer", "description": "Groups found."},
        "pairs": {"type": "integer", "description": "Pairs found."},
        "seconds": {"type": "number", "description": "How long the job took."},
    },
}
REVIEWED_PRODUCT: Schema = {
    "type": "object",
    "required": [*PRODUCT_FIELDS, "image_url", "product_url", "photo", "fields"],
    "properties": {
        **PRODUCT_FIELDS,
        "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
        "image_url": {"type": "string", "description": "The product's photo (GET /images/{sku})."},
        "product_url": {"type": "string", "description": "The product's page (GET /products/{sku})."},
        "photo": {
            "type": "object",
            "description": "The photo's pixels (0 where it cannot be read now) and file size.",
            "required": ["width", "height", "bytes"],
            "properties": {
                "width": {"type": "integer", "minimum": 0},
                "height": {"type": "integer", "minimum": 0},
                "bytes": {"type": "integer", "minimum": 0},
            },
        },
        "fields": {
            "type": "integer",
            "minimum": 0,
            "description": "Fields filled: a title other than the sku, category, price, url, and each attribute.",
        },
    },
}
DUPLICATES: Schema = {
    "type": "object",
    "required": ["report", "threshold", "page", "per_page", "pages", "total_groups", "groups"],
    "properties": {
        "report": {"oneOf": [ref("DuplicatesReport"), {"type": "null"}]},
        "threshold": {**nullable("number"), "description": "The similarity from which pairs are shown."},
        "page": {"type": "integer", "minimum": 1},
        "per_page": {"type": "integer", "minimum": 1},
        "pages": {"type": "integer", "minimum": 0},
        "total_groups": {
            "type": "integer",
            "minimum": 0,
            "description": "The report's groups with a pair at the threshold; those whose products were deleted "
            "since are left out of their page, so a page may hold fewer than per_page.",
        },
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["group", "size", "keep", "products", "pairs"],
                "properties": {
                    "group": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "Its number in the report (most similar first); a group that a deletion "
                        "split shows as its parts, each with this number.",
                    },
                    "size": {"type": "integer", "minimum": 2, "description": "Its live products."},
                    "keep": {"type": "string", "description": "The sku of the suggested copy to keep."},
                    "products": {
                        "type": "array",
                        "maxItems": MAX_GROUP_PRODUCTS,
                        "description": f"The suggested copy first; at most {MAX_GROUP_PRODUCTS} listed.",
                        "items": ref("DuplicateProduct"),
                    },
                    "pairs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["sku", "other_sku", "similarity"],
                            "properties": {
                                "sku": {"type": "string"},
                                "other_sku": {"type": "string"},
                                "similarity": {"type": "number", "description": "Cosine of their closest photos."},
                            },
                        },
                    },
                },
            },
        },
        "message": {"type": "string", "description": "With no report yet: what to run."},
    },
}

DUPLICATES_PATHS: Schema = {
    "/api/duplicates": {
        "get": {
            "operationId": "duplicates",
            "x-endpoint": "duplicates.duplicates_json",
            "tags": ["catalog"],
            "summary": "Near-duplicate products: a page of the latest report's groups",
            "description": "The groups of products whose photos are near-identical, as the latest run of `python -m "
            "indexer duplicates` found them, a page at a time, each with its products still live (those deleted "
            "since are left out), the similarity of each pair, and a suggested copy to keep (the most fields "
            "filled, then the most pixels, then the largest file). Without a report: no groups, and a message.",
            "parameters": PAGING_PARAMS,
            "responses": {
                "200": json_response("A page of groups.", ref("Duplicates")),
                "400": {**errors(400)["400"], "description": BAD_PAGE},
                **errors(503),
            },
        }
    },
    "/duplicates": {
        "get": {
            "operationId": "duplicates_page",
            "x-endpoint": "duplicates.duplicates_page",
            "tags": ["pages"],
            "summary": "The review page of near-duplicate products, groups side by side",
            "parameters": PAGING_PARAMS,
            "responses": {
                "200": HTML,
                "400": {**errors(400, html=True)["400"], "description": BAD_PAGE},
                **errors(503, html=True),
            },
        }
    },
}
DUPLICATES_SCHEMAS: Schema = {
    "Duplicates": DUPLICATES,
    "DuplicatesReport": REPORT,
    "DuplicateProduct": REVIEWED_PRODUCT,
}
