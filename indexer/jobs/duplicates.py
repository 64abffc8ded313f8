"""The near-duplicate job (`python -m indexer duplicates`, `make duplicates`): groups of products whose photos are
near-identical. indexer.index.duplicates proposes the pairs of photos whose stored vectors are at the threshold or
above, through the index; indexer.jobs.photo_match keeps those whose photos are one picture (the vectors alone
cannot tell a copy from another shot of the same thing); this turns them into pairs and groups of products, and the
report that indexer.storage.duplicates keeps.

Photos are compared, not image rows: the rows of one stored file are one photo, and the products that share a photo
are variants by design (docs/operations.md), never duplicates of each other. A product with several photos is
paired by its closest two, and extra views (index.catalog_views) are left out. Pairs link products into groups
(connected components), numbered from 1, most similar first; a pair's similarity is its vectors' cosine.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from indexer.config import Settings, cpu_count
from indexer.errors import CatalogError
from indexer.index.duplicates import LiveVectors, PhotoPairs, near_photo_pairs
from indexer.index.segments import load_base
from indexer.jobs.photo_match import MATCH, match_scores, read_thumbnails
from indexer.storage.duplicates import PairRow, ReportSummary
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store

CSV_COLUMNS = ("group", "sku", "other_sku", "similarity")
# Product rows read from the database per batch.
READ_BATCH = 50_000


class DuplicatesError(CatalogError, ValueError):
    """The duplicate finder cannot run as asked (a threshold out of range, no index, another backend); the message
    says what to do."""

    status = 400
    error = "bad_request"


def check_threshold(value: float, name: str = "the threshold") -> float:
    """A cosine similarity threshold: above 0 and at most 1."""
    if not 0.0 < value <= 1.0:
        raise DuplicatesError(f"{name} must be a cosine similarity above 0 and at most 1, not {value:g}")
    return float(value)


@dataclass
class DuplicateReport:
    """What one run found: its summary and its pairs, by group; and, not kept, the photo pairs the index proposed
    and how many photos could not be read for the check (their pairs are left out)."""

    summary: ReportSummary
    pairs: list[PairRow]
    proposed: int = 0
    unreadable: int = 0

    def write_csv(self, path: Path) -> None:
        """One row per pair within a group: group,sku,other_sku,similarity."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows((g, sku, other, f"{similarity:.6f}") for g, sku, other, similarity in self.pairs)

    def describe(self) -> str:
        """The summary a run prints."""
        s = self.summary
        within = ", pairs within a category only" if s.category_only else ""
        in_groups = len({sku for pair in self.pairs for sku in pair[1:3]})
        checked = (
            f"; of {self.proposed:,} photo pairs the vectors proposed, those whose photos are one picture"
            if s.photo_check
            else "; by the vectors alone (no photo check)"
        )
        unreadable = (
            f" ({self.unreadable:,} photos could not be read: their pairs are left out; --no-photo-check pairs them by "
            "their vectors alone)"
            if self.unreadable
            else ""
        )
        return (
            f"Near-duplicates at similarity {s.threshold:g}{within}: {s.groups:,} groups of {in_groups:,} products "
            f"({s.pairs:,} pairs), among {s.products:,} products ({s.photos:,} photos) as of change {s.change}"
            f"{checked}{unreadable}, in {s.seconds:.1f} s"
        )


@dataclass(frozen=True)
class Photos:
    """The live photos of the index's model: one image id per photo to search with, each image id's photo (-1: an
    extra view, or no photo of this model), which products each photo is of, and each product's sku and category."""

    query_ids: np.ndarray
    photo_of_id: np.ndarray
    files: np.ndarray  # each photo's stored file (object: str)
    # photo p is the photo of products[starts[p]:starts[p + 1]] (indices into skus and categories)
    starts: np.ndarray
    products: np.ndarray
    skus: np.ndarray
    categories: np.ndarray  # a code per product, -1 for none


