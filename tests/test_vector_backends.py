"""The vector store chosen by configuration: the same search, filter, write, delete and restart tests against FAISS
(base segments plus each server's delta) and Milvus (Milvus Lite, a file in the test's folder), through the real
model, the real service and a real database."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from indexer.config import REPO_ROOT, ConfigError, load_settings
from indexer.jobs.importing import import_vectors
from indexer.jobs.indexing import index_catalog
from indexer.storage.locks import write_lock
from indexer.storage.schema import API, ProductImage
from indexer.storage.store import Store
from indexer.storage.vectors import ImageVector
from service import create_app
from tests.conftest import both_databases, skimage_photo, subprocess_config, write_skimage_catalog
from tests.support.server import running_server

KEY = "vector-backends-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BACKENDS = ["faiss", "milvus"]
PRODUCTS_CSV = """sku,image,title,category,price,url
cat-1,animals/chelsea.jpg,Chelsea the cat,animals,9.99,
cam-1,people/camera.jpg,Cameraman,people,8.50,
mug-1,drinks/coffee.jpg,Espresso cup,drinks,3.20,
suit-1,people/astronaut.jpg,Astronaut portrait,people,,
rocket-1,space/rocket.jpg,Rocket launch,space,1000000,
eye-1,medical/retina.jpg,Retina scan,medical,12,
"""
PHOTOS = {
    "cat-1": "chelsea",
    "cam-1": "camera",
    "mug-1": "coffee",
    "suit-1": "astronaut",
    "rocket-1": "rocket",
    "eye-1": "retina",
}


def backend_settings(base_settings, folder: Path, backend: str, **changes):
    return base_settings.with_overrides(
        data_dir=folder / "data",
        api_key=KEY,
        index_backend=backend,
        milvus_uri=str(folder / "milvus" / "vectors.db") if backend == "milvus" else "",
        **changes,
    )


def restart(settings) -> None:
    """What a server's restart drops: for Milvus Lite, this process's client and embedded server (the data stays
    in the file, and the next client opens it again)."""
    if settings.index_backend == "milvus":
        from indexer.index.milvus_store import close

        close(settings)


@pytest.fixture(params=BACKENDS)
def shop(request, base_settings, embedder, tmp_path, database_url):
    """The six-product catalog, with prices, indexed with the parametrised backend; (settings, catalog, client)."""
    settings = backend_settings(base_settings, tmp_path, request.param, database_url=database_url)
    catalog = write_skimage_catalog(tmp_path / "catalog")
    (catalog / "products.csv").write_text(PRODUCTS_CSV)
    index_catalog(settings, embedder, catalog, progress=False)
    yield settings, catalog, create_app(settings, embedder).test_client()
    restart(settings)


def jpeg(name: str, angle: int = 0) -> bytes:
    buffer = io.BytesIO()
    skimage_photo(name).rotate(angle).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def search(client, photo: bytes, k: int = 6, **filters) -> list[str]:
    data = {"image": (io.BytesIO(photo), "q.jpg"), "k": str(k), **{n: str(v) for n, v in filters.items()}}
    response = client.post("/api/search", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.json
    return [r["sku"] for r in response.json["results"]]


def similar(client, sku: str, k: int = 6, **filters) -> list[str]:
    response = client.get(f"/api/products/{sku}/similar", query_string={"k": k, **filters})
    assert response.status_code == 200, response.json
    return [r["sku"] for r in response.json["results"]]


def put(client, sku: str, photo: bytes, **fields):
    data = {"image": (io.BytesIO(photo), "p.jpg"), **fields}
    return client.put(f"/api/products/{sku}", data=data, headers=AUTH, content_type="multipart/form-data")


def test_each_photo_finds_its_own_product_first_and_similar_leaves_it_out(shop):
    settings, _, client = shop
    ready = client.get("/readyz").json
    assert ready["ready"] and ready["items"] == 6
    for sku, photo in PHOTOS.items():
        assert search(client, jpeg(photo))[0] == sku
        found = similar(client, sku)
        assert sku not in found and sorted(found) == sorted(set(PHOTOS) - {sku})
    assert client.get("/api/categories").json["categories"] == ["animals", "drinks", "medical", "people", "space"]
    if settings.index_backend == "milvus":
        assert not (settings.index_dir / "manifest.json").exists()  # no FAISS base: the vectors are in Milvus
        assert ready["factory"].startswith("Milvus FLAT")
    else:
        assert (settings.index_dir / "manifest.json").exists()


def test_category_and_price_filters(shop):
    _, _, client = shop
    query = jpeg("astronaut")
    assert search(client, query, category="people") == ["suit-1", "cam-1"]
    assert similar(client, "suit-1", category="people") == ["cam-1"]
    # A product without a price is in no price range; bounds include their ends, as float32 prices compare.
    assert sorted(search(client, query, min_price=3.2, max_price=9.99)) == ["cam-1", "cat-1", "mug-1"]
    assert sorted(search(client, query, min_price=9.99)) == ["cat-1", "eye-1", "rocket-1"]
    assert sorted(search(client, query, max_price=8.5)) == ["cam-1", "mug-1"]

    assert search(client, query, category="people", max_price=100) == ["cam-1"]
    assert search(client, query, min_price=1e300) == []  # beyond float32: no price reaches it
    assert sorted(search(client, query, max_price=1e300)) == ["cam-1", "cat-1", "eye-1", "mug-1", "rocket-1"]
    assert search(client, query, category="space", max_price=10) == []
    unknown = client.post("/api/search", data={"image": (io.BytesIO(query), "q.jpg"), "category": "boats"},
                          content_type="multipart/form-data")  # fmt: skip
    assert unknown.status_code == 400


def test_attribute_filters_on_faiss_and_a_clear_400_on_milvus(shop):
    settings, _, client = shop
    assert put(client, "grey-1", jpeg("camera", 90), title="Grey", colour="grey").status_code == 201
    answer = client.get("/api/products/suit-1/similar", query_string={"k": 6, "attr.colour": "GREY"})
    if settings.index_backend == "milvus":
        assert answer.status_code == 400 and "need the FAISS index" in answer.json["message"]
    else:
        assert answer.status_code == 200 and [r["sku"] for r in answer.json["results"]] == ["grey-1"]


def test_writes_and_deletes_are_searchable_at_once_and_after_a_restart(shop, embedder):
    settings, catalog, client = shop
    upside_down = jpeg("coffee", angle=180)
    created = put(client, "mug-9", upside_down, title="Upside-down espresso", category="kitchen", price="2.5")
    assert created.status_code == 201 and created.json["items"] == 7
    assert search(client, upside_down, k=1) == ["mug-9"]
    assert search(client, upside_down, category="kitchen") == ["mug-9"]
    assert search(client, upside_down, max_price=3) == ["mug-9"]
    assert "kitchen" in client.get("/api/categories").json["categories"]

    # a new price and category for the same photo: the filters follow at once
    assert put(client, "mug-9", upside_down, title="Espresso", category="drinks", price="30").status_code == 200
    assert search(client, upside_down, max_price=3) == []
    assert search(client, upside_down, category="drinks") == ["mug-9", "mug-1"]
    assert "kitchen" not in client.get("/api/categories").json["categories"]

    # replacing the photo replaces the vector: the old one is gone from every search
    replaced = put(client, "cat-1", jpeg("rocket", angle=90), title="Not a cat any more", category="space")
    assert replaced.status_code == 200
    assert "cat-1" not in search(client, jpeg("chelsea"), k=2)
    assert client.get("/api/categories").json["categories"] == ["drinks", "medical", "people", "space"]

    deleted = client.delete("/api/products/rocket-1", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json["items"] == 6
    assert "rocket-1" not in search(client, jpeg("rocket"))
    assert client.get("/api/products/rocket-1/similar").status_code == 404

    before = {sku: similar(client, sku) for sku in ("mug-9", "cat-1", "cam-1")}
    restart(settings)
    again = create_app(settings, embedder).test_client()
    assert again.get("/readyz").json["items"] == 6
    assert {sku: similar(again, sku) for sku in before} == before
    assert "rocket-1" not in search(again, jpeg("rocket"))
    assert search(again, upside_down, category="drinks") == ["mug-9", "mug-1"]

    # `make index` again keeps what the API wrote (products belong to their folder)
    index_catalog(settings, embedder, catalog, progress=False)
    assert search(again, upside_down, k=1) == ["mug-9"]
    assert again.get("/readyz").json["items"] == Store.open(settings).products.counts()[0]


@both_databases
def test_a_write_through_one_server_is_seen_by_another(shop, embedder):
    settings, _, first = shop
    second = create_app(settings, embedder).test_client()
    assert second.get("/readyz").json["items"] == 6
    photo = jpeg("retina", angle=90)
    assert put(first, "eye-2", photo, category="medical", price="1").status_code == 201
    assert search(second, photo, k=1, max_price=1) == ["eye-2"]
    assert first.delete("/api/products/eye-2", headers=AUTH).status_code == 200
    assert "eye-2" not in search(second, photo)


def test_a_change_committed_without_the_vector_store_is_applied_by_the_next_search(shop, embedder):
    """A writer that died between its commit and updating Milvus (or any writer that only wrote the database):
    the next server that sees the new change number brings the vector store up to date."""
    settings, _, client = shop
    store = Store.open(settings)
    vector = embedder.embed_image(jpeg("camera", angle=180))
    with write_lock(settings.data_dir, store):
        from indexer.records import ProductFields

        product = ProductFields("cam-2", "Upside-down cameraman", "people", 1.0, None)
        image = ImageVector(rel_path="api/direct/cam-2", path="", sha256="direct", vector=vector)
        store.products.put(product, image, embedder.identity.key, source=API)
    assert search(client, jpeg("camera", angle=180), k=1, category="people", max_price=1) == ["cam-2"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_imported_vectors_are_searched_exactly_with_their_filters(backend, base_settings, embedder, tmp_path):
    """import-vectors into either store; /similar gives the exact nearest products that pass the filters."""
    rng = np.random.default_rng(7)
    count, dim = 300, embedder.identity.dim
    centres = rng.normal(size=(4, dim))
    vectors = (centres[np.arange(count) % 4] + 0.8 * rng.normal(size=(count, dim))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    categories = np.arange(count) % 3
    prices = np.round(rng.uniform(1, 100, count), 2)
    np.save(tmp_path / "vectors.npy", vectors)
    lines = ["sku,title,category,price,url,image"]
    lines += [f"p{i},Product {i},c{categories[i]},{'' if i % 10 == 0 else prices[i]},," for i in range(count)]
    (tmp_path / "products.csv").write_text("\n".join(lines) + "\n")
    settings = backend_settings(base_settings, tmp_path, backend)
    import_vectors(settings, embedder, tmp_path / "vectors.npy", tmp_path / "products.csv", progress=False)
    client = create_app(settings, embedder).test_client()
    has_price = np.arange(count) % 10 != 0
    for query in (0, 1, 2, 55):
        for filters, passes in (
            ({}, np.ones(count, bool)),
            ({"category": "c1"}, categories == 1),
            ({"min_price": 20, "max_price": 60}, has_price & (prices >= 20) & (prices <= 60)),
            ({"category": "c2", "min_price": 50}, has_price & (categories == 2) & (prices >= 50)),
        ):
            scores = np.where(passes, vectors @ vectors[query], -np.inf)
            scores[query] = -np.inf
            expected = [f"p{i}" for i in np.argsort(-scores, kind="stable")[:10] if np.isfinite(scores[i])]
            assert similar(client, f"p{query}", k=10, **filters) == expected, (query, filters)
    restart(settings)


@pytest.mark.parametrize("shop", ["milvus"], indirect=True)  # with FAISS, a compaction purges them
def test_milvus_purges_old_tombstones_it_has_applied(shop, embedder, monkeypatch):
    settings, _, client = shop
    from indexer.index import compaction
    from indexer.index.milvus_store import sync_locked

    assert client.delete("/api/products/rocket-1", headers=AUTH).status_code == 200
    store = Store.open(settings)
    with Session(store.engine) as session:
        assert session.scalar(select(func.count()).where(ProductImage.deleted_at.is_not(None))) == 1
    monkeypatch.setattr(compaction, "PURGE_AFTER", timedelta(0))
    report = sync_locked(settings, store, embedder.identity, purge=True)
    assert report.vectors == 5
    with Session(store.engine) as session:
        assert session.scalar(select(func.count()).where(ProductImage.deleted_at.is_not(None))) == 0
    assert "rocket-1" not in search(client, jpeg("rocket"))
    restart(settings)
    assert create_app(settings, embedder).test_client().get("/readyz").json["items"] == 5


def test_both_backends_give_the_same_answers(base_settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    (catalog / "products.csv").write_text(PRODUCTS_CSV)
    answers = {}
    for backend in BACKENDS:
        settings = backend_settings(base_settings, tmp_path / backend, backend)
        index_catalog(settings, embedder, catalog, progress=False)
        client = create_app(settings, embedder).test_client()
        found = {}
        for sku in PHOTOS:
            for filters in ({}, {"category": "people"}, {"min_price": 5}, {"max_price": 10, "category": "drinks"}):
                response = client.get(f"/api/products/{sku}/similar", query_string={"k": 6, **filters})
                found[sku, tuple(filters.items())] = [(r["sku"], r["score"]) for r in response.json["results"]]
        answers[backend] = found
        restart(settings)
    assert answers["faiss"].keys() == answers["milvus"].keys()
    for key, faiss_results in answers["faiss"].items():
        milvus_results = answers["milvus"][key]
        assert [sku for sku, _ in milvus_results] == [sku for sku, _ in faiss_results], key
        assert np.allclose([s for _, s in milvus_results], [s for _, s in faiss_results], atol=1e-5), key


def test_a_milvus_server_without_a_collection_is_not_ready_and_says_why(base_settings, embedder, tmp_path):
    settings = backend_settings(base_settings, tmp_path, "milvus")
    Store.open(settings)
    ready = create_app(settings, embedder).test_client().get("/readyz")
    assert ready.status_code == 503 and "make index" in ready.json["reason"]
    restart(settings)


def test_the_backend_and_milvus_uri_come_from_config_or_environment(tmp_path, monkeypatch):
    for name in ("VECTOR_STORE", "MILVUS_URI", "DATA_DIR", "SEARCH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    config = subprocess_config(tmp_path)
    assert load_settings(config).index_backend == "faiss"  # the default
    monkeypatch.setenv("VECTOR_STORE", "milvus")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    settings = load_settings(config)
    assert (settings.index_backend, settings.milvus_target) == ("milvus", str(tmp_path / "data" / "milvus.db"))
    monkeypatch.setenv("MILVUS_URI", "http://milvus.internal:19530")
    assert load_settings(config).milvus_target == "http://milvus.internal:19530"
    monkeypatch.setenv("MILVUS_URI", "vectors.db")  # a file, relative to the config file's folder
    assert load_settings(config).milvus_target == str(tmp_path / "vectors.db")
    for name, value in (("MILVUS_URI", "milvus.internal:19530"), ("VECTOR_STORE", "qdrant")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_settings(config)
        monkeypatch.delenv(name)


@pytest.mark.slow
def test_make_index_and_the_production_server_with_milvus_from_the_environment(tmp_path):
    """`python -m indexer index` and `python -m service`, both told by VECTOR_STORE and MILVUS_URI alone."""
    catalog = write_skimage_catalog(tmp_path / "catalog")
    (catalog / "products.csv").write_text(PRODUCTS_CSV)
    env = {
        "DATA_DIR": str(tmp_path / "data"),
        "SEARCH_CONFIG": str(subprocess_config(tmp_path)),
        "VECTOR_STORE": "milvus",
        "MILVUS_URI": str(tmp_path / "milvus.db"),
        "API_KEY": KEY,
    }
    command = [sys.executable, "-m", "indexer", "index", "--catalog", str(catalog), "--quiet"]
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Milvus collection" in done.stdout and "holds 6 vectors" in done.stdout
    assert not (tmp_path / "data" / "index" / "manifest.json").exists()
    with running_server(env, timeout=120) as server:
        found = requests.get(f"{server.url}/api/products/suit-1/similar", params={"category": "people"}, timeout=30)
        assert [r["sku"] for r in found.json()["results"]] == ["cam-1"]
        photo = jpeg("coffee", angle=180)
        fields = {"category": "drinks", "price": "2"}
        created = requests.put(
            f"{server.url}/api/products/mug-9", headers=AUTH, files={"image": ("p.jpg", photo)}, data=fields, timeout=30
        )
        assert created.status_code == 201
        hits = requests.post(
            f"{server.url}/api/search", files={"image": ("q.jpg", photo)}, data={"k": "1", "max_price": "2"}, timeout=30
        )
        assert [r["sku"] for r in hits.json()["results"]] == ["mug-9"]
