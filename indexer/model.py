"""The embedding model: MobileNet without its classifier, pixels in, unit vectors out.

The network takes uint8-range RGB pixels and does its own input scaling, so
callers never need to know which MobileNet variant is configured. Keras builds
it; `load_embedder` runs it with the configured engine (LiteRT by default).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.config import PYPI_WEIGHTS, ConfigError, Settings
from indexer.engines import Engine, KerasEngine, LiteRTEngine, LiteRTExport, export_litert, export_path, read_export
from indexer.images import Box, load_pixels
from indexer.weights import sha256_file

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

    @classmethod
    def from_dict(cls, data: dict) -> ModelIdentity:
        return cls(name=data["model"], weights_sha256=data["weights_sha256"], dim=int(data["dim"]))

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
    model = keras.Model(pixels, backbone(scaled), name="embedder")
    if settings.finetuned is not None:
        model.load_weights(settings.finetuned)
    return model


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

    def __init__(
        self, engine: Engine, identity: ModelIdentity, tflite_sha256: str | None = None, version: str = "plain"
    ):
        self.engine = engine
        self.identity = identity
        self.tflite_sha256 = tflite_sha256
        # "plain" (ImageNet weights) or the name of a fine-tuned model version.
        self.version = version
        self.input_size = INPUT_SIZE

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 pixels -> (N, dim) unit vectors."""
        if len(pixels) == 0:
            return np.zeros((0, self.identity.dim), dtype=np.float32)
        return l2_normalize(self.engine.features(pixels))

    def embed_image(self, source: bytes | str | Path, box: Box | None = None) -> np.ndarray:
        """One image file or upload (or the box's region of it) -> (dim,) unit vector; raises ImageError for bad
        input and BoxError for a region too small for the photo."""
        return self.embed_pixels(load_pixels(source, self.input_size, box)[None])[0]


def identity_of(settings: Settings, feature_model) -> ModelIdentity:
    return ModelIdentity(settings.model_name, weights_fingerprint(feature_model), int(feature_model.output_shape[-1]))


def weights_key(settings: Settings, *, convert: bool = True) -> str:
    """Names the configured weights without loading them: a file's sha256, or "imagenet"."""
    if settings.finetuned is not None:
        return sha256_file(settings.finetuned)
    if settings.weights == "imagenet":
        return "imagenet"
    if settings.weights == PYPI_WEIGHTS and not convert:
        from indexer.weights import WEIGHTS_FILE

        path = settings.models_dir / WEIGHTS_FILE
        if not path.exists():
            raise ConfigError(f"the model weights are not converted yet ({path}); run `make weights`")
        return sha256_file(path)
    return sha256_file(Path(resolve_weights(settings)))


def ensure_litert_export(settings: Settings, *, create: bool = True) -> LiteRTExport:
    """The .tflite conversion of the configured model, converting it (with TensorFlow) if allowed."""
    path = export_path(settings.models_dir, settings.model_name, weights_key(settings, convert=create))
    export = read_export(path)
    if export is None:
        if not create:
            raise ConfigError(f"no LiteRT model at {path} for the configured weights yet; run `make weights`")
        feature_model = build_feature_model(settings)
        export = export_litert(feature_model, identity_of(settings, feature_model).as_dict(), path)
    return export


def load_embedder(
    settings: Settings, *, engine: str | None = None, create_export: bool = True, concurrency: int = 1
) -> Embedder:
    """The configured engine with the configured model, for up to `concurrency` simultaneous
    callers. LiteRT never imports TensorFlow unless it must convert the model first (and
    create_export allows it)."""
    engine = engine or settings.engine
    version = settings.finetuned.name.removesuffix(".weights.h5") if settings.finetuned else "plain"
    if engine == "keras":
        feature_model = build_feature_model(settings)
        return Embedder(KerasEngine(feature_model), identity_of(settings, feature_model), version=version)
    export = ensure_litert_export(settings, create=create_export)
    return Embedder(
        LiteRTEngine(export.model_path, settings.inference_threads, interpreters=concurrency),
        ModelIdentity.from_dict(export.identity),
        tflite_sha256=export.tflite_sha256,
        version=version,
    )
