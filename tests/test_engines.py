"""LiteRT and Keras run the same network: same vectors, same neighbours; the service runs without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from indexer.config import REPO_ROOT, ConfigError
from indexer.embedding.images import load_pixels
from indexer.embedding.model import ModelIdentity, ensure_litert_export, load_embedder
from tests.conftest import SKIMAGE_CATALOG, read_csv


def test_litert_and_keras_vectors_agree_on_real_photos(embedder, keras_embedder, skimage_catalog):
    pixels = np.stack([load_pixels(p, 224) for p in sorted(skimage_catalog.rglob("*.jpg"))])
    cosines = (embedder.embed_pixels(pixels) * keras_embedder.embed_pixels(pixels)).sum(axis=1)
    assert len(cosines) == sum(len(v) for v in SKIMAGE_CATALOG.values())
    assert cosines.min() >= 0.9999


def test_litert_and_keras_find_the_same_neighbours(embedder, keras_embedder, grocery):
    """Top-5 lists on a 400-photo grocery catalog for 100 shopper photos: identical for >= 99 %."""
    catalog = read_csv(grocery / "catalog.csv")[::7][:400]
    queries = read_csv(grocery / "queries.csv")[::24][:100]
    catalog_pixels = np.stack([load_pixels(grocery / row["image"], 224) for row in catalog])
    query_pixels = np.stack([load_pixels(grocery / row["image"], 224) for row in queries])
    neighbours, query_vectors = {}, {}
    for name, engine in (("litert", embedder), ("keras", keras_embedder)):
        vectors = np.concatenate([engine.embed_pixels(catalog_pixels[i : i + 32]) for i in range(0, 400, 32)])
        query_vectors[name] = engine.embed_pixels(query_pixels)
        _, neighbours[name] = faiss.knn(query_vectors[name], vectors, 5, metric=faiss.METRIC_INNER_PRODUCT)
    assert (query_vectors["litert"] * query_vectors["keras"]).sum(axis=1).min() >= 0.9999
    same = (neighbours["litert"] == neighbours["keras"]).all(axis=1)
    assert same.mean() >= 0.99, f"{int(same.sum())}/{len(same)} identical top-5 lists"


def test_a_pool_of_litert_interpreters_is_safe_to_share_between_threads(base_settings, embedder, skimage_catalog):
    paths = sorted(skimage_catalog.rglob("*.jpg")) * 4
    expected = np.stack([embedder.embed_image(p) for p in paths])
    pooled = load_embedder(base_settings.with_overrides(model_threads=1), concurrency=3)
    with ThreadPoolExecutor(max_workers=6) as pool:  # more callers than interpreters: some wait their turn
        concurrent = np.stack(list(pool.map(pooled.embed_image, paths)))
    np.testing.assert_allclose(concurrent, expected, atol=1e-6)


def test_litert_export_records_the_keras_model_identity(base_settings, keras_embedder, embedder):
    export = ensure_litert_export(base_settings, create=False)
    assert ModelIdentity.from_dict(export.identity) == keras_embedder.identity
    assert embedder.identity == keras_embedder.identity  # an index built by either engine serves with the other
    assert embedder.tflite_sha256 == export.tflite_sha256 and len(export.tflite_sha256) == 64


def test_service_refuses_to_convert_a_missing_litert_model(settings, tmp_path):
    with pytest.raises(ConfigError, match="make weights"):
        load_embedder(settings.with_overrides(models_dir=tmp_path / "no-models"), create_export=False)


SERVICE_PROBE = """
import io, json, sys
from service import create_app
client = create_app().test_client()
photo = open(sys.argv[1], "rb").read()
response = client.post("/api/search", data={"image": (io.BytesIO(photo), "q.jpg")}, content_type="multipart/form-data")
engine = client.application.extensions["catalog_search"].embedder.engine.name
imported = sorted(m for m in ("tensorflow", "keras", "tf_keras", "pymilvus", "milvus_lite") if m in sys.modules)
print(json.dumps({"status": response.status_code, "engine": engine, "imported": imported}))
"""


def test_a_litert_and_faiss_service_imports_neither_tensorflow_nor_pymilvus(settings, embedder, skimage_catalog):
    from indexer.jobs.indexing import index_catalog

    index_catalog(settings, embedder, skimage_catalog, progress=False)
    env = {"DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin", "PRECISION": "fp32"}
    result = subprocess.run([sys.executable, "-c", SERVICE_PROBE, str(skimage_catalog / "drinks" / "coffee.jpg")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe == {"status": 200, "engine": "litert", "imported": []}
