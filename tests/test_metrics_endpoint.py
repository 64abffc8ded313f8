"""GET /metrics: Prometheus text with request counts and times, embedding and search times, the index, writes."""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import SKIMAGE_CATALOG, served_catalog, skimage_jpeg, write_skimage_catalog
from tests.support.procfs import process_tree_cpu_seconds
from tests.support.server import running_server

KEY = "metrics-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PHOTOS = [name for names in SKIMAGE_CATALOG.values() for name in names]
METRICS_DIR = "visual-search-metrics-"  # METRICS_DIR_PREFIX in service/server.py
SEARCHED = {"endpoint": "api.search_by_photo", "method": "POST", "status": "200"}


class Scrape:
    """One parsed /metrics answer: sample values by name and labels (0 when absent)."""

    def __init__(self, text: str):
        self.text = text
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def rise(self, before: Scrape, name: str, **labels: str) -> float:
        """How much a sample grew since an earlier scrape."""
        return self.value(name, **labels) - before.value(name, **labels)

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


def scrape(client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return Scrape(response.get_data(as_text=True))


def indexed_app(settings, embedder, folder):
    index_catalog(settings, embedder, write_skimage_catalog(folder / "catalog"), progress=False)
    return create_app(settings, embedder)


@pytest.fixture(scope="module")
def client(base_settings, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return indexed_app(base_settings.with_overrides(data_dir=root / "data"), embedder, root).test_client()


def search(client, photo: bytes):
    data = {"image": (io.BytesIO(photo), "q.jpg"), "k": "3"}
    return client.post("/api/search", data=data, content_type="multipart/form-data")


def test_searches_raise_the_request_embedding_and_search_counts(client):
    before = scrape(client)
    photos = [skimage_jpeg(name, quality=71) for name in PHOTOS[:3]]  # not yet in the recent-query cache: embedded
    for photo in photos:
        assert search(client, photo).status_code == 200
    after = scrape(client)
    assert after.rise(before, "visual_search_http_requests_total", **SEARCHED) == 3
    assert after.rise(before, "visual_search_http_request_duration_seconds_count", **SEARCHED) == 3
    assert after.rise(before, "visual_search_embedding_seconds_count") == 3
    assert after.rise(before, "visual_search_search_seconds_count") == 3
    assert after.rise(before, "visual_search_search_seconds_sum") > 0
    assert after.rise(before, "visual_search_inference_cpu_seconds_total") > 0
    slowest = after.value("visual_search_http_request_duration_seconds_bucket", le="+Inf", **SEARCHED)
    assert slowest == after.value("visual_search_http_request_duration_seconds_count", **SEARCHED)


def test_more_like_this_is_timed_as_a_search_without_an_embedding(client):
    before = scrape(client)
    assert client.get("/api/products/drinks/coffee/similar").status_code == 200
    after = scrape(client)
    assert after.rise(before, "visual_search_search_seconds_count") == 1
    assert after.rise(before, "visual_search_embedding_seconds_count") == 0
    assert after.rise(before, "visual_search_inference_cpu_seconds_total") == 0
    labels = {"endpoint": "api.similar_products", "method": "GET", "status": "200"}
    assert after.rise(before, "visual_search_http_requests_total", **labels) == 1


def test_index_gauges_show_the_live_index(client):
    metrics = scrape(client)
    status = client.get("/readyz").json
    assert metrics.value("visual_search_index_ready") == 1
    assert metrics.value("visual_search_index_items") == status["items"] == 6
    assert metrics.value("visual_search_index_base_items") == 6
    assert metrics.value("visual_search_index_change") == status["change"] > 0
    assert metrics.value("visual_search_index_delta_items") == 0
    assert metrics.value("visual_search_index_masked_images") == 0
    base_version = status["index_version"].split("+")[0]
    assert metrics.value("visual_search_index_base_info", version=base_version, factory=status["factory"]) == 1
    assert 0 <= metrics.value("visual_search_index_base_age_seconds") < 3600


def test_errors_and_unknown_urls_are_counted_by_endpoint_never_by_path(client):
    before = scrape(client)
    assert client.get("/api/products/no-such-sku").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert search(client, b"not a photo").status_code == 400
    after = scrape(client)
    for labels in (
        {"endpoint": "api.product_details", "method": "GET", "status": "404"},
        {"endpoint": "unmatched", "method": "GET", "status": "404"},
        {"endpoint": "api.search_by_photo", "method": "POST", "status": "400"},
    ):
        assert after.rise(before, "visual_search_http_requests_total", **labels) == 1, labels
    assert "no-such-sku" not in after.text and "/no/such/page" not in after.text


def test_writes_are_counted_by_kind_and_status_and_move_the_index_gauges(base_settings, embedder, tmp_path):
    app = indexed_app(base_settings.with_overrides(data_dir=tmp_path / "data", api_key=KEY), embedder, tmp_path)
    client = app.test_client()
    before = scrape(client)

    def put(sku: str, headers=AUTH):
        data = {"image": (io.BytesIO(skimage_jpeg("coffee", quality=60)), "p.jpg"), "title": "Secret mug title"}
        return client.put(f"/api/products/{sku}", data=data, headers=headers, content_type="multipart/form-data")

    assert put("mug-secret-sku").status_code == 201
    assert put("mug-secret-sku").status_code == 200
    written = scrape(client)
    assert written.value("visual_search_index_items") == 7
    assert written.value("visual_search_index_delta_items") >= 1
    assert client.delete("/api/products/mug-secret-sku", headers=AUTH).status_code == 200
    assert client.delete("/api/products/mug-secret-sku", headers=AUTH).status_code == 404
    assert put("other", headers={}).status_code == 401
    after = scrape(client)
    expected = {("put", "201"): 1, ("put", "200"): 1, ("delete", "200"): 1, ("delete", "404"): 1, ("put", "401"): 1}
    for (kind, status), count in expected.items():
        assert after.rise(before, "visual_search_writes_total", kind=kind, status=status) == count, (kind, status)
    assert after.value("visual_search_index_items") == 6
    # Product data and the key never reach the metrics.
    assert "mug-secret-sku" not in after.text and "Secret mug" not in after.text and KEY not in after.text


def test_metrics_answer_before_there_is_an_index(base_settings, embedder, tmp_path):
    client = create_app(base_settings.with_overrides(data_dir=tmp_path / "empty"), embedder).test_client()
    metrics = scrape(client)
    assert metrics.value("visual_search_index_ready") == 0 and not metrics.has("visual_search_index_items")
    assert metrics.has("visual_search_http_requests_total")


def metrics_folder(workers: list[int], timeout: float = 60) -> Path:
    """The folder service/server.py made for the workers' metric files (they write them on start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders = {f.parent for pid in workers for f in Path(tempfile.gettempdir()).glob(f"{METRICS_DIR}*/*_{pid}.db")}
        if len(folders) == 1 and all(list(next(iter(folders)).glob(f"*_{pid}.db")) for pid in workers):
            return folders.pop()
        time.sleep(0.1)
    raise AssertionError(f"no metrics folder holds files of both workers {workers}")


def searches_answered_by(folder: Path, pid: int, snapshots: Path) -> float:
    """What one worker alone has counted, from a copy of its own file."""
    snapshot = snapshots / str(pid)
    snapshot.mkdir(exist_ok=True)
    if (counts := folder / f"counter_{pid}.db").exists():
        shutil.copy(counts, snapshot / counts.name)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(snapshot))
    return registry.get_sample_value("visual_search_http_requests_total", SEARCHED) or 0


def test_counts_add_up_across_server_workers(base_settings, embedder, tmp_path):
    """Two workers each count the searches they answer; every scrape, whichever worker answers it, sums both.
    Their inference CPU time is summed too, and is a part of the CPU time the server spent meanwhile."""
    # One request thread per worker, so that the second search of a pair goes to the other worker.
    changes = {"workers = 0\nthreads = 0": "workers = 2\nthreads = 1"}
    env, _ = served_catalog(base_settings, embedder, tmp_path, config_changes=changes)
    photos = [skimage_jpeg(name, quality=80) for name in PHOTOS[:2]]
    with running_server(env, timeout=120) as server:

        def search_over_http(photo: bytes) -> int:
            files = {"image": ("q.jpg", photo)}
            return requests.post(f"{server.url}/api/search", files=files, timeout=60).status_code

        def searches_counted() -> float:
            response = requests.get(f"{server.url}/metrics", timeout=30)
            assert response.status_code == 200
            metrics = Scrape(response.text)
            assert metrics.value("visual_search_index_items") == 6
            return metrics.value("visual_search_http_requests_total", **SEARCHED)

        workers = server.worker_pids()
        assert len(workers) == 2
        folder = metrics_folder(workers)
        server_cpu = process_tree_cpu_seconds(server.process.pid)
        sent, counted = [0], [searches_counted()]
        with ThreadPoolExecutor(2) as pool:
            for _ in range(30):  # until both workers have answered searches
                assert list(pool.map(search_over_http, photos)) == [200, 200]
                sent.append(sent[-1] + len(photos))
                counted.append(searches_counted())
                by_worker = [searches_answered_by(folder, pid, tmp_path) for pid in workers]
                if all(by_worker) and len(sent) >= 3:
                    break
        assert all(by_worker), f"one worker answered every search: {by_worker}"
        assert counted == sent and sum(by_worker) == sent[-1]
        server_cpu = process_tree_cpu_seconds(server.process.pid) - server_cpu
        inference = Scrape(requests.get(f"{server.url}/metrics", timeout=30).text)
        assert 0 < inference.value("visual_search_inference_cpu_seconds_total") < server_cpu
    assert not folder.exists()  # removed when the server stopped