def find_duplicates(
    settings: Settings,
    store: Store,
    *,
    threshold: float,
    category_only: bool = False,
    photo_check: bool = True,
    progress: bool = False,
    threads: int = 0,
) -> DuplicateReport:
    """Groups of products whose photos are near-identical: pairs of photos whose vectors are at cosine similarity
    `threshold` or more, from the current base segment and the changes after it, through the base's FAISS structure,
    and (photo_check) whose photos are one picture (indexer.jobs.photo_match; a photo that cannot be read, such as an
    imported vector's, confirms none). `category_only` pairs products only within one category (products without a
    category are never paired then). `threads`: FAISS's and the photo decoding's (0: every core). Raises
    DuplicatesError when there is no FAISS index to search."""
    started = time.perf_counter()
    threshold = check_threshold(threshold)
    if settings.index_backend != "faiss":
        raise DuplicatesError(
            f"the duplicate finder needs the faiss backend (index.backend = {settings.index_backend!r}): it searches "
            "the base segment's own FAISS structure; run it with VECTOR_STORE=faiss on a data folder indexed so"
        )
    with live_photos(settings, store) as (live, photos):
        found = near_photo_pairs(
            live, photos.query_ids, photos.photo_of_id, threshold, threads=threads or cpu_count(), progress=progress
        )
    proposed, unreadable = len(found), 0
    if photo_check:
        found, unreadable = _same_pictures(photos, found, threads, progress)
    first, second, similarity = _product_pairs(photos, found, category_only)
    groups, pairs = _groups(photos.skus, first, second, similarity)
    summary = ReportSummary(
        created=datetime.now(UTC).replace(microsecond=0),
        change=live.head,
        threshold=threshold,
        category_only=category_only,
        photo_check=photo_check,
        photos=len(photos.query_ids),
        products=len(photos.skus),
        groups=groups,
        pairs=len(pairs),
        seconds=round(time.perf_counter() - started, 2),
    )
    return DuplicateReport(summary, pairs, proposed, unreadable)


@contextmanager
def live_photos(settings: Settings, store: Store) -> Iterator[tuple[LiveVectors, Photos]]:
    """The current base with the changes after it applied, and its live photos; the base is let go of afterwards.
    DuplicatesError when there is no index yet."""
    base = load_base(settings.index_dir)
    if base is None:
        raise DuplicatesError(f"no index in {settings.index_dir} yet: run `make index CATALOG=<folder>` first")
    try:
        model_key, dim = base.manifest["model_key"], int(base.vectors.shape[1])
        live = LiveVectors.of(base, store.vectors.changes_since(base.built_through, model_key, dim))
        yield live, read_photos(store, model_key, live)
    finally:
        base.release()


def _same_pictures(photos: Photos, found: PhotoPairs, threads: int, progress: bool) -> tuple[PhotoPairs, int]:
    """The pairs whose photos are one picture (match_scores at MATCH or more), and how many of their photos could not
    be read. Only the photos of proposed pairs are decoded."""
    involved, where = np.unique(np.concatenate([found.first, found.second]), return_inverse=True)
    row, thumbnails = read_thumbnails(list(photos.files[involved]), threads, progress)
    first, second = row[where[: len(found)]], row[where[len(found) :]]
    keep = (first >= 0) & (second >= 0)
    keep[keep] = match_scores(thumbnails, first[keep], second[keep]) >= MATCH
    kept = PhotoPairs(found.first[keep], found.second[keep], found.similarity[keep])
    return kept, int((row < 0).sum())


def read_photos(store: Store, model_key: str, live: LiveVectors) -> Photos:
    """The photo table of the live image rows of this model whose vectors the index holds."""
    query = (
        select(
            ProductImage.id, ProductImage.product_id, ProductImage.view == "", ProductImage.path, ProductImage.rel_path
        )
        .where(LIVE, ProductImage.model_key == model_key)
        .order_by(ProductImage.id)
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).all()
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    owners = np.array([r[1] for r in rows], dtype=np.int64)
    is_photo = np.array([r[2] for r in rows], dtype=bool)
    # One stored file, one photo: its variants' rows carry the same vector under the same path (the write API keeps
    # an upload by its content, so the same bytes are one file). An imported vector's path is its products file's
    # image, maybe none: its rel_path (import/<image or sku>) names the photo.
    paths = np.array([r[3] or r[4] for r in rows], dtype=object)
    del rows
    keep = is_photo & live.is_live(ids)
    ids, owners, paths = ids[keep], owners[keep], paths[keep]
    names, first_row, photo = np.unique(paths, return_index=True, return_inverse=True)
    product_ids, product = np.unique(owners, return_inverse=True)
    pairs = np.unique(photo.astype(np.int64) * max(len(product_ids), 1) + product)
    photo_of_pair, product_of_pair = np.divmod(pairs, max(len(product_ids), 1))
    photo_of_id = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, dtype=np.int64)
    photo_of_id[ids] = photo
    skus, categories = _product_fields(store, product_ids)
    return Photos(
        query_ids=ids[first_row],
        photo_of_id=photo_of_id,
        files=names,
        starts=np.searchsorted(photo_of_pair, np.arange(len(names) + 1)),
        products=product_of_pair,
        skus=skus,
        categories=categories,
    )


