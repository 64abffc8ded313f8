"""Catalog views (index.catalog_views): extra vectors of each catalog photo, its mirror image and its centre,
that resolve to the photo's product, follow it through re-runs, removals and API writes, and never show twice."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from sqlalchemy import func, select

from indexer.config import ConfigError, load_settings
from indexer.embedding.images import Box, load_pixels, load_views
from indexer.jobs.indexing import index_catalog
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store
from service import create_app
from tests.conftest import SKIMAGE_CATALOG, both_databases, skimage_photo, write_skimage_catalog

VIEWS = ("flip", "crop")
PHOTOS = sum(len(names) for names in SKIMAGE_CATALOG.values())
KEY = "views-test-key"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def live_views(settings) -> dict[str, int]:
    """view ("" for the photos) -> live rows of it."""
    with Store.open(settings).engine.connect() as connection:
        rows = connection.execute(select(ProductImage.view, func.count()).where(LIVE).group_by(ProductImage.view))
        return dict(rows.all())


def test_the_views_are_the_photo_mirrored_and_its_centre_region(skimage_catalog):
    photo = skimage_catalog / "drinks" / "coffee.jpg"
    pixels = load_views(photo, 224, VIEWS)
    assert pixels.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(pixels[0], load_pixels(photo, 224))  # the photo exactly as queries see it
    np.testing.assert_array_equal(pixels[1], pixels[0][:, ::-1])
    np.testing.assert_array_equal(pixels[2], load_pixels(photo, 224, Box(0.1, 0.1, 0.9, 0.9)))
    np.testing.assert_array_equal(load_views(photo, 224)[0], pixels[0])


def test_a_photo_too_small_for_a_centre_region_stands_in_for_it():
    tiny = png(Image.new("RGB", (12, 12), (200, 30, 30)))
    pixels = load_views(tiny, 32, ("crop",))
    np.testing.assert_array_equal(pixels[1], pixels[0])


def test_the_setting_is_read_in_one_order_and_an_unknown_view_is_refused(monkeypatch):
    monkeypatch.setenv("CATALOG_VIEWS", "crop, flip,crop")
    assert load_settings().catalog_views == ("flip", "crop")
    monkeypatch.setenv("CATALOG_VIEWS", "none")
    assert load_settings().catalog_views == ()
    monkeypatch.setenv("CATALOG_VIEWS", "mirror")
    with pytest.raises(ConfigError, match="unknown view 'mirror'; choose from flip, crop"):
        load_settings()


@pytest.fixture
def indexed(settings, embedder, tmp_path):
    """The scikit-image catalog indexed with both views, and a write API over it."""
    settings = settings.with_overrides(catalog_views=VIEWS, api_key=KEY)
    catalog = write_skimage_catalog(tmp_path / "catalog")
    report = index_catalog(settings, embedder, catalog, progress=False)
    return settings, catalog, report


@both_databases
def test_each_photo_is_indexed_with_its_views_and_a_second_run_embeds_nothing(indexed, embedder):
    settings, catalog, report = indexed
    assert (report.embedded, report.indexed, report.products) == (PHOTOS, PHOTOS, PHOTOS)  # photos, not vectors
    assert live_views(settings) == {"": PHOTOS, "flip": PHOTOS, "crop": PHOTOS}
    again = index_catalog(settings, embedder, catalog, progress=False)
    assert (again.embedded, again.unchanged) == (0, PHOTOS)


@both_databases
def test_a_product_with_views_appears_once_in_results_and_its_mirror_image_finds_it(indexed, embedder):
    settings, catalog, _ = indexed
    client = create_app(settings, embedder).test_client()
    mirrored = ImageOps.mirror(Image.open(catalog / "drinks" / "coffee.jpg").convert("RGB"))
    response = client.post("/api/search?k=10", data=png(mirrored), content_type="image/png")
    results = response.json["results"]
    skus = [result["sku"] for result in results]
    assert len(skus) == len(set(skus)) == PHOTOS  # every product once, though each has three vectors
    assert skus[0] == "drinks/coffee"
    # The mirror image meets the photo's flip view: nearly the same vector, closer than to the photo's own.
    own = embedder.embed_image(catalog / "drinks" / "coffee.jpg") @ embedder.embed_image(png(mirrored))
    assert results[0]["score"] > 0.999 and results[0]["score"] > own + 0.01
    similar = client.get("/api/products/drinks/coffee/similar?k=10").json["results"]
    assert "drinks/coffee" not in [r["sku"] for r in similar] and len(similar) == PHOTOS - 1


@both_databases
def test_changing_the_views_re_embeds_the_photos_and_drops_the_views_no_longer_configured(indexed, embedder):
    settings, catalog, _ = indexed
    with Store.open(settings).engine.connect() as connection:
        photo_ids = set(connection.scalars(select(ProductImage.id).where(LIVE, ProductImage.view == "")))
    fewer = index_catalog(settings.with_overrides(catalog_views=("flip",)), embedder, catalog, progress=False)
    assert fewer.embedded == PHOTOS and fewer.removed == 0
    assert live_views(settings) == {"": PHOTOS, "flip": PHOTOS}
    index_catalog(settings.with_overrides(catalog_views=()), embedder, catalog, progress=False)
    assert live_views(settings) == {"": PHOTOS}
    with Store.open(settings).engine.connect() as connection:
        assert set(connection.scalars(select(ProductImage.id).where(LIVE))) == photo_ids  # the same rows, re-used


@both_databases
def test_a_photo_that_leaves_the_catalog_takes_its_views_with_it(indexed, embedder):
    settings, catalog, _ = indexed
    (catalog / "space" / "rocket.jpg").unlink()
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert report.removed == 1 and report.indexed == PHOTOS - 1
    assert live_views(settings) == {"": PHOTOS - 1, "flip": PHOTOS - 1, "crop": PHOTOS - 1}


@both_databases
def test_the_write_api_stores_a_photos_views_and_replacing_or_deleting_the_product_takes_them(indexed, embedder):
    settings, _, _ = indexed
    client = create_app(settings, embedder).test_client()
    auth = {"Authorization": f"Bearer {KEY}"}

    def product_rows() -> dict[str, int]:
        with Store.open(settings).engine.connect() as connection:
            query = select(ProductImage.view, ProductImage.sha256).join(Product).where(Product.sku == "cam-1", LIVE)
            return dict(connection.execute(query).all())

    for name in ("camera", "astronaut"):
        photo = png(skimage_photo(name))
        response = client.put("/api/products/cam-1", data={"image": (io.BytesIO(photo), "p.png")}, headers=auth)
        assert response.status_code in (200, 201)
        rows = product_rows()
        assert set(rows) == {"", "flip", "crop"} and len(set(rows.values())) == 1  # one photo's three vectors
    found = client.post(
        "/api/search?k=3", data=png(ImageOps.mirror(skimage_photo("astronaut"))), content_type="image/png"
    )
    # Its mirror view matches as closely as the catalog's own astronaut's does (the query is searched as kept: a
    # re-encoded JPEG, so which of the two near-identical photos comes first is down to rounding).
    scores = {result["sku"]: result["score"] for result in found.json["results"][:2]}
    assert set(scores) == {"cam-1", "people/astronaut"} and min(scores.values()) > 0.99, scores
    assert client.delete("/api/products/cam-1", headers=auth).status_code == 200
    assert product_rows() == {}
