"""Inference engines: the same embedding network run by Keras or by LiteRT.

TensorFlow builds the network and converts it once to a .tflite file next to
the weights (`make weights`); LiteRT (XNNPACK on the CPU) runs it. LiteRT
starts in a fraction of a second with a small memory footprint and runs near
the CPU's limit, so the service never needs to import TensorFlow.
Both engines take uint8 RGB pixels and return the pooled, not yet normalised, features.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

ENGINES = ("litert", "keras")


class Engine(Protocol):
    name: str

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 pixels -> (N, dim) float32 features."""


class KerasEngine:
    name = "keras"

    def __init__(self, feature_model):
        import tensorflow as tf

        self.model = feature_model
        size = feature_model.input_shape[1]
        self._forward = tf.function(
            lambda pixels: feature_model(tf.cast(pixels, tf.float32), training=False),
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)],
        )

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return self._forward(np.ascontiguousarray(pixels, dtype=np.uint8)).numpy()


class LiteRTEngine:
    """A small pool of LiteRT interpreters. An interpreter is not thread-safe, so each call
    borrows one; up to `interpreters` calls run at once instead of queueing behind one lock.
    The most recently used interpreter is lent first, so its weights stay warm in the caches."""

    name = "litert"

    def __init__(self, model_path: Path, threads: int, interpreters: int = 1, model_content: bytes | None = None):
        # model_content: the .tflite bytes themselves (as a Ray actor gets them), model_path then only names it.
        self.model_path = Path(model_path)
        self.threads = max(1, threads)
        self.interpreters = max(1, interpreters)
        self.model_content = self.model_path.read_bytes() if model_content is None else model_content
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.interpreters)
        self.features(np.zeros((1, *self._input_shape()[1:]), np.uint8))  # fail early on a bad file

    def _new_interpreter(self):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=self.model_content, num_threads=self.threads)
        interpreter.allocate_tensors()
        return interpreter

    def _input_shape(self) -> tuple[int, ...]:
        interpreter = self._borrow()
        try:
            return tuple(interpreter.get_input_details()[0]["shape"])
        finally:
            self._give_back(interpreter)

    def _borrow(self):
        self._slots.acquire()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            try:
                return self._new_interpreter()
            except BaseException:
                self._slots.release()
                raise

    def _give_back(self, interpreter) -> None:
        self._idle.put(interpreter)
        self._slots.release()

    def features(self, pixels: np.ndarray) -> np.ndarray:
        # One image per invoke: as fast on the CPU as larger batches, and the interpreter's
        # working memory stays that of a single image.
        interpreter = self._borrow()
        try:
            source = interpreter.get_input_details()[0]
            output = interpreter.get_output_details()[0]
            features = np.empty((len(pixels), output["shape"][-1]), dtype=np.float32)
            for i in range(len(pixels)):
                interpreter.set_tensor(source["index"], np.asarray(pixels[i : i + 1], dtype=source["dtype"]))
                interpreter.invoke()
                features[i] = interpreter.get_tensor(output["index"])[0]
            return features
        finally:
            self._give_back(interpreter)


@dataclass(frozen=True)
class LiteRTExport:
    """A converted model and what it was converted from (the sidecar JSON)."""

    model_path: Path
    identity: dict
    tflite_sha256: str

    @property
    def sidecar(self) -> Path:
        return self.model_path.with_suffix(".json")


def export_path(models_dir: Path, model_name: str, weights_key: str, calibration: str | None = None) -> Path:
    """Where the .tflite conversion of these weights lives: fp32, or int8 calibrated on the named sample."""
    stem = f"{model_name}-{weights_key[:16]}"
    if calibration is not None:
        stem += f"-{INT8_RECIPE}-{calibration[:12]}"
    return models_dir / "litert" / f"{stem}.tflite"


def read_export(path: Path) -> LiteRTExport | None:
    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        return None
    if not path.exists():
        return None
    return LiteRTExport(model_path=path, identity=info["identity"], tflite_sha256=info["tflite_sha256"])


def convert_fp32(feature_model) -> bytes:
    """The Keras feature model as a float32 .tflite flatbuffer (float pixels in, features out)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="litert-export-") as folder:
        path = Path(folder) / "model.tflite"
        # Keras's own LiteRT export: the weights end up as constants in the flatbuffer.
        feature_model.export(str(path), format="litert", verbose=False, input_signature=[_pixels_spec(feature_model)])
        return path.read_bytes()


# Convolutions that stay float in the int8 model: the network's first ones, where 8-bit activations of raw
# pixels lose the most (measured on grocery photos: top-1 neighbour agreement with fp32 0.81 when all are int8,
# 0.92 with the first three float, for 0.4 ms more per image).
FLOAT_STEM_CONVOLUTIONS = 3
CONVOLUTIONS = ("CONV_2D", "DEPTHWISE_CONV_2D")
# Names how int8 models are made, in their file names: a new recipe never reuses an old recipe's file.
INT8_RECIPE = f"int8-stem{FLOAT_STEM_CONVOLUTIONS}"


def convert_int8(feature_model, calibration_pixels: np.ndarray) -> tuple[bytes, list[str]]:
    """Full-integer post-training quantisation: int8 weights and activations, with float pixels in and float
    features out (so callers do not change), each layer's activation range measured on the calibration photos;
    the first FLOAT_STEM_CONVOLUTIONS convolutions stay float. Returns the flatbuffer and those layers' names."""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="litert-int8-") as folder:
        # A SavedModel, not the Keras model itself: TensorFlow's calibrator cannot read Keras 3's variables.
        spec = [_pixels_spec(feature_model)]
        feature_model.export(folder, format="tf_saved_model", verbose=False, input_signature=spec)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([p[None].astype(np.float32)] for p in calibration_pixels)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # TensorFlow's quantisation debugger lists the quantised model's layers in execution order, and makes
        # the model again with the chosen ones left float ("selective quantisation").
        few = lambda: ([p[None].astype(np.float32)] for p in calibration_pixels[:4])  # noqa: E731
        with warnings.catch_warnings():
            # The debugger runs TensorFlow's own interpreter, which warns that LiteRT replaces it.
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
            debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=few)
            debugger.run()
            stem = [row["tensor_name"] for row in _layer_rows(debugger) if row["op_name"] in CONVOLUTIONS]
            stem = stem[:FLOAT_STEM_CONVOLUTIONS]
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=stem)
            selective = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=few, debug_options=options
            )
            return selective.get_nondebug_quantized_model(), stem


def _layer_rows(debugger) -> list[dict[str, str]]:
    import csv
    import io

    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    return list(csv.DictReader(io.StringIO(dump.getvalue())))


def _pixels_spec(feature_model):
    import tensorflow as tf

    size = feature_model.input_shape[1]
    return tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")


def write_export(path: Path, flatbuffer: bytes, identity: dict, **details: object) -> LiteRTExport:
    """The .tflite file and its sidecar JSON (what it was converted from), each written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(flatbuffer)
    os.replace(partial, path)
    export = LiteRTExport(path, identity, hashlib.sha256(flatbuffer).hexdigest())
    sidecar_partial = export.sidecar.with_name(export.sidecar.name + ".partial")
    sidecar = {"identity": identity, "tflite_sha256": export.tflite_sha256, **details}
    sidecar_partial.write_text(json.dumps(sidecar, indent=2))
    os.replace(sidecar_partial, export.sidecar)
    return export
