"""The parts the OpenAPI document's operations share: parameters, request bodies and responses (errors too)."""

from __future__ import annotations

from typing import Any

from indexer.storage.text import MAX_WORDS_CHARS
from service.openapi.schemas import JSON, Schema, ref
from service.search_photo import RAW_IMAGE_TYPES


def json_response(description: str, schema: Schema, **extra: Any) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def error(description: str, *, html: bool = False, retry: bool = False, challenge: bool = False) -> Schema:
    """An error answer. Paths under /api/ always answer JSON; the others (pages, photos, health) answer a short
    HTML page unless the client prefers JSON (Accept: application/json)."""
    content: Schema = {JSON: {"schema": ref("Error")}}
    if html:
        content["text/html"] = {"schema": {"type": "string"}}
    response: Schema = {"description": description, "content": content}
    if retry:
        response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
    if challenge:
        response["headers"] = {"WWW-Authenticate": {"$ref": "#/components/headers/WWWAuthenticate"}}
    return response


def errors(*statuses: int, html: bool = False) -> dict[str, Schema]:
    return {
        str(status): error(ERRORS[status], html=html, retry=status == 503, challenge=status == 401)
        for status in statuses
    }


ERRORS = {
    400: "The request is unusable: a missing, empty or unreadable image, more than one of image, image_url and "
    "query, an image_url that is refused, or a bad k, category, price bound, box or q (blank, too long, or without "
    "a word), a facets list naming something other than category, price and attr.<name>, or a facet_depth that is "
    "not a whole number from 1 to service.max_facet_depth. The message says what to send instead.",
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


def param(name: str, where: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


SKU = param(
    "sku",
    "path",
    {"type": "string", "minLength": 1},
    "The product's sku. It may contain slashes (`shoes/red-runner`): the rest of the path is the sku (which "
    "never ends in `/similar`).",
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
# attr.<name>=<value> (service/params.py): any attribute name, so an object whose properties are the parameters.
ATTRIBUTES: Schema = {
    "type": "object",
    "propertyNames": {"pattern": r"^attr\.\S", "maxLength": 105},
    "additionalProperties": {"type": "string", "maxLength": 200},
    "maxProperties": 64,
    "description": "Attribute filters, `attr.<name>=<value>` (e.g. `attr.size=M&attr.size=L&attr.brand=Acme`): a "
    "repeated name passes any of its values, different names must all hold; values match exactly, case-insensitively "
    "(an empty value is no filter); combined with category and prices. An unknown name is a 400 that lists the known "
    "ones; a value no product has gives no results. Names are at most 100 characters, values 200, and at most 64 "
    "of them a search. Applied inside the vector search (the FAISS index; Milvus answers 400).",
}
BOX: Schema = {
    "type": "string",
    # Four comma-separated parts, or nothing (the whole photo); the numbers themselves are checked by the server.
    "pattern": r"^\s*$|^[^,]*(,[^,]*){3}$",
    "description": "The region of the photo to search for, as fractions of its width and height: `x0,y0,x1,y1` "
    "with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, covering enough of the photo; empty for the whole photo.",
    "examples": ["0.1,0.2,0.6,0.9"],
}
WORDS: Schema = {
    "type": "string",
    "maxLength": MAX_WORDS_CHARS,
    "description": f"Words to search for in the products' titles, categories and attribute values (at most "
    f"{MAX_WORDS_CHARS} characters; case and, on SQLite, accents do not matter; every word must occur). Alone, the "
    "products that hold them, most relevant first; with a photo (or on /similar), fused with its ranking by "
    "reciprocal rank fusion (service.text_weight), each result then saying how it `match`ed. Sent but blank, or "
    "holding no letter or digit: 400.",
    "examples": ["white mug"],
}
# Facet counts beside the results (indexer.index.facets): on POST /api/search, /similar and the results page.
FACET_FIELDS: Schema = {
    "facets": {
        "type": "string",
        "description": "Counts to return beside the results, comma-separated (or the field repeated): `category`, "
        "`price` (bands cut at the quartiles of the matches' prices, rounded to round figures) and `attr.<name>` "
        "(an attribute's values, counted case-insensitively; an attribute no match has: an empty list). Counted over "
        "the best `facet_depth` matches after the filters, of which the results are the first k. Naming anything "
        "else: 400.",
        "examples": ["category,price,attr.colour"],
    },
    "facet_depth": {
        "type": "integer",
        "minimum": 1,
        "description": "How many of the best matches the facets count (default service.facet_depth, 200); more "
        "than service.max_facet_depth (1000): 400.",
    },
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


def query_param(name: str, schema: Schema) -> Schema:
    return param(name, "query", {k: v for k, v in schema.items() if k != "description"}, schema["description"])


FILTER_PARAMS = [
    *(query_param(name, schema) for name, schema in FILTERS.items()),
    {**query_param("attributes", ATTRIBUTES), "style": "form", "explode": True},
]
WORDS_PARAM = query_param("q", WORDS)
FACET_PARAMS = [query_param(name, schema) for name, schema in FACET_FIELDS.items()]
# The fields a raw photo body leaves to the query string (a form may send them there too).
SEARCH_PARAMS = [*FILTER_PARAMS, query_param("box", BOX)]


def multipart(properties: Schema, description: str, *, required: bool = True, extra: Schema | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": properties, **(extra or {})}
    return {
        "required": required,
        "description": description,
        "content": {"multipart/form-data": {"schema": schema, "encoding": {"image": {"contentType": "image/*"}}}},
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


# Words alone (POST /api/search): q, and no photo named in any way.
WORDS_ALONE: Schema = {
    "required": ["q"],
    "properties": {
        "q": {"pattern": r"\w"},
        "image_url": {"pattern": r"^\s*$"},
        "query": {"pattern": r"^\s*$"},
        "image": False,
    },
}


def search_body(description: str, *, required: bool = True, raw: bool = False, words: bool = False) -> Schema:
    """The photo and filters of a search: multipart with an upload, or url-encoded with image_url or query; with
    raw, also the photo itself as the body (RAW_IMAGE_TYPES); with words, also q, beside a photo or alone, and the
    facets (a search that returns results rather than a picture of them)."""
    fields = {**SEARCH_FIELDS, "q": WORDS, **FACET_FIELDS} if words else SEARCH_FIELDS
    named = [*NAMED_BY.values(), WORDS_ALONE] if words else list(NAMED_BY.values())
    body = multipart(fields, description, required=required, extra={"oneOf": named})
    body["content"]["application/x-www-form-urlencoded"] = {
        "schema": {
            "type": "object",
            "properties": {name: field for name, field in fields.items() if name != "image"},
            "oneOf": [NAMED_BY["image_url"], NAMED_BY["query"], *([WORDS_ALONE] if words else [])],
        }
    }
    if raw:
        body["content"].update({media_type: {"schema": RAW_PHOTO} for media_type in RAW_IMAGE_TYPES})
    return body
