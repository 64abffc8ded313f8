"""The int8 model: calibrated on catalog photos, close to fp32, and never mixed with it in one index."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from indexer.config import REPO_ROOT, ConfigError
from indexer.embedding.images import load_pixels
from indexer.embedding.model import ModelIdentity, ensure_litert_export, int8_pointer, load_embedder, weights_key
from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import read_csv

pytestmark = pytest.mark.slow  # each calibration converts the network with TensorFlow (about half a minute)


@pytest.fixture(scope="session")
def int8_settings(base_settings, tmp_path_factory):
    """Settings with precision int8 and a models folder of their own (the converted weights linked in), so
    that calibrating here never changes which int8 model the repository's models/ folder uses."""
    models = tmp_path_factory.mktemp("int8-models")
    for path in base_settings.models_dir.iterdir():
        if path.is_file():
            (models / path.name).symlink_to(path)
    return base_settings.with_overrides(precision="int8", models_dir=models)


@pytest.fixture(scope="session")
def int8_embedder(int8_settings, grocery):
    return load_embedder(int8_settings, catalog=grocery, metadata=grocery / "catalog.csv")


def test_int8_embeddings_and_neighbours_agree_with_fp32(embedder, int8_embedder, grocery):
    """On 300 grocery catalog photos and 200 shopper photos: mean cosine to fp32 >= 0.97, same top-1 >= 90 %."""
    catalog = read_csv(grocery / "catalog.csv")[::10][:300]
    queries = read_csv(grocery / "queries.csv")[::12][:200]
    catalog_pixels = np.stack([load_pixels(grocery / row["image"], 224) for row in catalog])
    query_pixels = np.stack([load_pixels(grocery / row["image"], 224) for row in queries])
    vectors, top1 = {}, {}
    for name, model in (("fp32", embedder), ("int8", int8_embedder)):
        vectors[name] = model.embed_pixels(query_pixels)
        _, nearest = faiss.knn(vectors[name], model.embed_pixels(catalog_pixels), 1, metric=faiss.METRIC_INNER_PRODUCT)
        top1[name] = nearest[:, 0]
    cosines = (vectors["fp32"] * vectors["int8"]).sum(axis=1)
    assert cosines.mean() >= 0.97, f"mean cosine {cosines.mean():.4f}"
    same = (top1["fp32"] == top1["int8"]).mean()
    assert same >= 0.90, f"same top-1 for {same:.1%} of queries"


def test_int8_model_has_its_own_identity_and_file(embedder, int8_embedder, int8_settings):
    fp32, int8 = embedder.identity, int8_embedder.identity
    assert (int8.name, int8.weights_sha256, int8.dim) == (fp32.name, fp32.weights_sha256, fp32.dim)
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert int8.quantized_sha256 == int8_embedder.tflite_sha256 != embedder.tflite_sha256
    assert int8.key != fp32.key  # their vectors never share database rows
    assert ModelIdentity.from_dict(int8.as_dict()) == int8
    # An index manifest from before precisions existed is an fp32 one.
    assert ModelIdentity.from_dict({"model": fp32.name, "weights_sha256": fp32.weights_sha256, "dim": 1024}) == fp32
    assert int8_embedder.engine.model_path.stat().st_size < embedder.engine.model_path.stat().st_size / 3


def test_int8_calibration_is_kept_when_another_folder_is_indexed(int8_settings, int8_embedder, skimage_catalog):
    """Indexing a folder of new photos must not re-quantise (which would re-embed the whole catalog)."""
    again = ensure_litert_export(int8_settings, catalog=skimage_catalog)
    assert again.tflite_sha256 == int8_embedder.tflite_sha256
    assert ensure_litert_export(int8_settings, create=False).tflite_sha256 == int8_embedder.tflite_sha256


def test_int8_without_any_calibration_says_what_to_run(base_settings, int8_settings, tmp_path):
    bare = int8_settings.with_overrides(models_dir=tmp_path / "models")
    bare.models_dir.mkdir()
    for path in base_settings.models_dir.iterdir():
        if path.is_file():  # the weights, not any converted model
            (bare.models_dir / path.name).symlink_to(path)
    assert not int8_pointer(bare, weights_key(bare)).exists()
    with pytest.raises(ConfigError, match="make index CATALOG="):
        load_embedder(bare, create_export=False)


def test_a_service_serves_an_index_built_at_the_other_precision_with_that_models_network(
    settings, embedder, int8_embedder, skimage_catalog, tmp_path
):
    index_catalog(settings, embedder, skimage_catalog, progress=False)
    # The models folder holds the fp32 network: an int8 server searches the fp32 index with it.
    client = create_app(settings, int8_embedder).test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["model"]["precision"] == "fp32"
    photo = (skimage_catalog / "animals" / "chelsea.jpg").read_bytes()
    found = client.post("/api/search?k=1", data=photo, content_type="image/jpeg").get_json()["results"][0]
    assert found["sku"] == "animals/chelsea" and found["score"] > 0.99
    # Without it, the index is refused, saying why.
    empty = settings.with_overrides(models_dir=tmp_path / "no-models")
    response = create_app(empty, int8_embedder).test_client().get("/readyz")
    assert response.status_code == 503
    reason = response.get_json()["reason"]
    assert "built at fp32 precision" in reason and "runs int8" in reason and "PRECISION=fp32" in reason


def test_an_int8_index_serves_int8_searches(settings, int8_settings, int8_embedder, skimage_catalog):
    settings = settings.with_overrides(precision="int8", models_dir=int8_settings.models_dir)
    index_catalog(settings, int8_embedder, skimage_catalog, progress=False)
    client = create_app(settings, int8_embedder).test_client()
    ready = client.get("/readyz").get_json()
    assert ready["ready"] and ready["model"]["precision"] == "int8"
    photo = (skimage_catalog / "drinks" / "coffee.jpg").read_bytes()
    found = client.post("/api/search", data={"image": (io.BytesIO(photo), "q.jpg")}).get_json()
    assert found["results"][0]["sku"] == "drinks/coffee"


def test_make_weights_and_index_calibrate_int8_on_the_catalog_they_are_given(base_settings, tmp_path, skimage_catalog):
    """The command line as `make index CATALOG=...` runs it with PRECISION=int8: `weights` calibrates on the
    catalog, `index` reuses that model, and the index serves int8 searches."""
    models = tmp_path / "models"
    models.mkdir()
    for path in base_settings.models_dir.iterdir():
        if path.is_file():
            (models / path.name).symlink_to(path)
    env = {**os.environ, "PRECISION": "int8", "MODELS_DIR": str(models), "DATA_DIR": str(tmp_path / "data")}

    def indexer(*arguments: str) -> str:
        done = subprocess.run([sys.executable, "-m", "indexer", *arguments], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    made = indexer("weights", "--catalog", str(skimage_catalog))
    assert "LiteRT model ready (fp32)" in made and "LiteRT model ready (int8)" in made
    indexer("migrate")
    indexer("index", "--catalog", str(skimage_catalog), "--quiet")
    settings = base_settings.with_overrides(precision="int8", models_dir=models, data_dir=tmp_path / "data")
    embedder = load_embedder(settings, create_export=False)
    assert embedder.identity.precision == "int8"
    assert embedder.tflite_sha256 in made or embedder.engine.model_path.name in made
    client = create_app(settings, embedder).test_client()
    assert client.get("/readyz").get_json()["model"]["precision"] == "int8"
    photo = (skimage_catalog / "space" / "rocket.jpg").read_bytes()
    found = client.post("/api/search", data=photo, content_type="image/jpeg").get_json()
    assert found["results"][0]["sku"] == "space/rocket"
