"""The indexing job: incremental runs, unreadable files, and what servers then search; on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from indexer.index.segments import load_base, read_manifest
from indexer.jobs.indexing import index_catalog
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store
from tests.conftest import both_databases, live_index, skimage_photo

pytestmark = both_databases


def run(settings, embedder, catalog, metadata=None):
    return index_catalog(settings, embedder, catalog, metadata, progress=False)


def session(settings) -> Session:
    return Session(Store.open(settings).engine)


def indexed_paths(settings) -> dict[str, str]:
    with session(settings) as s:
        return dict(s.execute(select(ProductImage.rel_path, ProductImage.sha256).where(LIVE)).all())


def test_first_run_embeds_every_image_into_a_base_segment(settings, embedder, skimage_catalog):
    report = run(settings, embedder, skimage_catalog)
    assert (report.scanned, report.embedded, report.indexed, report.problems) == (6, 6, 6, [])
    assert report.compaction is not None  # the first run builds the base
    base = load_base(settings.index_dir)
    assert len(base) == 6 and base.manifest["model"] == "mobilenet_v1" and base.manifest["dim"] == 1024
    with session(settings) as s:
        rows = s.execute(select(ProductImage.id, ProductImage.embedding)).all()
        assert s.scalar(select(Product.category).where(Product.sku == "animals/chelsea")) == "animals"
    for row_id, blob in rows:  # base ids are the image row ids, holding the same vectors
        row = base.rows_of(np.array([row_id]))[0]
        np.testing.assert_array_equal(base.vectors[row], np.frombuffer(blob, np.float32))
    # rows are grouped by category, so a category filter scans one block
    assert list(base.category_codes) == sorted(base.category_codes)


def test_second_run_on_an_unchanged_catalog_embeds_nothing_and_builds_nothing(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    first_version = read_manifest(settings.index_dir)["version"]
    report = run(settings, embedder, skimage_catalog)
    assert (report.embedded, report.unchanged, report.removed, report.indexed) == (0, 6, 0, 6)
    assert report.compaction is None and read_manifest(settings.index_dir)["version"] == first_version


def test_a_re_run_reads_only_files_whose_size_or_mtime_changed(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    photo = skimage_catalog / "drinks" / "coffee.jpg"
    stat = photo.stat()
    data = bytearray(photo.read_bytes())
    data[-3] ^= 0xFF  # other bytes, same size
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: as rsync, the file is not read
    assert run(settings, embedder, skimage_catalog).embedded == 0
    os.utime(photo)  # a new mtime: read, hashed, and the new bytes embedded
    assert run(settings, embedder, skimage_catalog).embedded == 1
    os.utime(photo)  # touched only: read and hashed again, but the same bytes are not embedded again
    report = run(settings, embedder, skimage_catalog)
    assert (report.embedded, report.unchanged) == (0, 6)


def test_added_changed_and_deleted_files_reach_the_live_index_without_a_rebuild(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    base_version = read_manifest(settings.index_dir)["version"]
    before = indexed_paths(settings)
    skimage_photo("hubble_deep_field").save(skimage_catalog / "space" / "hubble.png")
    skimage_photo("astronaut").rotate(90).save(skimage_catalog / "people" / "camera.jpg")  # new bytes, same file
    (skimage_catalog / "medical" / "retina.jpg").unlink()

    report = run(settings, embedder, skimage_catalog)

    assert (report.embedded, report.unchanged, report.removed, report.indexed) == (2, 4, 1, 6)
    assert report.compaction is None and report.pending == 3  # served from the delta
    assert read_manifest(settings.index_dir)["version"] == base_version
    after = indexed_paths(settings)
    assert "space/hubble.png" in after and "medical/retina.jpg" not in after
    assert after["people/camera.jpg"] != before["people/camera.jpg"]
    with session(settings) as s:
        live = (
            select(func.count()).select_from(Product).where(Product.id.in_(select(ProductImage.product_id).where(LIVE)))
        )
        assert s.scalar(live.where(Product.category == "medical")) == 0
        changed_id = s.scalar(select(ProductImage.id).where(ProductImage.rel_path == "people/camera.jpg"))
        retina_id = s.scalar(select(ProductImage.id).where(ProductImage.rel_path == "medical/retina.jpg"))
    index = live_index(settings, embedder)
    assert len(index) == 6 and index.delta_size == 2 and index.masked_count == 2
    rotated = embedder.embed_image(skimage_catalog / "people" / "camera.jpg")
    ids, scores = index.search(rotated, 6)
    assert ids[0] == changed_id and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert retina_id not in ids and "medical" not in index.live_categories()


def test_unreadable_files_are_reported_and_skipped_without_failing_the_run(settings, embedder, skimage_catalog):
    (skimage_catalog / "animals" / "notes.jpg").write_text("this is not a photo")
    data = (skimage_catalog / "drinks" / "coffee.jpg").read_bytes()
    (skimage_catalog / "drinks" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    report = run(settings, embedder, skimage_catalog)
    assert report.indexed == 6 and report.embedded == 6
    assert sorted(p.split(":")[0] for p in report.problems) == ["animals/notes.jpg", "drinks/truncated.jpg"]
    assert "animals/notes.jpg" not in indexed_paths(settings)


def test_a_file_that_breaks_after_indexing_leaves_the_index(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    (skimage_catalog / "people" / "astronaut.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    report = run(settings, embedder, skimage_catalog)
    assert report.removed == 1 and report.indexed == 5
    assert "people/astronaut.jpg" not in indexed_paths(settings)
    assert len(live_index(settings, embedder)) == 5


def test_metadata_changes_update_products_without_re_embedding(settings, embedder, skimage_catalog):
    csv = skimage_catalog / "products.csv"
    csv.write_text("sku,image,title,category,price\nA1,animals/chelsea.jpg,Chelsea the cat,cats,9.5\n")
    run(settings, embedder, skimage_catalog)
    csv.write_text("sku,image,title,category,price\nA1,animals/chelsea.jpg,Chelsea (new),felines,12\n")
    report = run(settings, embedder, skimage_catalog)
    assert (report.embedded, report.indexed) == (0, 1)  # only the listed row is the catalog
    product = Store.open(settings).products.by_sku("A1")
    assert (product.title, product.category, product.price) == ("Chelsea (new)", "felines", 12.0)
    # the category a filter sees moved with it
    assert live_index(settings, embedder).live_categories() == ["felines"]


def test_an_empty_catalog_publishes_an_empty_base(settings, embedder, tmp_path):
    (tmp_path / "empty").mkdir()
    report = run(settings, embedder, tmp_path / "empty")
    assert report.indexed == 0 and len(load_base(settings.index_dir)) == 0


def test_a_moved_catalog_re_points_images_without_re_embedding(settings, embedder, skimage_catalog, tmp_path):
    run(settings, embedder, skimage_catalog)
    moved = shutil.copytree(skimage_catalog, tmp_path / "moved")
    report = run(settings, embedder, moved)
    assert report.embedded == 0
    with session(settings) as s:
        paths = s.scalars(select(ProductImage.path)).all()
    assert all(p.startswith(str(moved)) for p in paths)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_configured_faiss_factory_is_used_and_its_recall_recorded(settings, embedder, skimage_catalog, factory):
    run(settings.with_overrides(index_factory=factory), embedder, skimage_catalog)
    manifest = read_manifest(settings.index_dir)
    assert manifest["factory"] == factory and manifest["tuning"]["recall_at_10"] >= 0.95
    assert len(load_base(settings.index_dir)) == 6


def test_removed_images_stay_resolvable_until_a_compaction_purges_them(settings, embedder, skimage_catalog):
    from indexer.index.compaction import compact

    run(settings, embedder, skimage_catalog)
    old_base = load_base(settings.index_dir)
    (skimage_catalog / "space" / "rocket.jpg").rename(skimage_catalog.parent / "rocket.jpg")
    run(settings, embedder, skimage_catalog)
    with session(settings) as s:  # every id of the base still has its row
        assert len(s.scalars(select(ProductImage.id).where(ProductImage.id.in_(old_base.ids.tolist()))).all()) == 6
        rocket = s.scalar(select(ProductImage).where(ProductImage.rel_path == "space/rocket.jpg"))
        assert rocket.deleted_at is not None
    (skimage_catalog.parent / "rocket.jpg").rename(skimage_catalog / "space" / "rocket.jpg")
    report = run(settings, embedder, skimage_catalog)  # the file is back: same row, same id
    assert report.embedded == 1 and report.indexed == 6
    with session(settings) as s:
        revived = s.scalar(select(ProductImage).where(ProductImage.rel_path == "space/rocket.jpg"))
        assert revived.id == rocket.id and revived.deleted_at is None
    (skimage_catalog / "space" / "rocket.jpg").unlink()
    run(settings, embedder, skimage_catalog)
    store = Store.open(settings)

    def built_through() -> int:
        return read_manifest(settings.index_dir)["built_through"]

    assert store.vectors.purge_tombstones(built_through(), timedelta(seconds=0)) == 0  # the base still holds it
    compact(settings, store, embedder)
    assert store.vectors.purge_tombstones(built_through(), timedelta(seconds=0)) == 1
    assert store.products.by_sku("space/rocket") is None


def test_indexing_another_folder_adds_its_products_and_removes_none(settings, embedder, skimage_catalog, tmp_path):
    run(settings, embedder, skimage_catalog)
    new_photos = tmp_path / "new-photos" / "space"
    new_photos.mkdir(parents=True)
    skimage_photo("hubble_deep_field").save(new_photos / "hubble.png")
    skimage_photo("coffee").rotate(90).save(new_photos / "cup.jpg")
    report = run(settings, embedder, tmp_path / "new-photos")
    assert (report.embedded, report.removed, report.indexed) == (2, 0, 8)
    assert len(live_index(settings, embedder)) == 8


def test_add_only_never_removes_and_a_later_full_run_does(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    (skimage_catalog / "medical" / "retina.jpg").unlink()
    report = index_catalog(settings, embedder, skimage_catalog, progress=False, add_only=True)
    assert (report.removed, report.indexed) == (0, 6)
    assert run(settings, embedder, skimage_catalog).removed == 1


def test_a_run_that_would_remove_over_a_fifth_of_its_folder_stops_until_pruned(settings, embedder, skimage_catalog):
    from indexer.jobs.indexing import PruneNeeded

    run(settings, embedder, skimage_catalog)
    (skimage_catalog / "people" / "astronaut.jpg").unlink()
    (skimage_catalog / "people" / "camera.jpg").unlink()  # 2 of 6: a mistyped path or a half-copied folder
    with pytest.raises(PruneNeeded, match=r"(?s)remove 2 of the 6 images.*people/astronaut.jpg.*--prune"):
        run(settings, embedder, skimage_catalog)
    assert len(live_index(settings, embedder)) == 6  # nothing was removed
    report = index_catalog(settings, embedder, skimage_catalog, progress=False, prune=True)
    assert (report.removed, report.indexed) == (2, 4)
    assert "people/astronaut.jpg" not in indexed_paths(settings)
