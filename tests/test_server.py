"""The production server (`make serve`'s `python -m service`) over real HTTP on loopback, on SQLite and on
PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import DATABASES, new_database, served_catalog, wait_until
from tests.support.load import run_wrk, search_bodies
from tests.support.server import counter_total, running_server

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


def in_chunks(data: bytes, size: int = 1_000_000) -> Iterator[bytes]:
    """A body that requests sends with Transfer-Encoding: chunked, without a Content-Length."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_a_chunked_upload_is_searched_and_one_over_the_limit_refused(server):
    """Without a Content-Length the limit can only be found by reading: a photo sent in chunks is searched, and one
    past the limit is answered 413, not cut off at the limit and refused as a corrupt photo."""
    url, catalog = server
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    raw = {"Content-Type": "image/jpeg"}
    searched = requests.post(f"{url}/api/search?k=1", data=in_chunks(photo), headers=raw, timeout=30)
    assert searched.status_code == 200 and searched.json()["results"][0]["sku"] == "drinks/coffee"
    too_long = photo + b"\0" * 12_000_000  # a photo with trailing bytes decodes: only the limit can refuse it
    refused = requests.post(f"{url}/api/search?k=1", data=in_chunks(too_long), headers=raw, timeout=60)
    assert refused.status_code == 413 and "limit" in refused.json()["message"]
    form = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n\r\n' + too_long + b"\r\n--b--\r\n"
    )
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    refused = requests.post(f"{url}/api/search", data=in_chunks(form), headers=multipart, timeout=60)
    assert refused.status_code == 413
    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200


def searched(url: str, photo: bytes) -> bool:
    try:
        response = requests.post(
            f"{url}/api/search?k=1", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=30
        )
    except requests.ConnectionError:
        return False
    return response.status_code == 200 and response.json()["results"][0]["sku"] == "drinks/coffee"


def test_a_dead_worker_is_replaced_and_workers_stop_with_the_main_process(base_settings, embedder, tmp_path):
    """A worker killed outright (the kernel's OOM killer) is replaced, the other answering meanwhile; and when the
    main process is killed outright, its workers stop instead of answering on the port unmanaged."""
    config = {"workers = 0\nthreads = 0": "workers = 2\nthreads = 0"}
    env, catalog = served_catalog(base_settings, embedder, tmp_path, config_changes=config)
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    with running_server(env, timeout=120) as server:
        main = server.process.pid
        wait_until(lambda: len(server.worker_pids()) == 2)
        first = server.worker_pids()[0]
        os.kill(first, signal.SIGKILL)
        # The other worker answers meanwhile (a connection caught by the dying one is reset: then the next one).
        wait_until(lambda: searched(server.url, photo), timeout=5)
        wait_until(lambda: first not in server.worker_pids() and len(server.worker_pids()) == 2)  # replaced
        assert searched(server.url, photo)
        workers = server.worker_pids()
        os.kill(main, signal.SIGKILL)
        server.process.wait(timeout=30)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=30)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{server.url}/healthz", timeout=5)


def test_workers_killed_every_two_seconds_are_replaced_and_the_server_never_stops_serving(
    base_settings, embedder, tmp_path
):
    """The kernel's OOM killer, or a crash in a native decoder, taking a worker every 2 s for 30 s (the replacement
    each time, which Granian alone answers by exiting altogether) while 4 clients search: the server stays up,
    /healthz answers 200 throughout from the surviving worker, at least 90 % of searches succeed, and /metrics
    counts the deaths."""
    config = {"workers = 0\nthreads = 0": "workers = 2\nthreads = 0"}
    env, catalog = served_catalog(base_settings, embedder, tmp_path, config_changes=config)
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    with running_server(env, timeout=120) as server:
        wait_until(lambda: len(server.worker_pids()) == 2)
        stop = threading.Event()
        searches: list[bool] = []
        health: list[int] = []

        def search() -> None:
            while not stop.is_set():
                searches.append(searched(server.url, photo))

        def watch_health() -> None:
            while not stop.is_set():
                health.append(healthz(server.url))
                time.sleep(0.2)

        threads = [threading.Thread(target=search) for _ in range(4)] + [threading.Thread(target=watch_health)]
        for thread in threads:
            thread.start()
        kills = 0
        try:
            for _ in range(15):
                time.sleep(2)
                workers = sorted(server.worker_pids(), key=started_at)
                if len(workers) > 1:  # the youngest: the replacement, as in a crash loop; never the last one
                    os.kill(workers[-1], signal.SIGKILL)
                    kills += 1
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert server.process.poll() is None, "the server exited"
        assert kills >= 5
        assert health and all(status == 200 for status in health), health
        assert sum(searches) >= 0.9 * len(searches), f"{sum(searches)} of {len(searches)} searches succeeded"
        wait_until(lambda: len(server.worker_pids()) == 2, timeout=60)  # every slot refilled once the kills stop
        assert counter_total(server.url, "visual_search_worker_deaths_total") == kills
        assert searched(server.url, photo)


def healthz(url: str) -> int:
    """/healthz's status; a connection the dying worker had accepted is reset, and asked again once (a new one)."""
    try:
        return requests.get(f"{url}/healthz", timeout=10).status_code
    except requests.ConnectionError:
        return requests.get(f"{url}/healthz", timeout=10).status_code


def started_at(pid: int) -> int:
    """When a process started, in clock ticks since boot (Linux /proc)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


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
