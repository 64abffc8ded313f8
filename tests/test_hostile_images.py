"""Photos in every other format Pillow writes, broken photos, and photos that would take much memory to decode.
Only JPEG (MPO included), PNG and WebP are decoded: anything else is a clear 400 on every route that takes a photo
of a real server, and is skipped with its reason by `make index`; no decoder's failure is ever a 500; and
decodings hold no more memory than model.image_max_mb, however many arrive at once."""

from __future__ import annotations

import functools
import gc
import io
import random
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import requests
from PIL import Image, features

from indexer.config import process_memory_mb
from indexer.embedding.images import DECODING, FORMAT_NAMES, ImageError, limit_decoding, load_pixels
from indexer.jobs.indexing import index_catalog
from tests.conftest import served_catalog, skimage_photo, write_skimage_catalog
from tests.support.server import running_server

pytestmark = pytest.mark.slow  # a real server

API_KEY = "hostile-images-key"
REFUSED_MESSAGE = f"send a {FORMAT_NAMES} photo"
# The formats Pillow writes other than the accepted ones, each in a mode it writes.
OTHER_FORMATS = {
    "DDS": "RGB",
    "TIFF": "RGB",
    "JPEG2000": "RGB",
    "ICNS": "RGBA",
    "SGI": "RGB",
    "PCX": "RGB",
    "XBM": "1",
    "BMP": "RGB",
    "GIF": "P",
    "TGA": "RGB",
    "ICO": "RGBA",
    "PPM": "RGB",
    "QOI": "RGB",
    "MSP": "1",
    "SPIDER": "F",
    "BLP": "P",
    "EPS": "RGB",
    "AVIF": "RGB",
}


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def unreadable_dds() -> bytes:
    """384 bytes: a DDS header naming a pixel format Pillow's DDS decoder does not implement (NotImplementedError
    when that decoder is given it)."""
    header = struct.pack("<4s7I44x", b"DDS ", 124, 0x1 | 0x2 | 0x4 | 0x1000, 16, 16, 0, 0, 0)
    pixel_format = struct.pack("<2I4s5I", 32, 0x4, b"ATC ", 0, 0, 0, 0, 0)
    caps = struct.pack("<5I", 0x1000, 0, 0, 0, 0)
    return header + pixel_format + caps + bytes(256)


@functools.cache
def other_formats() -> dict[str, bytes]:
    """A photo in each other format this Pillow can write, and the DDS file no decoder here reads."""
    photo = skimage_photo("coffee").resize((64, 48))
    files = {}
    for name, mode in OTHER_FORMATS.items():
        if not features.check({"JPEG2000": "jpg_2000", "AVIF": "avif"}.get(name, "zlib")):
            continue  # this Pillow was built without that codec
        files[name] = encoded(photo.convert(mode), name)
    files["DDS of an unimplemented pixel format"] = unreadable_dds()
    return files


def mpo() -> bytes:
    """A phone's JPEG with a second view (MPO): read by the JPEG decoder, its first image searched."""
    first, second = skimage_photo("coffee"), skimage_photo("rocket").resize(skimage_photo("coffee").size)
    return encoded(first, "MPO", save_all=True, append_images=[second])


@functools.cache
def big_png(mode: str, side: int = 6300) -> bytes:
    """A few hundred KB of PNG that decodes to side x side pixels: 16-bit grey ("I;16") or RGBA."""
    if mode == "I;16":
        image = Image.fromarray(np.repeat((np.arange(side, dtype=np.uint16) * 10)[:, None], side, axis=1))
    else:
        image = Image.new("RGBA", (side, side), (10, 200, 30, 128))
    return encoded(image, "PNG", compress_level=9)


