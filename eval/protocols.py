"""The evaluation's queries, through the service's own API: shop photos (POST /api/search) or leave-one-out
(GET /api/products/<sku>/similar), so that what is measured is what shoppers get."""

from __future__ import annotations

import csv
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from indexer.config import REPO_ROOT, cpu_count

K = 10


def product_labels(app, label: str) -> dict[str, str | None]:
    """sku -> the product's label: its category, or another metadata column (an attribute)."""
    return app.extensions["catalog_search"].store.products.labels(label)


def repository_path(path: str | Path) -> str:
    """`path` relative to the repository (e.g. ../shared/datasets/grocery-store), as saved results name a folder:
    they travel with the repository, so they never hold a folder of the machine that made them."""
    return Path(os.path.relpath(Path(path).resolve(), REPO_ROOT)).as_posix()


def catalog_path(path: str | Path, catalog: Path) -> str:
    """`path` relative to the catalog folder when it lies inside it (as metadata names photos), else relative to
    the repository."""
    resolved, catalog = Path(path).resolve(), catalog.resolve()
    if resolved.is_relative_to(catalog):
        return resolved.relative_to(catalog).as_posix()
    return repository_path(resolved)


def read_queries(path: Path, catalog: Path, label: str, words: str | None = None) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "image" not in rows[0] or label not in rows[0]:
        raise SystemExit(f"error: {path} needs an 'image' and a '{label}' column")
    if words is not None and words not in rows[0]:
        raise SystemExit(f"error: {path} has no '{words}' column for --words")
    for row in rows:  # like metadata, image paths are relative to the catalog folder
        row["path"] = str(catalog / row["image"])
    return rows


def run_queries(
    app, queries: list[dict[str, str]] | None, skus: list[str], words: str | None = None
) -> list[list[dict]]:
    """Result lists from the API, one per query photo (or per catalog sku for leave-one-out); with `words`, each
    photo is searched with q set to that column of its row (a shopper's words beside the photo)."""

    def by_photo(query: dict[str, str]) -> list[dict]:
        photo = Path(query["path"]).read_bytes()
        fields = {"image": (io.BytesIO(photo), "query.jpg"), "k": str(K)}
        if words is not None:
            fields["q"] = query[words]
        response = app.test_client().post("/api/search", data=fields, content_type="multipart/form-data")
        if response.status_code != 200:
            raise SystemExit(f"error: {query['image']}: {response.status_code} {response.get_json()}")
        return response.get_json()["results"]

    def by_sku(sku: str) -> list[dict]:
        response = app.test_client().get(f"/api/products/{sku}/similar", query_string={"k": K})
        if response.status_code != 200:
            raise SystemExit(f"error: {sku}: {response.status_code} {response.get_json()}")
        return response.get_json()["results"]

    from tqdm import tqdm

    work, items = (by_photo, queries) if queries is not None else (by_sku, skus)
    with ThreadPoolExecutor(max_workers=cpu_count()) as pool:
        return list(tqdm(pool.map(work, items), total=len(items), desc="Searching", unit="query"))
