"""The indexing job: catalog folder -> embeddings in SQLite -> a published FAISS index.

Incremental: a file whose bytes (sha256) and model are unchanged is not embedded
again; changed files are re-embedded under the same id; files gone from the
catalog leave the database and the index. Embeddings are committed in batches,
so an interrupted run keeps what it finished and the next run carries on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from indexer.catalog import CatalogImage, CatalogScan, scan_catalog
from indexer.config import Settings
from indexer.images import ImageError, load_pixels
from indexer.locking import write_lock
from indexer.model import Embedder
from indexer.schema import LIVE, RESULT_COLUMNS, Product, ProductImage, open_database
from indexer.vectors import KEEP_OLD_SECONDS, build_index, publish_index, read_manifest

CATALOG = "catalog"  # ProductImage.source of rows that follow the catalog folder


@dataclass
class IndexReport:
    catalog: Path
    scanned: int = 0
    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    indexed: int = 0
    products: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.embed_seconds if self.embed_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"Indexed {self.catalog}: {self.indexed} images of {self.products} products are searchable.",
            f"  scanned {self.scanned}, embedded {self.embedded} ({self.images_per_second:.1f} images/s), "
            f"unchanged {self.unchanged}, removed {self.removed}, skipped {len(self.problems)}, "
            f"in {self.seconds:.1f} s, peak memory {self.peak_memory_mb:.0f} MB",
        ]
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s); these files or rows were skipped:")
            lines += [f"    - {p}" for p in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"    ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Known = dict[str, tuple[str, str]]  # rel_path -> (sha256, model_key) of the live catalog rows


@dataclass
class CheckedBatch:
    """One worker's batch: photos embedded (with their vectors and sha256), photos unchanged since
    the last run, and photos that could not be read or decoded (with the reason)."""

    embedded: list[CatalogImage]
    vectors: np.ndarray
    digests: dict[str, str]
    unchanged: int
    failures: list[tuple[CatalogImage, str]]


def _check_and_embed(images: list[CatalogImage], known: Known, embedder: Embedder) -> CheckedBatch:
    """One worker's unit of work: read each photo once, hash it, and decode and embed (with this
    thread's interpreter) only those whose bytes or model changed since the last run."""
    model_key, size = embedder.identity.key, embedder.input_size
    embedded, pixels, digests, unchanged, failures = [], [], {}, 0, []
    for image in images:
        try:
            data = image.path.read_bytes()
        except OSError as exc:
            failures.append((image, f"cannot be read ({exc.strerror or exc})"))
            continue
        digest = sha256_bytes(data)
        if known.get(image.rel_path) == (digest, model_key):
            unchanged += 1
            continue
        try:
            pixels.append(load_pixels(data, size))
        except ImageError as exc:
            failures.append((image, str(exc)))
            continue
        embedded.append(image)
        digests[image.rel_path] = digest
    batch = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return CheckedBatch(embedded, embedder.embed_pixels(batch), digests, unchanged, failures)


def checked_batches(
    images: list[CatalogImage],
    known: Known,
    embedder: Embedder,
    batch_size: int,
    pool: ThreadPoolExecutor,
    workers: int,
) -> Iterator[CheckedBatch]:
    """Check and embed batches on `workers` threads, each reading, decoding and then running its
    own interpreter, so both kinds of work keep every core busy. The first batches start at
    once, before the caller iterates; results come back in order; at most 2 batches per worker
    are in flight, so memory stays bounded for any catalog size."""
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    pending = deque(pool.submit(_check_and_embed, batch, known, embedder) for batch in islice(batches, 2 * workers))

    def in_order() -> Iterator[CheckedBatch]:
        while pending:
            done = pending.popleft().result()
            if (batch := next(batches, None)) is not None:
                pending.append(pool.submit(_check_and_embed, batch, known, embedder))
            yield done

    return in_order()


