"""A product's two records: the fields a catalog, an import or the write API gives (ProductFields), and the
product as the API and the pages show it (ShownProduct), whose as_dict is the one JSON shape of a product."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# What browsers strip from both ends of a link (C0 controls and space), and the controls they drop inside it
# ("java\tscript:" is "javascript:" to a browser): a link holding any control character is no link.
_C0_AND_SPACE = "".join(map(chr, range(0x21)))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WEB_SCHEME = re.compile(r"https?://", re.IGNORECASE)
# The routes that follow a sku in a URL (GET /api/products/<sku>/similar): a sku ending in one would be read as
# that route of a shorter sku. tests/test_hostile_pages.py holds this list to the service's URL map.
ROUTE_SUFFIXES = ("/similar",)
# The lengths of the products table's text columns (indexer.storage.schema; tests/test_schema.py holds them to it).
MAX_LENGTHS = {"sku": 512, "title": 1024, "category": 256, "url": 2048}


def safe_link(url: str | None) -> str | None:
    """The product url as a link a page, the widget or the API may hand out: an absolute http:// or https://
    address with a host, else None. Case, surrounding whitespace and control characters cannot smuggle in
    another scheme (javascript:, data:, vbscript:...)."""
    if not url:
        return None
    link = url.strip(_C0_AND_SPACE)
    if _CONTROL.search(link) or not _WEB_SCHEME.match(link):
        return None
    try:
        host = urlsplit(link).hostname
    except ValueError:  # a malformed address, such as an unclosed IPv6 bracket
        return None
    return link if host else None


def sku_problem(sku: str) -> str | None:
    """Why `sku` cannot be a product's sku, as a message that says what to send; None when it can. A sku is a
    path in the product's URLs (/products/<sku>, /api/products/<sku>), so each sku must reach its own product:
    none ends in a route's suffix, starts with "/" (merged away) or holds a "." or ".." segment (clients remove
    those before sending)."""
    if suffix := next((s for s in ROUTE_SUFFIXES if sku.endswith(s)), None):
        return f"a sku may not end in {suffix!r}: /api/products/<sku>{suffix} is another route"
    if sku.startswith("/"):
        return "a sku may not start with '/'"
    if any(part in (".", "..") for part in sku.split("/")):
        return "a sku may not hold '.' or '..' between slashes: clients remove those segments from URLs"
    return None


@dataclass(frozen=True)
class ProductFields:
    """A product as a catalog file, an import or the write API describes it: what the store is given."""

    sku: str
    title: str
    category: str | None = None
    price: float | None = None
    url: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def shown(self) -> tuple:
        """The fields a search result shows, besides the sku."""
        return (self.title, self.category, self.price, self.url)

    def storage_problem(self) -> str | None:
        """Why the store cannot hold this product (a field longer than its column, a NUL character, which
        PostgreSQL refuses in text), as a message that says what to send; None when it can."""
        for name, limit in MAX_LENGTHS.items():
            if len(value := getattr(self, name) or "") > limit:
                return f"{name} is {len(value)} characters long; at most {limit} can be stored"
        texts = [self.sku, self.title, self.category or "", self.url or "", *self.attributes, *self.attributes.values()]
        if any("\x00" in text for text in texts):
            return "product fields may not contain NUL characters"
        return None


@dataclass(frozen=True, slots=True)
class Match:
    """How a result of a search with words matched: its rank (1 = best) and score in the visual ranking, and its
    rank in the words' ranking; None for a ranking it is not in."""

    visual_rank: int | None = None
    visual_score: float | None = None
    text_rank: int | None = None

    def as_dict(self) -> dict[str, object]:
        score = None if self.visual_score is None else round(self.visual_score, 6)
        return {"visual_rank": self.visual_rank, "visual_score": score, "text_rank": self.text_rank}


@dataclass(frozen=True, slots=True)
class ShownProduct:
    """A product as the API and the pages show it, read from the store: as a search result (with the score of the
    match, no attributes, and how it matched when words were searched) or on its own (with its attributes, no
    score)."""

    sku: str
    title: str
    category: str | None = None
    price: float | None = None
    url: str | None = None
    attributes: dict[str, str] | None = None
    score: float | None = None
    match: Match | None = None

    @property
    def link(self) -> str | None:
        """The product's url when it is a safe http(s) link (safe_link), else None: what pages and JSON show."""
        return safe_link(self.url)

    def scored(self, score: float, match: Match | None = None) -> ShownProduct:
        """This product as a search result: the same fields with the match's score (and how it matched)."""
        return ShownProduct(self.sku, self.title, self.category, self.price, self.url, score=score, match=match)

    def as_dict(self) -> dict[str, object]:
        """The product's JSON, in its documented order: the shown fields, then its attributes or its score, and
        how it matched (a search with words)."""
        shown: dict[str, object] = {
            "sku": self.sku,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "url": self.link,
        }
        if self.attributes is not None:
            shown["attributes"] = self.attributes
        if self.score is not None:
            shown["score"] = round(self.score, 6)
        if self.match is not None:
            shown["match"] = self.match.as_dict()
        return shown
