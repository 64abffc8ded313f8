"""Slow clients against the real server: sockets that send a request's headers and a little of its body, then
stall, are answered 408 and closed after service.read_timeout_s, and meanwhile hold up no other client."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
import requests

from indexer.config import Settings
from service.front import HELD_BODIES, MIN_BODY_BYTES_PER_S
from tests.conftest import served_catalog, wait_until
from tests.support.server import running_server

pytestmark = pytest.mark.slow  # a real server, held for half a minute

SLOW_SOCKETS = 32
HELD_S = 30
# What a stalled client sends: the headers of a 100 kB upload and 3 bytes of it.
STALLED = (
    b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\nabc"
)


@pytest.fixture(scope="module")
def server(base_settings: Settings, embedder, tmp_path_factory):
    env, catalog = served_catalog(base_settings, embedder, tmp_path_factory.mktemp("slow-clients"))
    with running_server(env, timeout=120) as running:
        yield running.url, catalog


def connect(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def stalled_socket(url: str) -> socket.socket:
    connection = connect(url)
    connection.sendall(STALLED)
    connection.setblocking(False)
    return connection


def answer_if_closed(connection: socket.socket, received: dict[socket.socket, bytes]) -> bytes | None:
    """What the server sent on a stalled socket once it has closed it; None while it is still open."""
    try:
        while chunk := connection.recv(65536):
            received[connection] = received.get(connection, b"") + chunk
    except BlockingIOError:
        return None
    except ConnectionResetError:
        pass
    connection.close()
    return received.pop(connection, b"")


def test_stalled_bodies_hold_up_no_one_and_are_dropped(server, base_settings):
    """32 sockets stay stalled mid-body for 30 s (each one the server drops is replaced at once, as an attacker
    would): /healthz and a photo search from another client answer within 2 s throughout, and every stalled
    socket is answered 408 and closed after the read timeout."""
    url, catalog = server
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    opened = {stalled_socket(url): time.monotonic() for _ in range(SLOW_SOCKETS)}
    received: dict[socket.socket, bytes] = {}
    dropped: list[tuple[float, bytes]] = []  # (seconds held, the server's answer)
    rounds = 0
    started = time.monotonic()
    try:
        while time.monotonic() - started < HELD_S:
            assert requests.get(f"{url}/healthz", timeout=2).status_code == 200
            search = requests.post(f"{url}/api/search", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=2)
            assert search.status_code == 200 and search.json()["results"][0]["sku"] == "drinks/coffee"
            rounds += 1
            for connection, since in list(opened.items()):
                if (answer := answer_if_closed(connection, received)) is not None:
                    dropped.append((time.monotonic() - since, answer))
                    del opened[connection]
                    opened[stalled_socket(url)] = time.monotonic()
            assert len(opened) == SLOW_SOCKETS
            time.sleep(0.2)
    finally:
        for connection in opened:
            connection.close()
    # Every socket of the first wave, and of the next ones, was cut off: no sooner than the timeout (a little
    # slack for the clocks of two processes), and with a 408 that says why.
    assert len(dropped) >= 2 * SLOW_SOCKETS, (rounds, len(dropped))
    limit = base_settings.read_timeout_s + 100_000 / MIN_BODY_BYTES_PER_S
    assert all(held > base_settings.read_timeout_s - 0.5 for held, _ in dropped)
    assert all(held < limit + 10 for held, _ in dropped)  # generous: the server's drop, not this loop's pace
    for _, answer in dropped:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and b"did not arrive" in answer


def test_stalled_headers_are_dropped(server, base_settings):
    """Headers cut off mid-line: the server closes the connection after the read timeout."""
    url, _ = server
    with connect(url) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Stalled: ")
        started = time.monotonic()
        connection.settimeout(base_settings.read_timeout_s + 30)
        assert connection.recv(65536) == b""  # closed: the end of the stream, before any answer
        assert time.monotonic() - started > base_settings.read_timeout_s - 0.5
    assert requests.get(f"{url}/healthz", timeout=2).status_code == 200


def test_a_slow_but_steady_upload_is_searched(server, base_settings):
    """A body that takes longer than the read timeout in all, each part arriving well within it and the whole at
    the minimum rate or faster, is read and searched: the limit is on stalling, not on slow links."""
    url, catalog = server
    photo = (catalog / "medical" / "retina.jpg").read_bytes()  # 240 kB
    parts = 8
    pause = base_settings.read_timeout_s / 5
    assert parts * pause > base_settings.read_timeout_s
    assert parts * pause < base_settings.read_timeout_s + len(photo) / MIN_BODY_BYTES_PER_S - 1
    size = -(-len(photo) // parts)
    with connect(url) as connection:
        connection.sendall(
            b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(photo)).encode() + b"\r\n\r\n"
        )
        for start in range(0, len(photo), size):
            time.sleep(pause)
            connection.sendall(photo[start : start + size])
        connection.settimeout(30)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert b'"sku":"medical/retina"' in reply.replace(b" ", b"")


def test_the_read_timeout_is_checked(tmp_path):
    from indexer.config import ConfigError, load_settings
    from tests.conftest import subprocess_config

    for bad in ("0", "0.5", "601", "-1"):
        config = subprocess_config(tmp_path, **{"read_timeout_s = 5.0": f"read_timeout_s = {bad}"})
        with pytest.raises(ConfigError, match="read_timeout_s"):
            load_settings(config)


def test_bodies_past_what_a_process_holds_are_refused_and_the_rest_are_served(server, base_settings):
    """Sockets that send almost all of the largest allowed body and then stall hold those bytes: once a process
    holds HELD_BODIES of them, a further upload is answered 503 busy at once, /healthz (no body) still answers,
    and uploads are searched again as soon as the stalled sockets go."""
    url, catalog = server
    largest = base_settings.max_upload_bytes
    head = (
        b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\nContent-Length: "
        + str(largest).encode()
        + b"\r\n\r\n"
    )
    held: list[socket.socket] = []
    refused = 0
    try:
        # Each server process (two at the defaults on 2 cores) holds its own bodies, and the kernel deals the
        # connections out as it likes: more sockets than both can hold, each either held or refused.
        for _ in range(HELD_BODIES * 2 + 6):
            connection = connect(url)
            # Refused and closed before the whole body is sent: the answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.sendall(head + b"\xff" * (largest - 10))
            if answered_busy(connection, wait_s=1.0):
                refused += 1
                connection.close()
            else:
                held.append(connection)
        assert refused >= 1 and held
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        for connection in held:
            connection.close()
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    wait_until(
        lambda: (
            requests.post(
                f"{url}/api/search", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=10
            ).status_code
            == 200
        ),
        timeout=30,
    )


def answered_busy(connection: socket.socket, wait_s: float) -> bool:
    """Whether the server answered this socket 503 busy within wait_s (a held socket gets no answer)."""
    connection.settimeout(wait_s)
    try:
        answer = connection.recv(65536)
    except (TimeoutError, ConnectionResetError):
        return False
    return answer.startswith(b"HTTP/1.1 503") and b"busy" in answer
