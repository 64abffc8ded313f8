"""A change of model while a real server searches and takes writes: `make index` at the other precision (int8 or
fp32) than the server's builds the new base beside the one served, and the server switches to it and to its
network together: no search fails, none mixes the two models, no accepted write is lost, /readyz shows the switch."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading

import pytest
import requests

from indexer.config import REPO_ROOT
from tests.conftest import served_catalog, skimage_jpeg, wait_until
from tests.support.http import Client, result_skus
from tests.support.server import running_server

pytestmark = pytest.mark.slow

KEY = secrets.token_urlsafe(16)
# A catalog photo searched finds itself at the same cosine each time one model embeds the query and the index; int8
# and fp32 vectors of one photo are about 0.995 apart, so a search that mixed them would score it at neither
# model's own figure.
SAME_SCORE = 2e-4


def precision(url: str) -> str:
    return requests.get(f"{url}/readyz", timeout=30).json()["model"]["precision"]


def top_score(url: str, photo: bytes) -> float:
    response = requests.post(f"{url}/api/search?k=1", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60)
    return response.json()["results"][0]["score"]


def test_a_model_change_under_load_switches_without_a_failed_search_a_mixed_answer_or_a_lost_write(
    base_settings, embedder, tmp_path
):
    env, catalog = served_catalog(base_settings, embedder, tmp_path, API_KEY=KEY)
    photos = [path.read_bytes() for path in sorted(catalog.rglob("*.jpg"))]
    with running_server(env, timeout=120) as server:
        before = precision(server.url)
        after = "fp32" if before == "int8" else "int8"
        scores = {before: [top_score(server.url, photo) for photo in photos]}
        stop = threading.Event()
        searches: list[tuple[int, int, float | None]] = []  # (status, photo, its top score)
        writes: list[tuple[str, int, bytes]] = []

        def search() -> None:
            number = 0
            while not stop.is_set():
                response = requests.post(f"{server.url}/api/search?k=3", data=photos[number % len(photos)],
                                         headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
                top = response.json()["results"][0]["score"] if response.status_code == 200 else None
                searches.append((response.status_code, number % len(photos), top))
                number += 1

        def write() -> None:
            writer = Client(server.url, key=KEY)
            number = 0
            while not stop.is_set():
                photo = skimage_jpeg("astronaut", 10 + number)
                status, data, _ = writer.put(f"written-{number}", photo, {"title": f"Written {number}"})
                assert status in (200, 201, 503), data  # 503: made with the model before, as the switch came
                writes.append((f"written-{number}", status, photo))
                number += 1

        threads = [threading.Thread(target=search), threading.Thread(target=write)]
        for thread in threads:
            thread.start()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "indexer", "index", "--catalog", str(catalog), "--quiet"], cwd=REPO_ROOT,
                env={**os.environ, **env, "PRECISION": after}, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            wait_until(lambda: precision(server.url) == after, timeout=30)
            wait_until(lambda: len(searches) > 20, timeout=30)  # and some more searches on the new model
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)

        assert {status for status, *_ in searches} == {200}, [s for s in searches if s[0] != 200][:5]
        scores[after] = [top_score(server.url, photo) for photo in photos]
        mixed = [(photo, top) for _, photo, top in searches
                 if all(abs(top - scores[model][photo]) > SAME_SCORE for model in (before, after))]  # fmt: skip
        assert not mixed, (mixed[:5], scores)
        assert {top for _, _, top in searches} & set(scores[after]), "no search was answered by the new model"
        accepted = [(sku, photo) for sku, status, photo in writes if status in (200, 201)]
        assert accepted
        for sku, photo in accepted:  # each found by its own photo, on the new model
            response = requests.post(f"{server.url}/api/search?k=5", data=photo,
                                     headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
            assert sku in result_skus(response.json()), sku
        ready = requests.get(f"{server.url}/readyz", timeout=30).json()
        assert ready["model"]["precision"] == after and ready["search"] is not None
