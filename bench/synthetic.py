"""Synthetic catalogs for `make bench-scale`: clustered unit vectors around real photo embeddings,
written in chunks to a .npy file with a products CSV beside it (row i of one is row i of the other).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from indexer.catalog import scan_catalog
from indexer.config import REPO_ROOT

DIM = 1024
# Cosine of a product's vector to its anchor, drawn uniformly from this range.
COSINE_RANGE = (0.6, 0.9)
# Rows per write: 16,384 x 1024 float32 is 64 MB, plus the same again for the noise.
CHUNK = 16_384
PRICE_RANGE = (0.5, 50.0)
PRODUCT_COLUMNS = ("sku", "title", "category", "price", "url", "image", "band", "kind")
# The shares of the catalog that `make bench-scale` filters hold. Each product draws, independently of its vector
# and of each other: a category (category_of), a "band" attribute (band_of), and for each share a word (word_of)
# that its title holds with that probability; the anchor's category is its "kind" attribute.
SHARES = (0.001, 0.01, 0.02, 0.05, 0.2, 0.5)
_VARIANTS = ("organic", "classic", "family pack", "fresh", "value", "premium", "loose", "local")
_SIZES = ("250 g", "500 g", "1 kg", "2 kg", "6 pack", "1 l", "330 ml", "each")


@dataclass(frozen=True)
class Photo:
    name: str
    category: str
    data: bytes


@dataclass(frozen=True)
class SyntheticCatalog:
    vectors: Path
    products: Path
    count: int


def _permille(share: float) -> str:
    return f"{round(share * 1000):04d}"


def category_of(share: float) -> str:
    """The category holding this share of a synthetic catalog (the rest are in "cat-other")."""
    return f"cat{_permille(share)}"


def band_of(share: float) -> str:
    """The value of the "band" attribute held by this share of a synthetic catalog (the rest hold "band-other")."""
    return f"band{_permille(share)}"


def word_of(share: float) -> str:
    """The title word held by this share of a synthetic catalog (each product draws each word independently)."""
    return f"word{_permille(share)}"


def _partition(rng: np.random.Generator, rows: int, names: list[str], other: str) -> list[str]:
    """Each row's name among `names` (the i-th held by SHARES[i] of the rows), else `other`."""
    edges = np.cumsum(SHARES)
    which = np.searchsorted(edges, rng.random(rows), side="right")
    return [names[i] if i < len(names) else other for i in which]


def sku_of(row: int) -> str:
    return f"syn-{row:07d}"


def row_of(sku: str) -> int | None:
    """The vector row of a synthetic sku, None for any other sku."""
    if not sku.startswith("syn-"):
        return None
    try:
        return int(sku[4:])
    except ValueError:
        return None


def catalog_metadata(folder: Path) -> Path | None:
    """A benchmark catalog's metadata file: catalog.csv (as the grocery-store dataset has) or products.csv."""
    return next((folder / name for name in ("catalog.csv", "products.csv") if (folder / name).exists()), None)


def real_photos(limit: int, catalog: Path | None, seed: int) -> tuple[str, list[Photo]]:
    """Up to `limit` real photos with a category each, spread over every category: from the
    catalog folder (its catalog.csv or products.csv, or its folders) when it exists, else the
    demo catalog, else scikit-image's sample photos (random crops of each). Returns a description
    of the source and the photos."""
    for folder in (catalog, REPO_ROOT / "demo-catalog"):
        if folder is not None and Path(folder).is_dir():
            metadata = catalog_metadata(folder)
            images = [i for i in scan_catalog(folder, metadata).images if i.category]
            if images:
                return str(folder), _spread(images, limit, seed)
    return "scikit-image sample photos", _skimage_crops(limit, seed)


