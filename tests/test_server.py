"""The production server (`make serve`'s gunicorn command) over real HTTP on loopback, on SQLite and on
PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import shutil
import socket

import pytest
import requests

from bench.load import run_wrk, search_bodies
from bench.server import running_server
from tests.conftest import DATABASES, new_database, served_catalog

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop


@pytest.fixture(scope="module", params=DATABASES)
def server(request, base_settings, embedder, tmp_path_factory):
    settings = base_settings.with_overrides(database_url=new_database(request, request.param))
    env, catalog = served_catalog(settings, embedder, tmp_path_factory.mktemp("server"))
    with running_server(env, timeout=120) as running:
        yield running.url, catalog


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


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make test and make bench install it)")
def test_bench_load_counts_answered_searches_and_every_refused_one_as_an_error(server):
    url, catalog = server
    photos = [(catalog / "drinks" / "coffee.jpg").read_bytes(), (catalog / "animals" / "chelsea.jpg").read_bytes()]
    with search_bodies(photos, {"k": "3"}) as (folder, content_type):
        good = run_wrk(f"{url}/api/search", folder, content_type, clients=2, seconds=2)
    assert good["requests"] > 0 and good["errors"] == 0
    assert 0 < good["p50_ms"] <= good["p95_ms"] <= good["p99_ms"]
    with search_bodies([b"not a photo"], {"k": "3"}) as (folder, content_type):
        refused = run_wrk(f"{url}/api/search", folder, content_type, clients=1, seconds=1)
    assert refused["requests"] > 0 and refused["errors"] == refused["requests"]
