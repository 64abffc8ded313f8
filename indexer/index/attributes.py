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
        """The rows (int64, increasing) that hold, for every name, one of its values."""
        found: np.ndarray | None = None
        for name, values in wanted:
            held = self.vocabulary.get(name, {})
            slices = [self.rows[held[v][0] : held[v][1]] for v in sorted(values) if v in held]
            if not slices:
                return np.zeros(0, np.int64)
            rows = slices[0] if len(slices) == 1 else np.unique(np.concatenate(slices))
            found = rows if found is None else np.intersect1d(found, rows, assume_unique=True)
            if not len(found):
                break
        return np.zeros(0, np.int64) if found is None else found.astype(np.int64)

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
