"""The indexing job: incremental runs, unreadable files, and the published index."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from sqlalchemy import func, select

from indexer.indexing import index_catalog
from indexer.schema import LIVE, Product, ProductImage, live_product_ids, open_database
from indexer.vectors import load_index, read_manifest
from tests.conftest import skimage_photo


def run(settings, embedder, catalog, metadata=None):
    return index_catalog(settings, embedder, catalog, metadata, progress=False)


def indexed_paths(settings) -> dict[str, str]:
    with open_database(settings)() as session:
        return dict(session.execute(select(ProductImage.rel_path, ProductImage.sha256).where(LIVE)).all())


def test_first_run_embeds_every_image_and_publishes_them(settings, embedder, skimage_catalog):
    report = run(settings, embedder, skimage_catalog)
    assert (report.scanned, report.embedded, report.indexed, report.problems) == (6, 6, 6, [])
    version = load_index(settings.index_dir)
    assert version.index.ntotal == 6
    assert version.manifest["model"] == "mobilenet_v1" and version.manifest["dim"] == 1024
    with open_database(settings)() as session:
        rows = session.execute(select(ProductImage.id, ProductImage.embedding)).all()
        assert session.scalar(select(Product.category).where(Product.sku == "animals/chelsea")) == "animals"
    for row_id, blob in rows:  # FAISS ids are the SQLite row ids, holding the same vectors
        np.testing.assert_array_equal(version.index.reconstruct(row_id), np.frombuffer(blob, np.float32))


def test_second_run_on_an_unchanged_catalog_embeds_nothing(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    first_version = read_manifest(settings.index_dir)["version"]
    report = run(settings, embedder, skimage_catalog)
    assert (report.embedded, report.unchanged, report.removed, report.indexed) == (0, 6, 0, 6)
    assert read_manifest(settings.index_dir)["version"] == first_version  # nothing to republish


def test_added_changed_and_deleted_files_are_all_reflected(settings, embedder, skimage_catalog):
    run(settings, embedder, skimage_catalog)
    before = indexed_paths(settings)
    skimage_photo("hubble_deep_field").save(skimage_catalog / "space" / "hubble.png")
    skimage_photo("astronaut").rotate(90).save(skimage_catalog / "people" / "camera.jpg")  # new bytes, same file
    (skimage_catalog / "medical" / "retina.jpg").unlink()

    report = run(settings, embedder, skimage_catalog)

    assert (report.embedded, report.unchanged, report.removed, report.indexed) == (2, 4, 1, 6)
    after = indexed_paths(settings)
    assert "space/hubble.png" in after and "medical/retina.jpg" not in after
    assert after["people/camera.jpg"] != before["people/camera.jpg"]
    with open_database(settings)() as session:
        live = select(func.count()).select_from(Product).where(Product.id.in_(live_product_ids()))
        assert session.scalar(live.where(Product.category == "medical")) == 0
        changed_id = session.scalar(select(ProductImage.id).where(ProductImage.rel_path == "people/camera.jpg"))
    rotated = embedder.embed_image(skimage_catalog / "people" / "camera.jpg")
    np.testing.assert_allclose(load_index(settings.index_dir).index.reconstruct(changed_id), rotated, atol=1e-6)


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


def test_metadata_changes_update_products_without_re_embedding(settings, embedder, skimage_catalog):
    csv = skimage_catalog / "products.csv"
    csv.write_text("sku,image,title,category,price\nA1,animals/chelsea.jpg,Chelsea the cat,cats,9.5\n")
    run(settings, embedder, skimage_catalog)
    csv.write_text("sku,image,title,category,price\nA1,animals/chelsea.jpg,Chelsea (new),felines,12\n")
    report = run(settings, embedder, skimage_catalog)
    assert (report.embedded, report.indexed) == (0, 1)  # only the listed row is the catalog
    with open_database(settings)() as session:
        product = session.scalar(select(Product).where(Product.sku == "A1"))
    assert (product.title, product.category, product.price) == ("Chelsea (new)", "felines", 12.0)


def test_an_empty_catalog_publishes_an_empty_index(settings, embedder, tmp_path):
    (tmp_path / "empty").mkdir()
    report = run(settings, embedder, tmp_path / "empty")
    assert report.indexed == 0 and load_index(settings.index_dir).index.ntotal == 0


def test_a_moved_catalog_re_points_images_without_re_embedding(settings, embedder, skimage_catalog, tmp_path):
    run(settings, embedder, skimage_catalog)
    moved = shutil.copytree(skimage_catalog, tmp_path / "moved")
    report = run(settings, embedder, moved)
    assert report.embedded == 0
    with open_database(settings)() as session:
        paths = session.scalars(select(ProductImage.path)).all()
    assert all(p.startswith(str(moved)) for p in paths)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_configured_faiss_factory_is_used(settings, embedder, skimage_catalog, factory):
    run(settings.with_overrides(index_factory=factory), embedder, skimage_catalog)
    assert read_manifest(settings.index_dir)["factory"] == factory
    assert load_index(settings.index_dir).index.ntotal == 6


def test_removed_images_stay_resolvable_for_older_index_versions_until_purged(settings, embedder, skimage_catalog):
    from datetime import timedelta

    from indexer.indexing import purge_tombstones

    run(settings, embedder, skimage_catalog)
    old_version = load_index(settings.index_dir)
    (skimage_catalog / "space" / "rocket.jpg").rename(skimage_catalog.parent / "rocket.jpg")
    run(settings, embedder, skimage_catalog)
    sessions = open_database(settings)
    with sessions() as session:  # every id of the version published before still has its row
        ids = [int(i) for i in faiss_ids(old_version.index)]
        assert len(session.scalars(select(ProductImage.id).where(ProductImage.id.in_(ids))).all()) == 6
        rocket = session.scalar(select(ProductImage).where(ProductImage.rel_path == "space/rocket.jpg"))
        assert rocket.deleted_at is not None
    (skimage_catalog.parent / "rocket.jpg").rename(skimage_catalog / "space" / "rocket.jpg")
    report = run(settings, embedder, skimage_catalog)  # the file is back: same row, same id
    assert report.embedded == 1 and report.indexed == 6
    with sessions() as session:
        revived = session.scalar(select(ProductImage).where(ProductImage.rel_path == "space/rocket.jpg"))
        assert revived.id == rocket.id and revived.deleted_at is None
    (skimage_catalog / "space" / "rocket.jpg").unlink()
    run(settings, embedder, skimage_catalog)
    with sessions.begin() as session:
        assert purge_tombstones(session, timedelta(seconds=0)) == 1
        assert session.scalar(select(Product).where(Product.sku == "space/rocket")) is None


def faiss_ids(index) -> np.ndarray:
    import faiss

    return faiss.vector_to_array(index.id_map)