def _upsert_products(session: Session, images: Iterable[CatalogImage]) -> dict[str, int]:
    """Create or refresh each product's metadata (its first row wins); returns sku -> product id."""
    first_rows: dict[str, CatalogImage] = {}
    for image in images:
        first_rows.setdefault(image.sku, image)
    products = {p.sku: p for p in session.scalars(select(Product))}
    for sku, image in first_rows.items():
        product = products.setdefault(sku, Product(sku=sku))
        product.title, product.category, product.price = image.title, image.category, image.price
        product.url, product.attributes = image.url, dict(image.attributes)
        session.add(product)
    session.flush()
    return {sku: products[sku].id for sku in first_rows}


def index_catalog(
    settings: Settings,
    embedder: Embedder,
    catalog_dir: Path | None = None,
    metadata: Path | None = None,
    *,
    sessions: sessionmaker | None = None,
    progress: bool = True,
) -> IndexReport:
    """Bring the database and the FAISS index in line with the catalog folder."""
    started = time.perf_counter()
    catalog_dir = Path(catalog_dir or settings.catalog_dir)
    scan: CatalogScan = scan_catalog(catalog_dir, metadata or settings.metadata_path)
    report = IndexReport(catalog=scan.root, scanned=len(scan.images), problems=list(scan.problems))
    sessions = sessions or open_database(settings)
    model_key = embedder.identity.key

    with sessions() as session:
        known: Known = {
            row.rel_path: (row.sha256, row.model_key)
            for row in session.execute(
                select(ProductImage.rel_path, ProductImage.sha256, ProductImage.model_key).where(
                    ProductImage.source == CATALOG, LIVE
                )
            )
        }
    failed: set[str] = set()
    with ThreadPoolExecutor(max_workers=settings.embed_workers, thread_name_prefix="embed") as pool:
        embed_started = time.perf_counter()
        results = checked_batches(scan.images, known, embedder, settings.batch_size, pool, settings.embed_workers)
        # While the first batches are embedded: every product's metadata, which the embeddings'
        # rows point to. Products whose photos all fail are removed again by _reconcile_rows.
        with write_lock(settings.data_dir), sessions.begin() as session:
            product_ids = _upsert_products(session, scan.images)
        bar = tqdm(total=len(scan.images), desc="Indexing", unit="img", disable=not progress)
        for batch in results:
            for image, problem in batch.failures:
                failed.add(image.rel_path)
                report.problems.append(f"{image.rel_path}: {problem}")
            if batch.embedded:
                with write_lock(settings.data_dir), sessions.begin() as session:
                    _store_embeddings(session, batch, product_ids, model_key)
            report.embedded += len(batch.embedded)
            report.unchanged += batch.unchanged
            bar.update(len(batch.embedded) + batch.unchanged + len(batch.failures))
        bar.close()
        report.embed_seconds = time.perf_counter() - embed_started

    keep = {
        image.rel_path: (product_ids[image.sku], str(image.path))
        for image in scan.images
        if image.rel_path not in failed
    }
    with write_lock(settings.data_dir):
        with sessions.begin() as session:
            report.removed = _reconcile_rows(session, keep)
        report.indexed, report.products = publish_from_database(settings, sessions, embedder, str(scan.root))
    report.seconds = time.perf_counter() - started
    report.peak_memory_mb = peak_memory_mb()
    return report


