"""The storefront write API: keyed, immediate, durable, serialised, and kept by `make index`; on SQLite and
PostgreSQL."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer.index.segments import load_base, read_manifest
from indexer.jobs.indexing import index_catalog
from indexer.storage.schema import ProductImage
from indexer.storage.store import Store
from service import create_app
from tests.conftest import both_databases, skimage_jpeg, subprocess_config, write_skimage_catalog

pytestmark = both_databases

KEY = "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def setup(base_settings, embedder, tmp_path, database_url):
    settings = base_settings.with_overrides(data_dir=tmp_path / "data", api_key=KEY, database_url=database_url)
    catalog = write_skimage_catalog(tmp_path / "catalog")
    index_catalog(settings, embedder, catalog, progress=False)
    return settings, catalog, create_app(settings, embedder).test_client()


def put(client, sku: str, photo: bytes, headers=AUTH, **fields):
    data = {"image": (io.BytesIO(photo), "p.jpg"), **fields}
    return client.put(f"/api/products/{sku}", data=data, headers=headers, content_type="multipart/form-data")


def search(client, photo: bytes, k: int = 3) -> list[str]:
    response = client.post("/api/search", data={"image": (io.BytesIO(photo), "q.jpg"), "k": str(k)},
                           content_type="multipart/form-data")  # fmt: skip
    return [r["sku"] for r in response.json["results"]]


def test_writes_are_off_without_a_key(settings, embedder):
    client = create_app(settings.with_overrides(api_key=""), embedder).test_client()
    response = put(client, "x", skimage_jpeg("coffee"))
    assert response.status_code == 403 and "api_key" in response.json["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY + "x"}])
def test_a_missing_or_wrong_key_is_refused(setup, headers):
    _, _, client = setup
    assert put(client, "x", skimage_jpeg("coffee"), headers=headers).status_code == 401
    assert client.delete("/api/products/drinks/coffee", headers=headers).status_code == 401
    assert client.get("/api/products/drinks/coffee").status_code == 200  # nothing changed


def test_a_new_product_is_searchable_at_once_and_after_a_restart(setup, embedder):
    settings, _, client = setup
    base_version = read_manifest(settings.index_dir)["version"]
    photo = skimage_jpeg("coffee", angle=180)
    response = put(client, "mug-9", photo, title="Upside-down espresso", category="drinks", price="2.5", colour="white")
    assert response.status_code == 201 and response.json["created"] and response.json["items"] == 7
    assert search(client, photo)[0] == "mug-9"
    details = client.get("/api/products/mug-9").json
    assert (details["title"], details["price"], details["attributes"]) == (
        "Upside-down espresso",
        2.5,
        {"colour": "white"},
    )
    assert client.get("/images/mug-9").data == photo

    restarted = create_app(settings, embedder).test_client()
    assert search(restarted, photo)[0] == "mug-9"
    # nothing was rebuilt: the write lives in the delta until a compaction folds it in
    assert read_manifest(settings.index_dir)["version"] == base_version
    assert restarted.get("/readyz").json["delta"] == 1


def test_a_write_through_another_server_process_is_found_by_the_next_search(setup, embedder):
    """Another process's write (here another app, with its own connections) reaches a server that has already
    searched, and so holds the store's change marker from before it, on its very next search; and so does a
    deletion after that."""
    settings, _, client = setup
    other = create_app(settings, embedder).test_client()
    photo = skimage_jpeg("coffee", angle=180)
    before = search(client, photo)
    assert "mug-9" not in before
    assert put(other, "mug-9", photo, title="Upside-down espresso").status_code == 201
    assert search(client, photo)[0] == "mug-9"
    assert other.delete("/api/products/mug-9", headers=AUTH).status_code == 200
    assert search(client, photo) == before


def test_replacing_a_product_swaps_its_photo_and_metadata(setup):
    _, _, client = setup
    put(client, "thing", skimage_jpeg("coffee"), title="Cup")
    response = put(client, "thing", skimage_jpeg("rocket"), title="Rocket")
    assert response.status_code == 200 and not response.json["created"] and response.json["items"] == 7
    assert search(client, skimage_jpeg("rocket"), k=2)[:2].count("thing") == 1
    assert client.get("/api/products/thing").json["title"] == "Rocket"


def test_a_new_title_for_the_same_photo_shows_in_results_at_once(setup):
    # Same photo, so the same vector: only the metadata, which searches cache per version, changes.
    _, _, client = setup

    def shown() -> tuple[str, float | None]:
        photo = io.BytesIO(skimage_jpeg("rocket"))
        response = client.post("/api/search", data={"image": (photo, "q.jpg")}, content_type="multipart/form-data")
        result = next(r for r in response.json["results"] if r["sku"] == "thing")
        return result["title"], result["price"]

    put(client, "thing", skimage_jpeg("rocket"), title="Rocket")
    assert shown() == ("Rocket", None)
    assert put(client, "thing", skimage_jpeg("rocket"), title="Rocket, renamed", price="12").status_code == 200
    assert shown() == ("Rocket, renamed", 12.0)


def test_a_deleted_product_never_appears_again(setup):
    settings, _, client = setup
    before = load_base(settings.index_dir)
    response = client.delete("/api/products/drinks/coffee", headers=AUTH)
    assert response.status_code == 200 and response.json["items"] == 5
    assert "drinks/coffee" not in search(client, skimage_jpeg("coffee"), k=5)
    assert client.get("/api/products/drinks/coffee").status_code == 404
    assert client.delete("/api/products/drinks/coffee", headers=AUTH).status_code == 404
    # A request still holding the state from before the delete can resolve every id it finds.
    with Session(Store.open(settings).engine) as session:
        ids = before.ids.tolist()
        assert len(session.scalars(select(ProductImage.id).where(ProductImage.id.in_(ids))).all()) == len(ids)


@pytest.mark.parametrize(
    ("photo", "fields"),
    [(b"not an image", {}), (None, {"price": "cheap"}), (None, {"title": "nul\x00"}), (None, {"colour\x00": "red"})],
)
def test_bad_writes_are_400s_and_change_nothing(setup, photo, fields):
    _, _, client = setup
    response = put(client, "bad", photo if photo is not None else skimage_jpeg("coffee"), **fields)
    assert response.status_code == 400
    assert client.get("/api/products/bad").status_code == 404
    assert client.get("/readyz").json["items"] == 6


def test_concurrent_writers_are_serialised(setup):
    _, _, client = setup
    names = ["coffee", "rocket", "astronaut"] * 4
    photos = {f"sku-{i}": skimage_jpeg(name, angle=i * 7) for i, name in enumerate(names)}
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda item: put(client, item[0], item[1]).status_code, photos.items()))
    assert statuses == [201] * len(photos)
    assert client.get("/readyz").json["items"] == 6 + len(photos)
    for sku in photos:
        assert client.get(f"/api/products/{sku}").status_code == 200


def test_make_index_keeps_products_written_through_the_api(setup, embedder):
    settings, catalog, client = setup
    put(client, "api-only", skimage_jpeg("astronaut", angle=90))
    (catalog / "space" / "rocket.jpg").unlink()
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert report.removed == 1 and report.indexed == 6  # 5 catalog photos + the API's
    assert client.get("/api/products/api-only").status_code == 200
    assert client.get("/api/products/space/rocket").status_code == 404


def test_a_server_whose_delta_passes_the_threshold_starts_a_compaction(settings, embedder, tmp_path, monkeypatch):
    settings = settings.with_overrides(api_key=KEY, compact_after=3)  # the compaction process gets its database
    index_catalog(settings, embedder, write_skimage_catalog(tmp_path / "catalog"), progress=False)
    monkeypatch.setenv("SEARCH_CONFIG", str(subprocess_config(tmp_path)))  # what the compaction process reads
    client = create_app(settings, embedder).test_client()
    first_base = read_manifest(settings.index_dir)["version"]
    photos = {f"w-{i}": skimage_jpeg("rocket", angle=20 * i + 5) for i in range(3)}
    for sku, photo in photos.items():
        assert put(client, sku, photo).status_code == 201
    deadline = time.monotonic() + 120
    while read_manifest(settings.index_dir)["version"] == first_base:  # a separate process builds it
        assert time.monotonic() < deadline, (settings.data_dir / "compaction.log").read_text()[-2000:]
        time.sleep(0.1)
    status = client.get("/readyz").json
    assert status["items"] == 9 and status["delta"] == 0 and status["base"]["items"] == 9
    for sku, photo in photos.items():
        assert sku in search(client, photo)
