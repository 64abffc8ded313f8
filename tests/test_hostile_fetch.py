"""image_url as an attacker would aim it: at other ports (refused before any connection), at hosts and ports
that fail in different ways (one and the same 502, so ports and hosts cannot be told apart), and at URLs with
spaces or non-ASCII characters (encoded as a browser would, and fetched). Local servers started here only."""

from __future__ import annotations

import io
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import pytest

from service import create_app
from service.fetch import _parse, no_answer_message
from tests.conftest import indexed_skimage, skimage_photo


def photo_bytes() -> bytes:
    buffer = io.BytesIO()
    skimage_photo("chelsea").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


class Photos(BaseHTTPRequestHandler):
    """Any path under /photos/ is the photo; /redirect sends to ?to, decoded (raw, as some servers send it)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", unquote(self.path.removeprefix("/redirect?to=")))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.server.photo if self.path.startswith("/photos/") else b"not found"
        self.send_response(200 if self.path.startswith("/photos/") else 404)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def photos() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Photos)
    server.daemon_threads = True
    server.photo, server.paths = photo_bytes(), []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@contextmanager
def raw_server(behaviour: str) -> Iterator[int]:
    """A TCP port that fails as told: "reset" (accepts, then resets), "garbage" (answers no HTTP), "silent"
    (accepts and never answers)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            if behaviour == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif behaviour == "garbage":
                connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            elif behaviour == "silent":
                stop.wait(5)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


def unused_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return unused.getsockname()[1]


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    settings = indexed_skimage(
        base_settings, embedder, tmp_path_factory.mktemp("hostile-fetch"), fetch_timeout_s=1.0, fetch_allow_private=True
    )
    return settings


def search_url(client, url: str):
    return client.post("/api/search", data={"image_url": url, "k": "1"})


def test_only_the_configured_ports_are_fetched(indexed, embedder, photos):
    port = photos.server_address[1]
    shipped = create_app(indexed, embedder).test_client()  # fetch_ports = [80, 443]
    before = len(photos.paths)
    refused = search_url(shipped, f"http://127.0.0.1:{port}/photos/a.jpg")
    assert refused.status_code == 400 and f"port {port}" in refused.json["message"]
    assert "80 and 443" in refused.json["message"] and "service.fetch_ports" in refused.json["message"]
    assert len(photos.paths) == before  # refused before any connection
    opened = create_app(indexed.with_overrides(fetch_ports=(port,)), embedder).test_client()
    assert search_url(opened, f"http://127.0.0.1:{port}/photos/a.jpg").status_code == 200
    # A redirect to another port is refused as the URL itself would be.
    redirected = search_url(opened, f"http://127.0.0.1:{port}/redirect?to=http://127.0.0.1:{unused_port()}/x.jpg")
    assert redirected.status_code == 400 and "redirected to" in redirected.json["message"]


def test_every_failure_to_reach_a_server_is_the_same_502(indexed, embedder):
    closed = unused_port()
    with raw_server("reset") as reset, raw_server("garbage") as garbage, raw_server("silent") as silent:
        urls = {
            "refused": f"http://127.0.0.1:{closed}/photo.jpg",
            "reset": f"http://127.0.0.1:{reset}/photo.jpg",
            "no HTTP": f"http://127.0.0.1:{garbage}/photo.jpg",
            "timed out": f"http://127.0.0.1:{silent}/photo.jpg",
            "TLS to a plain port": f"https://127.0.0.1:{garbage}/photo.jpg",
            "no such name": f"http://no-such-host.invalid:{closed}/photo.jpg",
        }
        ports = (closed, reset, garbage, silent)
        client = create_app(indexed.with_overrides(fetch_ports=ports), embedder).test_client()
        answers = {kind: search_url(client, url) for kind, url in urls.items()}
    for kind, answer in answers.items():
        assert answer.status_code == 502, kind
        assert answer.json == {"error": "bad_gateway", "message": no_answer_message(1.0)}, kind
    assert client.get("/healthz").status_code == 200


def test_spaces_and_non_ascii_characters_are_encoded_as_a_browser_would(indexed, embedder, photos):
    port = photos.server_address[1]
    client = create_app(indexed.with_overrides(fetch_ports=(port,)), embedder).test_client()
    cases = {
        "/photos/red shoe.jpg": "/photos/red%20shoe.jpg",
        "/photos/chaussure_été.jpg?taille=42 EU&couleur=rouge": (
            "/photos/chaussure_%C3%A9t%C3%A9.jpg?taille=42%20EU&couleur=rouge"
        ),
        "/photos/already%20encoded.jpg": "/photos/already%20encoded.jpg",  # kept, not encoded twice
        "/photos/靴.jpg": "/photos/%E9%9D%B4.jpg",
    }
    for sent, received in cases.items():
        answer = search_url(client, f"http://127.0.0.1:{port}{sent}")
        assert answer.status_code == 200, (sent, answer.json)
        assert photos.paths[-1] == received
    # A redirect's Location with a space is encoded the same way.
    assert search_url(client, f"http://127.0.0.1:{port}/redirect?to=/photos/after redirect.jpg").status_code == 200
    assert photos.paths[-1] == "/photos/after%20redirect.jpg"


def test_a_non_ascii_host_name_is_sent_in_its_idna_form():
    target = _parse("https://bücher.example/schuhe/rot weiß.jpg", redirected=False)
    assert (target.host, target.host_header) == ("xn--bcher-kva.example", "xn--bcher-kva.example")
    assert target.path == "/schuhe/rot%20wei%C3%9F.jpg"