def publish_from_database(
    settings: Settings, sessions: sessionmaker, embedder: Embedder, catalog: str
) -> tuple[int, int]:
    """Build the index from every committed vector and publish it, if it differs from the
    current version. Call it holding write_lock. Returns (images, products) searchable."""
    with sessions() as session:
        ids, vectors = _all_embeddings(session, embedder.identity.key, embedder.identity.dim)
        products = session.scalar(select(func.count(func.distinct(ProductImage.product_id))).where(LIVE))
        shown = session.execute(
            select(ProductImage.id, *RESULT_COLUMNS).join(Product).where(LIVE).order_by(ProductImage.id)
        )
        results_fingerprint = _rows_fingerprint(shown)
    manifest = {
        **embedder.identity.as_dict(),
        "model_key": embedder.identity.key,
        "model_version": embedder.version,
        "engine": embedder.engine.name,
        "tflite_sha256": embedder.tflite_sha256,
        "factory": settings.index_factory,
        "catalog": catalog,
        "catalog_fingerprint": _fingerprint(ids, vectors),
        "results_fingerprint": results_fingerprint,
    }
    current = read_manifest(settings.index_dir) or {}
    if any(current.get(key) != value for key, value in manifest.items()):
        # Only publish when something changed, so an idle re-run does not make servers reload.
        manifest["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        publish_index(settings.index_dir, build_index(ids, vectors, settings.index_factory), manifest)
    with sessions.begin() as session:
        purge_tombstones(session, timedelta(seconds=KEEP_OLD_SECONDS))
    return len(ids), int(products or 0)


def peak_memory_mb() -> float:
    """This process's peak resident memory (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _store_embeddings(session, batch: CheckedBatch, product_ids: dict[str, int], model_key: str) -> None:
    paths = [image.rel_path for image in batch.embedded]
    rows = {row.rel_path: row for row in session.scalars(select(ProductImage).where(ProductImage.rel_path.in_(paths)))}
    for image, vector in zip(batch.embedded, batch.vectors, strict=True):
        row = rows.get(image.rel_path) or ProductImage(rel_path=image.rel_path)
        row.product_id = product_ids[image.sku]
        row.path = str(image.path)
        row.sha256 = batch.digests[image.rel_path]
        row.model_key = model_key
        row.embedding = np.asarray(vector, dtype=np.float32).tobytes()
        row.deleted_at = None  # a file back in the catalog revives its old row and id
        session.add(row)


def _reconcile_rows(session: Session, keep: dict[str, tuple[int, str]]) -> int:
    """Tombstone live catalog image rows no longer in the catalog (or no longer readable);
    re-point kept rows whose sku or absolute path changed. Returns the rows tombstoned."""
    stale, changed = [], []
    for row_id, rel_path, product_id, path in session.execute(
        select(ProductImage.id, ProductImage.rel_path, ProductImage.product_id, ProductImage.path).where(
            ProductImage.source == CATALOG, LIVE
        )
    ):
        if rel_path not in keep:
            stale.append(row_id)
        elif keep[rel_path] != (product_id, path):
            changed.append({"id": row_id, "product_id": keep[rel_path][0], "path": keep[rel_path][1]})
    now = datetime.now(UTC)
    for start in range(0, len(stale), 500):
        session.execute(
            update(ProductImage).where(ProductImage.id.in_(stale[start : start + 500])).values(deleted_at=now)
        )
    if changed:
        session.execute(update(ProductImage), changed)
    # Products of this run none of whose photos could be read (the API writes a product and its
    # image in one transaction, so it never leaves one without).
    session.execute(delete(Product).where(~Product.id.in_(select(ProductImage.product_id))))
    return len(stale)


def purge_tombstones(session: Session, older_than: timedelta) -> int:
    """Delete image rows tombstoned long enough ago that no index version in use refers to
    them, and the products they leave without any image. Returns the image rows deleted."""
    cutoff = datetime.now(UTC) - older_than
    expired = ProductImage.deleted_at.is_not(None) & (ProductImage.deleted_at < cutoff)
    owners = set(session.scalars(select(ProductImage.product_id).where(expired)))
    purged = session.execute(delete(ProductImage).where(expired)).rowcount
    # Only those products: one the indexer has just created may not have its images yet.
    session.execute(delete(Product).where(Product.id.in_(owners), ~Product.id.in_(select(ProductImage.product_id))))
    return purged


def _all_embeddings(session: Session, model_key: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = session.execute(
        select(ProductImage.id, ProductImage.embedding)
        .where(ProductImage.model_key == model_key, LIVE)
        .order_by(ProductImage.id)
    ).all()
    ids = np.fromiter((row_id for row_id, _ in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim)
    return ids, vectors


def _fingerprint(ids: np.ndarray, vectors: np.ndarray) -> str:
    digest = hashlib.sha256(ids.tobytes())
    digest.update(np.ascontiguousarray(vectors).tobytes())
    return digest.hexdigest()


def _rows_fingerprint(rows: Iterable[Sequence]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(list(row)).encode())
    return digest.hexdigest()
