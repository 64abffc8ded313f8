"""Every kind of upload a public endpoint receives: odd but valid photos work, garbage gets a
clear 4xx JSON error, and the service keeps serving. The same files in a catalog are skipped."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import skimage_photo, write_skimage_catalog


def encoded(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    data = bytearray(encoded(Image.new("L", (8, 8)), "PNG"))
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return bytes(data)


@functools.cache
def valid_oddities() -> dict[str, bytes]:
    photo = skimage_photo("coffee").resize((200, 150))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.new("L", photo.size, 0).point(lambda _: 128))
    frames = [photo.convert("P"), skimage_photo("rocket").resize((200, 150)).convert("P")]
    animated = io.BytesIO()
    frames[0].save(animated, format="WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    assert sixteen.mode == "I;16"
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "1x1 pixel": encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "16-bit grayscale PNG": encoded(sixteen, "PNG"),
        "CMYK JPEG": encoded(photo.convert("CMYK"), "JPEG"),
        "palette PNG with transparency": encoded(palette, "PNG", transparency=0),
        "RGBA PNG": encoded(rgba, "PNG"),
        "animated WebP": animated.getvalue(),
        "grayscale WebP": encoded(photo.convert("L"), "WEBP"),
    }


@functools.cache
def garbage() -> dict[str, tuple[bytes, str]]:
    jpeg = encoded(skimage_photo("coffee"), "JPEG")
    return {
        "empty body": (b"", "empty"),
        "text named .jpg": (b"<html>not a photo</html>", "not a recognised image"),
        "truncated JPEG": (jpeg[: len(jpeg) // 3], "truncated"),
        "decompression bomb": (png_claiming(30000, 30000), "pixels"),
        "zip file": (b"PK\x03\x04" + b"\x00" * 100, "not a recognised image"),
    }


@pytest.fixture(scope="module")
def client(base_settings, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    settings = base_settings.with_overrides(data_dir=root / "data", max_upload_bytes=1_000_000)
    index_catalog(settings, embedder, write_skimage_catalog(root / "catalog"), progress=False)
    return create_app(settings, embedder).test_client()


def post(client, data: bytes, **fields):
    form = {"image": (io.BytesIO(data), "upload.jpg"), **{k: str(v) for k, v in fields.items()}}
    return client.post("/api/search", data=form, content_type="multipart/form-data")


@pytest.mark.parametrize("name", list(valid_oddities()))
def test_unusual_but_valid_photos_are_searched(client, name):
    response = post(client, valid_oddities()[name])
    assert response.status_code == 200, response.get_json()
    assert len(response.json["results"]) > 0


@pytest.mark.parametrize("name", list(garbage()))
def test_garbage_uploads_get_a_clear_400_and_the_service_keeps_serving(client, name):
    data, message = garbage()[name]
    response = post(client, data)
    assert response.status_code == 400 and response.is_json
    assert message in response.json["message"]
    assert post(client, valid_oddities()["CMYK JPEG"]).status_code == 200


@pytest.mark.parametrize("k", ["-1", "0", "1e9", "NaN", "", "  7 ", "99999999999999999999999"])
def test_any_k_gets_results_or_a_400(client, k):
    response = post(client, valid_oddities()["1x1 pixel"], k=k)
    assert response.status_code in (200, 400) and response.is_json
    if response.status_code == 200:
        assert 1 <= len(response.json["results"]) <= 100


@pytest.mark.parametrize("sku", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%00", "a" * 3000, "<script>"])
def test_strange_skus_are_404s(client, sku):
    for url in (f"/api/products/{sku}/similar", f"/images/{sku}", f"/products/{sku}"):
        response = client.get(url, follow_redirects=True)
        assert response.status_code == 404, url
        # Echoed only inside JSON (never rendered) or escaped in HTML.
        assert response.is_json or b"<script>" not in response.data


def test_the_same_files_in_a_catalog_are_reported_and_skipped(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    for name, data in valid_oddities().items():
        (catalog / "odd" / f"{name.replace(' ', '-')}.png").parent.mkdir(exist_ok=True)
        (catalog / "odd" / f"{name.replace(' ', '-')}.png").write_bytes(data)
    for name, (data, _) in garbage().items():
        (catalog / "bad" / f"{name.replace(' ', '-')}.jpg").parent.mkdir(exist_ok=True)
        (catalog / "bad" / f"{name.replace(' ', '-')}.jpg").write_bytes(data)
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert report.indexed == 6 + len(valid_oddities())
    assert sorted(p.split(":")[0] for p in report.problems) == sorted(
        f"bad/{name.replace(' ', '-')}.jpg" for name in garbage()
    )
