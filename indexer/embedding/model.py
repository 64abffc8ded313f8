"""The embedding model: MobileNet without its classifier, pixels in, unit vectors out.

The network takes uint8-range RGB pixels and does its own input scaling, so
callers never need to know which MobileNet variant is configured. Keras builds
it; `load_embedder` runs it with the configured engine (LiteRT by default).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from indexer.config import PYPI_WEIGHTS, ConfigError, Settings
from indexer.embedding.calibration import calibration_sample, fallback_catalog
from indexer.embedding.engines import (
    INT8_RECIPE,
    Engine,
    KerasEngine,
    LiteRTEngine,
    LiteRTExport,
    convert_fp32,
    convert_int8,
    export_path,
    read_export,
    write_export,
)
from indexer.embedding.images import Box, Source, load_pixels, load_views
from indexer.embedding.weights import sha256_file
from indexer.embedding.whitening import Whitening

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

INPUT_SIZE = 224


@dataclass(frozen=True)
class ModelIdentity:
    """What an index was built with; an index is only searched with the same model, at the same precision."""

    name: str
    weights_sha256: str
    dim: int
    precision: str = "fp32"
    # The int8 model's own file: its calibration decides its vectors, so two calibrations are two models.
    quantized_sha256: str | None = None
    # "avg", or "gem3" for generalised-mean pooling with p = 3 (model.pooling, model.gem_p).
    pooling: str = "avg"
    # The whitening fitted on the catalog (indexer/embedding/whitening.py), e.g. "learned-96", and its sha256.
    whitening: str | None = None
    whitening_sha256: str | None = None

    def as_dict(self) -> dict[str, object]:
        identity: dict[str, object] = {
            "model": self.name, "weights_sha256": self.weights_sha256, "dim": self.dim, "precision": self.precision
        }  # fmt: skip
        if self.quantized_sha256:
            identity["quantized_sha256"] = self.quantized_sha256
        if self.pooling != "avg":
            identity["pooling"] = self.pooling
        if self.whitening:
            identity.update(whitening=self.whitening, whitening_sha256=self.whitening_sha256)
        return identity

    @classmethod
    def from_dict(cls, data: dict) -> ModelIdentity:
        # Indexes from before precisions existed are fp32.
        return cls(
            name=data["model"],
            weights_sha256=data["weights_sha256"],
            dim=int(data["dim"]),
            precision=data.get("precision") or "fp32",
            quantized_sha256=data.get("quantized_sha256"),
            pooling=data.get("pooling") or "avg",
            whitening=data.get("whitening"),
            whitening_sha256=data.get("whitening_sha256"),
        )

    @property
    def key(self) -> str:
        """Names the vectors in the database: an fp32 key is what it was before int8 existed."""
        if self.whitening:
            return f"{self.network_key}+{self.whitening}-{(self.whitening_sha256 or '')[:12]}"
        return self.network_key

    @property
    def network_key(self) -> str:
        """The network's part of the key: the same with or without a whitening after it."""
        key = f"{self.name}@{self.weights_sha256[:16]}"
        if self.pooling != "avg":
            key += f"+{self.pooling}"
        if self.precision != "fp32":
            key += f"+{self.precision}-{(self.quantized_sha256 or '')[:12]}"
        return key

    def quantized(self, flatbuffer_sha256: str) -> ModelIdentity:
        return replace(self, precision="int8", quantized_sha256=flatbuffer_sha256)

    def whitened(self, whitening: Whitening) -> ModelIdentity:
        """This network's identity followed by the whitening: the index's vectors."""
        return replace(self, dim=whitening.dims, whitening=whitening.name, whitening_sha256=whitening.sha256)


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
        from indexer.embedding.weights import ensure_pypi_weights

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
    if settings.pooling == "gem":
        pooled = _gem_layer(settings.gem_p)(features)
    else:
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


