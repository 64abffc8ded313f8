"""POST /api/search/batch: photos, image_urls and skus searched in one request, each answered as its own request
would be, in the order sent, an item's failure in its own place; over a real index of real photos, through Flask's
test client and through the production server (its body limits)."""

from __future__ import annotations

import io

import pytest
import requests
from urllib3.filepost import encode_multipart_formdata

from service import create_app
from tests.conftest import SKIMAGE_CATALOG, indexed_skimage, served_catalog, skimage_jpeg
from tests.support.server import running_server
from tests.test_fetch import serve

PRODUCTS_CSV = """sku,image,title,category,price
cat,animals/chelsea.jpg,Tabby cat,animals,9.99
mug,drinks/coffee.jpg,Espresso cup,drinks,3.20
rocket,space/rocket.jpg,Saturn rocket,space,120
eye,medical/retina.jpg,Retina scan,medical,
cam,people/camera.jpg,Cameraman,people,
suit,people/astronaut.jpg,Astronaut in a suit,people,
"""
# The served server's limits (config.toml's, but a smaller batch body to reach it quickly): 10 MB a photo, 12 MB a
# batch's whole body.
UPLOAD_CAP = 10_000_000
BATCH_CAP = 12_000_000


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """16 different shoppers' photos: the catalog's six photos turned by a few degrees each way."""
    names = [name for names in SKIMAGE_CATALOG.values() for name in names]
    return [skimage_jpeg(name, angle) for angle in (0, 8, -8) for name in names][:16]


def batch_body(parts: list[tuple[str, object]], **fields: object) -> tuple[bytes, str]:
    """A batch's multipart body with its parts in this order (an 'image' as a file, any other as a plain field),
    then the shared fields; and its content type."""
    form = [(name, (f"{i}.jpg", value) if name == "image" else value) for i, (name, value) in enumerate(parts)]
    return encode_multipart_formdata(form + [(name, str(value)) for name, value in fields.items()])


def client_batch(client, parts: list[tuple[str, object]], **fields: object):
    """POST /api/search/batch through Flask's test client."""
    body, content_type = batch_body(parts, **fields)
    return client.post("/api/search/batch", data=body, content_type=content_type)


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    return indexed_skimage(base_settings, embedder, tmp_path_factory.mktemp("batch"), default_k=3)


def test_a_batch_of_16_photos_answers_what_16_single_searches_answer(indexed, embedder, photos):
    # Two apps, each with its own memory of recent query photos: neither answers from the other's vectors.
    singles = create_app(indexed, embedder).test_client()
    batches = create_app(indexed, embedder).test_client()
    alone = []
    for photo in photos:
        answer = singles.post("/api/search", data={"image": (io.BytesIO(photo), "q.jpg"), "k": "4"})
        assert answer.status_code == 200
        alone.append(answer.json)
    answer = client_batch(batches, [("image", photo) for photo in photos], k=4)
    assert answer.status_code == 200, answer.json
    items = answer.json["items"]
    assert len(items) == 16
    for item, single in zip(items, alone, strict=True):
        assert item.pop("took_ms") > 0 and single.pop("took_ms") > 0
        assert item == single  # the same results and scores, filters echoed, the same query token, the same index
    assert len({item["query"] for item in items}) == 16


def test_shared_filters_apply_to_every_item_and_are_echoed(indexed, embedder, photos):
    client = create_app(indexed, embedder).test_client()
    answer = client_batch(client, [("image", photos[0]), ("sku", "people/camera")], category="people", k=5)
    assert answer.status_code == 200
    for item in answer.json["items"]:
        assert item["category"] == "people" and item["k"] == 5
        assert item["results"] and {result["category"] for result in item["results"]} == {"people"}
    assert answer.json["items"][1]["sku"] == "people/camera"
    assert [r["sku"] for r in answer.json["items"][1]["results"]] == ["people/astronaut"]  # itself excluded


def test_bad_shared_fields_and_single_search_fields_are_400s_that_say_so(indexed, embedder, photos):
    client = create_app(indexed, embedder).test_client()
    answer = client_batch(client, [("sku", "space/rocket")], category="no such category")
    assert answer.status_code == 400 and "unknown category" in answer.json["message"]
    answer = client_batch(client, [("image", photos[0])], box="0,0,0.5,0.5")
    assert answer.status_code == 400 and "box applies to a single search" in answer.json["message"]
    answer = client.post("/api/search/batch", json={"sku": ["space/rocket"]})
    assert answer.status_code == 400 and "multipart/form-data" in answer.json["message"]


