"""The production server as `make serve` starts it, on a free loopback port, for the tests, the bench and the soak."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests

from indexer.config import REPO_ROOT
from tests.support.procfs import process_tree


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    process: subprocess.Popen
    url: str
    ready_seconds: float

    def worker_pids(self) -> list[int]:
        """The worker processes of the server's main process, now."""
        return process_tree(self.process.pid)[1:]


@contextmanager
def running_server(env: dict[str, str], timeout: float = 60) -> Iterator[RunningServer]:
    """`python -m service` (service.server); yields once /readyz answers 200, stops it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "service", "--port", str(port), "--no-access-log"]
    # Its log goes to a file: an unread pipe would stall the server once full.
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env},
                                   stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if requests.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):
                    pass
                if process.poll() is not None or time.perf_counter() - started > timeout:
                    log.seek(0)
                    raise RuntimeError(f"the server did not start:\n{log.read().decode(errors='replace')[-3000:]}")
                time.sleep(0.02)
            yield RunningServer(process, url, time.perf_counter() - started)
        finally:
            process.terminate()
            process.wait(timeout=30)


def counter_total(url: str, name: str) -> float:
    """A counter's value summed over its labels, as the server's /metrics gives it (every worker's)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )
