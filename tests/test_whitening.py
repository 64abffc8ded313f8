"""Whitening learned on the catalog: fitted by `make index` on real grocery photos, kept, applied to queries."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

from indexer.embedding.images import load_pixels
from indexer.embedding.model import load_embedder
from indexer.embedding.whitening import MIN_FIT_PHOTOS, fit, in_use
from indexer.index.search import model_mismatch
from indexer.index.segments import read_manifest
from indexer.jobs.indexing import index_catalog
from indexer.storage.store import Store
from service import create_app
from tests.conftest import grocery_subset, live_index, read_csv, skimage_jpeg, write_csv

pytestmark = pytest.mark.slow  # embeds a few hundred real photos

# Twenty fine categories, with all their catalog photos (about 700) and shop photos (about 550).
CATEGORIES = (
    "Banana", "Carrots", "Kiwi", "Lemon", "Lime", "Watermelon", "Oatly-Oat-Milk", "Pineapple", "Pomegranate",
    "Red-Bell-Pepper", "Yellow-Bell-Pepper", "Brown-Cap-Mushroom", "Anjou", "Conference", "Golden-Delicious",
    "Granny-Smith", "Pink-Lady", "Royal-Gala", "Red-Delicious", "Mango",
)  # fmt: skip


@pytest.fixture(scope="module")
def whitening_settings(base_settings):
    """Whitening on (the suite runs with WHITENING=off); each index's whitening lives in its own database."""
    return base_settings.with_overrides(whitening=True, batch_size=16)


def fitted(settings, embedder):
    """The whitening the catalog's database holds for the network, and the identity of its vectors."""
    whitening = in_use(Store.open(settings), embedder.network.key)
    return whitening, embedder.network if whitening is None else embedder.network.whitened(whitening)


@pytest.fixture(scope="module")
def catalog(grocery, tmp_path_factory):
    return grocery_subset(grocery, CATEGORIES, tmp_path_factory.mktemp("grocery-subset"))


@pytest.fixture(scope="module")
def indexed(whitening_settings, catalog, tmp_path_factory):
    """The catalog indexed once with whitening on: the run embeds it and fits the whitening."""
    folder, metadata, _ = catalog
    settings = whitening_settings.with_overrides(data_dir=tmp_path_factory.mktemp("data"))
    Store.open(settings)
    embedder = load_embedder(settings)
    assert in_use(Store.open(settings), embedder.network.key) is None  # nothing fitted yet for this catalog
    report = index_catalog(settings, embedder, folder, metadata, progress=False)
    return settings, report


def test_first_index_fits_a_learned_whitening_and_stores_whitened_unit_vectors(indexed, catalog, embedder):
    settings, report = indexed
    _, _, count = catalog
    assert report.embedded == count and report.indexed == count
    assert f"fitted learned-96 whitening on {count} photos of {len(CATEGORIES)} categories" in report.whitening
    whitening, identity = fitted(settings, embedder)
    assert whitening.kind == "learned" and identity.whitening == "learned-96" and identity.dim == 96
    store = Store.open(settings)
    assert store.vectors.snapshot(embedder.network.key).ids.size == 0  # no vector is left unwhitened
    vectors = np.concatenate([v for _, v in store.vectors.stream(identity.key, 96)])
    assert len(vectors) == count
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_whitened_vectors_are_the_projection_of_the_network_vectors(indexed, catalog, embedder):
    """What the run stored for a photo is the plain network's vector through the fitted projection."""
    settings, _ = indexed
    folder, metadata, _ = catalog
    whitening, identity = fitted(settings, embedder)
    row = read_csv(metadata)[5]
    expected = whitening.apply(embedder.embed_pixels(load_pixels(folder / row["image"], 224)[None]))[0]
    stored = Store.open(settings).vectors.of_product(row["sku"], identity.key, identity.dim)
    assert float(stored @ expected) > 0.9999


