"""`python -m indexer match`: a folder of photos matched against a real index of real photos, as the command line
runs it, into a CSV; photos that cannot be read get a row with their error and do not stop the job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from indexer.config import REPO_ROOT
from tests.conftest import indexed_skimage, read_csv, skimage_jpeg, subprocess_config

pytestmark = pytest.mark.slow  # command-line runs


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    return indexed_skimage(base_settings, embedder, tmp_path_factory.mktemp("match"))


def match(settings, *args: str) -> subprocess.CompletedProcess:
    config = subprocess_config(settings.data_dir.parent)
    env = {"DATA_DIR": str(settings.data_dir), "SEARCH_CONFIG": str(config)}
    command = [sys.executable, "-m", "indexer", "match", "--quiet", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True)


def test_every_photo_is_matched_into_the_csv_and_an_unreadable_one_is_reported(indexed, tmp_path):
    photos = tmp_path / "supplier"
    (photos / "shelf").mkdir(parents=True)
    for path in ("animals/chelsea.jpg", "space/rocket.jpg", "drinks/coffee.jpg"):  # catalog photos, as sent
        (photos / path.replace("/", "-")).write_bytes((indexed.catalog_dir / path).read_bytes())
    (photos / "shelf" / "turned-camera.jpg").write_bytes(skimage_jpeg("camera", 10))
    (photos / "shelf" / "broken.jpg").write_bytes(b"\xff\xd8 cut short")
    out = tmp_path / "matches.csv"
    done = match(indexed, "--photos", str(photos), "--out", str(out), "--k", "2")
    assert done.returncode == 0, done.stderr
    rows = read_csv(out)
    assert list(rows[0]) == ["photo", "rank", "sku", "score", "title", "category", "error"]
    by_photo: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_photo.setdefault(row["photo"], []).append(row)
    # The folder's order; two matches each, best first; a catalog photo's best match is its own product.
    assert list(by_photo) == [
        "animals-chelsea.jpg", "drinks-coffee.jpg", "shelf/broken.jpg", "shelf/turned-camera.jpg", "space-rocket.jpg"
    ]  # fmt: skip
    for photo, sku in (("animals-chelsea.jpg", "animals/chelsea"), ("space-rocket.jpg", "space/rocket")):
        best, second = by_photo[photo]
        assert (best["rank"], best["sku"], best["category"]) == ("1", sku, sku.split("/")[0])
        assert float(best["score"]) > 0.999 and float(second["score"]) < float(best["score"])
        assert best["error"] == "" and best["title"] == sku.split("/")[1]
    assert by_photo["shelf/turned-camera.jpg"][0]["sku"] == "people/camera"
    (broken,) = by_photo["shelf/broken.jpg"]
    assert broken["sku"] == "" and "not a recognised image format" in broken["error"]
    assert "Matched 4 of 5 photos" in done.stdout and "shelf/broken.jpg" in done.stdout


def test_filters_apply_and_a_filter_the_catalog_cannot_apply_says_so(indexed, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(skimage_jpeg("chelsea", 5))
    out = tmp_path / "people.csv"
    done = match(indexed, "--photos", str(photos), "--out", str(out), "--k", "5", "--category", "people")
    assert done.returncode == 0, done.stderr
    assert {row["sku"] for row in read_csv(out)} == {"people/astronaut", "people/camera"}
    done = match(indexed, "--photos", str(photos), "--out", str(tmp_path / "none.csv"), "--category", "shoes")
    assert done.returncode == 2 and "unknown category 'shoes'" in done.stderr
