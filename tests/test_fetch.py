"""Search by image_url (service/fetch.py): real HTTP(S) from a server on 127.0.0.1 started here, and the
refusals that keep the service from being used to reach private addresses. No request leaves the machine."""

from __future__ import annotations

import io
import ipaddress
import logging
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from indexer.config import ConfigError, load_settings
from service import create_app
from service.fetch import EVERYWHERE, FetchFailed, FetchRefused, fetch_image, no_answer_message, refusal_reason
from service.recent_queries import stored_photo
from tests.conftest import indexed_skimage, skimage_photo

LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.0/8"),)
CAP = 2_000_000  # max_upload_bytes of the apps below

# Every socket.connect in this process (Python's audit events): the proof that a refused address was never
# dialled. Audit hooks cannot be removed; this one only appends to a list.
CONNECTS: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect":
        address = args[1]
        CONNECTS.append(address[0] if isinstance(address, tuple) else str(address))


sys.addaudithook(_audit)


@contextmanager
def connections() -> Iterator[list[str]]:
    """The addresses this process connects to inside the block."""
    seen: list[str] = []
    before = len(CONNECTS)
    try:
        yield seen
    finally:
        seen.extend(CONNECTS[before:])


def jpeg(image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cat_photo() -> bytes:
    # A different crop of a catalog photo, as a shopper's photo would be.
    photo = skimage_photo("chelsea")
    return jpeg(photo.crop((30, 20, photo.width - 10, photo.height - 30)), quality=75)


class Handler(BaseHTTPRequestHandler):
    """Routes for every case: photos, lies about Content-Type, redirects, huge, slow and failing answers."""

    protocol_version = "HTTP/1.1"  # for the chunked answer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def send(self, status: int, body: bytes, content_type: str = "image/jpeg", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host")))
        url = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        photo = self.server.photo
        try:
            if url.path == "/photo.jpg":
                self.send(200, photo)
            elif url.path == "/photo-labelled-text":
                self.send(200, photo, "text/plain")
            elif url.path == "/text-labelled-jpeg":
                self.send(200, b"hello, I am certainly a photo\n" * 20, "image/jpeg")
            elif url.path == "/html":
                self.send(200, b"<!doctype html><title>not a photo</title>", "text/html")
            elif url.path == "/redirect":
                self.send(302, b"", "text/plain", Location=query["to"])
            elif url.path.startswith("/hops/"):
                left = int(url.path.removeprefix("/hops/"))
                self.send(302, b"", "text/plain", Location=f"/hops/{left - 1}" if left else "/photo.jpg")
            elif url.path == "/no-location":
                self.send(302, b"", "text/plain")
            elif url.path == "/big":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", "50000000")
                self.end_headers()
                self.wfile.write(photo[:1000])
                self.close_connection = True
            elif url.path == "/chunked-big":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = photo[:65536].ljust(65536, b"\0")
                for _ in range(3 * CAP // len(chunk)):  # until the client stops reading, at most 3 caps
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True
            elif url.path == "/slow-body":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(photo)))
                self.end_headers()
                for byte in photo[:100]:  # 10 s in all, a byte every 0.1 s
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
                self.close_connection = True
            elif url.path == "/slow-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for byte in b"X-Slow: " + b"a" * 100:  # each byte well within a socket timeout
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
                self.close_connection = True
            else:
                self.send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):  # the fetch stopped reading: what several tests want
            self.close_connection = True


@contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.photo = cat_photo()
    server.requests = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadingHTTPServer]:
    with serve() as server:
        yield server


@pytest.fixture(scope="module")
def base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    settings = indexed_skimage(
        base_settings, embedder, tmp_path_factory.mktemp("fetch"), max_upload_bytes=CAP, fetch_timeout_s=1.0
    )
    return settings


@pytest.fixture(scope="module")
def open_client(indexed, embedder, server):
    """service.fetch_allow_private = true, and the local test server's port: it may be fetched."""
    settings = indexed.with_overrides(fetch_allow_private=True, fetch_ports=(80, 443, server.server_address[1]))
    return create_app(settings, embedder).test_client()


