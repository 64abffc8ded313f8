"""The Fashion-MNIST demo catalog: IDX files in, a category-per-folder catalog with products.csv out."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from indexer.catalog import scan_catalog
from indexer.jobs.demo_catalog import (
    CATEGORIES,
    DEBIAN_DIR,
    PHOTO_SIZE,
    _read_idx,
    as_catalog_photo,
    write_demo_catalog,
)


def test_idx_files_are_read_with_their_shape(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28).astype(np.uint8)
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 28, 28) + images.tobytes()))
    np.testing.assert_array_equal(_read_idx(path), images)


def test_catalog_photos_are_dark_on_white_and_upscaled():
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[10:18, 10:18] = 255  # a bright garment on black, as Fashion-MNIST stores it
    photo = as_catalog_photo(pixels)
    assert photo.size == (PHOTO_SIZE, PHOTO_SIZE) and photo.mode == "RGB"
    array = np.asarray(photo)
    assert array[0, 0].tolist() == [255, 255, 255] and array[PHOTO_SIZE // 2, PHOTO_SIZE // 2].max() < 30


@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason=f"Debian's dataset-fashion-mnist is not installed ({DEBIAN_DIR}); `make demo` installs it",
)
def test_demo_catalog_is_a_readable_catalog_with_every_category(tmp_path):
    out = write_demo_catalog(tmp_path / "demo", per_category=3, queries_per_category=1)
    scan = scan_catalog(out)
    assert len(scan.images) == 3 * len(CATEGORIES) and scan.problems == []
    assert {image.category for image in scan.images} == set(CATEGORIES)
    assert len(list((tmp_path / "demo-queries").glob("*.png"))) == len(CATEGORIES)
