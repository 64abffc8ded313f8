"""Backups (`python -m indexer backup`) taken while a real server serves and takes writes, restored into an empty
data folder and database: the restored service answers every /similar and photo search as the source did at the
snapshot's change number; a backup killed part-way or a damaged file is never accepted. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from indexer.config import REPO_ROOT
from tests.conftest import DATABASES, SKIMAGE_CATALOG, new_database, served_catalog, skimage_jpeg
from tests.support.http import Client
from tests.support.server import running_server

pytestmark = pytest.mark.slow  # real servers and command-line runs

KEY = secrets.token_urlsafe(16)
PHOTOS = [name for names in SKIMAGE_CATALOG.values() for name in names]
# The 30 photo searches compared: each catalog photo, as it is and turned four ways (other photos of it).
SEARCHES = [(name, angle) for name in PHOTOS for angle in (0, 7, 15, 25, 35)]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "indexer", *args], cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def answers(url: str, skus: list[str]) -> dict[str, list[str]]:
    """Every product's /similar top 10 and each of SEARCHES' top 10, as skus."""
    client = Client(url, key="")
    found = {}
    for sku in skus:
        status, data, _ = client.similar(sku, k=10)
        assert status == 200, (sku, data)
        found[f"similar {sku}"] = [r["sku"] for r in data["results"]]
    for name, angle in SEARCHES:
        response = requests.post(f"{url}/api/search?k=10", data=skimage_jpeg(name, angle),
                                 headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        found[f"photo {name} {angle}"] = [r["sku"] for r in response.json()["results"]]
    return found


def live_skus(url: str) -> list[str]:
    response = requests.post(f"{url}/api/search?k=100", data=skimage_jpeg("coffee"),
                             headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
    return sorted(r["sku"] for r in response.json()["results"])


@pytest.mark.parametrize("database", DATABASES)
def test_a_backup_taken_while_serving_and_writing_restores_to_the_same_answers(
    request, database, base_settings, embedder, tmp_path
):
    url = new_database(request, database)
    settings = base_settings.with_overrides(database_url=url) if url else base_settings
    env, _ = served_catalog(settings, embedder, tmp_path / "source", API_KEY=KEY)
    snapshot = tmp_path / "snapshot"
    with running_server(env, timeout=120) as source:
        client = Client(source.url, key=KEY)
        for number, name in enumerate(PHOTOS):  # uploaded photos, which the snapshot must carry
            status, data, _ = client.put(f"up-{number}", skimage_jpeg(name, 40), {"title": f"Upload {name}"})
            assert status in (200, 201), data
        written = backup_while_writing_and_searching(source.url, env, snapshot)
        change = json.loads((snapshot / "snapshot.json").read_text())["change"]
        after = [sku for sku, at in written if at > change]
        assert [sku for sku, at in written if at <= change] and after, "the writes did not straddle the backup"
        # The source as it was at the snapshot's change number: the same live products, searched exactly.
        for sku in after:
            assert client.call("DELETE", f"/api/products/{sku}", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
        skus = live_skus(source.url)
        expected = answers(source.url, skus)
        # And the source moves on: none of this may reach the restored service.
        assert client.put("later", skimage_jpeg("astronaut", 80), {})[0] == 201

    verified = cli(env, "backup", "--verify", str(snapshot))
    assert verified.returncode == 0 and f"change {change}" in verified.stdout, verified.stderr
    restored_url = new_database(request, database)
    restored_env = {**env, "DATA_DIR": str(tmp_path / "restored")}
    restored_env.pop("DATABASE_URL", None)
    if restored_url:
        restored_env["DATABASE_URL"] = restored_url
    done = cli(restored_env, "restore", "--from", str(snapshot), "--quiet")
    assert done.returncode == 0, done.stderr
    with running_server(restored_env, timeout=120) as restored:
        assert requests.get(f"{restored.url}/readyz", timeout=30).json()["change"] == change
        assert live_skus(restored.url) == skus and "later" not in skus
        assert answers(restored.url, skus) == expected
        photo = requests.get(f"{restored.url}/images/up-0", timeout=30)  # the uploaded photo came along
        assert photo.status_code == 200 and photo.content
    # Restoring over a data folder that is in use is refused.
    again = cli(restored_env, "restore", "--from", str(snapshot), "--quiet")
    assert again.returncode == 2 and "is not empty" in again.stderr


def backup_while_writing_and_searching(url: str, env: dict[str, str], snapshot) -> list[tuple[str, int]]:
    """`backup --to snapshot` while one client writes products and another searches (every search answers 200);
    the (sku, change number) of each write."""
    stop = threading.Event()
    written: list[tuple[str, int]] = []
    searched: list[int] = []

    def write() -> None:
        writer = Client(url, key=KEY)
        number = 0
        while not stop.is_set():
            sku = f"churn-{number}"
            status, data, _ = writer.put(sku, skimage_jpeg(PHOTOS[number % len(PHOTOS)], 50 + number), {})
            assert status in (200, 201), data
            written.append((sku, data["change"]))
            number += 1

    def search() -> None:
        while not stop.is_set():
            searched.append(requests.get(f"{url}/api/products/up-0/similar", timeout=60).status_code)

    threads = [threading.Thread(target=write), threading.Thread(target=search)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        done = cli(env, "backup", "--to", str(snapshot), "--quiet")
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert searched and set(searched) == {200}
    return written


def test_a_backup_killed_part_way_or_damaged_is_never_accepted(base_settings, embedder, tmp_path):
    env, _ = served_catalog(base_settings, embedder, tmp_path / "source")
    complete = tmp_path / "complete"
    started = time.monotonic()
    assert cli(env, "backup", "--to", str(complete), "--quiet").returncode == 0
    whole = time.monotonic() - started
    for step in range(1, 8):
        folder = tmp_path / f"killed-{step}"
        process = subprocess.Popen([sys.executable, "-m", "indexer", "backup", "--to", str(folder), "--quiet"],
                                   cwd=REPO_ROOT, env={**os.environ, **env}, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(whole * step / 8)
        process.send_signal(signal.SIGKILL)
        process.wait()
        partial = folder.with_name(folder.name + ".partial")
        # Killed before the end: only the .partial folder, which nothing accepts; else a whole, valid snapshot.
        assert not folder.exists() or cli(env, "backup", "--verify", str(folder)).returncode == 0
        for refused in [partial] if partial.exists() else []:
            verify = cli(env, "backup", "--verify", str(refused))
            assert verify.returncode == 2 and "unfinished backup" in verify.stderr
            restore = cli({**env, "DATA_DIR": str(tmp_path / f"into-{step}")}, "restore", "--from", str(refused))
            assert restore.returncode == 2 and "unfinished backup" in restore.stderr
    # One byte changed in a file of the base: verify and restore name the file, and restore writes nothing.
    vectors = next(complete.glob("index/*/vectors.npy"))
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    name = vectors.relative_to(complete).as_posix()
    verify = cli(env, "backup", "--verify", str(complete))
    assert verify.returncode == 2 and f"{name} is corrupted" in verify.stderr
    target = tmp_path / "into-damaged"
    restore = cli({**env, "DATA_DIR": str(target)}, "restore", "--from", str(complete))
    assert restore.returncode == 2 and f"{name} is corrupted" in restore.stderr
    assert not target.exists()
    # A snapshot is never written over.
    assert "already exists" in cli(env, "backup", "--to", str(complete)).stderr
