"""The server's front: each request's body is read in the worker's event loop against a deadline, then the Flask
(WSGI) app runs on a fixed pool of request threads. A client that stalls is answered 408 and dropped, holding no
request thread while it dawdles (Granian's own WSGI body reads have no timeout)."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# A body must keep arriving at this many bytes per second (past the first read_timeout_s): a poor mobile uplink
# (160 kbit/s) still sends a 3 MB photo in time, while a client that drips bytes to hold a connection open is cut
# off, or pays for every second in bandwidth.
MIN_BODY_BYTES_PER_S = 20_000
# The body bytes a process holds at once (arrived, being read or waiting for a request thread), as this many of
# the largest bodies allowed: a request whose body would take the total past it is answered 503 and dropped, so
# that many slow or parked uploads cannot add up to more memory than this (80 MB at the default 10 MB limit). The
# bytes must really arrive: a stalled socket holds only what it sent.
HELD_BODIES = 8

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Headers = list[tuple[str, str]]


class Front:
    """An RSGI application (Granian's native interface) serving a WSGI app; see the module's docstring."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        threads: int,
        read_timeout_s: float,
        max_body_bytes: int,
        larger_bodies: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.read_timeout_s = read_timeout_s
        self.max_body_bytes = max_body_bytes
        # path -> its own cap on POST bodies (a batch of photos), each at most most_held; every other request keeps
        # max_body_bytes.
        self.larger_bodies = larger_bodies or {}
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="request")
        # Bytes set aside for the bodies held now; only the event loop's thread changes it.
        self.held = 0
        self.most_held = HELD_BODIES * (max_body_bytes + 1)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pool.shutdown(wait=True)

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        held: list[int] = [0]  # this request's bytes counted in self.held, given back however it ends
        try:
            try:
                body = await self._read_body(scope, protocol, held)
            except TimeoutError:
                message = f"the request body did not arrive within the server's limit ({self.read_timeout_s:g} s)"
                _refuse(protocol, 408, "request_timeout", message)
                return
            except ServerBusy:
                message = "the server holds as many uploads as it may at once; send the request again shortly"
                _refuse(protocol, 503, "busy", message, [("retry-after", "1")])
                return
            environ = _environ(scope, body)
            loop = asyncio.get_running_loop()
            status, headers, content = await loop.run_in_executor(self.pool, _call, self.app, environ)
        finally:
            self.held -= held[0]
        protocol.response_bytes(status, headers, content)

    async def _read_body(self, scope: Any, protocol: Any, held: list[int]) -> bytes:
        """The body, or its first limit + 1 bytes (max_body_bytes, or the path's in larger_bodies; the app answers
        413 for more), each part counted in held[0] and self.held as it arrives. Raises TimeoutError when a part of it
        is later than read_timeout_s plus its size at MIN_BODY_BYTES_PER_S, and ServerBusy when it would take the
        bodies held past most_held."""
        limit = self.max_body_bytes
        if scope.method == "POST":
            limit = self.larger_bodies.get(scope.path, limit)
        declared = scope.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b""  # refused from its Content-Length alone, without waiting for it
        if declared in (None, "0") and "transfer-encoding" not in scope.headers:
            return b""
        started = time.monotonic()
        parts: list[bytes] = []
        received = 0
        chunks = aiter(protocol)
        while received <= limit:
            deadline = started + self.read_timeout_s + received / MIN_BODY_BYTES_PER_S
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            if self.held + len(chunk) > self.most_held:
                raise ServerBusy
            self.held += len(chunk)
            held[0] += len(chunk)
            parts.append(chunk)
            received += len(chunk)
        return b"".join(parts)


class ServerBusy(Exception):
    """The bodies a process holds would pass its limit (HELD_BODIES)."""


def _refuse(protocol: Any, status: int, error: str, message: str, extra: Headers | None = None) -> None:
    """Answer without the app, closing the connection: the socket goes with any unread rest of the body."""
    headers = [("content-type", "application/json"), ("connection", "close"), *(extra or [])]
    protocol.response_bytes(status, headers, json.dumps({"error": error, "message": message}).encode())


def _environ(scope: Any, body: bytes) -> dict[str, Any]:
    """The WSGI environ (PEP 3333) of an RSGI request scope, as Granian's WSGI interface builds it."""
    server_host, _, server_port = scope.server.rpartition(":")
    client_host, _, _ = scope.client.rpartition(":")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope.method,
        "SCRIPT_NAME": "",
        # RSGI gives the path percent-decoded as UTF-8; WSGI wants those bytes as Latin-1.
        "PATH_INFO": scope.path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.query_string,
        "SERVER_NAME": server_host,
        "SERVER_PORT": server_port,
        "SERVER_PROTOCOL": f"HTTP/{scope.http_version}",
        "REMOTE_ADDR": client_host,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.scheme,
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in scope.headers.items():
        key = name.upper().replace("-", "_")
        key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def _call(app: WSGIApp, environ: dict[str, Any]) -> tuple[int, Headers, bytes]:
    """Run the WSGI app on a request thread; its status, headers and whole body."""
    started: list[Any] = []
    written: list[bytes] = []

    def start_response(status: str, headers: Headers, exc_info: Any = None) -> Callable[[bytes], None]:
        started[:] = [int(status.split(" ", 1)[0]), headers]
        return written.append

    result = app(environ, start_response)
    try:
        written.extend(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return started[0], started[1], b"".join(written)
