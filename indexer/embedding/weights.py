"""Genuine ImageNet MobileNet v1 weights without internet access beyond PyPI.

The usual Keras download is out of reach on many build machines, so
`make weights` takes the TF-slim MobileNet v1 1.0/224 ImageNet network that is
frozen (as constants) inside the MIT-licensed `nudity==0.2.3` sdist on PyPI,
checks both files' sha256, and copies every constant into the matching layer
of `keras.applications.MobileNet`. The sdist is only downloaded and read,
never installed or imported.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

SDIST_REQUIREMENT = "nudity==0.2.3"
SDIST_NAME = "nudity-0.2.3.tar.gz"
SDIST_SHA256 = "d26e10346f00ad76b1166a221f1b56877d154ca343e82c6e6c8e738ca5f27d5f"
GRAPH_MEMBER = "nudity-0.2.3/nudity/files/retrained_graph.pb"
GRAPH_SHA256 = "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"
GRAPH_FILE = "mobilenet_v1_1.0_224_frozen.pb"
WEIGHTS_FILE = "mobilenet_v1_1.0_224_imagenet.weights.h5"
BN_EPSILON = 0.001
# TF-slim names the 13 depthwise-separable blocks Conv2d_1 .. Conv2d_13.
BLOCKS = range(1, 14)


class WeightsError(RuntimeError):
    """The weights could not be fetched or do not match their published checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def frozen_graph_path(models_dir: Path) -> Path:
    """Return the verified frozen graph, downloading the sdist from PyPI if needed."""
    graph = models_dir / GRAPH_FILE
    if graph.exists() and sha256_file(graph) == GRAPH_SHA256:
        return graph
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mobilenet-sdist-") as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            SDIST_REQUIREMENT,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        sdist = Path(tmp) / SDIST_NAME
        if result.returncode != 0 or not sdist.exists():
            raise WeightsError(
                f"could not download {SDIST_REQUIREMENT} from PyPI ({result.stderr.strip()[-500:]}); "
                "check that pip can reach the package index, or set model.weights in config.toml"
            )
        if (actual := sha256_file(sdist)) != SDIST_SHA256:
            raise WeightsError(f"{SDIST_NAME} has sha256 {actual}, expected {SDIST_SHA256}; refusing to use it")
        with tarfile.open(sdist) as archive:
            member = archive.extractfile(GRAPH_MEMBER)
            if member is None:
                raise WeightsError(f"{SDIST_NAME} has no {GRAPH_MEMBER}")
            partial = graph.with_suffix(".partial")
            with open(partial, "wb") as out:
                shutil.copyfileobj(member, out)
    if (actual := sha256_file(partial)) != GRAPH_SHA256:
        partial.unlink()
        raise WeightsError(f"the frozen graph has sha256 {actual}, expected {GRAPH_SHA256}")
    partial.replace(graph)
    return graph


def read_graph_constants(graph: Path) -> dict[str, np.ndarray]:
    """Every Const node of a frozen TF1 GraphDef, by name."""
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util

    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(graph.read_bytes())
    return {
        node.name: tensor_util.MakeNdarray(node.attr["value"].tensor) for node in graph_def.node if node.op == "Const"
    }


def keras_weights_from_slim(constants: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map TF-slim MobileNet v1 constants to Keras MobileNet layer weights, by layer name."""

    def batch_norm(scope: str) -> list[np.ndarray]:
        return [constants[f"{scope}/BatchNorm/{part}"] for part in ("gamma", "beta", "moving_mean", "moving_variance")]

    layers = {
        "conv1": [constants["MobilenetV1/Conv2d_0/weights"]],
        "conv1_bn": batch_norm("MobilenetV1/Conv2d_0"),
    }
    for i in BLOCKS:
        depthwise, pointwise = f"MobilenetV1/Conv2d_{i}_depthwise", f"MobilenetV1/Conv2d_{i}_pointwise"
        layers[f"conv_dw_{i}"] = [constants[f"{depthwise}/depthwise_weights"]]
        layers[f"conv_dw_{i}_bn"] = batch_norm(depthwise)
        layers[f"conv_pw_{i}"] = [constants[f"{pointwise}/weights"]]
        layers[f"conv_pw_{i}_bn"] = batch_norm(pointwise)
    # Slim has 1001 classes with 0 = "background"; Keras's 1000 ImageNet classes are slim's 1..1000.
    layers["conv_preds"] = [
        constants["MobilenetV1/Logits/Conv2d_1c_1x1/weights"][..., 1:],
        constants["MobilenetV1/Logits/Conv2d_1c_1x1/biases"][1:],
    ]
    return layers


def convert_weights(graph: Path, destination: Path) -> Path:
    """Build Keras MobileNet v1 (with its ImageNet classifier) from the frozen graph and save its weights."""
    import keras

    model = keras.applications.MobileNet(weights=None, include_top=True, classes=1000)
    for layer_name, arrays in keras_weights_from_slim(read_graph_constants(graph)).items():
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [a.shape for a in arrays]:
            raise WeightsError(f"layer {layer_name}: shapes {[a.shape for a in arrays]} do not match {expected}")
        layer.set_weights(arrays)
    partial = destination.with_name(destination.name + ".partial.weights.h5")
    model.save_weights(partial)
    partial.replace(destination)
    return destination


def ensure_pypi_weights(models_dir: Path) -> Path:
    """The converted Keras weights file, fetching and converting on first use."""
    destination = models_dir / WEIGHTS_FILE
    if not destination.exists():
        convert_weights(frozen_graph_path(models_dir), destination)
    return destination