@pytest.fixture(scope="module")
def client(indexed, embedder, server):
    """As shipped, the local test server's port aside: only public addresses may be fetched."""
    return create_app(indexed.with_overrides(fetch_ports=(80, 443, server.server_address[1])), embedder).test_client()


def search_url(client, url: str, **fields):
    return client.post("/api/search", data={"image_url": url, **{k: str(v) for k, v in fields.items()}})


# --- searching by URL ------------------------------------------------------------------------------


def test_search_by_image_url_finds_the_photos_product_first(open_client, base, server):
    response = search_url(open_client, f"{base}/photo.jpg")
    assert response.status_code == 200, response.json
    assert response.json["results"][0]["sku"] == "animals/chelsea"
    assert response.json["box"] is None
    # The same token as uploading the same bytes: the page and the preview can use it.
    upload = open_client.post("/api/search", data={"image": (io.BytesIO(server.photo), "q.jpg")})
    assert upload.json["query"] == response.json["query"]
    assert open_client.get(f"/api/search/preview.png?query={response.json['query']}").status_code == 200


def test_image_url_with_a_box_searches_that_region(open_client, base, embedder, server, indexed):
    from indexer.embedding.images import Box

    response = search_url(open_client, f"{base}/photo.jpg", box="0.1,0.1,0.9,0.9", k=1)
    assert response.status_code == 200 and response.json["box"] == [0.1, 0.1, 0.9, 0.9]
    region = embedder.embed_image(stored_photo(server.photo), box=Box(0.1, 0.1, 0.9, 0.9))  # the photo as kept
    catalog_photo = embedder.embed_image(indexed.catalog_dir / "animals" / "chelsea.jpg")
    assert response.json["results"][0]["score"] == pytest.approx(float(region @ catalog_photo), abs=1e-4)


def test_the_search_page_takes_an_image_url(open_client, base):
    response = open_client.post("/", data={"image_url": f"{base}/photo.jpg", "k": "2"})
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and 'id="query-photo"' in html and 'href="/products/animals/chelsea"' in html


def test_the_host_header_is_the_urls_and_the_connection_goes_to_the_checked_address(open_client, server):
    port = server.server_address[1]
    with connections() as dialled:
        response = search_url(open_client, f"http://localhost:{port}/photo.jpg?size=large")
    assert response.status_code == 200
    assert server.requests[-1] == ("/photo.jpg?size=large", f"localhost:{port}")
    assert dialled and all(ipaddress.ip_address(address).is_loopback for address in dialled)


def test_content_type_is_not_trusted_the_bytes_are_sniffed(open_client, base):
    assert search_url(open_client, f"{base}/photo-labelled-text").status_code == 200
    for path in ("/text-labelled-jpeg", "/html"):
        response = search_url(open_client, base + path)
        assert response.status_code == 400, path
        assert "did not return an image" in response.json["message"]


# --- what is refused, and never dialled --------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://10.0.0.1/photo.jpg", "a private address (10.0.0.1)"),
        ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address (169.254.169.254)"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "a cloud metadata address (fd00:ec2::254)"),
        ("http://192.168.1.1/", "a private address"),
        ("http://100.64.0.1/", "a non-public address"),
        ("http://0.0.0.0/", "an unspecified address"),
        ("http://[::ffff:10.0.0.1]/", "a private address"),
        ("http://224.0.0.1/", "a multicast address"),
        ("http://240.0.0.1/", "a reserved address"),
        ("http://2130706433/photo.jpg", "a loopback address (127.0.0.1)"),  # 127.0.0.1 written as a number
    ],
)
def test_private_addresses_are_refused_before_any_connection(client, url, kind):
    with connections() as dialled:
        response = search_url(client, url)
    assert response.status_code == 400 and response.json["error"] == "bad_request"
    assert kind in response.json["message"] and "set service.fetch_allow_private" in response.json["message"]
    assert dialled == []


def test_the_local_server_and_localhost_are_refused_while_private_fetches_are_off(client, server):
    port = server.server_address[1]
    served = len(server.requests)
    for url in (f"http://127.0.0.1:{port}/photo.jpg", f"http://localhost:{port}/photo.jpg", f"http://[::1]:{port}/"):
        with connections() as dialled:
            response = search_url(client, url)
        assert response.status_code == 400 and "a loopback address" in response.json["message"], url
        assert dialled == []
    assert len(server.requests) == served


