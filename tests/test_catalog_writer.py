"""The one write path (indexer.writes.CatalogWriter): batches and single products, the model check made again under
the writers' lock, failures that change nothing; and the embedding stage's distributor without Ray installed."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from indexer.config import ConfigError
from indexer.errors import NotReady
from indexer.jobs.indexing import distributor
from indexer.records import ProductFields
from indexer.storage.locks import write_lock
from indexer.storage.schema import API, IMPORT
from indexer.storage.store import Store
from indexer.writes import CatalogWriter, ModelChanged, Photo, SaveFailed
from tests.conftest import both_databases, skimage_jpeg


@pytest.fixture
def store(settings):
    store = Store.open(settings)
    yield store
    store.engine.dispose()


def photo_vectors(embedder, name: str):
    return embedder.embed_views(skimage_jpeg(name), ())


@both_databases
def test_a_batch_writes_products_and_photos_and_a_put_replaces_a_products_photos(settings, store, embedder):
    identity = embedder.identity
    writer = CatalogWriter(settings, store, IMPORT)
    products = [ProductFields("a", "A"), ProductFields("b", "B")]
    photos = [Photo(p.sku, f"import/{p.sku}", "", p.sku, photo_vectors(embedder, n)) for p, n in
              zip(products, ("coffee", "rocket"), strict=True)]  # fmt: skip
    written = writer.write(products, photos, model=identity)
    assert written.change is not None and writer.product_ids.keys() == {"a", "b"}
    assert store.products.counts() == (2, 2)

    api = CatalogWriter(settings, store, API)
    data = skimage_jpeg("camera")
    created = api.put_upload(ProductFields("a", "A again"), data, "JPEG", photo_vectors(embedder, "camera"), (),
                             model=identity)  # fmt: skip
    assert not created  # "a" had a live photo: replaced, and its import photo is now a tombstone
    assert store.products.counts() == (2, 2) and store.products.by_sku("a").title == "A again"
    assert store.products.image_path("a")[0].startswith(str(settings.data_dir / "uploads"))
    assert api.write(removed=["a", "nobody"]).removed == {"a"}
    assert store.products.counts() == (1, 1) and not store.products.is_live("a")


@both_databases
def test_vectors_of_another_model_are_refused_before_the_file_and_again_under_the_lock(settings, store, embedder):
    identity = embedder.identity
    other = replace(identity, whitening="learned-96", whitening_sha256="0" * 64)
    writer = CatalogWriter(settings, store, API)
    vectors = photo_vectors(embedder, "coffee")
    with pytest.raises(ModelChanged, match="changed models while the photo was embedded") as refused:
        writer.put_upload(ProductFields("p", "P"), skimage_jpeg("coffee"), "JPEG", vectors, (), model=identity,
                          current_model=lambda: other)  # fmt: skip
    assert isinstance(refused.value, NotReady) and refused.value.status == 503
    assert not (settings.data_dir / "uploads").exists() and not store.products.is_live("p")

    # The index switches models while the write waits for the lock (held here, as `make index` may hold it): the
    # look under the lock refuses it.
    current, looked = [identity], threading.Event()

    def current_model():
        looked.set()
        return current[0]

    with ThreadPoolExecutor(max_workers=1) as pool:
        with write_lock(settings.data_dir, store):
            put = pool.submit(writer.put_upload, ProductFields("p", "P"), skimage_jpeg("coffee"), "JPEG", vectors, (),
                              model=identity, current_model=current_model)  # fmt: skip
            assert looked.wait(60)
            current[0] = other
        with pytest.raises(ModelChanged):
            put.result()
    assert not store.products.is_live("p")


def test_a_change_that_cannot_be_saved_is_a_503_that_changed_nothing(settings, store, embedder):
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "uploads").write_bytes(b"a file where the uploads folder belongs")
    writer = CatalogWriter(settings, store, API)
    with pytest.raises(SaveFailed, match=r"could not be saved \(.+\); nothing was changed, try again later") as failed:
        writer.put_upload(ProductFields("p", "P"), skimage_jpeg("coffee"), "JPEG", photo_vectors(embedder, "coffee"),
                          (), model=embedder.identity)  # fmt: skip
    assert failed.value.status == 503 and not store.products.is_live("p")


def test_indexing_on_ray_without_ray_installed_says_how_to_install_it(settings, embedder, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets on an install without it
    monkeypatch.delitem(sys.modules, "indexer.jobs.distributed", raising=False)
    with pytest.raises(ConfigError, match=r"pip install -r requirements-ray\.txt"), distributor(settings, embedder):
        pass