def test_learned_whitening_finds_more_shop_photos_categories(indexed, catalog, embedder, grocery):
    """Held-out shop photos of the twenty categories: R@1 through the service beats the unwhitened vectors."""
    settings, _ = indexed
    folder, metadata, _ = catalog
    queries = [q for q in read_csv(grocery / "queries.csv") if q["category"] in CATEGORIES][::2]
    client = create_app(settings).test_client()
    whitened_hits = 0
    for query in queries:
        response = client.post("/api/search", data=(grocery / query["image"]).read_bytes(),
                               content_type="image/jpeg", query_string={"k": 1})  # fmt: skip
        assert response.status_code == 200, response.get_json()
        whitened_hits += response.json["results"][0]["category"] == query["category"]
    rows = read_csv(metadata)
    catalog_vectors = np.concatenate([embedder.embed_pixels(np.stack([load_pixels(folder / r["image"], 224)
                                      for r in rows[i : i + 64]])) for i in range(0, len(rows), 64)])  # fmt: skip
    query_vectors = embedder.embed_pixels(np.stack([load_pixels(grocery / q["image"], 224) for q in queries]))
    nearest = (query_vectors @ catalog_vectors.T).argmax(axis=1)
    plain_hits = sum(rows[n]["category"] == q["category"] for n, q in zip(nearest, queries, strict=True))
    assert whitened_hits > plain_hits, f"whitened {whitened_hits} vs plain {plain_hits} of {len(queries)}"


def test_a_second_run_keeps_the_whitening_and_embeds_nothing(indexed, catalog, embedder):
    settings, _ = indexed
    folder, metadata, count = catalog
    before, _ = fitted(settings, embedder)
    again = load_embedder(settings)
    report = index_catalog(settings, again, folder, metadata, progress=False)
    assert (report.embedded, report.unchanged, report.whitening) == (0, count, None)
    assert in_use(Store.open(settings), again.network.key).sha256 == before.sha256
    assert read_manifest(settings.index_dir)["whitening_sha256"] == before.sha256


def test_a_server_follows_its_index_whitening_and_says_when_the_database_lacks_it(indexed, embedder):
    settings, _ = indexed
    whitening, identity = fitted(settings, embedder)
    app = create_app(settings.with_overrides(whitening=False))  # an index-time option: the server follows
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 200 and ready.json["model"]["whitening_sha256"] == whitening.sha256
    manifest = {**identity.as_dict(), "whitening_sha256": "0" * 64}  # as if built on another catalog's database
    reason = model_mismatch(manifest, embedder.identity)
    assert "does not hold" in reason and "DATABASE_URL" in reason


def test_a_write_that_is_a_server_processs_first_request_is_whitened_like_the_index(indexed, tmp_path):
    """With several worker processes, a process's first request may be a write (the others took every search
    so far). Its photo is embedded with the index's whitening, loaded with the base before it, so the product
    is found at once: it used to be stored unwhitened, under the bare network's identity, and never found."""
    settings, _ = indexed
    copied = settings.with_overrides(data_dir=tmp_path / "data", api_key="key")
    shutil.copytree(settings.data_dir, copied.data_dir)
    client = create_app(copied).test_client()  # its own embedder: nothing is loaded before the first request
    photo = skimage_jpeg("coffee")
    written = client.put("/api/products/mug-9", data={"image": (io.BytesIO(photo), "mug.jpg"), "title": "Mug"},
                         headers={"Authorization": "Bearer key"}, content_type="multipart/form-data")  # fmt: skip
    assert written.status_code == 201, written.json
    found = client.post("/api/search", data=photo, content_type="image/jpeg").json["results"]
    assert found[0]["sku"] == "mug-9"


def test_compacting_keeps_the_index_whitening_whatever_the_compactor_is_configured(indexed, monkeypatch, capsys):
    """A server-started compaction (`python -m indexer compact`) rebuilds what the base holds, even from a server
    configured with WHITENING=off."""
    from indexer.__main__ import main
    from indexer.index.segments import read_manifest

    settings, _ = indexed
    monkeypatch.setenv("WHITENING", "off")
    assert main(["--data-dir", str(settings.data_dir), "compact", "--quiet"]) == 0
    images, _ = Store.open(settings).products.counts()
    assert f"Compacted {images} vectors" in capsys.readouterr().out
    assert read_manifest(settings.index_dir)["whitening"] == "learned-96"


def test_refit_embeds_every_photo_again_and_fits_anew(indexed, catalog):
    settings, _ = indexed
    folder, metadata, count = catalog
    report = index_catalog(settings, load_embedder(settings), folder, metadata, progress=False, refit=True)
    assert report.embedded == count and report.whitening.startswith("fitted learned-96 whitening")


