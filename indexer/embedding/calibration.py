"""Calibration photos for the int8 model: a fixed, seeded sample of the catalog's own photos.

Full-integer quantisation measures each layer's range of activations on real inputs. Photos of the
catalog being indexed give ranges that fit it; the same sample (same seed, same files) gives the
same model, so re-running `make index` never re-quantises for nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.catalog import CatalogError, scan_catalog
from indexer.config import REPO_ROOT, ConfigError, Settings
from indexer.embedding.images import ImageError, load_pixels

CALIBRATION_PHOTOS = 200
CALIBRATION_SEED = 0
DEMO_CATALOG = REPO_ROOT / "demo-catalog"


@dataclass(frozen=True)
class Calibration:
    """The photos an int8 model is calibrated on, preprocessed exactly as the indexer and service do."""

    source: Path
    pixels: np.ndarray  # (N, S, S, 3) uint8

    @property
    def fingerprint(self) -> str:
        """Names the sample by its pixels: the same photos give the same int8 model file."""
        return hashlib.sha256(self.pixels.tobytes()).hexdigest()

    def describe(self) -> dict[str, object]:
        return {"source": str(self.source), "photos": len(self.pixels), "seed": CALIBRATION_SEED}


def fallback_catalog(settings: Settings) -> tuple[Path, Path | None]:
    """Where calibration photos come from when no catalog is being indexed or fine-tuned: the configured
    catalog folder, else the demo catalog. Returns the folder and its metadata file (None: its folders)."""
    for folder, metadata in ((settings.catalog_dir, settings.metadata_path), (DEMO_CATALOG, None)):
        if folder.is_dir() and any(folder.iterdir()):
            return folder, metadata
    raise ConfigError(
        "the int8 model (model.precision) is calibrated on catalog photos, and none are known yet: "
        "`make index CATALOG=<folder of product photos>` (or `make weights CATALOG=<folder>`) calibrates it"
    )


def calibration_sample(catalog: Path, metadata: Path | None, size: int, count: int = CALIBRATION_PHOTOS) -> Calibration:
    """`count` photos drawn with a fixed seed from the catalog (its metadata's images, or its folders),
    skipping unreadable ones, decoded and resized by the one preprocessing path."""
    try:
        images = scan_catalog(catalog, metadata).photos
    except CatalogError as exc:
        raise ConfigError(f"cannot calibrate the int8 model: {exc}") from None
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(images))
    pixels: list[np.ndarray] = []
    for position in order:
        try:
            pixels.append(load_pixels(images[position].path, size))
        except ImageError:
            continue  # the indexer reports unreadable photos; calibration only needs readable ones
        if len(pixels) == count:
            break
    if not pixels:
        raise ConfigError(f"cannot calibrate the int8 model: {catalog} has no readable photos")
    return Calibration(source=Path(catalog).resolve(), pixels=np.stack(pixels))