class PhotoServer(BaseHTTPRequestHandler):
    """Serves the bytes of FILES[path] as image/jpeg, whatever they are (what image_url would fetch)."""

    files: ClassVar[dict[str, bytes]] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = self.files.get(self.path, b"")
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def photo_server() -> Iterator[str]:
    PhotoServer.files = {f"/{index}": data for index, data in enumerate(other_formats().values())}
    server = ThreadingHTTPServer(("127.0.0.1", 0), PhotoServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def server(base_settings, embedder, tmp_path_factory, photo_server) -> Iterator[tuple[str, Path]]:
    port = photo_server.rsplit(":", 1)[1]
    env, catalog = served_catalog(
        base_settings,
        embedder,
        tmp_path_factory.mktemp("hostile-images"),
        config_changes={"fetch_ports = [80, 443]": f"fetch_ports = [80, 443, {port}]"},
        API_KEY=API_KEY,
        FETCH_ALLOW_PRIVATE="1",
    )
    with running_server(env, timeout=120) as running:
        yield running.url, catalog


def search(url: str, photo: bytes, **fields: str) -> requests.Response:
    return requests.post(f"{url}/api/search", files={"image": ("upload.jpg", photo)}, data=fields, timeout=60)


def still_serving(url: str, catalog: Path) -> bool:
    photo = (catalog / "drinks" / "coffee.jpg").read_bytes()
    answer = search(url, photo, k="1")
    return requests.get(f"{url}/healthz", timeout=10).status_code == 200 and answer.status_code == 200


@pytest.mark.parametrize("name", list(other_formats()))
def test_every_other_format_is_a_400_naming_the_accepted_ones_on_every_route(server, photo_server, name):
    url, catalog = server
    photo = other_formats()[name]
    index = list(other_formats()).index(name)
    answers = {
        "search": search(url, photo),
        "region search": search(url, photo, box="0,0,0.5,0.5"),
        "raw body": requests.post(f"{url}/api/search", data=photo, headers={"Content-Type": "image/png"}, timeout=60),
        "preview": requests.post(f"{url}/api/search/preview.png", files={"image": ("a.png", photo)}, timeout=60),
        "image_url": requests.post(f"{url}/api/search", data={"image_url": f"{photo_server}/{index}"}, timeout=60),
        "write API": requests.put(
            f"{url}/api/products/hostile-{index}",
            files={"image": ("a.jpg", photo)},
            data={"title": "hostile"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        ),
    }
    for route, answer in answers.items():
        assert answer.status_code == 400, (route, answer.status_code, answer.text[:300])
        assert answer.json()["error"] == "bad_request", route
        assert FORMAT_NAMES in answer.json()["message"], (route, answer.json()["message"])
    page = requests.post(f"{url}/", files={"image": ("a.jpg", photo)}, timeout=60)
    assert page.status_code == 400 and REFUSED_MESSAGE in page.text
    assert requests.get(f"{url}/api/products/hostile-{index}", timeout=10).status_code == 404  # nothing was stored
    assert still_serving(url, catalog)


def test_a_phones_mpo_jpeg_is_searched_and_stored_as_a_jpeg(server):
    url, _ = server
    answer = search(url, mpo(), k="3")
    assert answer.status_code == 200 and answer.json()["results"][0]["sku"] == "drinks/coffee"
    written = requests.put(
        f"{url}/api/products/phone-photo",
        files={"image": ("phone.jpg", mpo())},
        data={"title": "phone photo"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert written.status_code == 201, written.text
    served = requests.get(f"{url}/images/phone-photo", timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_a_small_png_of_many_deep_pixels_is_a_400_naming_the_memory_limit(server, mode):
    url, catalog = server
    photo = big_png(mode)
    assert len(photo) < 400_000  # a few hundred KB, far under the upload limit
    answer = search(url, photo)
    assert answer.status_code == 400, answer.text[:300]
    message = answer.json()["message"]
    assert "6300x6300" in message and "model.image_max_mb" in message
    assert still_serving(url, catalog)


def test_make_index_skips_every_other_format_with_its_reason(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    (catalog / "odd").mkdir()
    files = enumerate(other_formats().values())
    named = {f"odd/{index}.{'png' if index % 2 else 'jpg'}": data for index, data in files}
    named["odd/deep.png"] = big_png("I;16")
    for rel, data in named.items():
        (catalog / rel).write_bytes(data)
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert report.indexed == 6
    problems = dict(problem.split(": ", 1) for problem in report.problems)
    assert sorted(problems) == sorted(named)
    assert all(REFUSED_MESSAGE in problems[rel] for rel in named if rel != "odd/deep.png")
    assert "model.image_max_mb" in problems["odd/deep.png"]


def mutations(data: bytes, count: int, seed: int) -> Iterator[bytes]:
    """Copies of a photo with a few bytes changed, cut short or repeated: what a decoder meets in broken files."""
    rng = random.Random(seed)
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(1, len(mutated))]
        if rng.random() < 0.2:
            start = rng.randrange(len(mutated))
            mutated[start:start] = mutated[start : start + rng.randint(1, 64)] * rng.randint(1, 4)
        yield bytes(mutated)


@pytest.mark.parametrize(
    "format, options",
    [("JPEG", {}), ("PNG", {}), ("PNG", {"mode": "I;16"}), ("WEBP", {}), ("WEBP", {"lossless": True})],
    ids=["jpeg", "png", "png-16-bit", "webp", "webp-lossless"],
)
def test_whatever_a_decoder_raises_on_a_broken_photo_is_an_image_error(format, options):
    options = dict(options)
    photo = skimage_photo("coffee").resize((48, 32))
    image = Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257) if options.pop("mode", None) else photo
    decoded = refused = 0
    for broken in mutations(encoded(image, format, **options), 300, seed=len(format)):
        try:
            load_pixels(broken, 32)
            decoded += 1
        except ImageError:
            refused += 1
    assert refused > 0 and decoded + refused == 300


@pytest.fixture
def decoding_limit() -> Iterator[None]:
    limit = DECODING.limit
    yield
    limit_decoding(limit // 2**20)


def peak_rise_mb(work) -> float:
    """How far this process's peak resident memory rises above its resident memory while work() runs."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident size
    before = process_memory_mb("VmRSS")
    work()
    return process_memory_mb("VmHWM") - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to read peak memory")
def test_decodings_at_once_hold_no_more_memory_than_the_limit(decoding_limit):
    """Eight threads decoding a 3000x3000 16-bit PNG at once (each about 70 MB): with a 128 MB budget they take
    turns, and the process's memory rises by less than the budget, not eight times one decoding."""
    photo = big_png("I;16", 3000)
    limit_decoding(128)
    errors: list[BaseException] = []

    def decode() -> None:
        try:
            load_pixels(photo, 224)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def eight_at_once() -> None:
        threads = [threading.Thread(target=decode) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    rise = peak_rise_mb(eight_at_once)
    assert errors == []
    assert rise < 128, f"peak memory rose {rise:.0f} MB"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to read peak memory")
@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_a_photo_under_a_raised_limit_decodes_within_it(decoding_limit, mode):
    photo = big_png(mode)
    limit_decoding(400)
    rise = peak_rise_mb(lambda: load_pixels(photo, 224))
    assert rise < 400, f"peak memory rose {rise:.0f} MB"
