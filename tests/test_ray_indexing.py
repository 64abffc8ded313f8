"""Indexing on a Ray cluster (RAY_ADDRESS=local): the same rows and vectors as a plain run, which never imports Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer.config import REPO_ROOT
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store
from tests.conftest import subprocess_config

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starts a local Ray cluster: seconds

# Runs `python -m indexer index`, then says whether Ray was imported on the way.
INDEX_AND_REPORT = (
    "import sys; from indexer.__main__ import main; code = main(sys.argv[1:]); "
    "print('ray imported:', 'ray' in sys.modules); sys.exit(code)"
)


def index(catalog: Path, data_dir: Path, config: Path, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DATABASE_URL", "CATALOG")}
    environment.update(DATA_DIR=str(data_dir), SEARCH_CONFIG=str(config), PRECISION="fp32", **env)
    command = [sys.executable, "-c", INDEX_AND_REPORT, "index", "--catalog", str(catalog), "--quiet"]
    done = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def rows(base_settings, data_dir: Path) -> dict[str, tuple[str, str, np.ndarray]]:
    store = Store.open(base_settings.with_overrides(data_dir=data_dir))
    query = select(ProductImage.rel_path, Product.sku, ProductImage.sha256, ProductImage.embedding).join(Product)
    with Session(store.engine) as session:
        found = session.execute(query.where(LIVE)).all()
    store.engine.dispose()
    return {path: (sku, digest, np.frombuffer(blob, np.float32)) for path, sku, digest, blob in found}


def test_ray_local_indexes_the_same_rows_and_vectors_as_a_plain_run(tmp_path, base_settings, skimage_catalog):
    (skimage_catalog / "broken").mkdir()
    (skimage_catalog / "broken" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # Batches of 2: several batches in flight across the actors, results back in order.
    config = subprocess_config(tmp_path, **{"batch_size = 32": "batch_size = 2"})

    plain = index(skimage_catalog, tmp_path / "plain", config)
    assert "ray imported: False" in plain
    on_ray = index(skimage_catalog, tmp_path / "ray", config, RAY_ADDRESS="local")
    assert "ray imported: True" in on_ray

    for output in (plain, on_ray):
        assert "6 images of 6 products are searchable" in output
        assert "skipped 1" in output and "broken/truncated.jpg" in output
    expected, got = rows(base_settings, tmp_path / "plain"), rows(base_settings, tmp_path / "ray")
    assert len(expected) == 6 and got.keys() == expected.keys()
    for path, (sku, digest, vector) in expected.items():
        assert got[path][:2] == (sku, digest)
        cosine = float(vector @ got[path][2]) / float(np.linalg.norm(vector) * np.linalg.norm(got[path][2]))
        assert cosine >= 0.9999, path
