"""Writes are all-or-nothing for the caller: a write that cannot be saved is an error that changed nothing, a
success is searchable, and after a failure and a restart every product that GET returns is found by search.

The real server (`python -m service`) runs on a data folder in a small tmpfs that the test fills up, or is SIGKILLed in
the middle of a stream of writes.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from tests.conftest import served_catalog, skimage_photo
from tests.support.server import running_server

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop

KEY = "failure-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def jpeg(name: str, angle: int) -> bytes:
    buffer = io.BytesIO()
    skimage_photo(name).rotate(angle).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def disk(tmp_path):
    """A 48 MB tmpfs: a disk that can really fill up."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CI and the development machines run as root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def served(base_settings, embedder, tmp_path):
    """An indexed catalog, and the environment of a production server over it."""

    def serve(data_dir: Path) -> tuple[dict[str, str], Path]:
        return served_catalog(base_settings, embedder, tmp_path, data_dir=data_dir, API_KEY=KEY)

    return serve


def put(url: str, sku: str, photo: bytes) -> requests.Response:
    return requests.put(f"{url}/api/products/{sku}", files={"image": ("p.jpg", photo)}, data={"title": sku},
                        headers=AUTH, timeout=60)  # fmt: skip


def found_by_search(url: str, sku: str, photo: bytes) -> bool:
    response = requests.post(f"{url}/api/search", files={"image": ("q.jpg", photo)}, data={"k": "3"}, timeout=60)
    return sku in [r["sku"] for r in response.json()["results"]]


def check_get_and_search_agree(url: str, photos: dict[str, bytes]) -> set[str]:
    """Every sku GET finds is found by a search with its photo; returns the skus that exist."""
    existing = {sku for sku in photos if requests.get(f"{url}/api/products/{sku}", timeout=30).status_code == 200}
    for sku in existing:
        assert found_by_search(url, sku, photos[sku]), f"{sku} exists but no search finds it"
    return existing


def test_a_full_disk_fails_writes_cleanly_and_nothing_half_written_remains(disk, served):
    env, _ = served(disk / "data")
    photos = {f"new-{i}": jpeg(name, 30 + 40 * i) for i, name in enumerate(["coffee", "rocket", "astronaut"])}
    with running_server(env) as server:
        assert put(server.url, "new-0", photos["new-0"]).status_code == 201
        # The disk fills up: other data, logs, another tenant. Unbuffered, so that closing the file has nothing
        # left to write (a buffered tail would raise the same "no space" again at close).
        with open(disk / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
            except OSError:
                pass
        failed = {}
        for sku in ("new-1", "new-2"):
            response = put(server.url, sku, photos[sku])
            assert response.status_code in (201, 503), response.text
            if response.status_code == 503:
                failed[sku] = response
                assert "nothing was changed" in response.json()["message"] and response.headers["Retry-After"]
                assert requests.get(f"{server.url}/api/products/{sku}", timeout=30).status_code == 404
            else:  # SQLite found room in pages it already had: then the write is complete
                assert found_by_search(server.url, sku, photos[sku])
        assert failed, "no write failed: the disk did not fill up"
        assert found_by_search(server.url, "new-0", photos["new-0"])  # searches go on while writes fail
    (disk / "filler").unlink()
    with running_server(env) as server:  # restarted with room again
        existing = check_get_and_search_agree(server.url, photos)
        assert existing == set(photos) - set(failed)
        assert put(server.url, "new-1", photos["new-1"]).status_code in (200, 201)  # the retry succeeds


def test_sigkill_during_writes_leaves_every_saved_product_findable(served, tmp_path):
    env, _ = served(tmp_path / "data")
    names = ["coffee", "rocket", "astronaut", "chelsea", "camera"]
    photos = {f"burst-{i}": jpeg(names[i % 5], 7 * i + 3) for i in range(40)}
    answered: dict[str, int] = {}

    def writer(url: str) -> None:
        for sku, photo in photos.items():
            try:
                answered[sku] = put(url, sku, photo).status_code
            except requests.RequestException:
                return  # the server is gone

    with running_server(env) as server:
        thread = threading.Thread(target=writer, args=(server.url,))
        thread.start()
        while len(answered) < 8 and thread.is_alive():
            threading.Event().wait(0.01)
        os.kill(server.process.pid, signal.SIGKILL)  # mid-stream: a write may be between commit and answer
        thread.join(timeout=60)
    assert 8 <= len(answered) < len(photos)
    with running_server(env) as server:
        existing = check_get_and_search_agree(server.url, photos)
        succeeded = {sku for sku, status in answered.items() if status in (200, 201)}
        assert succeeded <= existing  # every success survived the crash
