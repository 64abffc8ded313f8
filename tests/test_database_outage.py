"""A PostgreSQL outage under real servers: searches answer 200 from what each server holds, marked stale; writes
answer 503 and none that was accepted is lost; when the database returns, the servers catch up, and a write through
one server reaches the other."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.conftest import served_catalog, skimage_jpeg, throwaway_cluster, wait_until
from tests.support.http import Client, result_skus
from tests.support.postgres import PostgresCluster
from tests.support.server import counter_total, running_server

pytestmark = [pytest.mark.slow, pytest.mark.postgresql]

KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {KEY}"}
OUTAGE_S = 10


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A cluster of this test's own, which it stops and starts again (the session's is shared)."""
    with throwaway_cluster() as cluster:
        yield cluster


def test_searches_answer_through_a_database_outage_and_the_servers_catch_up_after(
    cluster, base_settings, embedder, tmp_path
):
    settings = base_settings.with_overrides(database_url=cluster.url(cluster.create_database()))
    env, catalog = served_catalog(settings, embedder, tmp_path, API_KEY=KEY)
    photos = [path.read_bytes() for path in sorted(catalog.rglob("*.jpg"))]
    with running_server(env, timeout=120) as first, running_server(env, timeout=120) as second:
        searches: list[tuple[int, str | None]] = []
        writes: list[tuple[str, int]] = []
        stop = threading.Event()

        def search() -> None:
            number = 0
            while not stop.is_set():
                if number % 2:
                    response = requests.get(f"{first.url}/api/products/drinks/coffee/similar", timeout=60)
                else:
                    response = requests.post(f"{first.url}/api/search?k=3", data=photos[number % len(photos)],
                                             headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
                searches.append((response.status_code, response.headers.get("X-Index-Stale")))
                number += 1

        def write() -> None:
            writer = Client(first.url, key=KEY)
            number = 0
            while not stop.is_set():
                sku = f"written-{number}"
                status, data, _ = writer.put(sku, skimage_jpeg("astronaut", number), {"title": sku})
                assert status in (200, 201, 503), data
                if status == 503:
                    assert "unavailable" in str(data)
                writes.append((sku, status))
                number += 1
                time.sleep(0.1)

        threads = [threading.Thread(target=search), threading.Thread(target=write)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            cluster.pause()
            time.sleep(OUTAGE_S / 2)
            readyz = requests.get(f"{first.url}/readyz", timeout=30)
            stale_gauge = counter_total(first.url, "visual_search_index_stale_seconds")
            time.sleep(OUTAGE_S / 2)
            cluster.resume()
            time.sleep(3)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

        assert searches and {status for status, _ in searches} == {200}, searches
        assert any(stale for _, stale in searches), "no answer said it was stale"
        assert readyz.status_code == 200 and readyz.json()["stale"]["seconds"] > 0
        assert stale_gauge > 0
        assert any(status == 503 for _, status in writes) and any(status != 503 for _, status in writes)
        # Caught up: no longer stale, and every write that was accepted is found on both servers.
        wait_until(lambda: requests.get(f"{first.url}/readyz", timeout=30).json()["stale"] is None, timeout=30)
        accepted = [sku for sku, status in writes if status != 503]
        for url in (first.url, second.url):
            for sku in accepted:
                assert requests.get(f"{url}/api/products/{sku}", timeout=30).status_code == 200, (url, sku)
        # A write through the other server reaches this one.
        put = requests.put(f"{second.url}/api/products/after-outage", headers=AUTH, data={"title": "After"},
                           files={"image": ("a.jpg", skimage_jpeg("rocket", 33))}, timeout=60)  # fmt: skip
        assert put.status_code == 201, put.text
        wait_until(lambda: "after-outage" in found_by_photo(first.url, skimage_jpeg("rocket", 33)), timeout=30)


def found_by_photo(url: str, photo: bytes) -> list[str]:
    response = requests.post(f"{url}/api/search?k=5", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
    return result_skus(response.json()) if response.status_code == 200 else []
