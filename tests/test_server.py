"""The production server (`make serve`'s gunicorn command) over real HTTP on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from indexer.config import REPO_ROOT
from indexer.indexing import index_catalog
from tests.conftest import write_skimage_catalog

GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(base_settings, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    settings = base_settings.with_overrides(data_dir=root / "data")
    catalog = write_skimage_catalog(root / "catalog")
    index_catalog(settings, embedder, catalog, progress=False)
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(settings.data_dir), "PORT": str(port)}
    process = subprocess.Popen(
        [str(GUNICORN), "--config", "service/gunicorn.conf.py", "service:create_app()"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                if requests.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # workers still loading the model
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become ready within 120 s")
            time.sleep(0.5)
        yield url, catalog
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_server_answers_searches_over_http(server):
    url, catalog = server
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    response = requests.post(f"{url}/api/search", files={"image": ("coffee.jpg", photo)}, data={"k": 3}, timeout=30)
    assert response.status_code == 200
    assert response.json()["results"][0]["sku"] == "drinks/coffee"


def test_server_rejects_garbage_and_keeps_serving(server):
    url, catalog = server
    bad = requests.post(f"{url}/api/search", files={"image": ("x.jpg", b"garbage")}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    assert (
        requests.get(f"{url}/images/drinks/coffee", timeout=5).content
        == (catalog / "drinks" / "coffee.jpg").read_bytes()
    )


def test_an_upload_over_the_limit_is_refused_before_its_body_is_sent(server):
    """Only the headers go out: a 413 must come back without the server waiting for 50 MB."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50000000\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
        )
        reply = ""
        while "limit" not in reply:  # headers and body may come in separate segments
            chunk = connection.recv(65536).decode(errors="replace")
            if not chunk:
                break
            reply += chunk
    assert reply.startswith("HTTP/1.1 413") and "limit" in reply
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
