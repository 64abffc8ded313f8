"""Facet counts beside a search's results: how many of its best matches are in each category, hold each value of
an attribute, or fall in each price band, the bands chosen from the matches' own prices."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from indexer.index.attributes import ATTRIBUTE_PREFIX, MAX_ATTRIBUTE_NAME
from indexer.records import ShownProduct

CATEGORY = "category"
PRICE = "price"
ATTRIBUTE = ATTRIBUTE_PREFIX
# The most facets one request may name: a request is not a way to make the service count without end.
MAX_FACETS = 20
# Price bands are cut at these quantiles of the matches' prices (4 bands of about as many matches each), each
# cut rounded to the nearest of these mantissas times a power of ten (by ratio): 7.5, 10, 25, 150, 2,000...
QUANTILES = (0.25, 0.5, 0.75)
NICE_MANTISSAS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
ASK_FOR = "category, price or attr.<name> (an attribute of the products, e.g. attr.colour), comma-separated"

Facet = list[dict[str, object]]


class FacetsError(ValueError):
    """A facets list that cannot be counted; the message says what to send."""


@dataclass(frozen=True)
class FacetRequest:
    """The facets a search asks for, in the order asked, without repeats: "category", "price", "attr.<name>"."""

    names: tuple[str, ...]

    @classmethod
    def parse(cls, values: Iterable[str]) -> FacetRequest | None:
        """The facets named in `values` (each comma-separated; blanks ignored), or None when none is named;
        FacetsError for a name that is none of category, price and attr.<name>, or for too many."""
        names = [name.strip() for value in values for name in value.split(",") if name.strip()]
        if not names:
            return None
        for name in names:
            if name in (CATEGORY, PRICE):
                continue
            attribute = name[len(ATTRIBUTE) :] if name.startswith(ATTRIBUTE) else ""
            if not attribute.strip():
                raise FacetsError(f"unknown facet {name[:80]!r}; ask for {ASK_FOR}")
            if len(attribute) > MAX_ATTRIBUTE_NAME:
                raise FacetsError(f"facet {name[:40]!r}...: an attribute name is at most {MAX_ATTRIBUTE_NAME} long")
        unique = tuple(dict.fromkeys(names))
        if len(unique) > MAX_FACETS:
            raise FacetsError(f"{len(unique)} facets asked for; ask for at most {MAX_FACETS}")
        return cls(unique)

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attribute names asked for (attr.<name>)."""
        return tuple(name[len(ATTRIBUTE) :] for name in self.names if name.startswith(ATTRIBUTE))


PAGE_FACETS = FacetRequest((CATEGORY, PRICE))  # what the results page shows when the request names none


def count_facets(
    matches: Sequence[ShownProduct], asked: FacetRequest, attributes: Mapping[str, Mapping[str, object]]
) -> dict[str, Facet]:
    """Each facet asked for, counted over `matches` (one per product): categories and attribute values as
    [{"value", "count"}] by count, then value; prices as bands (price_bands). `attributes` holds each match's
    attributes by sku (needed only for attr.<name>). A product without the field is not counted."""
    counted: dict[str, Facet] = {}
    for name in asked.names:
        if name == CATEGORY:
            counted[name] = _by_count(Counter(m.category for m in matches if m.category))
        elif name == PRICE:
            counted[name] = price_bands([m.price for m in matches if m.price is not None and math.isfinite(m.price)])
        else:
            attribute = name[len(ATTRIBUTE) :]
            counted[name] = attribute_values(attributes.get(m.sku, {}).get(attribute) for m in matches)
    return counted


def attribute_values(values: Iterable[object]) -> Facet:
    """An attribute's values counted case-insensitively (as attr.<name> filters match them), each shown in its
    commonest spelling among the matches (the first in sort order among equally common ones)."""
    spellings: dict[str, Counter[str]] = {}
    for value in values:
        text = "" if value is None else str(value)
        if text.strip():
            spellings.setdefault(text.casefold(), Counter())[text] += 1
    counts = Counter()
    for forms in spellings.values():
        commonest = min(forms, key=lambda form: (-forms[form], form))
        counts[commonest] = sum(forms.values())
    return _by_count(counts)


def _by_count(counts: Counter[str]) -> Facet:
    return [{"value": value, "count": n} for value, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def price_bands(prices: Sequence[float]) -> Facet:
    """Price bands over `prices`, cheapest first: [{"min", "max", "count"}], each band holding the prices p with
    min <= p < max, the first band open below (min null) and the last open above (max null). The cuts are the
    quartiles of the prices rounded to nice numbers (nice()), so that each band holds about a quarter of the
    matches whatever the spread of prices; a cut that would leave a band empty is dropped (fewer bands). One
    band (both ends null) when the prices do not spread; none without prices."""
    if not len(prices):
        return []
    ordered = np.sort(np.asarray(prices, dtype=np.float64))
    low, high = ordered[0], ordered[-1]
    edges: list[float] = []
    for cut in sorted({nice(q) for q in np.quantile(ordered, QUANTILES)}):
        below = edges[-1] if edges else -math.inf
        # Kept only when the band it closes holds a price: low < cut, and a price in [previous cut, cut).
        if low < cut <= high and np.any((ordered >= below) & (ordered < cut)):
            edges.append(cut)
    bounds: list[float | None] = [None, *edges, None]
    bands: Facet = []
    for lower, upper in itertools.pairwise(bounds):
        start = 0 if lower is None else int(np.searchsorted(ordered, lower, side="left"))
        end = len(ordered) if upper is None else int(np.searchsorted(ordered, upper, side="left"))
        bands.append({"min": lower, "max": upper, "count": end - start})
    return bands


def nice(value: float) -> float:
    """`value` rounded to the nearest (by ratio) of NICE_MANTISSAS times a power of ten, keeping its sign: the
    round figures a shop labels price bands with (under 10, 10 to 25, 25 to 50...)."""
    if value == 0 or not math.isfinite(value):
        return 0.0
    if value < 0:
        return -nice(-value)
    scale = 10.0 ** math.floor(math.log10(value))
    mantissa = min(NICE_MANTISSAS, key=lambda m: abs(math.log(value / (m * scale))))
    return float(f"{mantissa * scale:.12g}")  # 1.5 * 0.1 is 0.15000000000000002