def index_photos(photos: list[Photo], folder: Path):
    """The photos written as a catalog of a folder per category in folder/catalog (numbered, so that equal names
    stay apart) and indexed into folder/data: the settings over them."""
    from indexer.config import load_settings
    from indexer.embedding.model import load_embedder
    from indexer.jobs.indexing import index_catalog

    catalog = folder / "catalog"
    for number, photo in enumerate(photos):
        path = catalog / photo.category / f"{number:05d}-{Path(photo.name).stem}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo.data)
    settings = load_settings().with_overrides(data_dir=folder / "data", catalog_dir=catalog, metadata_path=None)
    index_catalog(settings, load_embedder(settings, catalog=catalog), catalog, progress=False)
    return settings


def _spread(images: list, limit: int, seed: int) -> list[Photo]:
    """Round-robin over categories (each shuffled), so that every category has an anchor."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list] = {}
    for image in images:
        by_category.setdefault(image.category, []).append(image)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_category.items())]
    chosen: list = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return [Photo(image.rel_path, image.category, image.path.read_bytes()) for image in chosen]


def _skimage_crops(limit: int, seed: int) -> list[Photo]:
    """scikit-image ships about twenty colour photos; random crops of them stand in for a catalog."""
    import skimage.data

    rng = np.random.default_rng(seed)
    folder = Path(skimage.data.__file__).parent
    sources = []
    for path in sorted(folder.glob("*")):
        if path.suffix.lower() not in (".png", ".jpg"):
            continue
        image = Image.open(path).convert("RGB")
        if min(image.size) >= 128:
            sources.append((path.stem, image))
    photos = []
    for number in range(limit):
        name, image = sources[number % len(sources)]
        width, height = image.size
        side = int(rng.integers(min(width, height) // 2, min(width, height) + 1))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crop = image.crop((left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        photos.append(Photo(f"{name}-{number}", name, buffer.getvalue()))
    return photos


def embed_photos(embedder, photos: list[Photo], progress: bool = True) -> np.ndarray:
    """(len(photos), dim) unit vectors from the project's own model."""
    vectors = [embedder.embed_image(p.data) for p in tqdm(photos, desc="Embedding anchors", disable=not progress)]
    return np.stack(vectors).astype(np.float32)


def noise_scale(cosine: np.ndarray, dim: int = DIM) -> np.ndarray:
    """The per-coordinate standard deviation that puts a ~ unit anchor plus Gaussian noise at this
    cosine to the anchor: |noise|^2 ~ dim * sigma^2, so cos ~ 1 / sqrt(1 + dim * sigma^2)."""
    return np.sqrt((1.0 / np.square(cosine) - 1.0) / dim).astype(np.float32)


