"""The JSON shapes of the service's answers, as the OpenAPI document's component schemas."""

from __future__ import annotations

from typing import Any

from indexer.config import PRECISIONS

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


# The shown fields of a product (indexer.records.ShownProduct), in results and on their own.
PRODUCT_FIELDS: Schema = {
    "sku": {"type": "string"},
    "title": {"type": "string"},
    "category": nullable("string"),
    "price": nullable("number"),
    "url": nullable("string"),
}
RESULT: Schema = {
    "type": "object",
    "required": [*PRODUCT_FIELDS, "score", "image_url", "product_url"],
    "additionalProperties": False,
    "properties": {
        **PRODUCT_FIELDS,
        "score": {
            "type": "number",
            "description": "Higher is better. A photo alone: cosine similarity to the query. Words alone: the "
            "full-text relevance (-bm25 on SQLite, ts_rank_cd on PostgreSQL). A photo and words: the fused score, "
            "1/(60 + visual_rank) + service.text_weight/(60 + text_rank), a term for each ranking the product is in.",
        },
        "match": {
            "type": "object",
            "description": "How the result matched, when the search had words (q); null for a ranking it is not in.",
            "required": ["visual_rank", "visual_score", "text_rank"],
            "additionalProperties": False,
            "properties": {
                "visual_rank": {"type": ["integer", "null"], "minimum": 1},
                "visual_score": nullable("number"),
                "text_rank": {"type": ["integer", "null"], "minimum": 1},
            },
        },
        "image_url": {"type": "string", "description": "The product's photo (GET /images/{sku})."},
        "product_url": {"type": "string", "description": "The product's page (GET /products/{sku})."},
    },
}
FILTERS_ECHO: Schema = {
    "k": {"type": "integer", "minimum": 1},
    "category": nullable("string"),
    "min_price": nullable("number"),
    "max_price": nullable("number"),
    "attributes": {
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "string"}},
        "description": "The attribute filters: name -> the values asked for, case-folded as they are matched.",
    },
}
# The answer's facets (indexer.index.facets.count_facets), present when the request asked for some.
FACET_VALUES: Schema = {
    "type": "array",
    "description": "Each value and how many of the matches counted hold it, by count, then value.",
    "items": {
        "type": "object",
        "required": ["value", "count"],
        "additionalProperties": False,
        "properties": {"value": {"type": "string"}, "count": {"type": "integer", "minimum": 1}},
    },
}
FACETS_ECHO: Schema = {
    "facets": {
        "type": "object",
        "description": "The facets asked for, by the names asked for (category, price, attr.<name>), counted over "
        "the best facet_depth matches; a product without the field is not counted.",
        "properties": {
            "category": FACET_VALUES,
            "price": {
                "type": "array",
                "description": "Bands, cheapest first, each holding the prices p with min <= p < max; the first is "
                "open below (min null), the last open above (max null). The cuts are the quartiles of the "
                "matches' prices rounded to round figures (1, 1.5, 2, 2.5, 3, 4, 5 or 7.5 times a power of ten); "
                "a cut that would leave a band empty is dropped.",
                "items": {
                    "type": "object",
                    "required": ["min", "max", "count"],
                    "additionalProperties": False,
                    "properties": {
                        "min": nullable("number"),
                        "max": nullable("number"),
                        "count": {"type": "integer", "minimum": 1},
                    },
                },
            },
        },
        "additionalProperties": FACET_VALUES,  # attr.<name>: counted case-insensitively, in its commonest spelling
    },
    "facet_depth": {"type": "integer", "minimum": 1, "description": "The matches the facets counted, at most."},
}
SEARCH_RESULTS: Schema = {
    "type": "object",
    "required": [
        *("results", "k", "category", "min_price", "max_price", "attributes", "box", "query", "q", "index_version"),
        "took_ms",
    ],
    "additionalProperties": False,
    "properties": {
        "results": {"type": "array", "items": ref("Result"), "description": "Best first, one per product."},
        **FILTERS_ECHO,
        "box": {
            "type": ["array", "null"],
            "items": {"type": "number", "minimum": 0, "maximum": 1},
            "minItems": 4,
            "maxItems": 4,
            "description": "The region searched for, x0, y0, x1, y1; null for the whole photo.",
        },
        "query": {
            "type": ["string", "null"],
            "description": "Token for this photo: GET /api/search/preview.png?query=, "
            "or POST /api/search with query= to search again without uploading it; null for words alone.",
        },
        "q": {"type": ["string", "null"], "description": "The words searched for, as sent; null without q."},
        "index_version": {"type": "string", "description": "The base version + the change number applied."},
        **FACETS_ECHO,
        "took_ms": {"type": "number"},
    },
}
SIMILAR_RESULTS: Schema = {
    "type": "object",
    "required": ["sku", "results", "k", "category", "min_price", "max_price", "attributes", "q", "took_ms"],
    "additionalProperties": False,
    "properties": {
        "sku": {"type": "string"},
        "results": {"type": "array", "items": ref("Result")},
        **FILTERS_ECHO,
        "q": {"type": ["string", "null"], "description": "The words fused in, as sent; null without q."},
        **FACETS_ECHO,
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
        "nprobe": nullable("integer"),
        "ef_search": nullable("integer"),
        "rerank": {"type": "integer"},
        "recall_at_10": nullable("number"),
        "queries": {"type": "integer"},
    },
}
READY: Schema = {
    "type": "object",
    "required": ["ready", "items", "model", "model_version", "engine", "index_version", "search", "change"],
    "properties": {
        "ready": {"const": True},
        "items": {"type": "integer", "description": "Searchable images."},
        "model": ref("Model"),
        "model_version": {"type": "string", "description": "`plain`, or the fine-tuned version in use."},
        "engine": {"type": "string"},
        "index_version": {"type": "string"},
        "index_created": nullable("string"),
        "factory": nullable("string"),
        "search": TUNING,
        "base": {
            "type": "object",
            "required": ["items", "built_through"],
            "properties": {"items": {"type": "integer"}, "built_through": {"type": "integer"}},
        },
        "change": {"type": "integer", "description": "The newest change number applied."},
        "delta": {"type": "integer", "description": "Changed images held outside the base."},
        "deleted_from_base": {"type": "integer"},
        "plan_costs": {
            "type": ["object", "null"],
            "description": "What each plan of a filtered search costs on this base (microseconds), measured when "
            "the server loaded it; the cheapest plan is chosen per search.",
        },
        "model_change": {
            "type": ["object", "null"],
            "description": "While `make index` embeds the catalog with another model than the one served (a "
            "fine-tuned version, another precision): the served model's key, the live rows already embedded with "
            "each other model, and all live rows. The servers switch to the new model and its base together once "
            "it is published. Null when every row is of the served model.",
        },
        "stale": {
            "type": ["object", "null"],
            "description": "While the catalog database cannot be read: since when, for how many seconds and why. "
            "Searches then answer from the index and products this server holds (each answer's X-Index-Stale header "
            "says so too), writes answer 503, and every change made meanwhile is applied once it answers. Null "
            "while the database reads.",
            "properties": {
                "since": {"type": "string"},
                "seconds": {"type": "number"},
                "reason": {"type": "string"},
            },
        },
    },
}
NOT_READY: Schema = {
    "type": "object",
    "required": ["ready", "reason", "model"],
    "properties": {"ready": {"const": False}, "reason": {"type": "string"}, "model": ref("Model")},
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