@pytest.mark.parametrize("target", ["http://10.0.0.1/secret", "http://169.254.169.254/latest/", "http://[::1]/"])
def test_a_redirect_to_a_private_address_is_refused_before_connecting(server, base, target):
    # The first hop (127.0.0.1) is allowed by the policy, the redirect target is not.
    with connections() as dialled, pytest.raises(FetchRefused) as refused:
        fetch_image(
            f"{base}/redirect?to={target}",
            max_bytes=CAP,
            timeout_s=2,
            allowed_networks=LOOPBACK_ONLY,
            ports=(80, server.server_address[1]),
        )
    assert f"redirected to {target}, which resolves to" in str(refused.value)
    assert dialled == ["127.0.0.1"]


def test_redirects_are_followed_three_times_and_no_more(open_client, base):
    assert search_url(open_client, f"{base}/hops/2").status_code == 200  # three redirects
    response = search_url(open_client, f"{base}/hops/3")
    assert response.status_code == 400 and "redirected more than 3 times" in response.json["message"]


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "gopher://127.0.0.1:70/", "javascript:alert(1)", "photo"]
)
def test_only_http_and_https_urls_are_fetched(open_client, url):
    with connections() as dialled:
        response = search_url(open_client, url)
    assert response.status_code == 400 and "must be an http or https URL" in response.json["message"]
    assert dialled == []


def test_a_redirect_to_another_scheme_is_refused(open_client, base):
    response = search_url(open_client, f"{base}/redirect?to=file:///etc/passwd")
    assert response.status_code == 400
    assert "redirected to 'file:///etc/passwd', which must be an http or https URL" in response.json["message"]


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://", "has no host name"), ("http://user:secret@127.0.0.1/", "user name or password")],
)
def test_urls_without_a_host_or_with_credentials_are_refused(open_client, url, message):
    response = search_url(open_client, url)
    assert response.status_code == 400 and message in response.json["message"]


def test_a_content_length_over_the_cap_is_refused_without_reading_the_body(open_client, base):
    response = search_url(open_client, f"{base}/big")
    assert response.status_code == 400
    assert "50,000,000 bytes, over the limit of 2,000,000 bytes" in response.json["message"]


def test_a_chunked_body_is_cut_off_at_the_cap(open_client, base):
    response = search_url(open_client, f"{base}/chunked-big")  # 6 MB sent without a length
    assert response.status_code == 400 and "larger than the limit of 2,000,000 bytes" in response.json["message"]


# --- failures: 502 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_a_fetch_over_the_time_limit_is_a_502_on_time(open_client, base, path):
    started = time.perf_counter()
    response = search_url(open_client, base + path)  # fetch_timeout_s = 1
    elapsed = time.perf_counter() - started
    assert response.status_code == 502 and response.json["error"] == "bad_gateway"
    assert response.json["message"] == no_answer_message(1.0)
    assert 0.9 < elapsed < 2.5  # the server would take 10 s


def test_a_server_that_fails_is_a_502_that_says_why(open_client, base):
    missing = search_url(open_client, f"{base}/missing.jpg")
    assert missing.status_code == 502 and "answered HTTP 404 Not Found" in missing.json["message"]
    no_location = search_url(open_client, f"{base}/no-location")
    assert no_location.status_code == 502 and "without a Location" in no_location.json["message"]


def test_one_photo_source_per_search(open_client, base, server):
    both = open_client.post(
        "/api/search", data={"image": (io.BytesIO(server.photo), "q.jpg"), "image_url": f"{base}/photo.jpg"}
    )
    assert both.status_code == 400 and "only one of image, image_url and query" in both.json["message"]
    neither = open_client.post("/api/search", data={"image_url": "  "})
    assert neither.status_code == 400 and "named 'image'" in neither.json["message"]


# --- https -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for the name localhost (and no address), made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


