"""The API over HTTP as the tests and the benchmarks speak it: multipart bodies built once and sent many times,
and one keep-alive connection to a server on this machine that times each call."""

from __future__ import annotations

import http.client
import json
import time
import uuid
from urllib.parse import quote, urlencode, urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def multipart_body(photo: bytes, fields: dict[str, str], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body with the photo as 'image', built once and sent many times."""
    boundary = boundary or uuid.uuid4().hex
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


class Client:
    """One keep-alive connection to the server on loopback; each call returns (status, JSON or None, ms).
    Writes carry `key` as their bearer token."""

    def __init__(self, url: str, key: str, timeout: float = 120):
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK:
            raise ValueError("the client only talks to this machine (loopback)")
        self.host, self.port, self.timeout, self.key = parts.hostname, parts.port, timeout, key
        self.connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict | None, float]:
        # A keep-alive connection the server has closed fails on first use: reconnect once. A
        # DELETE is never sent twice (a second one would answer 404), so it gets a fresh connection.
        if method == "DELETE":
            self.close()
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.connection.request(method, path, body=body, headers=headers or {})
                response = self.connection.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt or method == "DELETE":
                    raise
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if response.will_close:
                self.close()
            try:
                data = json.loads(payload)
            except ValueError:
                data = None
            return response.status, data, elapsed
        raise AssertionError("unreachable")

    def similar(self, sku: str, k: int = 10, **filters: object) -> tuple[int, dict | None, float]:
        query = urlencode({"k": k, **{name: v for name, v in filters.items() if v is not None}})
        return self.call("GET", f"/api/products/{quote(sku, safe='/')}/similar?{query}")

    def search(self, photo: bytes, k: int = 10) -> tuple[int, dict | None, float]:
        body, content_type = multipart_body(photo, {"k": str(k)})
        return self.call("POST", "/api/search", body, {"Content-Type": content_type})

    def put(self, sku: str, photo: bytes, fields: dict[str, str]) -> tuple[int, dict | None, float]:
        body, content_type = multipart_body(photo, fields)
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {self.key}"}
        return self.call("PUT", f"/api/products/{quote(sku, safe='/')}", body, headers)

    def delete(self, sku: str) -> tuple[int, dict | None, float]:
        headers = {"Authorization": f"Bearer {self.key}"}
        return self.call("DELETE", f"/api/products/{quote(sku, safe='/')}", None, headers)

    def product_status(self, sku: str) -> int:
        return self.call("GET", f"/api/products/{quote(sku, safe='/')}")[0]


def result_skus(data: dict | None) -> list[str]:
    """The skus of a search's or /similar's results, in order; none for an answer without results."""
    return [r["sku"] for r in (data or {}).get("results", [])]