def generate(
    folder: Path,
    count: int,
    anchors: np.ndarray,
    categories: list[str],
    seed: int,
    progress: bool = True,
) -> SyntheticCatalog:
    """Writes vectors.npy (count x dim float32 unit vectors) and products.csv to folder, a chunk at
    a time; the same seed, anchors and count give the same files."""
    folder.mkdir(parents=True, exist_ok=True)
    anchors = np.asarray(anchors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    vectors = open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=(count, anchors.shape[1]))
    with open(folder / "products.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PRODUCT_COLUMNS)
        with tqdm(total=count, desc="Synthetic vectors", unit="vec", unit_scale=True, disable=not progress) as bar:
            for start in range(0, count, CHUNK):
                rows = min(CHUNK, count - start)
                which = rng.integers(0, len(anchors), size=rows)
                sigma = noise_scale(rng.uniform(*COSINE_RANGE, size=rows))
                chunk = rng.standard_normal((rows, anchors.shape[1]), dtype=np.float32)
                chunk *= sigma[:, None]
                chunk += anchors[which]
                chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
                vectors[start : start + rows] = chunk
                prices = np.clip(np.round(rng.lognormal(math.log(4.0), 0.9, size=rows), 2), *PRICE_RANGE)
                variants = rng.integers(0, len(_VARIANTS), size=rows)
                sizes = rng.integers(0, len(_SIZES), size=rows)
                sweep_categories = _partition(rng, rows, [category_of(s) for s in SHARES], "cat-other")
                bands = _partition(rng, rows, [band_of(s) for s in SHARES], "band-other")
                words = rng.random((rows, len(SHARES))) < np.asarray(SHARES)
                for offset in range(rows):
                    kind = categories[which[offset]]
                    held = "".join(f", {word_of(s)}" for s, has in zip(SHARES, words[offset], strict=True) if has)
                    title = f"{kind.replace('-', ' ')}, {_VARIANTS[variants[offset]]}, {_SIZES[sizes[offset]]}{held}"
                    writer.writerow((sku_of(start + offset), title, sweep_categories[offset],
                                     f"{prices[offset]:.2f}", "", "", bands[offset], kind))  # fmt: skip
                bar.update(rows)
    vectors.flush()
    del vectors
    return SyntheticCatalog(folder / "vectors.npy", folder / "products.csv", count)


def prefix(catalog: SyntheticCatalog, folder: Path, count: int) -> SyntheticCatalog:
    """The first `count` products of a catalog as a catalog of their own (a random sample of the
    same distribution, since every row draws its anchor independently)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = np.load(catalog.vectors, mmap_mode="r")
    target = open_memmap(folder / "vectors.npy", mode="w+", dtype=np.float32, shape=(count, source.shape[1]))
    for start in range(0, count, CHUNK):
        target[start : start + CHUNK] = source[start : min(count, start + CHUNK)]
    target.flush()
    del target, source
    with open(catalog.products, newline="") as source_csv, open(folder / "products.csv", "w", newline="") as out:
        for number, line in enumerate(source_csv):
            if number > count:  # the header, then `count` rows
                break
            out.write(line)
    return SyntheticCatalog(folder / "vectors.npy", folder / "products.csv", count)


def cached_or_generate(
    folder: Path,
    count: int,
    anchors: np.ndarray,
    categories: list[str],
    seed: int,
    identity: dict,
    progress: bool = True,
) -> tuple[SyntheticCatalog, bool]:
    """generate(), unless folder already holds the files of the same inputs (a kept --work-dir);
    returns the catalog and whether it was reused."""
    meta = {
        "count": count,
        "seed": seed,
        "cosine_range": list(COSINE_RANGE),
        "chunk": CHUNK,
        "columns": list(PRODUCT_COLUMNS),
        "shares": list(SHARES),
        "anchors_sha256": _digest(anchors),
        "categories": categories,
        **identity,
    }
    meta_path = folder / "meta.json"
    catalog = SyntheticCatalog(folder / "vectors.npy", folder / "products.csv", count)
    files = (meta_path, catalog.vectors, catalog.products)
    if all(f.exists() for f in files) and json.loads(meta_path.read_text()) == meta:
        return catalog, True
    if folder.exists():
        shutil.rmtree(folder)
    catalog = generate(folder, count, anchors, categories, seed, progress)
    meta_path.write_text(json.dumps(meta))  # last: a half-written folder is never reused
    return catalog, False


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def cosine_to_anchors(catalog: SyntheticCatalog, anchors: np.ndarray, sample: int = 2000, seed: int = 0) -> dict:
    """How close a sample of products is to its nearest anchor, and to each other: the spread
    that the search index has to work with."""
    vectors = np.load(catalog.vectors, mmap_mode="r")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    picked = np.asarray(vectors[rows])
    nearest = (picked @ anchors.T).max(axis=1)
    pairs = picked[: len(picked) // 2] @ picked[len(picked) // 2 :].T
    return {
        "to_nearest_anchor_p5": round(float(np.percentile(nearest, 5)), 3),
        "to_nearest_anchor_p50": round(float(np.percentile(nearest, 50)), 3),
        "to_nearest_anchor_p95": round(float(np.percentile(nearest, 95)), 3),
        "between_random_products_p50": round(float(np.median(pairs)), 3),
    }
