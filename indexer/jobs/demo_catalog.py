"""Build the demo catalog: Fashion-MNIST's Zalando product photos as a folder of images.

Reads the IDX files of Debian's `dataset-fashion-mnist` package when present,
otherwise Keras's own `fashion_mnist` download. Photos are inverted to
dark-on-white and upscaled, which is how they read as catalog photos.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CATEGORIES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PHOTO_SIZE = 112


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (test images, labels)) as uint8 arrays."""
    if (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        return tuple(  # type: ignore[return-value]
            (
                _read_idx(DEBIAN_DIR / f"{split}-images-idx3-ubyte.gz"),
                _read_idx(DEBIAN_DIR / f"{split}-labels-idx1-ubyte.gz"),
            )
            for split in ("train", "t10k")
        )
    import keras

    return keras.datasets.fashion_mnist.load_data()


def as_catalog_photo(pixels: np.ndarray) -> Image.Image:
    """A 28x28 Fashion-MNIST image as an upscaled dark-on-white RGB photo."""
    image = ImageOps.invert(Image.fromarray(pixels, "L"))
    return image.resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BICUBIC).convert("RGB")


def write_demo_catalog(out_dir: Path, per_category: int = 300, queries_per_category: int = 3) -> Path:
    """Write <out_dir>/<category>/*.png with products.csv, and held-out queries in <out_dir>-queries/."""
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, category in enumerate(CATEGORIES):
        folder = out_dir / category.replace(" ", "-")
        folder.mkdir(exist_ok=True)
        for n, index in enumerate(np.flatnonzero(train_y == label)[:per_category], start=1):
            name = f"{folder.name}/{folder.name.lower()}-{n:04d}.png"
            as_catalog_photo(train_x[index]).save(out_dir / name)
            rows.append({"sku": f"fm-{index:05d}", "image": name, "title": f"{category} #{n}", "category": category})
    with open(out_dir / "products.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sku", "image", "title", "category"])
        writer.writeheader()
        writer.writerows(rows)
    queries = out_dir.with_name(out_dir.name + "-queries")
    queries.mkdir(exist_ok=True)
    held_out = []
    for label, category in enumerate(CATEGORIES):
        for n, index in enumerate(np.flatnonzero(test_y == label)[:queries_per_category], start=1):
            name = f"{category.replace(' ', '-').lower()}-{n}.png"
            as_catalog_photo(test_x[index]).save(queries / name)
            held_out.append({"image": f"../{queries.name}/{name}", "category": category})
    # `make eval CATALOG=<demo> QUERIES=<this file>`: image paths are relative to the catalog folder.
    with open(queries / "queries.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "category"])
        writer.writeheader()
        writer.writerows(held_out)
    return out_dir
