"""The results page's refine list: a search's facets, each value a small form that runs the same search again (the
same photo token, words, k and filters) with that value as one more filter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flask import Request

from indexer.index.facets import ATTRIBUTE, CATEGORY, PRICE, Facet

# The fields of the page's search that a refinement keeps as they were (besides attr.<name> and the photo's
# token): a refinement replaces only the fields of the filter it adds.
KEPT = ("q", "k", "category", "min_price", "max_price", "box", "facets", "facet_depth")

Fields = list[tuple[str, str]]


@dataclass(frozen=True)
class RefineItem:
    """One value of a facet: what it says, how many matches it counts, and the fields of the search it runs."""

    label: str
    count: int
    fields: Fields


@dataclass(frozen=True)
class RefineGroup:
    title: str
    items: list[RefineItem]


def search_state(request: Request, query_token: str | None) -> Fields:
    """The fields that run the page's search again: those it was sent (blanks left out) and, for a photo, its
    query token in place of the upload."""
    fields = [(name, value) for name in KEPT for value in request.values.getlist(name) if value.strip()]
    fields += [(n, v) for n, v in request.values.items(multi=True) if n.startswith(ATTRIBUTE) and v.strip()]
    return [*fields, ("query", query_token)] if query_token else fields


def refine_groups(facets: Mapping[str, Facet], state: Fields) -> list[RefineGroup]:
    """The refine list of a search's facets, in the order asked; a facet without values, and a price facet of one
    band (nothing to choose), is left out."""
    groups = []
    for name, facet in facets.items():
        if name == PRICE:
            items = [_band(band, state) for band in facet] if len(facet) > 1 else []
        else:
            # category=<value>, or attr.<name>=<value> in place of the search's own values of that attribute
            items = [RefineItem(str(v["value"]), int(v["count"]), _with(state, {name: str(v["value"])})) for v in facet]
        if items:
            title = "Category" if name == CATEGORY else "Price" if name == PRICE else name[len(ATTRIBUTE) :]
            groups.append(RefineGroup(title, items))
    return groups


def _band(band: Mapping[str, object], state: Fields) -> RefineItem:
    """A price band as min_price/max_price; an open end keeps the search's own bound."""
    low, high = band["min"], band["max"]
    changes = {}
    if low is not None:
        changes["min_price"] = f"{low:.12g}"
    if high is not None:
        changes["max_price"] = f"{high:.12g}"
    if low is None:
        label = f"under {_amount(high)}"
    elif high is None:
        label = f"{_amount(low)} and over"
    else:
        label = f"{_amount(low)} – {_amount(high)}"
    return RefineItem(label, int(band["count"]), _with(state, changes))


def _with(state: Fields, changes: Mapping[str, str]) -> Fields:
    """The state with each changed field (every value of it) replaced by its new value."""
    return [(n, v) for n, v in state if n not in changes] + list(changes.items())


def _amount(value: object) -> str:
    text = f"{value:,.2f}"
    return text[:-3] if text.endswith(".00") else text