def _gem_layer(p: float):
    """Generalised-mean pooling (Radenović et al.): (mean of x^p over the map)^(1/p); p = 1 is average pooling,
    larger p leans towards the strongest responses. p is a weight: `make finetune` learns it."""
    import keras
    from keras import ops

    class GeM(keras.layers.Layer):
        def build(self, input_shape):
            self.p = self.add_weight(shape=(), initializer=keras.initializers.Constant(p), name="p")

        def call(self, features):
            power = ops.maximum(self.p, 1.0)
            pooled = ops.mean(ops.power(ops.maximum(features, 1e-6), power), axis=(1, 2))
            return ops.power(pooled, 1.0 / power)

    return GeM(name="embedding")


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
    """Embeds batches of pixels or single images into L2-normalised float32 vectors: the network's pooled
    features, then the catalog's whitening when there is one. The whitening, and so the identity, is fixed when
    the embedder is made: with_whitening makes another embedder, so one in use never changes under its callers."""

    def __init__(
        self,
        engine: Engine,
        identity: ModelIdentity,
        tflite_sha256: str | None = None,
        version: str = "plain",
        whitening: Whitening | None = None,
    ):
        self.engine = engine
        self.tflite_sha256 = tflite_sha256
        # "plain" (ImageNet weights) or the name of a fine-tuned model version.
        self.version = version
        self.input_size = INPUT_SIZE
        self._network = identity
        self._whitening = whitening
        self._identity = identity if whitening is None else identity.whitened(whitening)

    @property
    def network(self) -> ModelIdentity:
        """The network's identity, without the whitening."""
        return self._network

    @property
    def whitening(self) -> Whitening | None:
        return self._whitening

    @property
    def identity(self) -> ModelIdentity:
        """What its vectors are: the network's identity, followed by the whitening's when there is one."""
        return self._identity

    def with_whitening(self, whitening: Whitening | None) -> Embedder:
        """This network followed by `whitening` (None: by none), as a new embedder sharing the engine (and of the
        same class); this one is left as it is."""
        if whitening is self._whitening:
            return self
        twin = copy.copy(self)
        twin._whitening = whitening
        twin._identity = self._network if whitening is None else self._network.whitened(whitening)
        return twin

    def finish(self, features: np.ndarray) -> np.ndarray:
        """The network's (N, features) output -> (N, dim) unit vectors: normalised, then whitened."""
        vectors = l2_normalize(features)
        return vectors if self._whitening is None else self._whitening.apply(vectors)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 pixels -> (N, dim) unit vectors."""
        if len(pixels) == 0:
            return np.zeros((0, self.identity.dim), dtype=np.float32)
        return self.finish(self.engine.features(pixels))

    def embed_image(self, source: Source, box: Box | None = None) -> np.ndarray:
        """One image file or upload (or the box's region of it) -> (dim,) unit vector; raises ImageError for bad
        input and BoxError for a region too small for the photo."""
        return self.embed_pixels(load_pixels(source, self.input_size, box)[None])[0]

    def embed_views(self, source: bytes | str | Path, views: tuple[str, ...] = ()) -> np.ndarray:
        """A catalog photo -> (1 + len(views), dim): its vector, then its extra views' (index.catalog_views)."""
        return self.embed_pixels(load_views(source, self.input_size, views))


def identity_of(settings: Settings, feature_model) -> ModelIdentity:
    return ModelIdentity(
        settings.model_name,
        weights_fingerprint(feature_model),
        int(feature_model.output_shape[-1]),
        pooling=settings.pooling_name,
    )


def weights_key(settings: Settings, *, convert: bool = True) -> str:
    """Names the configured weights without loading them: a file's sha256, or "imagenet"."""
    if settings.finetuned is not None:
        return sha256_file(settings.finetuned)
    if settings.weights == "imagenet":
        return "imagenet"
    if settings.weights == PYPI_WEIGHTS and not convert:
        from indexer.embedding.weights import WEIGHTS_FILE

        path = settings.models_dir / WEIGHTS_FILE
        if not path.exists():
            raise ConfigError(f"the model weights are not converted yet ({path}); run `make weights`")
        return sha256_file(path)
    return sha256_file(Path(resolve_weights(settings)))


def ensure_litert_export(
    settings: Settings,
    *,
    create: bool = True,
    catalog: Path | None = None,
    metadata: Path | None = None,
    recalibrate: bool = False,
) -> LiteRTExport:
    """The .tflite conversion of the configured model at the configured precision, converting it (with
    TensorFlow) if allowed. An int8 model is calibrated on `catalog` when given (see ensure_int8_export)."""
    key = weights_key(settings, convert=create)
    if settings.precision == "int8":
        return ensure_int8_export(
            settings, key, create=create, catalog=catalog, metadata=metadata, recalibrate=recalibrate
        )
    path = export_path(settings.models_dir, settings.network_name, key)
    export = read_export(path)
    if export is None:
        if not create:
            raise ConfigError(f"no LiteRT model at {path} for the configured weights yet; run `make weights`")
        feature_model = build_feature_model(settings)
        export = write_export(path, convert_fp32(feature_model), identity_of(settings, feature_model).as_dict())
    return export


def int8_pointer(settings: Settings, key: str) -> Path:
    """Names the int8 model in use for these weights (several calibrations may lie beside each other)."""
    return export_path(settings.models_dir, settings.network_name, key).with_name(
        f"{settings.network_name}-{key[:16]}-{INT8_RECIPE}.active.json"
    )


def ensure_int8_export(
    settings: Settings,
    key: str,
    *,
    create: bool,
    catalog: Path | None,
    metadata: Path | None,
    recalibrate: bool = False,
) -> LiteRTExport:
    """The int8 model in use for these weights. It is calibrated once, on the first catalog that `make index`
    or `make finetune` passes (or, before any, on the configured or demo catalog), and then kept: re-indexing
    a folder of new photos must not re-quantise, which would re-embed the whole catalog. A model calibrated on
    a fallback is replaced by one calibrated on the first real catalog; `recalibrate` replaces any."""
    pointer = int8_pointer(settings, key)
    active = _read_pointer(pointer)
    if active is not None and not recalibrate and (catalog is None or active[1] == "catalog"):
        return active[0]
    if not create:
        raise ConfigError(
            f"no int8 LiteRT model for the configured weights yet ({pointer}); "
            "run `make index CATALOG=<folder of product photos>` (or `make weights CATALOG=<folder>`), which "
            "calibrates it on that catalog's photos, or set PRECISION=fp32"
        )
    origin = "catalog" if catalog is not None else "fallback"
    if catalog is None:
        catalog, metadata = fallback_catalog(settings)
    sample = calibration_sample(catalog, metadata, INPUT_SIZE)
    path = export_path(settings.models_dir, settings.network_name, key, calibration=sample.fingerprint)
    export = read_export(path)
    if export is None:
        feature_model = build_feature_model(settings)
        flatbuffer, float_layers = convert_int8(feature_model, sample.pixels)
        identity = identity_of(settings, feature_model).quantized(hashlib.sha256(flatbuffer).hexdigest())
        export = write_export(
            path, flatbuffer, identity.as_dict(), calibration=sample.describe(), float_layers=float_layers
        )
    partial = pointer.with_name(pointer.name + ".partial")
    partial.write_text(json.dumps({"model": path.name, "origin": origin, "calibration": sample.describe()}, indent=2))
    os.replace(partial, pointer)
    return export


def _read_pointer(pointer: Path) -> tuple[LiteRTExport, str] | None:
    try:
        active = json.loads(pointer.read_text())
    except FileNotFoundError:
        return None
    export = read_export(pointer.with_name(active["model"]))
    return None if export is None else (export, active["origin"])


def load_network_for(settings: Settings, wanted: ModelIdentity, concurrency: int = 1) -> Embedder | None:
    """The network of another published index, from the models folder: the LiteRT model whose identity is
    `wanted`'s network (its weights, precision and calibration), with no whitening; None when the folder holds
    none (or the engine is Keras, which runs only the configured weights). What a server that runs one model loads
    when `make index` has published an index built with another (a fine-tuned version, another precision)."""
    if settings.engine == "keras":
        return None
    for sidecar in sorted((settings.models_dir / "litert").glob("*.json")):
        if sidecar.name.endswith(".active.json"):
            continue
        export = read_export(sidecar.with_suffix(".tflite"))
        if export is None or ModelIdentity.from_dict(export.identity).network_key != wanted.network_key:
            continue
        return Embedder(
            LiteRTEngine(export.model_path, settings.inference_threads, interpreters=concurrency),
            ModelIdentity.from_dict(export.identity),
            tflite_sha256=export.tflite_sha256,
            version=f"{wanted.name}@{wanted.weights_sha256[:12]}",
        )
    return None


def load_embedder(
    settings: Settings,
    *,
    engine: str | None = None,
    create_export: bool = True,
    concurrency: int = 1,
    catalog: Path | None = None,
    metadata: Path | None = None,
) -> Embedder:
    """The configured engine with the configured model, for up to `concurrency` simultaneous
    callers. LiteRT never imports TensorFlow unless it must convert the model first (and
    create_export allows it). `catalog` is the one being indexed: an int8 model not yet calibrated
    on a catalog is calibrated on it."""
    engine = engine or settings.engine
    version = settings.finetuned.name.removesuffix(".weights.h5") if settings.finetuned else "plain"
    if engine == "keras":
        feature_model = build_feature_model(settings)
        embedder = Embedder(KerasEngine(feature_model), identity_of(settings, feature_model), version=version)
    else:
        export = ensure_litert_export(settings, create=create_export, catalog=catalog, metadata=metadata)
        embedder = Embedder(
            LiteRTEngine(export.model_path, settings.inference_threads, interpreters=concurrency),
            ModelIdentity.from_dict(export.identity),
            tflite_sha256=export.tflite_sha256,
            version=version,
        )
    # Without a whitening: `make index` follows it with the catalog's (with_whitening), a server with its index's.
    return embedder
