"""Whitening learned on the catalog: a linear projection fitted on its own vectors, applied after the network.

With categories it is the learned whitening of Radenović, Tolias and Chum (TPAMI 2018): the vectors are
whitened by the spread of photos within a category, then rotated to the directions that vary most, of which
`dims` are kept; photos of one category move together and the index gets smaller. Without categories it is
PCA whitening (square-root-shrunk). `make index` fits it on the catalog's first run and keeps it in the
catalog's database (`--refit` fits again); every server uses the one its index names. Queries pay one small
matrix multiply.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from indexer.config import Settings
    from indexer.storage.store import Store

# Fewer photos than this give a covariance too noisy to whiten with; the catalog is then searched unwhitened.
MIN_FIT_PHOTOS = 200
# Learned whitening needs at least this many categories with two or more photos each; otherwise PCA.
MIN_CATEGORIES = 2
# Within-category covariance + this share of its mean variance on the diagonal, so that directions no category's
# photos vary in are not blown up. Of 0.01, 0.05 and 0.2 with 64-256 directions, measured on grocery shop photos,
# 0.2 with 96 is the best R@1 that costs no category more than 0.10 of its R@1 (eval/README.md#whitening).
REGULARISATION = 0.2
# PCA whitening's power: 0.5 shrinks each direction by the square root of its spread, which measured better
# than full whitening (power 1) on grocery shop photos (eval/README.md#whitening).
PCA_POWER = 0.5


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Whitening:
    """x -> unit((x - mean) @ projection); kind is "learned" or "pca"."""

    kind: str
    mean: np.ndarray
    projection: np.ndarray
    fitted_on: dict

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.dims}"

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """(N, input dims) unit vectors -> (N, dims) unit vectors."""
        return _unit((np.asarray(vectors, np.float32) - self.mean) @ self.projection).astype(np.float32)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, kind=self.kind, mean=self.mean, projection=self.projection,
                 fitted_on=json.dumps(self.fitted_on, sort_keys=True))  # fmt: skip
        return buffer.getvalue()

    @property
    def sha256(self) -> str:
        """Names the projection: its numbers, not the file they were saved in."""
        digest = hashlib.sha256(self.kind.encode())
        for array in (self.mean, self.projection):
            digest.update(np.ascontiguousarray(array, np.float32).tobytes())
        return digest.hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Whitening:
        with np.load(io.BytesIO(data)) as arrays:
            return cls(
                kind=str(arrays["kind"]),
                mean=arrays["mean"].astype(np.float32),
                projection=arrays["projection"].astype(np.float32),
                fitted_on=json.loads(str(arrays["fitted_on"])),
            )


class _Moments:
    """Running sums for the covariances, so a catalog of any size streams through in bounded memory."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self.labelled_outer = np.zeros((dim, dim), np.float64)
        self.by_label: dict[str, tuple[int, np.ndarray]] = {}

    def add(self, vectors: np.ndarray, labels: list[str | None]) -> None:
        vectors = np.asarray(vectors, np.float64)
        self.count += len(vectors)
        self.total += vectors.sum(axis=0)
        self.outer += vectors.T @ vectors
        labelled = vectors[[label is not None for label in labels]]
        self.labelled_outer += labelled.T @ labelled
        # One pass over the labels, however many categories (a pass per category cost photos times categories).
        codes: dict[str, int] = {}
        rows = [codes.setdefault(label, len(codes)) for label in labels if label is not None]
        totals = np.zeros((len(codes), vectors.shape[1]))
        np.add.at(totals, rows, labelled)
        counts = np.bincount(rows, minlength=len(codes))
        for label, code in codes.items():
            count, total = self.by_label.get(label, (0, 0.0))
            self.by_label[label] = (count + int(counts[code]), total + totals[code])


def fit(batches: Iterable[tuple[np.ndarray, list[str | None]]], dims: int) -> Whitening | None:
    """Fit on (unit vectors, their categories) batches; None when there are too few photos to fit on."""
    moments: _Moments | None = None
    for vectors, labels in batches:
        moments = moments or _Moments(vectors.shape[1])
        moments.add(vectors, labels)
    if moments is None or moments.count < MIN_FIT_PHOTOS:
        return None
    mean = moments.total / moments.count
    total_cov = moments.outer / moments.count - np.outer(mean, mean)
    groups = moments.by_label
    fitted_on = {"photos": moments.count, "categories": len(groups)}
    if sum(count >= 2 for count, _ in groups.values()) >= MIN_CATEGORIES:
        # Within-category scatter: Σ (x - its category's mean)(x - ...)ᵀ = Σ x xᵀ - Σ_c n_c mean_c mean_cᵀ.
        within = moments.labelled_outer - sum(np.outer(total, total) / count for count, total in groups.values())
        within /= sum(count for count, _ in groups.values())
        within += (1e-4 + REGULARISATION * np.trace(within) / len(within)) * np.eye(len(within))
        values, vectors = np.linalg.eigh(within)
        inverse_root = (vectors / np.sqrt(values)) @ vectors.T
        spread, directions = np.linalg.eigh(inverse_root @ total_cov @ inverse_root)
        order = np.argsort(spread)[::-1][: min(dims, len(spread))]
        return Whitening("learned", mean.astype(np.float32), (inverse_root @ directions[:, order]).astype(np.float32),
                         fitted_on)  # fmt: skip
    spread, directions = np.linalg.eigh(total_cov)
    order = np.argsort(spread)[::-1][: min(len(spread), moments.count - 1)]
    scale = np.maximum(spread[order], 1e-9) ** (-PCA_POWER / 2)
    return Whitening("pca", mean.astype(np.float32), (directions[:, order] * scale).astype(np.float32), fitted_on)


# --- kept in the catalog's database (indexer.storage.store), so every server and indexer sharing it has the same ---


def keep(store: Store, network_key: str, whitening: Whitening) -> None:
    """Keep a fitted whitening with the catalog; it becomes the one `make index` uses with this network."""
    store.models.save_whitening(network_key, whitening.sha256, whitening.name, whitening.to_bytes())


def in_use(store: Store, network_key: str) -> Whitening | None:
    """The whitening `make index` uses with this network: the newest fitted; None before the first fit."""
    data = store.models.whitening_data(network_key=network_key)
    return None if data is None else Whitening.from_bytes(data)


def configured(settings: Settings, store: Store, network_key: str) -> Whitening | None:
    """The whitening new vectors of this network go through: the catalog's when the settings whiten, else none."""
    return in_use(store, network_key) if settings.whitens else None


def by_sha256(store: Store, sha256: str) -> Whitening | None:
    """The whitening an index names (its manifest's whitening_sha256)."""
    data = store.models.whitening_data(sha256=sha256)
    return None if data is None else Whitening.from_bytes(data)
