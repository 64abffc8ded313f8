"""Fetching a shopper's photo from image_url with strict limits, without opening a server-side request forgery
hole: every address and port is checked (after every redirect) and the connection goes to the address that was
checked. Every failure to reach the server or to get an HTTP answer from it (no such name, refused, reset, TLS,
too slow) is one and the same 502, so that searches cannot be used to tell open ports or live hosts apart; the
reason is logged for the operator."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from werkzeug.exceptions import BadGateway

from indexer.embedding.images import FORMAT_NAMES
from service.errors import BadRequest

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# What service.fetch_allow_private = true passes: every address may be fetched.
EVERYWHERE: tuple[IPNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
MAX_REDIRECTS = 3
# The ports image_url may name unless service.fetch_ports says otherwise.
WEB_PORTS = (80, 443)
# What a path and a query keep as they are; anything else (spaces, non-ASCII as UTF-8) is percent-encoded.
PATH_SAFE = "/%!$&'()*+,;=:@-._~"
QUERY_SAFE = PATH_SAFE + "?"
REDIRECTS = (301, 302, 303, 307, 308)
# Instance metadata services (AWS, ECS, Alibaba, Oracle): refused anyway as non-public, named for a clearer message.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# The formats a fetched body may start with (the decoder's accepted formats, WebP checked apart); the Content-Type
# header is not trusted.
IMAGE_SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
}
CHUNK = 64 * 1024
USER_AGENT = "visual-product-search (image_url fetch)"

# getaddrinfo cannot be given a timeout; it runs here so that a slow resolver cannot outlast the fetch's limit.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


class FetchRefused(BadRequest):
    """400: the URL, an address it resolves to, or what it returned is not allowed; the message says why."""


class FetchFailed(BadGateway):
    """502: the server behind image_url could not be reached in time or did not deliver a photo."""

    def __init__(self, message: str):
        super().__init__(description=message)


class _NoAnswer(Exception):
    """No HTTP answer from image_url's server, for the reason given: told to the log, never to the client."""


def no_answer_message(timeout_s: float) -> str:
    """The one message of every failure to reach image_url's server or to get an HTTP answer from it."""
    return f"image_url's server could not be reached or did not answer within {timeout_s:g} s"


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # after redirects
    content_type: str


@dataclass(frozen=True)
class _Target:
    url: str
    https: bool
    host: str  # the URL's host name (IDNA-encoded): sent in Host and in SNI, and checked against the certificate
    port: int
    path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.https else 80) else f"{host}:{self.port}"


def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_networks: Sequence[IPNetwork] = (),
    ports: Collection[int] = WEB_PORTS,
    max_redirects: int = MAX_REDIRECTS,
    tls: ssl.SSLContext | None = None,
) -> Fetched:
    """GET an image over http(s) within timeout_s in total and max_bytes, following at most max_redirects.

    Only public addresses are fetched, plus those in allowed_networks (EVERYWHERE allows all), and only on
    `ports`. https checks certificates with `tls` (default: the system's trusted authorities). Raises
    FetchRefused (400) for what is not allowed and FetchFailed (502) when the fetch itself fails."""
    try:
        return _fetch(url, max_bytes, timeout_s, allowed_networks, ports, max_redirects, tls)
    except _NoAnswer as exc:
        log.info("image_url %s: %s", url[:200], exc)
        raise FetchFailed(no_answer_message(timeout_s)) from None


def _fetch(
    url: str,
    max_bytes: int,
    timeout_s: float,
    allowed_networks: Sequence[IPNetwork],
    ports: Collection[int],
    max_redirects: int,
    tls: ssl.SSLContext | None,
) -> Fetched:
    deadline = time.monotonic() + timeout_s
    current = url
    for hop in range(max_redirects + 1):
        target = _parse(current, redirected=hop > 0, ports=ports)
        addresses = _resolve(target, deadline)
        for address, _ in addresses:
            reason = refusal_reason(address, allowed_networks)
            if reason is not None:
                via = f"image_url redirected to {target.url[:200]}, which" if hop else "image_url"
                raise FetchRefused(
                    f"{via} resolves to {reason} ({address}); set service.fetch_allow_private to allow it"
                )
        location = _get(target, addresses, max_bytes, deadline, tls)
        if isinstance(location, Fetched):
            return location
        current = urljoin(target.url, location)
    raise FetchRefused(f"image_url redirected more than {max_redirects} times")


