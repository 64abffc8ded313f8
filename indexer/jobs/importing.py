"""Bulk import of vectors computed elsewhere (another machine, a GPU farm) into the store.

    python -m indexer import-vectors --vectors vectors.npy --products products.csv

Row i of the products file (sku,title,category,price,url,image) describes vector i. Vectors go through the
same store and compaction as `make index`; a vector whose bytes are already stored for its row is skipped,
so importing the same files again changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from indexer.catalog import CatalogError, RowsSeen, parse_price, product_of_row, row_url
from indexer.config import Settings
from indexer.embedding.model import Embedder
from indexer.embedding.whitening import configured
from indexer.index.compaction import CompactionReport
from indexer.jobs.indexing import compact_if_due
from indexer.records import ProductFields, sku_problem
from indexer.storage.schema import IMPORT
from indexer.storage.store import Store
from indexer.storage.vectors import KnownFile
from indexer.writes import CatalogWriter, Photo

BATCH = 10_000
COLUMNS = ("sku", "title", "category", "price", "url", "image")
# An image row's rel_path column holds 2048 characters (indexer.storage.schema).
MAX_IMAGE = 2048


@dataclass
class ImportReport:
    rows: int = 0
    stored: int = 0
    unchanged: int = 0
    skipped: int = 0
    seconds: float = 0.0
    compaction: CompactionReport | None = None
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"Imported {self.rows} vectors: {self.stored} stored, {self.unchanged} unchanged, "
            f"{self.skipped} skipped, in {self.seconds:.1f} s"
        ]
        if self.compaction is not None:
            lines.append("  " + self.compaction.summary())
        lines += [f"  - {p}" for p in self.problems[:20]]
        return "\n".join(lines)


def read_products(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "sku" not in (reader.fieldnames or []):
            raise CatalogError(f"{path} has no sku column; it needs sku,title,category,price,url,image")
        return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def import_vectors(
    settings: Settings, embedder: Embedder, vectors_path: Path, products_path: Path, *, progress: bool = True
) -> ImportReport:
    started = time.perf_counter()
    try:
        vectors = np.load(vectors_path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CatalogError(f"{vectors_path} is not a readable .npy file ({exc})") from None
    dim = embedder.network.dim
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise CatalogError(
            f"{vectors_path} holds vectors of shape {vectors.shape}, but the current model "
            f"({embedder.identity.name}) makes {dim}-dimensional ones"
        )
    rows = read_products(products_path)
    if len(rows) != len(vectors):
        raise CatalogError(f"{products_path} has {len(rows)} rows but {vectors_path} has {len(vectors)} vectors")
    report = ImportReport(rows=len(rows))
    store = Store.open(settings)
    # The vectors are the network's; the catalog's whitening, when `make index` has fitted one, follows them.
    embedder = embedder.with_whitening(configured(settings, store, embedder.network.key))
    known = store.vectors.known_files(IMPORT)
    identity = embedder.identity
    writer = CatalogWriter(settings, store, IMPORT)
    seen = RowsSeen()
    for start in tqdm(range(0, len(rows), BATCH), desc="Importing", unit="batch", disable=not progress):
        part = rows[start : start + BATCH]
        batch = embedder.finish(np.asarray(vectors[start : start + BATCH], dtype=np.float32))
        products, photos = [], []
        for number, (row, vector) in enumerate(zip(part, batch, strict=True), start=start + 2):
            if (checked := _checked_row(row, vector, number, report.problems)) is None:
                report.skipped += 1
                continue
            product, rel_path = checked
            # Variants: rows naming one image with different skus are products of their own; one sku with one
            # image twice would be one row stored twice.
            if (earlier := seen.repeated(product.sku, rel_path, number)) is not None:
                report.problems.append(
                    f"line {number}: sku {product.sku!r} with image {row.get('image', '')!r} is already on line "
                    f"{earlier}; skipped"
                )
                report.skipped += 1
                continue
            kept, first = seen.first_fields(product, number)
            if first is not None:
                report.problems.append(
                    f"line {number}: sku {product.sku!r} is on line {first} with other fields; its vector is kept, "
                    f"with line {first}'s fields"
                )
            products.append(kept)
            digest = hashlib.sha256(vector.tobytes()).hexdigest()
            photos.append(Photo(product.sku, rel_path, row.get("image", ""), digest, vector[None]))
        writer.write(products)
        photos = [photo for photo in photos if not _unchanged(photo, known, writer.product_ids, identity.key)]
        report.unchanged += len(products) - len(photos)
        writer.write(photos=photos, model=identity, sync=True)  # sync: nothing with FAISS
        report.stored += len(photos)
    if settings.index_backend != "milvus":
        report.compaction, _ = compact_if_due(settings, store, embedder, progress=progress)
    report.seconds = time.perf_counter() - started
    return report


def _checked_row(
    row: dict[str, str], vector: np.ndarray, number: int, problems: list[str]
) -> tuple[ProductFields, str] | None:
    """A products file's row as the product it describes and its vector's rel_path; None (the problem noted) when
    it cannot be imported."""
    sku = row.get("sku", "")
    try:
        price = parse_price(row.get("price"))
    except ValueError:
        problems.append(f"line {number}: price {row.get('price')!r} is not a number")
        return None
    if not sku or not np.isfinite(vector).all():
        problems.append(f"line {number}: needs a sku and a finite vector")
        return None
    if problem := sku_problem(sku):
        problems.append(f"line {number}: {problem}")
        return None
    url, problem = row_url(row.get("url"))
    if problem:  # the row is kept, without its url
        problems.append(f"line {number}: {problem}")
    product = product_of_row(row, sku, price, url)  # the other columns are attributes, as make index reads them
    rel_path = f"import/{row.get('image') or sku}"
    too_long = f"image is {len(rel_path) - 7} characters long; at most {MAX_IMAGE - 7} can be stored"
    if problem := product.storage_problem() or (too_long if len(rel_path) > MAX_IMAGE else None):
        problems.append(f"line {number}: {problem}")
        return None
    return product, rel_path


def _unchanged(photo: Photo, known: dict[str, KnownFile], product_ids: dict[str, int], model_key: str) -> bool:
    """Whether the store already holds this vector for this row's product (importing the same files again)."""
    stored = known.get(photo.rel_path)
    return (
        stored is not None
        and (stored.sha256, stored.model_key) == (photo.sha256, model_key)
        and product_ids[photo.sku] in stored.products
    )
