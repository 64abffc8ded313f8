"""Query tokens shared by every server process: the photo kept in the data folder (service/recent_queries.py), found
by another app over the same DATA_DIR (another server worker, or another host), checked, written once, pruned
when old, and a folder that cannot be written costing only the sharing."""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from indexer.config import REPO_ROOT, cpu_count
from indexer.embedding.model import Embedder
from indexer.embedding.whitening import Whitening
from service import create_app
from service.recent_queries import PRUNED_MARKER, QueryFolder, RecentQueries, stored_photo
from tests.conftest import indexed_skimage, served_catalog, skimage_photo
from tests.support.procfs import process_tree
from tests.support.server import running_server


def side_by_side(left: str, right: str, size: int = 320) -> bytes:
    """Two catalog products in one photo: a region search by token finds either."""
    canvas = Image.new("RGB", (2 * size, size), (255, 255, 255))
    for column, name in enumerate((left, right)):
        photo = skimage_photo(name)
        photo.thumbnail((size, size))
        canvas.paste(photo, (column * size + (size - photo.width) // 2, (size - photo.height) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    return indexed_skimage(base_settings, embedder, tmp_path_factory.mktemp("query-store"))


@pytest.fixture
def settings(indexed):
    """The indexed catalog with an empty query folder for each test."""
    folder = indexed.data_dir / "queries"
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.unlink(missing_ok=True)
    return indexed


@pytest.fixture(scope="module")
def photo() -> bytes:
    return side_by_side("chelsea", "rocket")


def upload(client, photo: bytes, **fields):
    data = {"image": (io.BytesIO(photo), "query.jpg"), **{key: str(value) for key, value in fields.items()}}
    return client.post("/api/search", data=data, content_type="multipart/form-data")


def kept_files(settings) -> list[Path]:
    """The photos (and any temporary files) in the query folder's shards."""
    return sorted(path for path in (settings.data_dir / "queries").glob("*/*") if path.is_file())


def test_a_token_made_by_one_app_is_searched_previewed_and_shown_by_another(settings, embedder, photo):
    first, second = create_app(settings, embedder).test_client(), create_app(settings, embedder).test_client()
    searched = upload(first, photo, k=3)
    token = searched.json["query"]
    assert searched.status_code == 200 and kept_files(settings) == [settings.data_dir / "queries" / token[:2] / token]

    again = second.post("/api/search", data={"query": token, "k": "3"})
    assert again.status_code == 200 and again.json["query"] == token
    assert [r["sku"] for r in again.json["results"]] == [r["sku"] for r in searched.json["results"]]
    assert [r["score"] for r in again.json["results"]] == pytest.approx([r["score"] for r in searched.json["results"]])

    right = second.post("/api/search", data={"query": token, "box": "0.5,0,1,1"})
    assert right.status_code == 200 and right.json["results"][0]["sku"] == "space/rocket"
    grid = second.get(f"/api/search/preview.png?query={token}&box=0,0,0.5,1&k=2")
    assert grid.status_code == 200 and grid.mimetype == "image/png"

    # The results page's region search: the token and a box, no upload, answered by a third app.
    page = create_app(settings, embedder).test_client().post("/", data={"query": token, "box": "0,0,0.5,1", "k": "3"})
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and re.search(rf'name="query" value="{token}"', html)
    assert re.search(r'href="/products/([^"]+)"', html).group(1) == "animals/chelsea"


def test_a_remembered_photo_is_embedded_again_once_the_index_whitening_changes(embedder, photo):
    """A token searched again after a new base with another whitening came in: its old vector belongs to the
    old index (here even of another length), so the photo is embedded again, as the new index's vectors are."""
    own = Embedder(embedder.engine, embedder.network, embedder.tflite_sha256)  # unwhitened, whatever the suite did
    recent = RecentQueries()
    before = recent.add(photo, own)
    projection = np.random.default_rng(0).normal(size=(own.network.dim, 8)).astype(np.float32)
    own = own.with_whitening(Whitening("pca", np.zeros(own.network.dim, np.float32), projection, {}))
    after = recent.add(photo, own)
    assert after.token == before.token and before.vector.shape == (own.network.dim,) and after.vector.shape == (8,)
    np.testing.assert_allclose(after.vector, own.embed_image(after.photo), atol=1e-6)  # the photo as kept
    assert recent.add(photo, own) is after  # and remembered again


@pytest.mark.parametrize(
    "token",
    [
        "deadbeef",
        "0" * 63,
        "0" * 65,
        "A" * 64,  # upper case: not a token the service makes
        "../" * 21 + "x",
        "../../../../etc/passwd",
        "%2e%2e%2fcatalog.sqlite3",
        "/" + "0" * 63,
        "0" * 62 + "/.",
    ],
)
def test_malformed_tokens_are_a_404_and_reach_no_file(settings, embedder, token):
    client = create_app(settings, embedder).test_client()
    assert client.post("/api/search", data={"query": token}).status_code == 404
    assert client.get("/api/search/preview.png", query_string={"query": token}).status_code == 404
    assert client.post("/", data={"query": token}).status_code == 404
    assert QueryFolder(settings.data_dir / "queries", 3600).path(token) is None


def test_a_file_that_does_not_carry_its_token_is_refused(settings, embedder, photo):
    first, second = create_app(settings, embedder).test_client(), create_app(settings, embedder).test_client()
    token = upload(first, photo).json["query"]
    (kept,) = kept_files(settings)
    other = side_by_side("rocket", "chelsea")
    kept.write_bytes(other)  # someone swapped the photo behind the token
    assert second.post("/api/search", data={"query": token}).status_code == 404
    assert second.get(f"/api/search/preview.png?query={token}").status_code == 404
    # The app that made it still has the photo in memory.
    assert first.post("/api/search", data={"query": token}).status_code == 200


def test_the_same_photo_is_written_once_whichever_app_receives_it(settings, embedder, photo):
    first, second = create_app(settings, embedder).test_client(), create_app(settings, embedder).test_client()
    token = upload(first, photo).json["query"]
    (kept,) = kept_files(settings)
    written = kept.stat()
    os.utime(kept, (written.st_atime - 600, written.st_mtime - 600))
    for client in (first, second, second):
        assert upload(client, photo).json["query"] == token
    assert kept_files(settings) == [kept] and kept.read_bytes() == stored_photo(photo)  # re-encoded, as searched
    now = kept.stat()
    assert now.st_ino == written.st_ino  # never replaced by a new file
    assert now.st_mtime > written.st_mtime - 600  # brought forward by the other app: it is in use


def test_photos_older_than_the_ttl_are_pruned_at_most_once_a_minute(settings, embedder, photo):
    folder = settings.data_dir / "queries"
    stale, fresh = folder / "ab" / ("ab" + "1" * 62), folder / "cd" / ("cd" + "2" * 62)
    crashed = folder / "ab" / (".ab" + "3" * 62 + ".0123456789ab.tmp")  # a write cut short by a crash
    for path in (stale, fresh, crashed):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"photo")
    hour_ago = time.time() - 3601
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(crashed, (hour_ago, hour_ago))
    client = create_app(settings.with_overrides(query_ttl_s=3600), embedder).test_client()
    token = upload(client, photo).json["query"]
    assert set(kept_files(settings)) == {fresh, folder / token[:2] / token}
    assert (folder / PRUNED_MARKER).exists()

    # Within the minute, neither this process nor another (the marker says a prune just ran) scans again.
    stale.write_bytes(b"photo")
    os.utime(stale, (hour_ago, hour_ago))
    other = create_app(settings.with_overrides(query_ttl_s=3600), embedder).test_client()
    upload(client, side_by_side("coffee", "rocket"))
    upload(other, side_by_side("camera", "rocket"))
    assert stale.exists()
    # Once the last prune is a minute old, whoever writes next prunes.
    os.utime(folder / PRUNED_MARKER, (time.time() - 61, time.time() - 61))
    latest = create_app(settings.with_overrides(query_ttl_s=3600), embedder).test_client()
    upload(latest, side_by_side("astronaut", "rocket"))
    assert not stale.exists() and fresh.exists()


def test_pruning_by_several_processes_at_once_is_harmless(tmp_path):
    folders = [QueryFolder(tmp_path / "queries", ttl_s=10) for _ in range(3)]
    for number in range(50):
        token = f"{number:064x}"
        path = folders[0].path(token)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 60, time.time() - 60))
    removed = [folder.prune() for folder in folders]
    assert sum(removed) == 50 and not [path for path in (tmp_path / "queries").rglob("*") if path.is_file()]


