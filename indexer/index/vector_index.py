"""The one interface a server searches through, whatever holds the vectors: `LiveIndex` (FAISS base segments
plus a delta, indexer.index.live_index) and `MilvusIndex` (a Milvus collection, indexer.index.milvus_store)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from indexer.index.live_index import Filters
    from indexer.storage.vectors import Changes


class IndexBase(Protocol):
    """What the index was built from: its manifest (model identity, structure, version) and the change number
    it holds every change through."""

    manifest: dict

    @property
    def built_through(self) -> int: ...

    def __len__(self) -> int: ...

    def release(self) -> None:
        """Tell compaction that this process no longer needs the base's files."""


class VectorIndex(Protocol):
    """Live image vectors searched with filters, brought up to date by the store's change numbers."""

    base: IndexBase

    @property
    def seen(self) -> int:
        """The change number the index is up to date with."""

    @property
    def delta_size(self) -> int:
        """Changed images held beside the base, which a compaction would fold into a new one (0: never)."""

    @property
    def masked_count(self) -> int:
        """Images of the base deleted or replaced since it was built."""

    def __len__(self) -> int: ...

    def live_categories(self) -> list[str]: ...

    def attribute_names(self) -> list[str]:
        """The attribute names filters may use; raises AttributesUnavailable where this index cannot filter by
        attribute (the message says what to do)."""

    def apply(self, changes: Changes) -> np.ndarray:
        """Bring the index up to changes.head; returns the image ids whose state changed."""

    def vector_of(self, image_id: int) -> np.ndarray | None:
        """The live vector of an image as this server holds it (what /similar uses while the database cannot be
        read); None when it is not live here."""

    def search(self, query: np.ndarray, count: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        """The ids and cosine scores of the `count` nearest live vectors passing the filters, best first."""
