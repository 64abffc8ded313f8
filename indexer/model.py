"""The embedding model: MobileNet without its classifier, pixels in, unit vectors out.

The Keras model takes uint8-range RGB pixels and does its own input scaling,
so callers never need to know which MobileNet variant is configured.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.config import PYPI_WEIGHTS, ConfigError, Settings
from indexer.images import load_pixels

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INPUT_SIZE = 224


@dataclass(frozen=True)
class ModelIdentity:
    """What an index was built with; an index is only searched with the same model."""

    name: str
    weights_sha256: str
    dim: int

    def as_dict(self) -> dict[str, object]:
        return {"model": self.name, "weights_sha256": self.weights_sha256, "dim": self.dim}

    @property
    def key(self) -> str:
        return f"{self.name}@{self.weights_sha256[:16]}"


def _application(name: str):
    import keras

    return {
        "mobilenet_v1": keras.applications.MobileNet,
        "mobilenet_v2": keras.applications.MobileNetV2,
        "mobilenet_v3_small": keras.applications.MobileNetV3Small,
        "mobilenet_v3_large": keras.applications.MobileNetV3Large,
    }[name]


def resolve_weights(settings: Settings) -> str:
    """The `weights` argument for keras.applications: "imagenet" or a file path."""
    if settings.weights == PYPI_WEIGHTS:
        from indexer.weights import ensure_pypi_weights

        return str(ensure_pypi_weights(settings.models_dir))
    if settings.weights == "imagenet":
        return "imagenet"
    path = Path(settings.weights).expanduser()
    if not path.is_absolute():
        path = settings.models_dir.parent / path
    if not path.exists():
        raise ConfigError(f"model.weights = {settings.weights!r}: no such file {path}")
    return str(path)


def build_classifier(settings: Settings):
    """The full ImageNet classifier (used to check that converted weights are genuine)."""
    build = _application(settings.model_name)
    return build(input_shape=(INPUT_SIZE, INPUT_SIZE, 3), weights=resolve_weights(settings), include_top=True)


def build_feature_model(settings: Settings):
    """Keras model from raw 0..255 RGB pixels to the 1-D pooled feature vector (not normalised)."""
    import keras

    build = _application(settings.model_name)
    weights = resolve_weights(settings)
    shape = (INPUT_SIZE, INPUT_SIZE, 3)
    if weights == "imagenet":
        base = build(input_shape=shape, weights="imagenet", include_top=False)
    else:
        try:  # a full classifier's weights, like the converted PyPI file
            base = build(input_shape=shape, weights=weights, include_top=True)
        except ValueError:  # a weights file saved without the classifier
            base = build(input_shape=shape, weights=weights, include_top=False)
    features = _last_feature_map(base)
    pooled = keras.layers.GlobalAveragePooling2D(name="embedding")(features)
    backbone = keras.Model(base.input, pooled, name=f"{settings.model_name}_features")

    pixels = keras.Input(shape=shape, name="pixels")
    # v1 and v2 expect [-1, 1]; the v3 models scale their own inputs.
    scaled = (
        pixels if settings.model_name.startswith("mobilenet_v3") else keras.layers.Rescaling(1 / 127.5, -1.0)(pixels)
    )
    return keras.Model(pixels, backbone(scaled), name="embedder")


def _last_feature_map(model):
    """The tensor that the classifier head averages: the embedding's source, in every variant."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            return layer.input
    return model.output


def weights_fingerprint(model) -> str:
    """sha256 over the weight tensors: the same for the same weights, however the file was written."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class Embedder:
    """Embeds batches of pixels or single images into L2-normalised float32 vectors."""

    def __init__(self, settings: Settings):
        import tensorflow as tf

        self.settings = settings
        self.input_size = INPUT_SIZE
        self.model = build_feature_model(settings)
        self.identity = ModelIdentity(
            name=settings.model_name,
            weights_sha256=weights_fingerprint(self.model),
            dim=int(self.model.output_shape[-1]),
        )
        signature = tf.TensorSpec((None, INPUT_SIZE, INPUT_SIZE, 3), tf.uint8)
        self._forward = tf.function(
            lambda pixels: self.model(tf.cast(pixels, tf.float32), training=False),
            input_signature=[signature],
        )

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 pixels -> (N, dim) unit vectors."""
        if len(pixels) == 0:
            return np.zeros((0, self.identity.dim), dtype=np.float32)
        return l2_normalize(self._forward(np.ascontiguousarray(pixels, dtype=np.uint8)).numpy())

    def embed_image(self, source: bytes | str | Path) -> np.ndarray:
        """One image file or upload -> (dim,) unit vector; raises ImageError for bad input."""
        return self.embed_pixels(load_pixels(source, self.input_size)[None])[0]
