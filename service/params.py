"""A request's parameters: k, the category, price and attribute filters, the words (q), the facets, and an uploaded
photo with its vectors (a search's or a write's), each checked with a 400 that says what to send. The same readers
read a form or query string and a JSON body's fields (json_fields turns those into form fields).

Which photo a search is about (an upload, an image_url, a token, a box) is service/search_photo.py; recent query
photos are remembered by service/recent_queries.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flask import Request
from PIL import Image
from werkzeug.datastructures import MultiDict

from indexer.embedding.images import ImageError
from indexer.embedding.model import Embedder
from indexer.index.attributes import ATTRIBUTE_PREFIX, MAX_ATTRIBUTE_NAME, MAX_ATTRIBUTE_VALUE
from indexer.index.facets import FacetRequest, FacetsError
from indexer.index.live_index import Filters
from indexer.storage.text import Words, WordsError
from service.errors import BadRequest

# What the readers read: a request's query string and form, or the fields of a JSON body (json_fields).
Fields = Request | MultiDict


def _values(source: Fields) -> MultiDict:
    return source.values if isinstance(source, Request) else source


def read_upload(request: Request) -> bytes:
    upload = request.files.get("image")
    if upload is None:
        raise BadRequest("send the photo as a multipart/form-data file field named 'image'")
    data = upload.read()
    if not data:
        raise BadRequest("the uploaded image is empty (0 bytes)")
    return data


def read_k(request: Fields, default: int, most: int) -> int:
    raw = _values(request).get("k", "").strip()
    if not raw:
        return default
    try:
        k = int(raw)
    except ValueError:
        raise BadRequest(f"k must be a whole number from 1 to {most}, not {raw[:40]!r}") from None
    if k < 1:
        raise BadRequest(f"k must be a whole number from 1 to {most}")
    return min(k, most)


def read_category(request: Fields, known: list[str] | Callable[[], list[str]]) -> str | None:
    """The category filter, checked against the known categories (a callable: listed only when one is asked for)."""
    category = _values(request).get("category", "").strip() or None
    if category is not None and category not in (known() if callable(known) else known):
        raise BadRequest(f"unknown category {category[:80]!r}; GET /api/categories lists them")
    return category


def read_price_bound(request: Fields, name: str) -> float | None:
    raw = _values(request).get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value):
        raise BadRequest(f"{name} must be a number, not {raw[:40]!r}")
    return value


# Attribute filters: attr.<name>=<value> (names and values as long as indexer.index.attributes allows). More values
# than this in one search are refused (400): each is a lookup.
MAX_ATTRIBUTE_VALUES = 64
# Known names listed in an unknown name's 400, at most.
LISTED_NAMES = 30


def read_attributes(request: Fields, known: Callable[[], list[str]]) -> tuple[tuple[str, frozenset[str]], ...]:
    """The attr.<name>=<value> filters: a repeated name is any of its values, different names all must hold;
    values case-folded (an empty one is no filter, as an unset form field). 400 for an empty, long or unknown
    name, a long value, or too many."""
    values = _values(request)
    wanted: dict[str, set[str]] = {}
    given = 0
    for key in values:
        if not key.startswith(ATTRIBUTE_PREFIX):
            continue
        name = key[len(ATTRIBUTE_PREFIX) :]
        if not name.strip():
            raise BadRequest("an attribute filter needs a name: attr.<name>=<value>, e.g. attr.size=M")
        if len(name) > MAX_ATTRIBUTE_NAME:
            raise BadRequest(f"attribute names are at most {MAX_ATTRIBUTE_NAME} characters; {name[:40]!r}… is longer")
        for value in values.getlist(key):
            given += 1
            if given > MAX_ATTRIBUTE_VALUES:
                raise BadRequest(f"at most {MAX_ATTRIBUTE_VALUES} attribute filters (attr.<name>=<value>) a search")
            if len(value) > MAX_ATTRIBUTE_VALUE:
                raise BadRequest(f"attribute values are at most {MAX_ATTRIBUTE_VALUE} characters (attr.{name[:40]})")
            if value.strip():
                wanted.setdefault(name, set()).add(value.strip().casefold())
    if wanted:
        names = set(known())
        for name in sorted(wanted):
            if name not in names:
                raise BadRequest(f"unknown attribute {name[:80]!r}; {_listed(sorted(names))}")
    return tuple((name, frozenset(values)) for name, values in sorted(wanted.items()))


def _listed(names: list[str]) -> str:
    if not names:
        return "no product has attributes to filter by"
    shown = ", ".join(repr(n[:60]) for n in names[:LISTED_NAMES])
    more = f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
    return f"the known attributes are {shown}{more}"


def read_filters(
    request: Fields,
    known_categories: list[str] | Callable[[], list[str]],
    known_attributes: Callable[[], list[str]] = list,
) -> Filters:
    """category, min_price, max_price and attr.<name> from the query string or form; 400 when they make no
    sense. The known names are asked for only when an attribute filter is given."""
    filters = Filters(
        category=read_category(request, known_categories),
        min_price=read_price_bound(request, "min_price"),
        max_price=read_price_bound(request, "max_price"),
        attributes=read_attributes(request, known_attributes),
    )
    if filters.min_price is not None and filters.max_price is not None and filters.min_price > filters.max_price:
        raise BadRequest("min_price is above max_price")
    return filters


def read_words(request: Fields, blank_is_none: bool = False) -> Words | None:
    """q, the words to search for, or None when it was not sent (or, with blank_is_none, left blank: a page's
    empty words box); 400 for a blank q, one too long, or one without a word."""
    raw = _values(request).get("q")
    if raw is None or (blank_is_none and not raw.strip()):
        return None
    try:
        return Words.parse(raw)
    except WordsError as exc:
        raise BadRequest(str(exc)) from None


def read_facets(request: Fields, default: int, most: int) -> tuple[FacetRequest | None, int]:
    """The facets asked for (facets=category,price,attr.<name>, comma-separated or repeated; None when none is
    named) and facet_depth, the matches they count (default when not sent); 400 for a facet that is none of
    those, or a facet_depth that is not a whole number from 1 to `most` (service.max_facet_depth)."""
    try:
        asked = FacetRequest.parse(_values(request).getlist("facets"))
    except FacetsError as exc:
        raise BadRequest(str(exc)) from None
    raw = _values(request).get("facet_depth", "").strip()
    if not raw:
        return asked, default
    try:
        depth = int(raw)
    except ValueError:
        depth = 0
    if not 1 <= depth <= most:
        raise BadRequest(
            f"facet_depth must be a whole number from 1 to {most} (service.max_facet_depth), not {raw[:40]!r}"
        )
    return asked, depth


def json_fields(body: Mapping[str, object], names: tuple[str, ...]) -> MultiDict:
    """A JSON body's search fields as the form fields the readers above read: each of `names` that is a string or a
    number as its text (null: not sent), and "attributes": {"<name>": ["<value>", ...]} (or one value) as
    attr.<name> fields; 400 for a field of another type."""
    fields: MultiDict = MultiDict()
    for name in names:
        value = body.get(name)
        if value is not None:
            fields.add(name, _scalar(value, name))
    attributes = body.get("attributes")
    if attributes is None:
        return fields
    if not isinstance(attributes, dict):
        raise BadRequest('attributes must be an object of names and values, e.g. {"size": ["M", "L"]}')
    given = 0
    for name, values in attributes.items():
        for value in values if isinstance(values, list) else [values]:
            given += 1
            if given > MAX_ATTRIBUTE_VALUES:  # before reading the rest of a long list
                raise BadRequest(f"at most {MAX_ATTRIBUTE_VALUES} attribute filters (attributes' values) a search")
            fields.add(ATTRIBUTE_PREFIX + name, _scalar(value, f"attributes.{name[:40]}"))
    return fields


def _scalar(value: object, name: str) -> str:
    # bool is an int to Python, not a number to a JSON client.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"{name} must be a string or a number, not {json_type(value)}")
    return str(value)


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {bool: "a boolean", dict: "an object", list: "an array", str: "a string", type(None): "null"}
    return names.get(type(value), "a number")


def embed_upload(data: bytes | Image.Image, embedder: Embedder, views: tuple[str, ...] | None = None) -> np.ndarray:
    """The upload's vector; with `views` (a product photo written through the API), (1 + len(views), dim): its
    vector and then its extra catalog views', as `make index` stores them. Or a 400 that says why the bytes are
    not a usable photo."""
    try:
        return embedder.embed_image(data) if views is None else embedder.embed_views(data, views)
    except ImageError as exc:
        raise BadRequest(f"the upload is not a usable image: {exc}") from None
