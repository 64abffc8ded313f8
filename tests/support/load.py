"""HTTP load for `make bench` and the server's tests: wrk, a load generator in C, POSTing real photos to the
server on loopback.

A load generator written in Python would spend a few per cent of the same two cores that the
server needs (measured: 0.4 ms of CPU per request with http.client, against 0.1 ms for
wrk), so the server's figure would depend on the client's.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from tests.support.http import LOOPBACK, multipart_body

WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
INSTALL_WRK = "install wrk (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk) and run make bench again"


@contextmanager
def search_bodies(photos: list[bytes], fields: dict[str, str], raw: bool = False) -> Iterator[tuple[Path, str]]:
    """The photos as request bodies in a temporary folder (one file each), for wrk.lua to load: multipart
    forms with one boundary for all, or (raw) the photos' own bytes, whose fields then go in the URL.
    Yields the folder and the content type."""
    boundary = uuid.uuid4().hex
    content_type = f"multipart/form-data; boundary={boundary}"
    if raw:  # wrk.lua sends one content type for all: the photos must share a format
        (content_type,) = {Image.open(io.BytesIO(photo)).get_format_mimetype() for photo in photos}
    with tempfile.TemporaryDirectory(prefix="bench-bodies-") as folder:
        for number, photo in enumerate(photos):
            body = photo if raw else multipart_body(photo, fields, boundary)[0]
            (Path(folder) / f"{number:05d}.body").write_bytes(body)
        yield Path(folder), content_type


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(f"bench: the HTTP load needs wrk, which is not installed; {INSTALL_WRK}")
    return path


def run_wrk(url: str, bodies: Path, content_type: str, clients: int, seconds: int) -> dict[str, float]:
    """`clients` keep-alive connections POSTing the bodies round-robin for `seconds`; requests/s,
    latency percentiles and errors (any non-2xx answer or socket error counts as one)."""
    if urlsplit(url).hostname not in LOOPBACK:
        raise ValueError("the benchmark's load only targets this machine (loopback)")
    command = [wrk_path(), "--threads", "1", "--connections", str(clients), "--duration", f"{seconds}s",
               "--timeout", "30s", "--script", str(WRK_SCRIPT), url, "--", str(bodies), content_type]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    report = next((line for line in finished.stdout.splitlines() if line.startswith("{")), None)
    if finished.returncode != 0 or report is None:
        raise RuntimeError(f"wrk failed ({finished.returncode}):\n{finished.stdout}\n{finished.stderr}")
    counts = json.loads(report)
    errors = sum(counts.pop(key) for key in list(counts) if key.endswith("_errors") or key == "timeouts")
    return {
        "clients": clients,
        "requests": counts["requests"],
        "errors": errors,
        "requests_per_s": round(counts["requests"] / counts["seconds"], 2),
        "p50_ms": counts["p50_ms"],
        "p95_ms": counts["p95_ms"],
        "p99_ms": counts["p99_ms"],
    }
