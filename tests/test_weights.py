"""The converted weights are the genuine ImageNet MobileNet v1, not merely well-shaped numbers."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.embedding.images import to_model_input
from indexer.embedding.model import build_classifier
from indexer.embedding.weights import (
    GRAPH_FILE,
    GRAPH_SHA256,
    keras_weights_from_slim,
    read_graph_constants,
    sha256_file,
)
from tests.conftest import skimage_photo


@pytest.fixture(scope="module")
def classifier(base_settings):
    return build_classifier(base_settings)


@pytest.mark.parametrize(("photo", "imagenet_class"), [("chelsea", 285), ("coffee", 967)])
def test_converted_classifier_recognises_imagenet_classes(classifier, photo, imagenet_class):
    # 285 = Egyptian cat, 967 = espresso in Keras's 1000-class ImageNet order.
    pixels = to_model_input(skimage_photo(photo), 224)[None].astype(np.float32) / 127.5 - 1.0
    probabilities = classifier.predict(pixels, verbose=0)[0]
    assert int(np.argmax(probabilities)) == imagenet_class


def test_cached_frozen_graph_matches_its_published_checksum(base_settings):
    assert sha256_file(base_settings.models_dir / GRAPH_FILE) == GRAPH_SHA256


def test_keras_pooled_features_match_the_frozen_graph(base_settings, keras_embedder):
    import tensorflow as tf

    pixels = np.stack([to_model_input(skimage_photo(name), 224) for name in ("chelsea", "astronaut")])
    scaled = pixels.astype(np.float32) / 127.5 - 1.0
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((base_settings.models_dir / GRAPH_FILE).read_bytes())
    frozen = []
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            for image in scaled:  # the frozen graph's input is fixed at batch 1
                pooled = session.run("MobilenetV1/Logits/AvgPool_1a/AvgPool:0", {"input:0": image[None]})
                frozen.append(pooled.reshape(-1))
    keras_features = keras_embedder.engine.features(pixels)
    np.testing.assert_allclose(keras_features, np.stack(frozen), atol=2e-5)


def test_slim_background_class_is_dropped_from_the_classifier(base_settings):
    constants = read_graph_constants(base_settings.models_dir / GRAPH_FILE)
    layers = keras_weights_from_slim(constants)
    kernel, bias = layers["conv_preds"]
    assert kernel.shape == (1, 1, 1024, 1000)
    np.testing.assert_array_equal(bias, constants["MobilenetV1/Logits/Conv2d_1c_1x1/biases"][1:])
    assert len([name for name in layers if name.startswith("conv_dw_") and not name.endswith("_bn")]) == 13
