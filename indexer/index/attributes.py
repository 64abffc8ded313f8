"""Attribute postings: which rows hold each attribute value, so an attribute filter is a few array slices.

A base writes them beside its other arrays (attributes.json: name -> case-folded value -> [start, end) into
attribute_rows.npy, the rows in increasing order within each value); the delta builds the same from the rows it
holds. Values are compared case-folded (str.casefold) on both sides; names exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A request names an attribute as attr.<name>, in filters and facets alike. Longer names or values are refused
# (400): real attributes are short, and each value is a lookup.
ATTRIBUTE_PREFIX = "attr."
MAX_ATTRIBUTE_NAME = 100
MAX_ATTRIBUTE_VALUE = 200

VOCABULARY, ROWS = "attributes.json", "attribute_rows.npy"

# What a filter asks for: (name, the case-folded values any of which passes), ANDed across names.
Wanted = tuple[tuple[str, frozenset[str]], ...]


def fold(value: object) -> str:
    return str(value).casefold()


@dataclass(frozen=True)
class Postings:
    """name -> case-folded value -> [start, end) of `rows`, which holds each value's rows in increasing order."""

    vocabulary: dict[str, dict[str, tuple[int, int]]]
    rows: np.ndarray

    @classmethod
    def build(cls, attributes: Iterable[Mapping[str, object] | None]) -> Postings:
        """Postings of rows 0, 1, ... holding these attributes (None or {}: a row without any)."""
        lists: dict[str, dict[str, list[int]]] = {}
        for row, held in enumerate(attributes):
            for name, value in (held or {}).items():
                if value is None or value == "":
                    continue
                lists.setdefault(name, {}).setdefault(fold(value), []).append(row)
        vocabulary: dict[str, dict[str, tuple[int, int]]] = {}
        parts, at = [], 0
        for name in sorted(lists):
            vocabulary[name] = {}
            for value in sorted(lists[name]):
                rows = lists[name][value]
                vocabulary[name][value] = (at, at + len(rows))
                parts.append(np.asarray(rows, dtype=np.int32))
                at += len(rows)
        return cls(vocabulary, np.concatenate(parts) if parts else np.zeros(0, np.int32))

    @property
    def names(self) -> set[str]:
        return set(self.vocabulary)

    def matching(self, wanted: Wanted) -> np.ndarray:
        """The rows (int64, increasing) that hold, for every name, one of its values. The name with the fewest rows
        is listed, and the others only tested on those (a binary search each), so a common value ANDed with a rare
        one costs about the rare one's rows."""
        per_name: list[list[np.ndarray]] = []
        for name, values in wanted:
            held = self.vocabulary.get(name, {})
            slices = [self.rows[held[v][0] : held[v][1]] for v in sorted(values) if v in held]
            if not slices:
                return np.zeros(0, np.int64)
            per_name.append(slices)
        if not per_name:
            return np.zeros(0, np.int64)
        per_name.sort(key=lambda slices: sum(map(len, slices)))
        found = _union(per_name[0])
        for slices in per_name[1:]:
            keep = np.zeros(len(found), dtype=bool)
            for rows in slices:
                keep |= _holds(rows, found)
            found = found[keep]
        return found

    def save(self, folder: Path) -> None:
        (folder / VOCABULARY).write_text(json.dumps(self.vocabulary, ensure_ascii=False, separators=(",", ":")))
        np.save(folder / ROWS, self.rows)

    @classmethod
    def load(cls, folder: Path) -> Postings | None:
        """A base's postings (rows memory-mapped); None for a base written before bases had them."""
        if not (folder / VOCABULARY).exists():
            return None
        read = json.loads((folder / VOCABULARY).read_text())
        vocabulary = {name: {v: (int(s), int(e)) for v, (s, e) in values.items()} for name, values in read.items()}
        return cls(vocabulary, np.load(folder / ROWS, mmap_mode="r"))


def _union(slices: list[np.ndarray]) -> np.ndarray:
    """The rows of several values of one name, increasing (a row holds one value of a name, so they are disjoint):
    through a mask over the rows when they are many, else sorted."""
    if len(slices) == 1:
        return np.asarray(slices[0], dtype=np.int64)
    total, bound = sum(map(len, slices)), max(int(rows[-1]) for rows in slices) + 1
    if total * 8 < bound:
        return np.sort(np.concatenate(slices)).astype(np.int64)
    mask = np.zeros(bound, dtype=bool)
    for rows in slices:
        mask[rows] = True
    return np.flatnonzero(mask)


def _holds(rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Which candidates (increasing) are among `rows` (increasing): a binary search each when they are few, else
    through a mask over the rows (one pass over `rows` beats that many binary searches)."""
    if not len(rows) or not len(candidates):
        return np.zeros(len(candidates), dtype=bool)
    if len(candidates) * 32 > len(rows):
        mask = np.zeros(max(int(rows[-1]), int(candidates[-1])) + 1, dtype=bool)
        mask[rows] = True
        return mask[candidates]
    at = np.searchsorted(rows, candidates)
    inside = at < len(rows)
    held = np.zeros(len(candidates), dtype=bool)
    held[inside] = rows[at[inside]] == candidates[inside]
    return held
