"""End to end on real shop photos: `python -m indexer index` on a small grocery catalog,
then shopper photos searched over HTTP through the Flask app."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.config import REPO_ROOT
from service import create_app
from tests.conftest import grocery_subset, read_csv, write_csv

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop

# Ten products from different coarse groups, with all their catalog photos (about 420).
CATEGORIES = (
    "Banana", "Carrots", "Kiwi", "Lemon", "Watermelon",
    "Oatly-Oat-Milk", "Pineapple", "Pomegranate", "Red-Bell-Pepper", "Brown-Cap-Mushroom",
)  # fmt: skip


@pytest.fixture(scope="module")
def small_grocery_catalog(grocery, tmp_path_factory):
    """A products.csv in a temporary folder whose image paths point into the shared dataset."""
    return grocery_subset(grocery, CATEGORIES, tmp_path_factory.mktemp("grocery"))


@pytest.fixture(scope="module")
def indexed(small_grocery_catalog, base_settings, tmp_path_factory):
    catalog, metadata, count = small_grocery_catalog
    data_dir = tmp_path_factory.mktemp("grocery-data")
    command = [
        sys.executable,
        "-m",
        "indexer",
        "index",
        "--catalog",
        str(catalog),
        "--metadata",
        str(metadata),
        "--quiet",
    ]
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert f"{count} images of {count} products are searchable" in result.stdout
    return base_settings.with_overrides(data_dir=data_dir)


def middle_query_per_category(grocery):
    """One held-out shop photo per category: the middle one of its test photos."""
    queries = read_csv(grocery / "queries.csv")
    per_category = [[q for q in queries if q["category"] == c] for c in CATEGORIES]
    return [photos[len(photos) // 2] for photos in per_category]


def test_shopper_photos_find_products_of_their_category(indexed, embedder, grocery):
    client = create_app(indexed, embedder).test_client()
    hits = []
    for query in middle_query_per_category(grocery):
        photo = (grocery / query["image"]).read_bytes()
        response = client.post(
            "/api/search", data={"image": (io.BytesIO(photo), "q.jpg"), "k": "5"}, content_type="multipart/form-data"
        )
        assert response.status_code == 200
        hits.append(response.json["results"][0]["category"] == query["category"])
    assert sum(hits) >= 8, f"top-1 category hits: {sum(hits)}/10"


def test_re_running_the_indexer_embeds_nothing(indexed, small_grocery_catalog, embedder):
    from indexer.jobs.indexing import index_catalog

    catalog, metadata, count = small_grocery_catalog
    report = index_catalog(indexed, embedder, catalog, metadata, progress=False)
    assert (report.embedded, report.unchanged, report.indexed) == (0, count, count)


def test_make_eval_reproduces_the_plain_model_figure(indexed, grocery, tmp_path, monkeypatch):
    """All held-out photos of the ten categories through `python -m eval`: R@1 was measured at 0.90."""
    from eval.__main__ import main as evaluate

    queries = [q for q in read_csv(grocery / "queries.csv") if q["category"] in CATEGORIES]
    queries_csv = write_csv(tmp_path / "queries.csv", queries)
    monkeypatch.setenv("DATA_DIR", str(indexed.data_dir))
    out = tmp_path / "eval"
    assert evaluate(["--catalog", str(grocery), "--queries", str(queries_csv), "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["summary"]["queries"] == len(queries)
    # Paths relative to the repository (the catalog) or the catalog (queries), never this machine's folders.
    assert (REPO_ROOT / report["catalog"]).resolve() == grocery.resolve()
    assert not Path(report["queries_file"]).is_absolute()
    assert all((grocery / row["query_path"]).is_file() for row in report["hardest"])
    assert report["summary"]["recall@1"] == pytest.approx(0.90, abs=0.03)
    assert report["summary"]["map@10"] > report["summary"]["recall@1"] - 0.1
    assert report["per_label"][0]["recall@1"] <= report["per_label"][-1]["recall@1"]
    assert (out / "hardest.png").stat().st_size > 10_000