def test_https_sends_the_urls_host_name_as_sni_and_checks_the_certificate_against_it(certificate, caplog):
    cert, key = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_side.sni_callback = lambda sock, name, context: names.append(name)
    trusting = ssl.create_default_context(cafile=str(cert))
    with serve(server_side) as server:
        port = server.server_address[1]
        limits = {"max_bytes": CAP, "timeout_s": 3, "allowed_networks": EVERYWHERE, "ports": (port,)}
        fetched = fetch_image(f"https://localhost:{port}/photo.jpg", tls=trusting, **limits)
        assert fetched.data == server.photo and names[-1] == "localhost"
        assert server.requests[-1][1] == f"localhost:{port}"
        # The certificate names localhost, not 127.0.0.1: by address the check fails, as it must. The client is
        # told what every failure to reach a server tells; the log says why.
        with caplog.at_level(logging.INFO, logger="service.fetch"):
            with pytest.raises(FetchFailed, match=re.escape(no_answer_message(3))):
                fetch_image(f"https://127.0.0.1:{port}/photo.jpg", tls=trusting, **limits)
            assert "TLS connection to 127.0.0.1 failed" in caplog.records[-1].getMessage()
            # The system's authorities do not trust this certificate.
            with pytest.raises(FetchFailed, match=re.escape(no_answer_message(3))):
                fetch_image(f"https://localhost:{port}/photo.jpg", **limits)
            assert "certificate verify failed" in caplog.records[-1].getMessage()


# --- the policy and its configuration --------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("93.184.215.14", None),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.0.10", "a private address"),
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("fc00::1", "a private address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("100.64.0.1", "a non-public address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("::ffff:169.254.169.254", "a cloud metadata address"),
        ("2002:a00:1::1", "a private address"),  # 6to4 around 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),  # NAT64 around 169.254.169.254
        ("64:ff9b::808:808", None),  # NAT64 around 8.8.8.8
    ],
)
def test_only_public_addresses_pass_the_default_policy(address, reason):
    assert refusal_reason(ipaddress.ip_address(address)) == reason


def test_allowed_networks_open_exactly_those_networks():
    assert refusal_reason(ipaddress.ip_address("127.0.0.1"), LOOPBACK_ONLY) is None
    assert refusal_reason(ipaddress.ip_address("10.0.0.1"), LOOPBACK_ONLY) == "a private address"
    assert refusal_reason(ipaddress.ip_address("::1"), LOOPBACK_ONLY) == "a loopback address"
    assert all(refusal_reason(ipaddress.ip_address(a), EVERYWHERE) is None for a in ("10.0.0.1", "fd00:ec2::254"))


def test_fetch_settings_come_from_config_and_the_environment(monkeypatch, tmp_path):
    from indexer.config import REPO_ROOT

    monkeypatch.delenv("FETCH_ALLOW_PRIVATE", raising=False)
    shipped = load_settings(REPO_ROOT / "config.toml")
    assert (shipped.fetch_allow_private, shipped.fetch_timeout_s) == (False, 5.0)
    config = tmp_path / "config.toml"
    config.write_text("[service]\nfetch_allow_private = true\nfetch_timeout_s = 2.5\n")
    assert (load_settings(config).fetch_allow_private, load_settings(config).fetch_timeout_s) == (True, 2.5)
    monkeypatch.setenv("FETCH_ALLOW_PRIVATE", "1")
    assert load_settings(REPO_ROOT / "config.toml").fetch_allow_private is True
    monkeypatch.setenv("FETCH_ALLOW_PRIVATE", "perhaps")
    with pytest.raises(ConfigError, match="FETCH_ALLOW_PRIVATE"):
        load_settings(REPO_ROOT / "config.toml")
    monkeypatch.delenv("FETCH_ALLOW_PRIVATE")
    config.write_text("[service]\nfetch_timeout_s = 0\n")
    with pytest.raises(ConfigError, match="fetch_timeout_s"):
        load_settings(config)


def test_the_fetched_photo_embeds_like_the_same_bytes_uploaded(server, base, embedder):
    port = server.server_address[1]
    fetched = fetch_image(
        f"{base}/photo.jpg", max_bytes=CAP, timeout_s=2, allowed_networks=LOOPBACK_ONLY, ports=(port,)
    )
    assert fetched.data == server.photo and fetched.content_type == "image/jpeg"
    np.testing.assert_array_equal(embedder.embed_image(fetched.data), embedder.embed_image(server.photo))
