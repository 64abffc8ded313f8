"""The OpenAPI description of POST /api/recommend (service/recommend.py): its path, its request body and its answer,
merged into the document's paths and components."""

from __future__ import annotations

from indexer.config import RECOMMEND_RULES, Settings
from indexer.index.attributes import MAX_ATTRIBUTE_NAME, MAX_ATTRIBUTE_VALUE
from service.openapi.parts import ERRORS, FILTERS, WORDS, error, json_response
from service.openapi.schemas import FILTERS_ECHO, JSON, Schema, ref
from service.params import MAX_ATTRIBUTE_VALUES
from service.recommend import UNKNOWN

# The shipped limit (service.recommend_max_items); a deployment may set another.
MOST = Settings.recommend_max_items


def examples(name: str, least: int, what: str) -> Schema:
    return {
        "type": "array",
        "minItems": least,
        "maxItems": MOST,
        "items": {"type": "string", "pattern": r"\S"},
        "description": f"{what}: catalog skus, or the `query` tokens of earlier searches (POST /api/search), at most "
        f"service.recommend_max_items ({MOST}). Each is a sku when the catalog has such a product, else a token; "
        f'one that is neither is a 400 naming it (or, with `"unknown": "ignore"`, left out).',
    }


ATTRIBUTE_VALUE: Schema = {"type": "string", "maxLength": MAX_ATTRIBUTE_VALUE}
RECOMMEND_REQUEST: Schema = {
    "type": "object",
    "required": ["like"],
    "additionalProperties": False,
    "properties": {
        "like": examples("like", 1, "The products (or photos) to find more like, one or more"),
        "unlike": examples("unlike", 0, "Products (or photos) the results should be unlike, e.g. dismissed ones"),
        **FILTERS,
        "attributes": {
            "type": "object",
            "propertyNames": {"pattern": r"\S", "maxLength": MAX_ATTRIBUTE_NAME},
            "additionalProperties": {"oneOf": [ATTRIBUTE_VALUE, {"type": "array", "items": ATTRIBUTE_VALUE}]},
            "description": 'Attribute filters, e.g. `{"size": ["M", "L"], "brand": "Acme"}`: a name passes any of '
            "its values, different names must all hold; values match case-insensitively; an unknown name is a 400 "
            f"that lists the known ones. At most {MAX_ATTRIBUTE_VALUES} values in all.",
        },
        "q": WORDS,
        "unknown": {
            "type": "string",
            "enum": list(UNKNOWN),
            "default": "error",
            "description": "What an item that is neither a sku nor a remembered token does: `error`, a 400 naming "
            "it; `ignore`, it is left out and listed in the answer's `ignored` (the widget's choice: a product "
            "deleted since the page was made shows no error).",
        },
    },
    "examples": [{"like": ["SHOE-123", "SHOE-456"], "unlike": ["BOOT-9"], "k": 8, "max_price": 120}],
}
RECOMMEND_RESULTS: Schema = {
    "type": "object",
    "required": [
        *("results", "like", "unlike", "ignored", "k", "category", "min_price", "max_price", "attributes", "q"),
        *("rule", "index_version", "took_ms"),
    ],
    "additionalProperties": False,
    "properties": {
        "results": {
            "type": "array",
            "items": ref("Result"),
            "description": "Best first, one per product, none of the liked or unliked products.",
        },
        "like": {"type": "array", "items": {"type": "string"}, "description": "As sent, each item once."},
        "unlike": {"type": "array", "items": {"type": "string"}},
        "ignored": {
            "type": "array",
            "items": {"type": "string"},
            "description": 'The items left out, with `"unknown": "ignore"`: neither skus nor remembered tokens.',
        },
        **FILTERS_ECHO,
        "q": {"type": ["string", "null"], "description": "The words fused in, as sent; null without q."},
        "rule": {"type": "string", "enum": list(RECOMMEND_RULES), "description": "service.recommend_rule."},
        "index_version": {"type": "string", "description": "The base version + the change number applied."},
        "took_ms": {"type": "number"},
    },
}
RECOMMEND_SCHEMAS: Schema = {"RecommendRequest": RECOMMEND_REQUEST, "RecommendResults": RECOMMEND_RESULTS}
RECOMMEND_PATHS: Schema = {
    "/api/recommend": {
        "post": {
            "operationId": "recommend",
            "x-endpoint": "recommend.recommend_products",
            "tags": ["search"],
            "summary": "More like these, less like those",
            "description": "The catalog products most like the liked products (or photos of earlier searches) and "
            "unlike the unliked ones, with a search's filters and words. By service.recommend_rule: "
            "`average_vector` (the default) searches for normalize(mean(liked) - service.unlike_weight x "
            "mean(unliked)), each score the cosine similarity to it; `best_score` scores each of the liked products' "
            "nearest by its best cosine similarity to a liked one when that beats its best to an unliked one, else "
            "below -1. With `q`, the ranking is fused with the words' as a search's is.",
            "requestBody": {"required": True, "content": {JSON: {"schema": ref("RecommendRequest")}}},
            "responses": {
                "200": json_response("The recommendations.", ref("RecommendResults")),
                "400": error(
                    "The body is not a JSON object of the fields above; like is missing or empty; like or unlike "
                    "lists more than service.recommend_max_items items, an item that is not a non-blank string, or "
                    "an item that is neither a sku nor a remembered query token (the message names it); the same "
                    "item in both; a bad k, category, price bound, attribute filter or q. The message says what to "
                    "send instead."
                ),
                "413": error(ERRORS[413]),
                "503": error(ERRORS[503], retry=True),
            },
        }
    }
}
