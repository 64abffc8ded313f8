"""Read a catalog: a folder of product photos plus optional products.csv / .jsonl metadata.

Without metadata every image under the folder is a product whose sku is its
relative path without extension and whose category is its parent folder.
With metadata, the rows are the catalog and image paths are relative to the folder.
Nothing here raises on a bad row or file: problems are collected for the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from indexer.embedding.images import ACCEPTED_FORMATS
from indexer.records import ProductFields, safe_link, sku_problem

# The files of a catalog folder that are photos: those of the formats the decoder accepts.
IMAGE_SUFFIXES = tuple(suffix for suffixes in ACCEPTED_FORMATS.values() for suffix in suffixes)
KNOWN_COLUMNS = ("sku", "image", "title", "category", "price", "url")
METADATA_NAMES = ("products.csv", "products.jsonl")


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (a missing folder, an unusable metadata file)."""


@dataclass(frozen=True)
class CatalogImage:
    """One product photo and the product it shows."""

    rel_path: str
    path: Path
    product: ProductFields

    @property
    def sku(self) -> str:
        return self.product.sku

    @property
    def title(self) -> str:
        return self.product.title

    @property
    def category(self) -> str | None:
        return self.product.category


@dataclass
class CatalogScan:
    root: Path
    images: list[CatalogImage]
    problems: list[str]

    @property
    def skus(self) -> set[str]:
        return {image.sku for image in self.images}

    @property
    def photos(self) -> list[CatalogImage]:
        """One image per photo file (the first row that names it): variants (several products sharing a photo) are
        several images of one file, which is read and embedded once."""
        first: dict[str, CatalogImage] = {}
        for image in self.images:
            first.setdefault(image.rel_path, image)
        return list(first.values())


def in_catalog(catalog: Path, path: str | Path | None) -> Path | None:
    """A path as given on the command line, or else a file of that name inside the catalog folder."""
    if not path:
        return None
    path = Path(path)
    return path if path.is_absolute() or path.exists() else Path(catalog) / path


def default_metadata(root: Path) -> Path | None:
    return next((root / name for name in METADATA_NAMES if (root / name).is_file()), None)


def scan_catalog(root: Path, metadata: Path | None = None) -> CatalogScan:
    """List the catalog's images; metadata defaults to <root>/products.csv or .jsonl."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise CatalogError(f"catalog folder {root} does not exist")
    metadata = metadata or default_metadata(root)
    if metadata is None:
        problems: list[str] = []
        images = sorted(_images_from_folder(root, problems), key=lambda image: image.path)
        return CatalogScan(root, images, problems)
    rows, problems = read_metadata(Path(metadata))
    images = _images_from_rows(root, rows, problems)
    return CatalogScan(root, images, problems)


def _images_from_folder(root: Path, problems: list[str]):
    """Every photo file under root, hidden ones aside. Links are not followed, as metadata mode refuses what
    leaves the folder: a link that leads out of it is skipped as a problem, and one within it is skipped too
    (what it names is indexed under its own name, or listed in products.csv to be indexed under another)."""
    for folder, folders, files in os.walk(root):
        here = Path(folder)
        folders.sort()
        for name in [*folders, *files]:
            path = here / name
            if name.startswith(".") or not path.is_symlink():
                continue
            rel = path.relative_to(root).as_posix()
            if not Path(os.path.realpath(path)).is_relative_to(root):
                problems.append(f"{rel}: a link to outside the catalog folder; skipped")
            elif name in files and path.suffix.lower() in IMAGE_SUFFIXES:
                problems.append(f"{rel}: a link within the catalog folder; skipped (list it in products.csv)")
        folders[:] = [name for name in folders if not name.startswith(".")]  # os.walk follows no links
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or path.is_symlink():
                continue
            rel = path.relative_to(root)
            if problem := sku_problem(rel.with_suffix("").as_posix()):
                problems.append(f"{rel.as_posix()}: {problem}; skipped")
                continue
            category = rel.parent.name or None
            title = path.stem.replace("_", " ").replace("-", " ")
            yield CatalogImage(rel.as_posix(), path, ProductFields(rel.with_suffix("").as_posix(), title, category))


def served_file(path: str, rel_path: str, uploads: Path) -> Path | None:
    """A stored photo's file as it may be served now, or None: a catalog photo (stored as <folder>/<rel_path>)
    must still be that very file, with no link anywhere below its catalog folder, and a photo written through
    the API must still be a file in `uploads` itself. Checked at each request, since links can be made after
    indexing."""
    if path.endswith("/" + rel_path) and ".." not in rel_path.split("/"):
        root, inside = path[: -len(rel_path) - 1], rel_path
    else:
        root, inside = str(uploads), os.path.basename(path)
        if os.path.realpath(os.path.dirname(path)) != os.path.realpath(root):
            return None
    real = os.path.realpath(path)
    if real != os.path.join(os.path.realpath(root), inside) or not os.path.isfile(real):
        return None
    return Path(path)


def read_metadata(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """Rows of products.csv or products.jsonl as (line number, dict), plus problems found."""
    problems: list[str] = []
    if not path.is_file():
        raise CatalogError(f"metadata file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path} is not UTF-8 text ({exc})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        rows = []
        # split on \n only: splitlines() also breaks at U+2028, U+0085... which JSON strings may hold
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path.name}:{number}: not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                problems.append(f"{path.name}:{number}: expected a JSON object")
                continue
            rows.append((number, {str(k): "" if v is None else str(v) for k, v in record.items()}))
        return rows, problems
    # a stream, not splitlines(): keeps line breaks inside quoted fields and line_num right
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("sku", "image") if c not in (reader.fieldnames or [])]
    if missing:
        raise CatalogError(f"{path} has no {' or '.join(missing)} column; it needs at least sku,image")
    rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
    return rows, problems


def product_of_row(row: dict[str, str], sku: str, price: float | None, url: str | None) -> ProductFields:
    """A products file's row as the product it describes (make index and import-vectors alike): the title defaults
    to the sku, and every column but the known ones is an attribute."""
    attributes = {name: value for name, value in row.items() if name not in KNOWN_COLUMNS and value}
    return ProductFields(sku, row.get("title") or sku, row.get("category") or None, price, url, attributes)


class RowsSeen:
    """What a products file's rows have named so far: each (sku, photo) pair, and each sku's first fields. Several
    skus may share a photo (variants); one sku with one photo twice would be one row stored twice, and one product
    has one title, price and category, those of its first row."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, str], int] = {}
        self._firsts: dict[str, tuple[int, ProductFields]] = {}

    def repeated(self, sku: str, photo: str, number: int) -> int | None:
        """The line that named this sku with this photo before this one, if any."""
        earlier = self._pairs.setdefault((sku, photo), number)
        return None if earlier == number else earlier

    def first_fields(self, product: ProductFields, number: int) -> tuple[ProductFields, int | None]:
        """The product as its sku's first row gave it, and that row's line when this row's fields differ."""
        line, kept = self._firsts.setdefault(product.sku, (number, product))
        return kept, (None if kept == product else line)


