"""Installs that lack an optional package: the command that needs it stops with the requirements file to install.

Each run hides the package from a real `python -m indexer` (None in sys.modules makes importing it fail as if it
were not installed), as on a host that installed requirements.txt alone, or requirements-serve.txt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.config import REPO_ROOT
from indexer.embedding.weights import GRAPH_FILE
from tests.conftest import subprocess_config

pytestmark = pytest.mark.slow  # each starts `python -m indexer` and loads the model: seconds

# `python -m indexer ARGS` with the packages named in HIDDEN out of reach.
WITHOUT = (
    "import os, sys\n"
    "for name in os.environ['HIDDEN'].split(','): sys.modules[name] = None\n"
    "from indexer.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_without(hidden: str, args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VECTOR_STORE", "DATABASE_URL")}
    config = subprocess_config(tmp_path)
    environment.update(HIDDEN=hidden, DATA_DIR=str(tmp_path / "data"), SEARCH_CONFIG=str(config), **env)
    environment.setdefault("PRECISION", "fp32")
    command = [sys.executable, "-c", WITHOUT, *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)


def test_indexing_on_ray_without_ray_names_its_requirements_file(tmp_path, skimage_catalog):
    done = run_without("ray", ["index", "--catalog", str(skimage_catalog), "--quiet"], tmp_path, RAY_ADDRESS="local")
    assert done.returncode == 2, done.stderr
    assert "pip install -r requirements-ray.txt" in done.stderr
    assert "Traceback" not in done.stderr


def test_milvus_without_its_client_names_its_requirements_file(tmp_path, skimage_catalog):
    args = ["index", "--catalog", str(skimage_catalog), "--quiet"]
    done = run_without("pymilvus,milvus_lite", args, tmp_path, VECTOR_STORE="milvus")
    assert done.returncode == 2, done.stderr
    assert "pip install -r requirements-milvus.txt" in done.stderr
    assert "Traceback" not in done.stderr


def test_making_the_model_without_tensorflow_names_the_default_install(tmp_path):
    # A models folder holding only the frozen graph: `weights` must build the Keras model to convert it.
    graph = REPO_ROOT / "models" / GRAPH_FILE
    if not graph.exists():
        pytest.skip(f"{graph} is made by `make weights`")
    models = tmp_path / "models"
    models.mkdir()
    (models / GRAPH_FILE).symlink_to(graph)
    done = run_without("tensorflow,keras", ["weights"], tmp_path, MODELS_DIR=str(models))
    assert done.returncode == 2, done.stderr
    assert "needs TensorFlow" in done.stderr and "pip install -r requirements.txt" in done.stderr
    assert "Traceback" not in done.stderr