def test_extra_catalog_views_are_whitened_but_the_fit_is_on_the_photos_alone(indexed, catalog, embedder, tmp_path):
    settings, _ = indexed
    folder, metadata, count = catalog
    with_views = settings.with_overrides(data_dir=tmp_path / "data", catalog_views=("flip",))
    Store.open(with_views)
    flipped = load_embedder(with_views)
    report = index_catalog(with_views, flipped, folder, metadata, progress=False)
    assert f"on {count} photos" in report.whitening
    whitening = in_use(Store.open(with_views), flipped.network.key)
    assert whitening.sha256 == fitted(settings, embedder)[0].sha256  # the same projection as without views
    whitened = flipped.with_whitening(whitening)
    live = live_index(with_views, whitened)
    assert len(live) == 2 * count and whitened.identity.dim == 96  # every view's vector whitened and searchable


def test_a_catalog_too_small_to_fit_stays_unwhitened(whitening_settings, skimage_catalog, tmp_path):
    settings = whitening_settings.with_overrides(data_dir=tmp_path / "data")
    Store.open(settings)
    report = index_catalog(settings, load_embedder(settings), skimage_catalog, None, progress=False)
    assert report.indexed == 6 and f"needs {MIN_FIT_PHOTOS} photos" in report.whitening
    assert in_use(Store.open(settings), load_embedder(settings).network.key) is None
    ready = create_app(settings).test_client().get("/readyz")
    assert ready.status_code == 200 and ready.json["model"]["dim"] == 1024, ready.json


def test_without_categories_pca_whitening_keeps_vectors_unit_norm(embedder, grocery):
    rows = read_csv(grocery / "catalog.csv")[::10][:MIN_FIT_PHOTOS]
    vectors = embedder.embed_pixels(np.stack([load_pixels(grocery / r["image"], 224) for r in rows]))
    whitening = fit([(vectors, [None] * len(vectors))], dims=96)
    assert whitening.kind == "pca" and whitening.dims == len(vectors) - 1
    np.testing.assert_allclose(np.linalg.norm(whitening.apply(vectors), axis=1), 1.0, atol=1e-5)
    assert fit([(vectors[:10], [None] * 10)], dims=96) is None


def test_imported_vectors_get_the_catalog_whitening(indexed, catalog, embedder, tmp_path):
    """`import-vectors` takes the network's vectors; in a catalog with a whitening, it stores them whitened."""
    from indexer.jobs.importing import import_vectors

    settings, _ = indexed
    folder, metadata, _ = catalog
    rows = read_csv(metadata)[:3]
    network_vectors = embedder.embed_pixels(np.stack([load_pixels(folder / r["image"], 224) for r in rows]))
    np.save(tmp_path / "vectors.npy", network_vectors)
    write_csv(tmp_path / "products.csv", [{"sku": f"imported-{i}", "title": "t", "category": r["category"]}
                                          for i, r in enumerate(rows)])  # fmt: skip
    report = import_vectors(settings, load_embedder(settings), tmp_path / "vectors.npy", tmp_path / "products.csv",
                            progress=False)  # fmt: skip
    assert report.stored == 3
    whitening, identity = fitted(settings, embedder)
    stored = Store.open(settings).vectors.of_product("imported-1", identity.key, identity.dim)
    np.testing.assert_allclose(stored, whitening.apply(network_vectors[1:2])[0], atol=1e-6)


def test_milvus_gets_only_whitened_vectors_and_serves_them(whitening_settings, catalog, grocery, tmp_path):
    """With Milvus the run fits the whitening, then loads the whitened vectors: the server finds shop photos."""
    folder, metadata, count = catalog
    settings = whitening_settings.with_overrides(data_dir=tmp_path / "data", index_backend="milvus",
                                                 milvus_uri=str(tmp_path / "milvus.db"))  # fmt: skip
    Store.open(settings)
    report = index_catalog(settings, load_embedder(settings), folder, metadata, progress=False)
    assert report.whitening.startswith("fitted learned-96") and f"holds {count} vectors" in report.vector_store
    client = create_app(settings).test_client()
    assert client.get("/readyz").json["model"]["whitening"] == "learned-96"
    query = next(q for q in read_csv(grocery / "queries.csv") if q["category"] == "Banana")
    response = client.post("/api/search", data=(grocery / query["image"]).read_bytes(), content_type="image/jpeg")
    assert response.status_code == 200 and response.json["results"][0]["category"] == "Banana"
