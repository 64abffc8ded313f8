"""The soak's load: photo searches from several clients while other work runs, each one recorded, and the rules a
result is judged by; shared by every variant of `make soak` (bench.soak)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from indexer.config import REPO_ROOT

KEY = "soak-test-key"


class Search(NamedTuple):
    """A search as recorded: when it was sent (time.monotonic), its latency (s), status and result skus, the server
    ("a" or "b" with two, else None), which of the query photos it sent, and its best result's score."""

    sent: float
    latency: float
    status: int
    skus: list[str]
    server: str | None
    photo: int
    score: float | None


def indexer_command(arguments: list[str], env: dict) -> str:
    """Run `python -m indexer ...`; its output, or RuntimeError with its error output."""
    result = subprocess.run([sys.executable, "-m", "indexer", *arguments], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"indexer {arguments[0]} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def search_client(urls: list[str], offset: int, clients: int, bodies: list, stop: threading.Event, record) -> None:
    """Photo searches until stop is set, each to the next of urls in turn (one keep-alive connection each);
    record(Search) for each."""
    connections: list[http.client.HTTPConnection | None] = [None] * len(urls)
    number, turn = offset, offset
    while not stop.is_set():
        photo = number % len(bodies)
        body, content_type = bodies[photo]
        number += clients
        server, turn = turn % len(urls), turn + 1
        if connections[server] is None:
            connections[server] = http.client.HTTPConnection("127.0.0.1", int(urls[server].rsplit(":", 1)[1]),
                                                             timeout=30)  # fmt: skip
        connection = connections[server]
        sent = time.monotonic()
        try:
            connection.request("POST", "/api/search", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
            status = response.status
            results = json.loads(payload)["results"] if status == 200 else []
        except (OSError, http.client.HTTPException, ValueError):
            status, results = 0, []
            connection.close()
            connections[server] = None
        name = "ab"[server] if len(urls) > 1 else None
        best = results[0]["score"] if results else None
        record(Search(sent, time.monotonic() - sent, status, [r["sku"] for r in results], name, photo, best))
    for connection in connections:
        if connection is not None:
            connection.close()


class SearchLoad:
    """Photo searches from several clients (search_client) while other work runs, each search recorded."""

    def __init__(self, urls: list[str], clients: int, bodies: list):
        self.urls, self.clients, self.bodies = urls, clients, bodies
        self.searches: list[Search] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def record(self, search: Search) -> None:
        with self._lock:
            self.searches.append(search)

    def beside(self, workers: list[Callable[[], None]], timeout: float | None) -> tuple[float, float]:
        """Searches while the workers run: waits for each worker (up to timeout), searches 2 s more on the final
        state and stops; when the searches started (time.monotonic) and for how many seconds they ran."""
        arguments = [(self.urls, i, self.clients, self.bodies, self.stop, self.record) for i in range(self.clients)]
        searching = [threading.Thread(target=search_client, args=each) for each in arguments]
        working = [threading.Thread(target=worker) for worker in workers]
        started = time.monotonic()
        for thread in searching + working:
            thread.start()
        for thread in working:
            thread.join(timeout=timeout)
        time.sleep(2)  # a little more load on the final state
        self.stop.set()
        for thread in searching:
            thread.join()
        return started, time.monotonic() - started

    def latencies(self) -> dict[str, float | None]:
        """p50 and p99 of the answered searches, in ms."""
        latencies = [search.latency * 1000 for search in self.searches if search.status == 200]
        return {
            "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        }

    def errors(self) -> int:
        return sum(1 for search in self.searches if search.status != 200)


def wrong_results(searches: list[Search], events: dict, first: list[dict], second: list[dict], synthetic: bool,
                  started: float) -> list[dict]:  # fmt: skip
    """The results no search should have returned (the rules of the module's docstring)."""
    known = {row["sku"] for row in first} | {row["sku"] for row in second} | set(events["written"])
    removed = {row["sku"] for row in first} - {row["sku"] for row in second}
    wrong = []
    for sent, _, _, skus, server, *_ in searches:
        for sku in skus:
            deleted_at = events["deleted"].get(sku)
            if (
                (sku not in known and not (synthetic and sku.startswith("syn-")))
                or (deleted_at is not None and deleted_at < sent)
                or (sku in removed and events["reindexed_at"] is not None and events["reindexed_at"] < sent)
            ):
                wrong.append({"sku": sku, "sent": round(sent - started, 3), **({"server": server} if server else {})})
    return wrong


def new_events() -> dict:
    """When each change had finished (time.monotonic): sku -> time for the writes and deletions."""
    return {"written": {}, "deleted": {}, "reindexed_at": None, "compacted_at": None}
