"""Base segments and deltas at a size where "auto" picks an approximate structure: bulk import, tuned recall,
filters, changes applied without a rebuild, and compaction under deletions and SIGKILL.

The catalog is 24,000 clustered synthetic vectors (dimension 1024, like the model's), imported through
`import-vectors` into a real store, SQLite and PostgreSQL in turn, and compacted into a real FAISS structure.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from indexer.catalog import CatalogError
from indexer.config import REPO_ROOT
from indexer.embedding.model import l2_normalize
from indexer.index.ann import FLAT_LIMIT
from indexer.index.compaction import compact
from indexer.index.live_index import Filters
from indexer.index.segments import load_base, read_manifest, remove_unused_bases
from indexer.jobs.importing import import_vectors
from indexer.records import ProductFields
from indexer.storage.store import Store
from indexer.storage.vectors import ImageVector
from service import create_app
from tests.conftest import DATABASES, copy_database, live_index, new_database, subprocess_config

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop

COUNT = 24_000
CATEGORIES = 40


def clustered_vectors(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around a few sub-centres per category, cosine ~0.75 to their centre (not uniform noise).
    The centres are the same for every seed: other seeds give new photos of the same catalog."""
    centres = l2_normalize(np.random.default_rng(0).normal(size=(CATEGORIES * 4, 1024)))
    rng = np.random.default_rng(1000 + seed)
    labels = rng.integers(0, len(centres), count)
    vectors = l2_normalize(centres[labels] + rng.normal(scale=0.88 / 32, size=(count, 1024)))
    return vectors.astype(np.float32), labels // 4


