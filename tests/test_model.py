"""The embedding: unit vectors of the configured dimension, the same for file and upload bytes."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.config import ConfigError
from indexer.embedding.images import load_pixels, to_model_input
from indexer.embedding.model import load_embedder, resolve_weights
from tests.conftest import skimage_photo


def test_embeddings_are_unit_float32_vectors(embedder, skimage_catalog):
    vector = embedder.embed_image(skimage_catalog / "animals" / "chelsea.jpg")
    assert vector.shape == (1024,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_file_and_uploaded_bytes_embed_identically(embedder, skimage_catalog):
    path = skimage_catalog / "drinks" / "coffee.jpg"
    np.testing.assert_array_equal(embedder.embed_image(path), embedder.embed_image(path.read_bytes()))


def test_batch_and_single_embeddings_agree(embedder, skimage_catalog):
    paths = sorted(skimage_catalog.rglob("*.jpg"))
    batch = embedder.embed_pixels(np.stack([load_pixels(p, 224) for p in paths]))
    singles = np.stack([embedder.embed_image(p) for p in paths])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_a_cropped_photo_is_closer_to_its_original_than_to_other_photos(embedder, skimage_catalog):
    photo = skimage_photo("chelsea")
    cropped = embedder.embed_pixels(to_model_input(photo.crop((40, 30, 400, 290)), 224)[None])[0]
    others = {p.stem: embedder.embed_image(p) for p in skimage_catalog.rglob("*.jpg")}
    nearest = max(others, key=lambda name: float(cropped @ others[name]))
    assert nearest == "chelsea"
    assert cropped @ others["chelsea"] > cropped @ others["rocket"] + 0.1


def test_identity_names_model_weights_and_dimension(embedder):
    identity = embedder.identity.as_dict()
    assert identity["model"] == "mobilenet_v1" and identity["dim"] == 1024
    assert len(identity["weights_sha256"]) == 64


def test_missing_weights_file_is_a_config_error(settings, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve_weights(settings.with_overrides(weights=str(tmp_path / "nope.weights.h5")))


def test_a_weights_file_path_loads_the_same_model(settings, embedder):
    converted = resolve_weights(settings)
    same = load_embedder(settings.with_overrides(weights=converted), engine="keras")
    assert same.identity == embedder.identity