def test_a_folder_that_cannot_be_written_costs_only_the_sharing(settings, embedder, photo, caplog):
    settings.data_dir.joinpath("queries").write_bytes(b"")  # a file where the folder should be: every write fails
    client = create_app(settings, embedder).test_client()
    with caplog.at_level(logging.WARNING, logger="service.recent_queries"):
        token = upload(client, photo).json["query"]
        assert upload(client, side_by_side("coffee", "rocket")).status_code == 200
        assert client.get(f"/api/search/preview.png?query={token}").status_code == 200  # from memory
    warnings = [r for r in caplog.records if r.name == "service.recent_queries" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tokens stay in this process only" in warnings[0].getMessage()


def test_a_ttl_of_zero_keeps_query_photos_in_memory_only(settings, embedder, photo):
    client = create_app(settings.with_overrides(query_ttl_s=0), embedder).test_client()
    token = upload(client, photo).json["query"]
    assert client.post("/api/search", data={"query": token}).status_code == 200
    assert not (settings.data_dir / "queries").exists()


def test_the_server_runs_one_process_by_default_where_a_second_would_break(base_settings):
    """workers = 0 means one process per core, unless tokens live in one process's memory (query_ttl_s = 0) or
    the vectors in a Milvus Lite file (one process may open it); a number configured is kept as it is."""
    default = base_settings.with_overrides(workers=0, threads=0, query_ttl_s=3600.0, index_backend="faiss")
    assert default.server_workers == cpu_count()
    assert default.server_threads == 2  # two per core, divided among the processes
    assert default.with_overrides(query_ttl_s=0).server_workers == 1
    assert default.with_overrides(index_backend="milvus", milvus_uri="").server_workers == 1  # Lite in DATA_DIR
    milvus_server = default.with_overrides(index_backend="milvus", milvus_uri="http://milvus:19530")
    assert milvus_server.server_workers == cpu_count()
    assert default.with_overrides(workers=3, query_ttl_s=0).server_workers == 3


@pytest.mark.slow
def test_two_single_threaded_server_workers_both_know_every_token(base_settings, embedder, tmp_path):
    """`make serve` with two sync workers: each request, on a new connection, may reach either worker."""
    service = (REPO_ROOT / "config.toml").read_text().split("[service]")[1]
    processes = re.search(r"^workers = .*\nthreads = .*$", service, re.MULTILINE).group(0)
    env, _ = served_catalog(base_settings, embedder, tmp_path, config_changes={processes: "workers = 2\nthreads = 1"})
    with running_server(env, timeout=120) as server:
        assert len(process_tree(server.process.pid)) == 3  # the master and two workers
        for name in ("chelsea", "coffee", "astronaut"):
            posted = requests.post(f"{server.url}/api/search", files={"image": ("q.jpg", side_by_side(name, "rocket"))})
            token = posted.json()["query"]
            for _ in range(4):
                by_token = requests.post(f"{server.url}/api/search", data={"query": token, "box": "0.5,0,1,1"})
                assert by_token.status_code == 200 and by_token.json()["results"][0]["sku"] == "space/rocket"
                grid = requests.get(f"{server.url}/api/search/preview.png", params={"query": token, "k": 2})
                assert grid.status_code == 200 and grid.headers["Content-Type"] == "image/png"