@pytest.fixture(scope="module", params=DATABASES)
def imported(request, tmp_path_factory, base_settings, embedder):
    folder = tmp_path_factory.mktemp("live")
    vectors, categories = clustered_vectors(COUNT)
    prices = np.round(np.random.default_rng(1).uniform(1, 100, COUNT), 2)
    np.save(folder / "vectors.npy", vectors)
    with open(folder / "products.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "title", "category", "price", "url", "image"])
        writer.writerows([f"p{i}", f"Product {i}", f"c{categories[i]}", prices[i], "", ""] for i in range(COUNT))
    settings = base_settings.with_overrides(data_dir=folder / "data", database_url=new_database(request, request.param))
    report = import_vectors(settings, embedder, folder / "vectors.npy", folder / "products.csv", progress=False)
    assert (report.stored, report.problems) == (COUNT, [])
    return settings, folder, vectors, categories, prices


@pytest.fixture
def fresh(request, imported, tmp_path):
    """A copy of the imported data folder (and PostgreSQL database), for tests that change it."""
    settings, *rest = imported
    shutil.copytree(settings.data_dir, tmp_path / "data")
    copy = settings.with_overrides(
        data_dir=tmp_path / "data", database_url=copy_database(request, settings.database_url)
    )
    return copy, *rest


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    scores = vectors @ query
    if allowed is not None:
        scores[~allowed] = -np.inf
    return [int(i) for i in np.argsort(-scores)[:k] if np.isfinite(scores[i])]


def rows_of(live, ids) -> list[int]:
    """Image ids -> product numbers: the import stores row i as product p{i} with image id i + 1."""
    return [int(i) - 1 for i in ids]


def test_auto_picks_an_approximate_structure_above_the_flat_limit_and_records_its_tuned_recall(imported, embedder):
    settings = imported[0]
    assert COUNT >= FLAT_LIMIT
    manifest = read_manifest(settings.index_dir)
    tuning = manifest["tuning"]
    assert manifest["configured_factory"] == "auto" and manifest["factory"].startswith("IVF")
    assert tuning["recall_at_10"] >= 0.95 and tuning["queries"] == 200 and tuning["nprobe"] >= 1
    status = create_app(settings, embedder).test_client().get("/readyz").json
    assert status["items"] == COUNT and status["factory"] == manifest["factory"]
    assert status["search"]["recall_at_10"] == tuning["recall_at_10"]


def test_searches_find_what_exact_search_finds(imported, embedder):
    settings, _, vectors, _, _ = imported
    live = live_index(settings, embedder)
    queries = clustered_vectors(60, seed=7)[0]  # new photos, not catalog vectors
    recall = np.mean([
        len(set(rows_of(live, live.search(q, 10)[0])) & set(exact_top(vectors, q, 10))) / 10 for q in queries
    ])  # fmt: skip
    assert recall >= 0.9


def test_category_and_price_filters_return_only_matching_products_best_first(imported, embedder):
    settings, _, vectors, categories, prices = imported
    live = live_index(settings, embedder)
    query = clustered_vectors(1, seed=11)[0][0]
    # a category is one block of the base, scanned exactly
    found = rows_of(live, live.search(query, 10, Filters(category="c3"))[0])
    assert found == exact_top(vectors, query, 10, categories == 3)
    # a narrow price range is scanned exactly too
    narrow = (prices >= 10) & (prices <= 12)
    found = rows_of(live, live.search(query, 10, Filters(min_price=10, max_price=12))[0])
    assert found == exact_top(vectors, query, 10, narrow)
    # a wide range goes through the approximate structure, restricted by a selector
    wide = (prices >= 20) & (prices <= 80)
    found = rows_of(live, live.search(query, 10, Filters(min_price=20, max_price=80))[0])
    assert all(20 <= prices[i] <= 80 for i in found)
    assert len(set(found) & set(exact_top(vectors, query, 10, wide))) >= 8
    assert live.search(query, 10, Filters(category="no such category"))[0].size == 0


def test_changes_reach_a_live_index_without_a_rebuild(fresh, embedder):
    settings, _, vectors, _, _ = fresh
    store = Store.open(settings)
    live = live_index(settings, embedder)
    base_version = read_manifest(settings.index_dir)["version"]
    key, dim = embedder.identity.key, embedder.identity.dim
    target = vectors[5]
    new = l2_normalize((target + 0.01 * clustered_vectors(1, seed=3)[0][0])[None])[0]

    # a new product next to p5
    image = ImageVector("api/new/n1", "", "n1", new)
    store.products.put(ProductFields("n1", "New", "c-new", 5.0), image, key)
    live.apply(store.vectors.changes_since(live.seen, key, dim))
    ids, _ = live.search(new, 2)
    assert len(live) == COUNT + 1 and "c-new" in live.live_categories()
    assert rows_of(live, ids)[1] == 5 and live.search(new, 1, Filters(category="c-new"))[0].size == 1

    # p5 replaced by another photo: its base vector is masked, its new one is in the delta
    replacement = vectors[900]
    store.products.put(ProductFields("p5", "Five"), ImageVector("api/five/p5", "", "p5", replacement), key)
    live.apply(store.vectors.changes_since(live.seen, key, dim))
    ids, _ = live.search(target, 3)
    assert 5 not in rows_of(live, ids[1:])  # p5's old image is gone (the first hit is n1)
    assert len(live) == COUNT + 1 and live.masked_count == 1

    # a base product deleted, and the new one too
    store.products.delete("p900")
    store.products.delete("n1")
    live.apply(store.vectors.changes_since(live.seen, key, dim))
    assert len(live) == COUNT - 1 and "c-new" not in live.live_categories()
    assert 899 not in rows_of(live, live.search(replacement, 5)[0])
    assert read_manifest(settings.index_dir)["version"] == base_version  # nothing rebuilt


def test_a_deletion_during_compaction_never_comes_back(fresh, embedder):
    settings, _, vectors, _, _ = fresh
    store = Store.open(settings)
    live = live_index(settings, embedder)
    deleted: list[int] = []
    compaction = threading.Thread(target=compact, args=(settings, Store.open(settings), embedder))
    compaction.start()
    while compaction.is_alive() and len(deleted) < 600:  # before, while and after its snapshot
        number = 37 * len(deleted) + 1
        store.products.delete(f"p{number}")
        deleted.append(number)
        time.sleep(0.005)
    still_compacting = compaction.is_alive()
    compaction.join()
    assert len(deleted) > 10 and (still_compacting or len(deleted) < 600)
    for index in (live_index(settings, embedder), live):  # a server starting now, and one that was running
        index.apply(store.vectors.changes_since(index.seen, embedder.identity.key, embedder.identity.dim))
        assert len(index) == COUNT - len(deleted)
        for number in deleted[::10]:
            assert number not in rows_of(index, index.search(vectors[number], 3)[0])


def test_sigkill_during_compaction_leaves_the_old_base_and_a_rerun_gives_the_same_answers(fresh, embedder, tmp_path):
    settings = fresh[0]
    queries = clustered_vectors(20, seed=5)[0]
    before = [list(live_index(settings, embedder).search(q, 10)[0]) for q in queries]
    old_manifest = read_manifest(settings.index_dir)
    config = subprocess_config(tmp_path)
    env = {**os.environ, "SEARCH_CONFIG": str(config), "DATABASE_URL": settings.database_url}
    command = [sys.executable, "-m", "indexer", "--data-dir", str(settings.data_dir), "compact", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    while process.poll() is None and not list(settings.index_dir.glob(".partial-base-*/vectors.npy")):
        assert time.monotonic() - started < 120
        time.sleep(0.01)
    time.sleep(0.3)  # well inside writing the vectors or building
    assert process.poll() is None, "the compaction ended before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert read_manifest(settings.index_dir) == old_manifest  # servers keep serving the old base
    assert [list(live_index(settings, embedder).search(q, 10)[0]) for q in queries] == before

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_manifest(settings.index_dir)["version"] != old_manifest["version"]
    assert not list(settings.index_dir.glob(".partial-base-*"))
    assert [list(live_index(settings, embedder).search(q, 10)[0]) for q in queries] == before


def test_re_importing_the_same_files_changes_nothing(imported, embedder):
    settings, folder, *_ = imported
    head = Store.open(settings).head()
    report = import_vectors(settings, embedder, folder / "vectors.npy", folder / "products.csv", progress=False)
    assert (report.stored, report.unchanged, report.compaction) == (0, COUNT, None)
    assert Store.open(settings).head() == head


def test_vectors_of_another_dimension_are_refused(imported, embedder, tmp_path):
    settings, folder, *_ = imported
    np.save(tmp_path / "small.npy", np.ones((COUNT, 512), np.float32))
    with pytest.raises(CatalogError, match="1024-dimensional"):
        import_vectors(settings, embedder, tmp_path / "small.npy", folder / "products.csv", progress=False)


def test_old_bases_are_removed_once_no_server_holds_them(fresh, embedder):
    settings = fresh[0]
    store = Store.open(settings)
    held = load_base(settings.index_dir)  # as a server holds the base it serves
    compact(settings, store, embedder)
    assert (settings.index_dir / held.name).exists()  # still in use
    compact(settings, store, embedder)
    bases = sorted(p.name for p in settings.index_dir.glob("base-*"))
    assert len(bases) == 2 and held.name in bases  # at most two: the current and the one still in use
    held.release()
    remove_unused_bases(settings.index_dir)
    assert [p.name for p in settings.index_dir.glob("base-*")] == [read_manifest(settings.index_dir)["base"]]
    assert held.vectors[0].shape == (1024,)  # requests still searching a removed base keep reading its map


def test_a_product_page_and_similar_work_from_the_store_vector(imported, embedder):
    settings, _, vectors, _, _ = imported
    client = create_app(settings, embedder).test_client()
    response = client.get("/api/products/p42/similar?k=5&min_price=1")
    assert response.status_code == 200
    found = [int(r["sku"][1:]) for r in response.json["results"]]
    assert 42 not in found and len(set(found) & set(exact_top(vectors, vectors[42], 6)[1:])) >= 4
    assert client.get("/api/products/p42/similar?min_price=9&max_price=1").status_code == 400
    assert client.get("/api/products/p42/similar?min_price=cheap").status_code == 400
