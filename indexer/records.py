"""A product's two records: the fields a catalog, an import or the write API gives (ProductFields), and the
product as the API and the pages show it (ShownProduct), whose as_dict is the one JSON shape of a product."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True, slots=True)
class ShownProduct:
    """A product as the API and the pages show it, read from the store: as a search result (with the score of the
    match, no attributes) or on its own (with its attributes, no score)."""

    sku: str
    title: str
    category: str | None = None
    price: float | None = None
    url: str | None = None
    attributes: dict[str, str] | None = None
    score: float | None = None

    def scored(self, score: float) -> ShownProduct:
        """This product as a search result: the same fields with the match's score."""
        return ShownProduct(self.sku, self.title, self.category, self.price, self.url, score=score)

    def as_dict(self) -> dict[str, object]:
        """The product's JSON, in its documented order: the shown fields, then its attributes or its score."""
        shown: dict[str, object] = {
            "sku": self.sku,
            "title": self.title,
            "category": self.category,
            "price": self.price,
            "url": self.url,
        }
        if self.attributes is not None:
            shown["attributes"] = self.attributes
        if self.score is not None:
            shown["score"] = round(self.score, 6)
        return shown
