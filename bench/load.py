"""A small HTTP load generator for loopback only: N client threads, each bounded in requests and time."""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


def multipart_body(photo: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body with the photo as 'image', built once and sent many times."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query.jpg"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + photo
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class LoadResult:
    clients: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, float]:
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "clients": self.clients,
            "requests": len(self.latencies_ms),
            "errors": self.errors,
            "requests_per_s": round(len(self.latencies_ms) / self.seconds, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p95_ms": round(float(np.percentile(latencies, 95)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        }


def run_load(
    url: str, bodies: list[tuple[bytes, str]], clients: int, max_requests: int, max_seconds: float
) -> LoadResult:
    """POST bodies round-robin to url from `clients` keep-alive connections; stops at either bound."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the load generator only targets this machine (loopback)")
    lock = threading.Lock()
    result = LoadResult(clients=clients, seconds=0.0)
    counter = iter(range(max_requests))
    deadline = time.monotonic() + max_seconds

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        latencies, errors = [], 0
        while time.monotonic() < deadline:
            with lock:
                number = next(counter, None)
            if number is None:
                break
            body, content_type = bodies[(number + offset) % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", parts.path, body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            if ok:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1
        connection.close()
        with lock:
            result.latencies_ms.extend(latencies)
            result.errors += errors

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - started
    return result
