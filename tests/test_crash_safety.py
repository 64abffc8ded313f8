"""SIGKILL the indexer at several points of a real run; re-running must end exactly where an
uninterrupted run ends, without embedding again what was already committed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from indexer.config import REPO_ROOT
from indexer.index.segments import load_base
from tests.conftest import read_csv, subprocess_config

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop

PHOTOS = 160


@pytest.fixture(scope="module")
def catalog(grocery, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash")
    rows = read_csv(grocery / "catalog.csv")[::18][:PHOTOS]
    metadata = folder / "products.csv"
    metadata.write_text("sku,image,title,category\n" + "".join(
        f"{r['sku']},{r['image']},{r['title']},{r['category']}\n" for r in rows
    ))  # fmt: skip
    # Small batches, so that a run commits many times and a kill can land between commits.
    config = subprocess_config(folder, **{"batch_size = 32": "batch_size = 4"})
    return grocery, metadata, config


def start_indexer(catalog, data_dir):
    grocery, metadata, config = catalog
    env = {**os.environ, "DATA_DIR": str(data_dir), "SEARCH_CONFIG": str(config)}
    command = [sys.executable, "-m", "indexer", "index", "--catalog", str(grocery), "--metadata", str(metadata),
               "--quiet"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed_rows(data_dir) -> int:
    try:
        with sqlite3.connect(data_dir / "catalog.sqlite3", timeout=1) as connection:
            return connection.execute("SELECT count(*) FROM images").fetchone()[0]
    except sqlite3.OperationalError:  # no database or no table yet
        return 0


def state(data_dir):
    with sqlite3.connect(data_dir / "catalog.sqlite3") as connection:
        rows = connection.execute(
            "SELECT images.rel_path, images.sha256, images.embedding, products.sku, products.category "
            "FROM images JOIN products ON products.id = images.product_id ORDER BY images.rel_path"
        ).fetchall()
        ids = dict(connection.execute("SELECT rel_path, id FROM images").fetchall())
    base = load_base(data_dir / "index")
    vectors = {path: np.array(base.vectors[base.row_of_id[row_id]]) for path, row_id in ids.items()}
    return rows, vectors, len(base)


@pytest.fixture(scope="module")
def uninterrupted(catalog, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("whole")
    process = start_indexer(catalog, data_dir)
    assert process.wait(timeout=300) == 0, process.stderr.read()
    return state(data_dir)


@pytest.mark.parametrize(
    ("point", "when"),
    [
        ("before the first commit", lambda rows, seconds: seconds > 0.3),
        ("after a few batches", lambda rows, seconds: rows >= 12),
        ("half way", lambda rows, seconds: rows >= PHOTOS // 2),
        ("with every vector committed, around compaction", lambda rows, seconds: rows >= PHOTOS),
    ],
)
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(catalog, uninterrupted, tmp_path, point, when):
    data_dir = tmp_path / "data"
    process = start_indexer(catalog, data_dir)
    started = time.monotonic()
    while process.poll() is None and not when(committed_rows(data_dir), time.monotonic() - started):
        time.sleep(0.005)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    committed = committed_rows(data_dir)
    if "compaction" not in point:  # the last point may see the run finish first
        assert process.returncode == -signal.SIGKILL and committed < PHOTOS, f"the kill {point} came too late"

    rerun = start_indexer(catalog, data_dir)
    output, errors = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, errors
    embedded = int(output.split("embedded ")[1].split(" ")[0])
    assert embedded == PHOTOS - committed, f"killed {point}: {committed} rows were already committed"

    rows, vectors, count = state(data_dir)
    expected_rows, expected_vectors, expected_count = uninterrupted
    assert count == expected_count == PHOTOS
    assert [row[:2] + row[3:] for row in rows] == [row[:2] + row[3:] for row in expected_rows]
    for path, _, blob, *_ in rows:  # the index holds exactly the committed vectors, as an uninterrupted run's
        np.testing.assert_array_equal(vectors[path], np.frombuffer(blob, np.float32))
        np.testing.assert_allclose(vectors[path], expected_vectors[path], atol=1e-5)
