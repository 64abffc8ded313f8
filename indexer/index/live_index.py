"""What a server searches: a base segment plus the changes committed since it was built.

Changes arrive in change-number order from the store. A new or changed vector goes into a small delta that is
scanned exactly; a deleted or replaced image is masked in the base. Every search sees one consistent state:
apply() builds the next state aside and swaps it in with one assignment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np

from indexer.errors import AttributesUnavailable
from indexer.index.ann import candidates
from indexer.index.attributes import Postings, Wanted
from indexer.index.costs import Costs
from indexer.index.segments import NO_CATEGORY, BaseSegment
from indexer.storage.vectors import Changes

# Selectors (bitmaps) of price and attribute filters kept per state, the oldest dropped first: a shop's filters
# repeat (the refine list's price bands, its attribute values), and a bitmap over a million ids costs a millisecond
# or two to make. A category's are kept beside them, one per category.
SELECTOR_CACHE = 32


@dataclass(frozen=True)
class Filters:
    category: str | None = None
    min_price: float | None = None
    max_price: float | None = None
    # (name, case-folded values): a product passes when, for every name, its value is one of those (case-folded)
    attributes: Wanted = ()

    @property
    def prices_bounded(self) -> bool:
        return self.min_price is not None or self.max_price is not None

    def price_mask(self, prices: np.ndarray) -> np.ndarray | None:
        """Which of these prices are inside the bounds (a product without a price is not); None: no bounds."""
        if not self.prices_bounded:
            return None
        ok = np.ones(len(prices), dtype=bool)
        if self.min_price is not None:
            ok &= prices >= self.min_price
        if self.max_price is not None:
            ok &= prices <= self.max_price
        return ok


NO_FILTERS = Filters()


@dataclass(frozen=True)
class _Delta:
    ids: np.ndarray
    vectors: np.ndarray
    codes: np.ndarray
    prices: np.ndarray
    attributes: list[dict]


@dataclass
class _State:
    seen: int
    masked: np.ndarray  # base rows deleted or replaced since the base was built
    masked_count: int
    masked_ids: np.ndarray  # their image ids
    delta: _Delta
    live_counts: np.ndarray  # live vectors per category code
    # FAISS selectors built for this state (bitmaps over image ids), kept with the bitmaps they point to
    selectors: dict[object, tuple[faiss.IDSelector, np.ndarray]] = field(default_factory=dict)
    # the delta's attribute postings (over its positions), built on the first attribute filter this state sees
    delta_postings: Postings | None = None

    def postings(self) -> Postings:
        if self.delta_postings is None:  # two threads may both build it: the same either way
            self.delta_postings = Postings.build(self.delta.attributes)
        return self.delta_postings


def _top(ids: np.ndarray, scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(scores)
    ids, scores = ids[keep], scores[keep]
    if len(scores) > count:
        best = np.argpartition(-scores, count - 1)[:count]
        ids, scores = ids[best], scores[best]
    order = np.argsort(-scores, kind="stable")
    return ids[order], scores[order]


_NONE = (np.zeros(0, np.int64), np.zeros(0, np.float32))


def plan(costs: Costs, matches: int, span: int, count: int, cached: bool = False) -> str:
    """How to search the `matches` live base rows that pass the filters, spread over `span` rows (a category's
    block, or the whole base), for the best `count`: the cheapest by this base's measured costs (Costs) of
    "gather" (score just those rows), "scan" (score the whole span, the others masked out), "ann" (the FAISS
    structure with a selector of exactly those rows, `cached` when that selector is already made) and
    "overfetch" (the unfiltered FAISS search asked for count / share candidates, filtered afterwards). The two
    approximate plans widen their probes by 1 / share, which keeps recall at the tuned level. The one place the
    choice is made. No more rows than are asked for are always scored exactly: every one of them is a result."""
    options = {"gather": costs.gather(matches), "scan": costs.scan(span)}
    wanted = max(count, costs.rerank)
    if costs.has_ann and matches > wanted:
        share = matches / max(1, costs.rows)
        options["ann"] = costs.selector(share, cached)
        if (fetch := costs.overfetch(wanted, share)) is not None:
            options["overfetch"] = fetch
    return min(options, key=options.__getitem__)


class LiveIndex:
    """The base plus the delta, searched as one (a VectorIndex); apply() brings it up to a newer change number."""

    def __init__(self, base: BaseSegment):
        self.base = base
        self.categories: list[str] = list(base.categories)
        self.code_of: dict[str, int] = {name: code for code, name in enumerate(self.categories)}
        self._lock = threading.Lock()
        self.costs = Costs.measure(base.vectors, base.ids, base.ann, base.tuning)
        dim = base.vectors.shape[1]
        self._base_counts = self._counts(base.category_codes)
        self._state = _State(
            seen=base.built_through,
            masked=np.zeros(len(base), dtype=bool),
            masked_count=0,
            masked_ids=np.zeros(0, np.int64),
            delta=_Delta(
                np.zeros(0, np.int64),
                np.zeros((0, dim), np.float32),
                np.zeros(0, np.int32),
                np.zeros(0, np.float32),
                [],
            ),
            live_counts=self._base_counts,
        )

    def _counts(self, codes: np.ndarray) -> np.ndarray:
        """Vectors per category code, one slot per known category (vectors without one are not counted)."""
        return np.bincount(codes[codes >= 0], minlength=len(self.categories))

    @property
    def seen(self) -> int:
        """The change number this index is up to date with."""
        return self._state.seen

    def __len__(self) -> int:
        state = self._state
        return len(self.base) - state.masked_count + len(state.delta.ids)

    @property
    def delta_size(self) -> int:
        return len(self._state.delta.ids)

    @property
    def masked_count(self) -> int:
        return self._state.masked_count

    def live_categories(self) -> list[str]:
        counts = self._state.live_counts
        return sorted(name for code, name in enumerate(self.categories) if code < len(counts) and counts[code] > 0)

    def apply(self, changes: Changes) -> np.ndarray:
        """Bring the index up to changes.head; returns the image ids whose state changed."""
        with self._lock:
            state = self._state
            if changes.head <= state.seen:
                return np.zeros(0, np.int64)
            touched = np.concatenate([changes.ids, changes.removed])
            masked, masked_ids = state.masked, state.masked_ids
            rows = self.base.rows_of(touched)
            rows = rows[rows >= 0]
            if len(rows):
                masked = masked.copy()
                masked[rows] = True
                masked_ids = np.union1d(masked_ids, self.base.ids[rows])
            codes = np.array([self._code(name) for name in changes.categories], dtype=np.int32)
            old = state.delta
            keep = ~np.isin(old.ids, touched)
            delta = _Delta(
                ids=np.concatenate([old.ids[keep], changes.ids]),
                vectors=np.concatenate([old.vectors[keep], changes.vectors.astype(np.float32, copy=False)]),
                codes=np.concatenate([old.codes[keep], codes]),
                prices=np.concatenate([old.prices[keep], changes.prices]),
                attributes=[a for a, kept in zip(old.attributes, keep, strict=True) if kept] + list(changes.attributes),
            )
            masked_count = len(masked_ids)
            live_counts = self._counts(delta.codes) - self._counts(self.base.category_codes[masked])
            live_counts[: len(self._base_counts)] += self._base_counts
            self._state = _State(changes.head, masked, masked_count, masked_ids, delta, live_counts)
            return touched

    def attribute_names(self) -> list[str]:
        """The attribute names filters may use: those of the base's postings and of the delta's rows."""
        if self.base.postings is None:
            raise AttributesUnavailable(
                "this index base was written before attribute filters existed; rebuild it with "
                "`python -m indexer compact` (or `make index`), then filter by attribute"
            )
        return sorted(self.base.postings.names | self._state.postings().names)

    def _code(self, name: str | None) -> int:
        if name is None:
            return NO_CATEGORY
        if name not in self.code_of:  # a category new since the base was built
            self.code_of[name] = len(self.categories)
            self.categories.append(name)
        return self.code_of[name]

    def vector_of(self, image_id: int) -> np.ndarray | None:
        """The live vector of an image: the delta's, else the base's unless masked; None when it is not live."""
        state = self._state
        if len(at := np.flatnonzero(state.delta.ids == image_id)):
            return np.array(state.delta.vectors[at[-1]], dtype=np.float32)
        row = int(self.base.rows_of(np.array([image_id], dtype=np.int64))[0])
        if row < 0 or state.masked[row]:
            return None
        return np.array(self.base.vectors[row], dtype=np.float32)

    # --- searching ---------------------------------------------------------------------------------

    def search(self, query: np.ndarray, count: int, filters: Filters = NO_FILTERS) -> tuple[np.ndarray, np.ndarray]:
        """The ids and cosine scores of the `count` nearest live vectors passing the filters, best first."""
        state = self._state
        query = np.ascontiguousarray(query, dtype=np.float32)
        code = None
        if filters.category is not None:
            code = self.code_of.get(filters.category)
            if code is None:
                return _NONE
        base_ids, base_scores = self._search_base(state, query, count, filters, code)
        delta_ids, delta_scores = self._search_delta(state, query, count, filters, code)
        return _top(np.concatenate([base_ids, delta_ids]), np.concatenate([base_scores, delta_scores]), count)

    def _search_delta(self, state: _State, query: np.ndarray, count: int, filters: Filters, code: int | None):
        delta = state.delta
        if not len(delta.ids):
            return _NONE
        scores = delta.vectors @ query
        if code is not None:
            scores[delta.codes != code] = -np.inf
        if (ok := filters.price_mask(delta.prices)) is not None:
            scores[~ok] = -np.inf
        if filters.attributes:
            ok = np.zeros(len(delta.ids), dtype=bool)
            ok[state.postings().matching(filters.attributes)] = True
            scores[~ok] = -np.inf
        return _top(delta.ids, scores, count)

    def _search_base(self, state: _State, query: np.ndarray, count: int, filters: Filters, code: int | None):
        base = self.base
        start, end = 0, len(base)
        if code is not None:  # one block of rows, within which a price filter is a mask
            if code not in base.blocks:
                return _NONE
            start, end = base.blocks[code]
        # a category's selector is kept per state; those of prices and attributes in a small cache
        key = code if not (filters.attributes or filters.prices_bounded) else ("filters", code, filters)
        if filters.attributes:
            rows = self._attribute_rows(state, filters, start, end)
            return self._search_rows(state, query, count, rows, start, end, key)
        if code is not None:
            ok = filters.price_mask(base.prices[start:end])
            if state.masked_count:
                live = ~state.masked[start:end]
                ok = live if ok is None else ok & live
            matches = (end - start) if ok is None else int(ok.sum())
            if matches == 0:
                return _NONE
            how = plan(self.costs, matches, end - start, count, key in state.selectors)
            if how in ("gather", "scan"):
                return self._exact(query, count, start, end, ok, gather=how == "gather")
            if how == "overfetch":
                found = self._overfetch(state, query, count, matches, lambda r: _within(r, start, end, ok))
                if found is not None:
                    return found
            ids = (lambda: base.ids[start:end]) if ok is None else (lambda: base.ids[start:end][ok])
            return self._approximate(state, query, count, key, matches, ids)
        if filters.prices_bounded:  # rows from the price index, without a pass over every price
            low, high = base.price_range(filters.min_price, filters.max_price)
            how = plan(self.costs, high - low, len(base), count, key in state.selectors)
            if how == "overfetch":
                found = self._overfetch(state, query, count, high - low, lambda r: filters.price_mask(base.prices[r]))
                if found is not None:
                    return found
            if how in ("ann", "overfetch"):
                return self._approximate(state, query, count, key, high - low, lambda: base.ids_by_price[low:high])
            rows = np.sort(base.price_order[low:high])  # the memory map read in order
            return self._search_rows(state, query, count, rows[~state.masked[rows]], 0, len(base), key, how)
        if base.ann is None:
            return self._exact(query, count, 0, len(base), ~state.masked if state.masked_count else None)
        return self._approximate(state, query, count, "all")

    def _attribute_rows(self, state: _State, filters: Filters, start: int, end: int) -> np.ndarray:
        """The live base rows in start..end (increasing) that pass the attribute and price filters, from the
        base's postings."""
        postings = self.base.postings
        if postings is None:
            self.attribute_names()  # raises: says how to get a base with postings
        rows = postings.matching(filters.attributes)
        rows = rows[np.searchsorted(rows, start) : np.searchsorted(rows, end)]
        if (ok := filters.price_mask(self.base.prices[rows])) is not None:
            rows = rows[ok]
        return rows[~state.masked[rows]] if state.masked_count else rows

    def _search_rows(
        self, state: _State, query: np.ndarray, count: int, rows: np.ndarray, start: int, end: int, key: object,
        how: str = "",
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The best of these live base rows (increasing, within start..end), by the plan for them."""
        base = self.base
        if not len(rows):
            return _NONE
        how = how or plan(self.costs, len(rows), end - start, count, key in state.selectors)
        if how == "overfetch":
            found = self._overfetch(state, query, count, len(rows), lambda r: _among(r, rows))
            if found is not None:
                return found
        if how in ("ann", "overfetch"):
            return self._approximate(state, query, count, key, len(rows), lambda: base.ids[rows])
        if how == "gather":
            return _top(base.ids[rows], base.vectors[rows] @ query, count)
        ok = np.zeros(end - start, dtype=bool)
        ok[rows - start] = True
        return self._exact(query, count, start, end, ok, gather=False)

    def _approximate(
        self, state: _State, query: np.ndarray, count: int, cache_key: object, matches: int | None = None,
        members: Callable[[], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Candidates from the FAISS structure, restricted to the `matches` image ids that `members` gives (None:
        every live one; asked for only when the selector is not kept already), re-ranked exactly with the real
        vectors."""
        base = self.base
        selector, keep = self._selector(state, members, cache_key)
        widen = self.costs.widen(matches / len(base)) if matches is not None else 1.0
        found = candidates(base.ann, base.tuning, query, count, selector=selector, widen=widen)
        del keep  # FAISS held only pointers into it during the search
        rows = base.rows_of(found)
        rows = np.unique(rows[rows >= 0])
        if not len(rows):
            return _NONE
        return _top(base.ids[rows], base.vectors[rows] @ query, count)

    def _overfetch(
        self, state: _State, query: np.ndarray, count: int, matches: int, passes
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The unfiltered FAISS search, widened as a selector's would be, asked for count / share candidates; those
        that pass (`passes`: which of these rows pass the filters) re-ranked exactly. None when fewer than `count`
        pass (the matching rows were unevenly spread): the caller then searches with a selector."""
        base = self.base
        share = matches / len(base)
        wanted = self.costs.overfetch_count(max(count, base.tuning.rerank), share)
        found = candidates(base.ann, base.tuning, query, wanted, widen=self.costs.widen(share))
        rows = base.rows_of(found)
        rows = rows[rows >= 0]
        if state.masked_count:
            rows = rows[~state.masked[rows]]
        rows = np.unique(rows[passes(rows)])
        if len(rows) < min(count, matches):
            return None
        return _top(base.ids[rows], base.vectors[rows] @ query, count)

    def _exact(
        self, query: np.ndarray, count: int, start: int, end: int, ok: np.ndarray | None, gather: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score rows start..end exactly: the whole block with the rows that fail masked out, or, with `gather`,
        just the rows that pass."""
        base = self.base
        if gather and ok is not None:
            rows = start + np.flatnonzero(ok)
            return _top(base.ids[rows], base.vectors[rows] @ query, count)
        scores = base.vectors[start:end] @ query
        if ok is not None:
            scores[~ok] = -np.inf
        return _top(base.ids[start:end], scores, count)

    def _selector(
        self, state: _State, members: Callable[[], np.ndarray] | None, cache_key: object
    ) -> tuple[object, object]:
        """A FAISS selector and what it points into (keep that alive while searching): every live base id but
        the masked ones (a small hash set), or a bitmap over image ids of `members`. Those of a category, or of
        the whole base, are kept for this state; price ranges vary per request."""
        if cache_key is not None and cache_key in state.selectors:
            return state.selectors[cache_key]
        if members is None:
            if not state.masked_count:
                return None, None
            masked = state.masked_ids
            batch = faiss.IDSelectorBatch(len(masked), faiss.swig_ptr(masked))
            made = (faiss.IDSelectorNot(batch), (batch, masked))
        else:
            bits = np.zeros(len(self.base.row_of_id), dtype=bool)
            bits[members()] = True
            if state.masked_count:
                bits[state.masked_ids] = False
            bitmap = np.packbits(bits, bitorder="little")
            made = (faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap)
        if cache_key is not None:
            if isinstance(cache_key, tuple) and len(state.selectors) >= len(self.categories) + SELECTOR_CACHE:
                oldest = next((key for key in state.selectors if isinstance(key, tuple)), None)
                state.selectors.pop(oldest, None)  # another thread may have dropped it already
            state.selectors[cache_key] = made
        return made


def _within(rows: np.ndarray, start: int, end: int, ok: np.ndarray | None) -> np.ndarray:
    """Which of these rows are in start..end and, with `ok` (over that block), pass it."""
    inside = (rows >= start) & (rows < end)
    if ok is not None:
        inside[inside] = ok[rows[inside] - start]
    return inside


def _among(rows: np.ndarray, matching: np.ndarray) -> np.ndarray:
    """Which of these rows are among `matching` (increasing)."""
    at = np.minimum(np.searchsorted(matching, rows), len(matching) - 1)
    return matching[at] == rows