def _product_fields(store: Store, product_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sku and category code (-1: none) of each of these product ids (sorted), read in one pass over products."""
    skus = np.empty(len(product_ids), dtype=object)
    names = np.empty(len(product_ids), dtype=object)
    with store.engine.connect() as connection:
        result = connection.execution_options(yield_per=READ_BATCH).execute(
            select(Product.id, Product.sku, Product.category).order_by(Product.id)
        )
        for rows in result.partitions():
            found = np.array([r[0] for r in rows], dtype=np.int64)
            at = np.minimum(np.searchsorted(product_ids, found), max(len(product_ids) - 1, 0))
            wanted = (product_ids[at] == found) if len(product_ids) else np.zeros(len(found), bool)
            skus[at[wanted]] = np.array([r[1] for r in rows], dtype=object)[wanted]
            names[at[wanted]] = np.array([r[2] or "" for r in rows], dtype=object)[wanted]
    labels, codes = np.unique(names.astype(str), return_inverse=True) if len(names) else ([], np.zeros(0, np.int64))
    codes = np.asarray(codes, dtype=np.int64)
    if len(labels) and labels[0] == "":
        codes = codes - 1  # no category: -1
    return skus, codes


def _expand(starts: np.ndarray, products: np.ndarray, first: np.ndarray, second: np.ndarray):
    """For pairs of photos (first, second): every (product of first, product of second) pair, with the index of the
    photo pair it came from."""
    count_first = starts[first + 1] - starts[first]
    count_second = starts[second + 1] - starts[second]
    sizes = count_first * count_second
    source = np.repeat(np.arange(len(first)), sizes)
    offset = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    across = count_second[source]
    a = products[starts[first[source]] + offset // np.maximum(across, 1)]
    b = products[starts[second[source]] + offset % np.maximum(across, 1)]
    return a, b, source


def _product_pairs(photos: Photos, found: PhotoPairs, category_only: bool):
    """(first, second, similarity): pairs of products (indices, first < second), each with the similarity of its
    closest photos, less the pairs of one product, of variants (products sharing a photo) and, with
    category_only, of two categories."""
    a, b, source = _expand(photos.starts, photos.products, found.first, found.second)
    similarity = found.similarity[source]
    first, second = np.minimum(a, b), np.maximum(a, b)
    keep = first != second
    if category_only:
        keep &= (photos.categories[first] == photos.categories[second]) & (photos.categories[first] >= 0)
    first, second, similarity = first[keep], second[keep], similarity[keep]
    count = max(len(photos.skus), 1)
    keys = first * count + second
    shared = np.flatnonzero(np.diff(photos.starts) > 1)  # photos of several products: variants
    if len(shared):
        va, vb, _ = _expand(photos.starts, photos.products, shared, shared)
        variants = np.unique(np.minimum(va, vb) * count + np.maximum(va, vb))
        keep = ~np.isin(keys, variants)
        keys, similarity = keys[keep], similarity[keep]
    order = np.lexsort((-similarity, keys))
    keys, similarity = keys[order], similarity[order]
    best = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    keys, similarity = keys[best], similarity[best]
    return keys // count, keys % count, similarity


def components(first: np.ndarray, second: np.ndarray, count: int) -> np.ndarray:
    """A label per node 0..count-1 (the smallest node of its connected component) for the edges first[i]-second[i]:
    minimum labels spread along the edges, with pointer jumping, in a few passes over the edges."""
    labels = np.arange(count)
    while len(first):
        low = np.minimum(labels[first], labels[second])
        np.minimum.at(labels, first, low)
        np.minimum.at(labels, second, low)
        labels = labels[labels]
        if np.array_equal(labels[first], labels[second]):
            break
    while not np.array_equal(labels[labels], labels):
        labels = labels[labels]
    return labels


def _groups(
    skus: np.ndarray, first: np.ndarray, second: np.ndarray, similarity: np.ndarray
) -> tuple[int, list[PairRow]]:
    """(groups, their pairs): products linked by pairs, numbered from 1 by their best similarity (then by size,
    then by their first sku); pairs by group, most similar first, each with its skus in order."""
    if not len(first):
        return 0, []
    labels = components(first, second, len(skus))
    root = labels[first]
    roots, group_of_pair = np.unique(root, return_inverse=True)
    best = np.full(len(roots), -np.inf)
    np.maximum.at(best, group_of_pair, similarity)
    members = np.unique(np.concatenate([first, second]))
    size = np.bincount(np.searchsorted(roots, labels[members]), minlength=len(roots))
    first_sku = [min(group) for group in _skus_by_group(skus, labels, members, roots)]
    order = sorted(range(len(roots)), key=lambda g: (-best[g], -size[g], first_sku[g]))
    number = np.empty(len(roots), dtype=np.int64)
    number[order] = np.arange(1, len(roots) + 1)
    a, b = skus[first], skus[second]
    rows = [
        PairRow(int(n), min(x, y), max(x, y), round(float(s), 6))
        for n, x, y, s in zip(number[group_of_pair], a, b, similarity, strict=True)
    ]
    rows.sort(key=lambda row: (row.group, -row.similarity, row.sku, row.other_sku))
    return len(roots), rows


def _skus_by_group(skus: np.ndarray, labels: np.ndarray, members: np.ndarray, roots: np.ndarray) -> list[list[str]]:
    group = np.searchsorted(roots, labels[members])
    found: list[list[str]] = [[] for _ in roots]
    for g, sku in zip(group, skus[members], strict=True):
        found[g].append(sku)
    return found


def cmd_duplicates(settings: Settings, args: argparse.Namespace) -> int:
    """`python -m indexer duplicates`: find, keep as the latest report, write the CSV if asked, say what is next."""
    store = Store.open(settings)
    threshold = settings.duplicates_threshold if args.threshold is None else args.threshold
    try:
        report = find_duplicates(
            settings,
            store,
            threshold=threshold,
            category_only=args.category_only,
            photo_check=args.photo_check,
            progress=not args.quiet,
        )
    except DuplicatesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store.duplicates.replace(report.summary, report.pairs)
    if args.out:
        report.write_csv(Path(args.out))
    print(report.describe())
    written = f"; the pairs are in {args.out}" if args.out else ""
    print(f"Kept as the latest report{written}. Next: review the groups at /duplicates on the service "
          "(make serve), or GET /api/duplicates", file=sys.stderr)  # fmt: skip
    return 0


def add_duplicates_command(commands: argparse._SubParsersAction) -> None:
    found = commands.add_parser(
        "duplicates", help="groups of products whose photos are near-identical, kept for the review page"
    )
    found.add_argument(
        "--threshold", type=float, help="cosine similarity of the stored vectors from which two photos are compared, "
        "above 0 and at most 1 (default: index.duplicates_threshold, measured in eval/README.md)",
    )  # fmt: skip
    found.add_argument("--category-only", action="store_true", help="pair products only within one category")
    found.add_argument(
        "--no-photo-check", dest="photo_check", action="store_false",
        help="pair photos by their vectors alone, without comparing the photos themselves (imported vectors "
        "without photo files; far less precise)",
    )  # fmt: skip
    found.add_argument("--out", metavar="FILE", help="also write the pairs to this CSV: group,sku,other_sku,similarity")
    found.add_argument("--quiet", action="store_true", help="no progress bar")
    found.set_defaults(run=cmd_duplicates)