# --- Through the production server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_site():
    """A local web server with photos to fetch (tests/test_fetch.py's): /photo.jpg is a photo of the cat."""
    with serve() as site:
        yield f"http://127.0.0.1:{site.server_address[1]}"


@pytest.fixture(scope="module")
def served(base_settings, embedder, tmp_path_factory, photo_site):
    """The production server over the catalog above; image_url may reach the local photo site."""
    port = photo_site.rsplit(":", 1)[1]
    changes = {
        "fetch_ports = [80, 443]": f"fetch_ports = [80, 443, {port}]",
        "max_batch_bytes = 40_000_000": f"max_batch_bytes = {BATCH_CAP}",
    }
    root = tmp_path_factory.mktemp("batch-served")
    env, _ = served_catalog(
        base_settings, embedder, root, products_csv=PRODUCTS_CSV, config_changes=changes, FETCH_ALLOW_PRIVATE="1"
    )
    with running_server(env, timeout=120) as running:
        yield running.url


def post_batch(url: str, parts: list[tuple[str, object]], **fields: object) -> requests.Response:
    body, content_type = batch_body(parts, **fields)
    return requests.post(f"{url}/api/search/batch", data=body, headers={"Content-Type": content_type}, timeout=120)


@pytest.mark.slow
def test_items_are_answered_in_the_order_sent_each_failure_in_its_own_place(served, photo_site, photos):
    cat, rocket = photos[0], skimage_jpeg("rocket", 8)
    parts = [
        ("sku", "mug"),
        ("image", cat),
        ("image_url", f"{photo_site}/photo.jpg"),
        ("sku", "no-such-product"),
        ("image", b"\xff\xd8 not really a JPEG"),
        ("image_url", f"{photo_site}/html"),
        ("image_url", "ftp://example.com/photo.jpg"),
        ("image", rocket),
    ]
    answer = post_batch(served, parts, k=2)
    assert answer.status_code == 200, answer.text
    items = answer.json()["items"]
    assert len(items) == len(parts)
    assert items[0]["sku"] == "mug" and len(items[0]["results"]) == 2
    assert items[1]["results"][0]["sku"] == "cat" and items[2]["results"][0]["sku"] == "cat"
    assert items[3] == {"error": "not_found", "message": "no product with sku 'no-such-product'", "status": 404}
    assert items[4]["status"] == 400 and "not a usable image" in items[4]["message"]
    assert items[5]["status"] == 400 and "image_url" in items[5]["message"]
    assert items[6]["status"] == 400 and "http or https" in items[6]["message"]
    assert items[7]["results"][0]["sku"] == "rocket"
    # Each photo is remembered as a single search's is: its token searches it again.
    again = requests.post(f"{served}/api/search", data={"query": items[7]["query"], "k": 2}, timeout=60).json()
    assert again["results"] == items[7]["results"]


@pytest.mark.slow
def test_too_many_items_or_none_is_a_400_that_says_so(served):
    answer = post_batch(served, [("sku", "mug")] * 33)
    assert answer.status_code == 400
    assert answer.json()["message"].startswith("a batch holds at most 32 items (service.max_batch)")
    for parts in ([], [("sku", " "), ("image_url", "")]):  # blank fields are no items, as forms send them
        answer = post_batch(served, parts, k=3)
        assert answer.status_code == 400 and "the batch holds no item" in answer.json()["message"]


@pytest.mark.slow
def test_a_batch_has_its_own_body_limit_and_each_photo_the_upload_limit(served, photos):
    # JPEG decoders stop at the image's end: the padding makes a large upload of a small photo.
    padded = photos[0] + b"\0" * 950_000
    many = [("image", padded)] * 11
    assert UPLOAD_CAP < sum(len(photo) for _, photo in many) < BATCH_CAP
    answer = post_batch(served, many, k=1)
    assert answer.status_code == 200 and all(item["results"][0]["sku"] == "cat" for item in answer.json()["items"])
    # Any other request keeps the upload limit.
    single = requests.post(f"{served}/api/search", files={"image": ("big.jpg", padded * 11)}, timeout=60)
    assert single.status_code == 413
    # A photo over the upload limit fails its item only.
    answer = post_batch(served, [("image", photos[1]), ("image", photos[0] + b"\0" * UPLOAD_CAP)], k=1)
    assert answer.status_code == 200
    first, second = answer.json()["items"]
    assert first["results"] and second["status"] == 413 and f"{UPLOAD_CAP:,} bytes" in second["message"]
    # A body over the batch's limit is refused whole, saying which limit.
    answer = post_batch(served, [("image", padded)] * 13, k=1)
    assert answer.status_code == 413 and "service.max_batch_bytes" in answer.json()["message"]