def _images_from_rows(root: Path, rows, problems: list[str]) -> list[CatalogImage]:
    """The rows' images. Several rows may name one photo (variants: each is a product of its own) and one sku
    may have several photos; the same sku with the same photo twice cannot be stored and is reported."""
    images: list[CatalogImage] = []
    seen = RowsSeen()
    real_folders: dict[str, str] = {}
    for number, row in rows:
        sku, image = row.get("sku", "").strip(), row.get("image", "").strip()
        where = f"line {number}"
        if not sku or not image:
            problems.append(f"{where}: needs both sku and image")
            continue
        if problem := sku_problem(sku):
            problems.append(f"{where}: {problem}; skipped")
            continue
        path = _resolve(root / image, real_folders)
        if not path.is_relative_to(root):
            problems.append(f"{where}: image {image!r} is outside the catalog folder")
            continue
        if not path.is_file():
            problems.append(f"{where}: image {image!r} does not exist")
            continue
        rel = path.relative_to(root).as_posix()
        if (earlier := seen.repeated(sku, rel, number)) is not None:
            problems.append(f"{where}: sku {sku!r} with image {image!r} is already listed on line {earlier}; skipped")
            continue
        price, url = _price(row.get("price", ""), where, problems), _url(row.get("url", ""), where, problems)
        product = product_of_row(row, sku, price, url)
        if problem := product.storage_problem():
            problems.append(f"{where}: {problem}; skipped")
            continue
        product, first = seen.first_fields(product, number)
        if first is not None:  # another photo of the product, but one product has one title, price...
            problems.append(
                f"{where}: sku {sku!r} is listed on line {first} with other fields; "
                f"its photo is kept, with line {first}'s fields"
            )
        images.append(CatalogImage(rel_path=rel, path=path, product=product))
    return images


def _resolve(path: Path, real_folders: dict[str, str]) -> Path:
    """path.resolve(), resolving each folder once: a catalog has many photos per folder, and
    resolving every component of every photo's path was most of the time a scan took."""
    folder, name = os.path.split(path)
    if name in ("", ".", ".."):
        return path.resolve()
    if folder not in real_folders:
        real_folders[folder] = os.path.realpath(folder)
    resolved = Path(real_folders[folder], name)
    return resolved.resolve() if resolved.is_symlink() else resolved


def parse_price(value: str | None) -> float | None:
    """A price from text: None when empty; ValueError unless a finite number."""
    if not value:
        return None
    price = float(value)
    if not math.isfinite(price):  # nan / inf would end up as invalid JSON in the API
        raise ValueError(f"{value!r} is not a finite number")
    return price


def row_url(value: str | None) -> tuple[str | None, str | None]:
    """A catalog or import row's url, and the problem to report when it is not an http(s) link (safe_link): the
    product is then stored without a url."""
    if not value or not value.strip():
        return None, None
    if (link := safe_link(value)) is None:
        return None, f"url {value[:80]!r} is not an http:// or https:// address; stored without a url"
    return link, None


def _url(value: str, where: str, problems: list[str]) -> str | None:
    link, problem = row_url(value)
    if problem:
        problems.append(f"{where}: {problem}")
    return link


def _price(value: str, where: str, problems: list[str]) -> float | None:
    try:
        return parse_price(value)
    except ValueError:
        problems.append(f"{where}: price {value!r} is not a number; stored without a price")
        return None
