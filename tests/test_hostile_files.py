"""The files a server sends (/images/<sku> and preview grids) as an attacker with write access to the catalog
folder would aim them: a photo replaced by a link after indexing, or a folder swapped for one, is a 404 through a
real server, and a folder-mode catalog keeps no link that leads out of it."""

from __future__ import annotations

import io
import shutil

import pytest
import requests
from PIL import Image

from indexer.catalog import scan_catalog, served_file
from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import served_catalog, skimage_jpeg, write_skimage_catalog
from tests.support.server import running_server

SECRET = b"DATABASE_PASSWORD=hunter2\n"


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.slow
def test_links_made_after_indexing_are_never_served(base_settings, embedder, tmp_path):
    env, catalog = served_catalog(base_settings, embedder, tmp_path)
    secrets = tmp_path / "secrets.txt"
    secrets.write_bytes(SECRET)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rocket.jpg").write_bytes(jpeg((255, 0, 0)))
    with running_server(env, timeout=120) as server:
        assert requests.get(f"{server.url}/images/animals/chelsea", timeout=10).status_code == 200
        # The photo itself becomes a link to a secrets file; its folder (space/) becomes a link to another one.
        (catalog / "animals" / "chelsea.jpg").unlink()
        (catalog / "animals" / "chelsea.jpg").symlink_to(secrets)
        shutil.rmtree(catalog / "space")
        (catalog / "space").symlink_to(elsewhere)
        for sku in ("animals/chelsea", "space/rocket"):
            served = requests.get(f"{server.url}/images/{sku}", timeout=10)
            assert served.status_code == 404 and SECRET not in served.content, sku
            grid = requests.get(f"{server.url}/api/search/preview.png", params={"sku": sku, "k": 2}, timeout=30)
            assert grid.status_code == 404, sku
        # A link within the catalog folder, made after indexing, is no longer the file that was indexed either.
        (catalog / "drinks" / "coffee.jpg").unlink()
        (catalog / "drinks" / "coffee.jpg").symlink_to(catalog / "people" / "camera.jpg")
        assert requests.get(f"{server.url}/images/drinks/coffee", timeout=10).status_code == 404
        kept = requests.get(f"{server.url}/images/people/astronaut", timeout=10)
        assert kept.status_code == 200 and kept.headers["Content-Type"] == "image/jpeg"


def test_folder_mode_skips_links_as_problems(base_settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    secrets = tmp_path / "secrets.jpg"
    secrets.write_bytes(skimage_jpeg("coffee"))  # a real photo, outside the catalog
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "hidden.jpg").write_bytes(skimage_jpeg("camera"))
    (catalog / "animals" / "leak.jpg").symlink_to(secrets)
    (catalog / "away").symlink_to(outside)
    (catalog / "people" / "again.jpg").symlink_to(catalog / "people" / "camera.jpg")

    scan = scan_catalog(catalog)
    assert "animals/leak" not in scan.skus and "away/hidden" not in scan.skus and "people/again" not in scan.skus
    assert scan.skus == {"animals/chelsea", "drinks/coffee", "people/astronaut", "people/camera", "space/rocket",
                         "medical/retina"}  # fmt: skip
    assert any(p.startswith("animals/leak.jpg: a link to outside the catalog folder") for p in scan.problems)
    assert any(p.startswith("away: a link to outside the catalog folder") for p in scan.problems)
    assert any(p.startswith("people/again.jpg: a link within the catalog folder") for p in scan.problems)

    settings = base_settings.with_overrides(data_dir=tmp_path / "data")
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert len(report.problems) == 3
    client = create_app(settings, embedder).test_client()
    assert client.get("/images/animals/leak").status_code == 404
    assert client.get("/images/animals/chelsea").status_code == 200


def test_photos_written_through_the_api_are_served_from_a_data_folder_reached_through_a_link(tmp_path):
    """The uploads folder may sit behind a link (DATA_DIR on a mounted volume); a file outside it never."""
    real = tmp_path / "volume" / "data"
    (real / "uploads").mkdir(parents=True)
    (tmp_path / "data").symlink_to(real)
    uploads = tmp_path / "data" / "uploads"
    photo = uploads / ("ab" * 32 + ".jpeg")
    photo.write_bytes(jpeg((0, 0, 255)))
    assert served_file(str(photo), "api/" + "ab" * 32 + "/mug", uploads) == photo
    (tmp_path / "secrets.txt").write_bytes(SECRET)
    assert served_file(str(tmp_path / "secrets.txt"), "api/x/mug", uploads) is None
    link = uploads / ("cd" * 32 + ".jpeg")
    link.symlink_to(tmp_path / "secrets.txt")
    assert served_file(str(link), "api/" + "cd" * 32 + "/mug", uploads) is None
    # A catalog row naming a file above its folder is refused, whatever the file.
    assert served_file(str(tmp_path / "catalog" / ".." / "secrets.txt"), "../secrets.txt", uploads) is None