def refusal_reason(address: IPAddress, allowed_networks: Sequence[IPNetwork] = ()) -> str | None:
    """Why an address may not be fetched ("a private address", ...), or None when it may."""
    if any(address.version == network.version and address in network for network in allowed_networks):
        return None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4 addresses inside IPv6 ones reach the IPv4 host: ::ffff:10.0.0.1 and NAT64 are that host ...
        if (inner := address.ipv4_mapped) is not None or address in NAT64:
            return refusal_reason(inner or ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        # ... and 6to4 and Teredo relay to it.
        tunnelled = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if tunnelled is not None and (reason := refusal_reason(tunnelled)) is not None:
            return reason
    for kind, flag in (
        ("a loopback", address.is_loopback),
        ("an unspecified", address.is_unspecified),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a reserved", address.is_reserved),
        ("a private", address.is_private),
        ("a non-public", not address.is_global),
    ):
        if flag:
            return f"{kind} address"
    return None


def _parse(url: str, redirected: bool, ports: Collection[int] = WEB_PORTS) -> _Target:
    where = f"image_url redirected to {url[:200]!r}, which" if redirected else "image_url"
    try:
        parts: SplitResult = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise FetchRefused(f"{where} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise FetchRefused(f"{where} must be an http or https URL, not {(parts.scheme or 'one without a scheme')!r}")
    if not parts.hostname:
        raise FetchRefused(f"{where} has no host name")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused(f"{where} must not carry a user name or password")
    try:
        host = parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
    except UnicodeError:
        raise FetchRefused(f"{where} has an invalid host name") from None
    https = parts.scheme == "https"
    port = port or (443 if https else 80)
    if port not in ports:
        allowed = " and ".join(str(p) for p in sorted(ports))
        raise FetchRefused(f"{where} names port {port}; only port {allowed} may be fetched (service.fetch_ports)")
    # As a browser sends it: spaces and non-ASCII characters percent-encoded (UTF-8), %XX escapes kept.
    path = quote(parts.path or "/", safe=PATH_SAFE) + (f"?{quote(parts.query, safe=QUERY_SAFE)}" if parts.query else "")
    return _Target(url=url.strip(), https=https, host=host, port=port, path=path)


def _resolve(target: _Target, deadline: float) -> list[tuple[IPAddress, tuple]]:
    """Every address the host resolves to (a literal address resolves to itself), with its socket address."""
    future = _resolver.submit(socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        raise _NoAnswer(f"resolving {target.host} took too long") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise _NoAnswer(f"{target.host!r} could not be resolved ({exc})") from None
    addresses = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = (ipaddress.ip_address(sockaddr[0].split("%")[0]), sockaddr)
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise _NoAnswer(f"{target.host!r} has no IPv4 or IPv6 address")
    return addresses


class _Watchdog:
    """Shuts the connection down at the deadline, so that nothing (a TLS handshake or headers trickled a byte at
    a time included) can outlast the total limit: socket timeouts alone restart with every byte received."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.fired = False
        # A second descriptor of the same connection: still valid after TLS has taken over the first.
        self._sock = sock.dup()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(OSError):  # already closed: the fetch finished just now
            self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()
        self._sock.close()


def _connect(target: _Target, addresses: list[tuple[IPAddress, tuple]], deadline: float) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers."""
    failures = []
    for address, sockaddr in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock = socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(remaining)
            sock.connect(sockaddr)  # the address checked above, never a second lookup of the name
            return sock
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                raise
            failures.append(f"{address}: {exc.strerror or exc}")
    raise _NoAnswer(f"could not connect to {target.host} ({'; '.join(failures)})")


def _get(
    target: _Target,
    addresses: list[tuple[IPAddress, tuple]],
    max_bytes: int,
    deadline: float,
    tls: ssl.SSLContext | None,
) -> Fetched | str:
    """One request: the image, or the Location of a redirect."""
    watchdog = None
    connection = None
    try:
        sock = _connect(target, addresses, deadline)
        watchdog = _Watchdog(sock, deadline)
        if target.https:
            try:  # SNI and the certificate check use the URL's host name, not the address connected to
                sock = (tls or ssl.create_default_context()).wrap_socket(sock, server_hostname=target.host)
            except ssl.SSLError as exc:
                sock.close()
                if watchdog.fired:
                    raise TimeoutError from None
                raise _NoAnswer(f"the TLS connection to {target.host} failed ({exc})") from None
        # Given a connected socket, http.client never connects (or resolves the name) itself.
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = sock
        headers = {"Host": target.host_header, "User-Agent": USER_AGENT, "Accept": "image/*", "Connection": "close"}
        connection.request("GET", target.path, headers={**headers, "Accept-Encoding": "identity"})
        response = connection.getresponse()
        if watchdog.fired:  # headers cut short by the deadline may still parse
            raise TimeoutError
        if response.status in REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise FetchFailed(f"image_url answered {response.status} without a Location")
            return location
        if response.status != 200:
            raise FetchFailed(f"image_url answered HTTP {response.status} {response.reason[:100]}".rstrip())
        length = response.getheader("Content-Length")
        if length and length.strip().isdigit() and int(length) > max_bytes:
            raise FetchRefused(f"image_url's image is {int(length):,} bytes, over the limit of {max_bytes:,} bytes")
        data = _read_body(response, max_bytes)
        if watchdog.fired:  # the body ended because the deadline shut the connection, not because it was whole
            raise TimeoutError
        if length and length.strip().isdigit() and len(data) < int(length):
            raise FetchFailed(f"image_url's body ended after {len(data):,} of its {int(length):,} bytes")
        _check_signature(data, response.getheader("Content-Type"))
        return Fetched(data=data, url=target.url, content_type=response.getheader("Content-Type") or "")
    except (FetchRefused, FetchFailed, _NoAnswer):
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if (watchdog is not None and watchdog.fired) or time.monotonic() >= deadline or isinstance(exc, TimeoutError):
            raise _NoAnswer("no whole answer before the deadline") from None
        raise _NoAnswer(f"{type(exc).__name__}: {exc}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if connection is not None:
            connection.close()


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body as far as it comes, at most max_bytes; stops as soon as its first bytes show it is no image."""
    chunks: list[bytes] = []
    received = 0
    checked = False
    while True:
        chunk = response.read1(CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
        if received > max_bytes:
            raise FetchRefused(f"image_url's image is larger than the limit of {max_bytes:,} bytes")
        if not checked and received >= 16:
            _check_signature(b"".join(chunks), response.getheader("Content-Type"))
            checked = True
    return b"".join(chunks)


def _check_signature(head: bytes, content_type: str | None) -> None:
    if not head:
        raise FetchRefused("image_url returned an empty body")
    if any(head.startswith(signature) for signatures in IMAGE_SIGNATURES.values() for signature in signatures):
        return
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return
    raise FetchRefused(
        f"image_url did not return an image (Content-Type {content_type or 'none'!r}, and the first bytes are not "
        f"{FORMAT_NAMES})"
    )
