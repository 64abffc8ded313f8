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

    def __init__(self, model_path: Path, threads: int, interpreters: int = 1):
        self.model_path = Path(model_path)
        self.threads = max(1, threads)
        self.interpreters = max(1, interpreters)
        self._model = self.model_path.read_bytes()
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(self.interpreters)
        self.features(np.zeros((1, *self._input_shape()[1:]), np.uint8))  # fail early on a bad file

    def _new_interpreter(self):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=self._model, num_threads=self.threads)
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


def export_path(models_dir: Path, model_name: str, weights_key: str) -> Path:
    return models_dir / "litert" / f"{model_name}-{weights_key[:16]}.tflite"


def read_export(path: Path) -> LiteRTExport | None:
    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        return None
    if not path.exists():
        return None
    return LiteRTExport(model_path=path, identity=info["identity"], tflite_sha256=info["tflite_sha256"])


def export_litert(feature_model, identity: dict, path: Path) -> LiteRTExport:
    """Convert the Keras feature model to a .tflite file (float32 pixels in), atomically."""
    import tensorflow as tf

    size = feature_model.input_shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.tflite")
    # Keras's own LiteRT export: the weights end up as constants in the flatbuffer.
    feature_model.export(
        str(partial), format="litert", verbose=False,
        input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name="pixels")],
    )  # fmt: skip
    flatbuffer = partial.read_bytes()
    os.replace(partial, path)
    export = LiteRTExport(path, identity, hashlib.sha256(flatbuffer).hexdigest())
    sidecar_partial = export.sidecar.with_name(export.sidecar.name + ".partial")
    sidecar_partial.write_text(json.dumps({"identity": identity, "tflite_sha256": export.tflite_sha256}, indent=2))
    os.replace(sidecar_partial, export.sidecar)
    return export
