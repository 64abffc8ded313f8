"""Generalised-mean (GeM) pooling as a model option, on real photos with the real network."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.config import ConfigError, load_settings
from indexer.embedding.images import load_pixels
from indexer.embedding.model import build_feature_model, identity_of, l2_normalize
from tests.conftest import read_csv

pytestmark = pytest.mark.slow  # builds the Keras network three times


@pytest.fixture(scope="module")
def photos(grocery):
    rows = read_csv(grocery / "queries.csv")[::100][:16]
    return np.stack([load_pixels(grocery / row["image"], 224) for row in rows]).astype(np.float32)


def features(settings, photos):
    model = build_feature_model(settings)
    return model, l2_normalize(model.predict(photos, verbose=0))


def test_gem_with_p_1_is_average_pooling(base_settings, photos):
    _, average = features(base_settings, photos)
    _, gem = features(base_settings.with_overrides(pooling="gem", gem_p=1.0), photos)
    np.testing.assert_allclose(gem, average, atol=1e-5)


def test_gem_with_p_3_leans_on_the_strongest_responses_and_has_its_own_identity(base_settings, photos):
    average_model, average = features(base_settings, photos)
    gem_settings = base_settings.with_overrides(pooling="gem", gem_p=3.0)
    gem_model, gem = features(gem_settings, photos)
    cosines = (gem * average).sum(axis=1)
    assert cosines.min() > 0.7 and cosines.max() < 0.9999  # the same photos, pooled differently
    plain, pooled = identity_of(base_settings, average_model), identity_of(gem_settings, gem_model)
    assert (plain.pooling, pooled.pooling) == ("avg", "gem3")
    assert pooled.key != plain.key and "+gem3" in pooled.key
    assert pooled.as_dict()["pooling"] == "gem3" and "pooling" not in plain.as_dict()
    assert gem_settings.network_name == "mobilenet_v1-gem3"


def test_an_unknown_pooling_is_refused(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[model]\npooling = "max"\n')
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        load_settings(config)
