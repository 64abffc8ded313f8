"""Searching a region of the query photo (box=x0,y0,x1,y1): one preprocessing path, validation, the API, the
preview and the page, and two grocery products side by side found one half at a time."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
from PIL import Image

from indexer.embedding.images import Box, BoxError, load_pixels, open_image, open_region
from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import indexed_skimage, read_csv, skimage_photo
from tests.test_images import exif_orientation, upright_layout


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- one preprocessing path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "photo",
    [
        encode(skimage_photo("chelsea"), quality=90),  # small JPEG
        encode(skimage_photo("astronaut").resize((1600, 1600)), quality=90),  # decoded at reduced scale
        encode(noise(300, 200), "PNG"),
        encode(upright_layout(400, 800).transpose(Image.Transpose.ROTATE_90), exif=exif_orientation(6)),
    ],
    ids=["jpeg", "large-jpeg", "png", "exif-rotated"],
)
def test_a_box_over_the_whole_photo_gives_exactly_the_vector_of_no_box(embedder, photo):
    whole = Box(0, 0, 1, 1)
    np.testing.assert_array_equal(load_pixels(photo, 224, whole), load_pixels(photo, 224))
    np.testing.assert_array_equal(embedder.embed_image(photo, box=whole), embedder.embed_image(photo))


def test_a_box_is_cropped_before_the_same_resize_as_a_whole_photo():
    photo = noise(200, 100)
    region = load_pixels(encode(photo, "PNG"), 224, Box(0.25, 0, 0.75, 0.5))
    np.testing.assert_array_equal(region, load_pixels(encode(photo.crop((50, 0, 150, 50)), "PNG"), 224))


def test_a_box_is_a_region_of_the_upright_photo():
    # Stored turned, shown upright by its EXIF tag: top-left red, top-right green, bottom half blue.
    data = encode(upright_layout(400, 800).transpose(Image.Transpose.ROTATE_90), quality=95, exif=exif_orientation(6))
    expected = {(0, 0, 0.5, 0.5): (255, 0, 0), (0.5, 0, 1, 0.5): (0, 255, 0), (0, 0.5, 1, 1): (0, 0, 255)}
    for corners, colour in expected.items():
        mean = load_pixels(data, 32, Box(*corners))[4:-4, 4:-4].reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - colour).max() < 30, (corners, mean)


def test_a_small_region_of_a_large_jpeg_is_decoded_at_a_scale_that_keeps_it_sharp():
    data = encode(noise(2400, 2400), quality=90)
    assert open_image(data, target_size=224).size == (300, 300)  # whole photo: 1/8 scale
    assert open_region(data, 224, Box(0.5, 0.5, 0.75, 0.75)).size == (300, 300)  # the quarter of a 1/2 scale


@pytest.mark.parametrize(
    ("corners", "message"),
    [
        ((0.5, 0, 0.5, 1), "0 <= x0 < x1 <= 1"),
        ((0.6, 0, 0.4, 1), "0 <= x0 < x1 <= 1"),
        ((-0.1, 0, 1, 1), "0 <= x0 < x1 <= 1"),
        ((0, 0, 1, 1.2), "0 <= y0 < y1 <= 1"),
        ((0, 0, float("nan"), 1), "finite"),
        ((0, 0, 0.05, 0.1), "covers 0.50% of the photo; it must cover at least 1%"),
    ],
)
def test_nonsense_boxes_are_refused(corners, message):
    with pytest.raises(BoxError, match=re.escape(message)):
        Box(*corners)


def test_a_box_under_16_pixels_a_side_of_the_photo_is_refused():
    with pytest.raises(BoxError, match="box is 12x100 pixels of this 100x100 photo; it must be at least 16"):
        load_pixels(encode(noise(100, 100), "PNG"), 224, Box(0, 0, 0.12, 1))


# --- the API, the preview and the page ---------------------------------------------------------------


@pytest.fixture(scope="module")
def client(base_settings, embedder, tmp_path_factory):
    settings = indexed_skimage(base_settings, embedder, tmp_path_factory.mktemp("regions"))
    return create_app(settings, embedder).test_client()


@pytest.fixture(scope="module")
def cat_and_rocket() -> bytes:
    """Two catalog products side by side: the cat on the left, the rocket on the right."""
    return side_by_side(skimage_photo("chelsea"), skimage_photo("rocket"))


def side_by_side(left: Image.Image, right: Image.Image, size: int = 320) -> bytes:
    canvas = Image.new("RGB", (2 * size, size), (255, 255, 255))
    for column, photo in enumerate((left, right)):
        photo = photo.copy()
        photo.thumbnail((size, size))
        canvas.paste(photo, (column * size + (size - photo.width) // 2, (size - photo.height) // 2))
    return encode(canvas, quality=90)


def search(client, photo: bytes | None = None, **fields):
    data = {key: str(value) for key, value in fields.items()}
    if photo is not None:
        data["image"] = (io.BytesIO(photo), "query.jpg")
    return client.post("/api/search", data=data, content_type="multipart/form-data")


def test_each_half_of_two_products_side_by_side_finds_its_product(client, cat_and_rocket):
    left = search(client, cat_and_rocket, box="0,0,0.5,1")
    right = search(client, cat_and_rocket, box="0.5,0,1,1")
    assert left.status_code == right.status_code == 200
    assert left.json["results"][0]["sku"] == "animals/chelsea" and left.json["box"] == [0, 0, 0.5, 1]
    assert right.json["results"][0]["sku"] == "space/rocket" and right.json["box"] == [0.5, 0, 1, 1]
    assert left.json["query"] == right.json["query"]  # the token names the photo, whatever the box


def test_an_uncropped_box_searches_exactly_like_no_box(client, cat_and_rocket):
    plain = search(client, cat_and_rocket, k=6).json
    boxed = search(client, cat_and_rocket, k=6, box="0,0,1,1").json
    assert [(r["sku"], r["score"]) for r in boxed["results"]] == [(r["sku"], r["score"]) for r in plain["results"]]


def test_a_remembered_query_is_searched_again_by_its_token_with_a_new_box(client, cat_and_rocket):
    token = search(client, cat_and_rocket).json["query"]
    again = client.post("/api/search", data={"query": token, "box": "0.5,0,1,1"})
    assert again.status_code == 200 and again.json["results"][0]["sku"] == "space/rocket"
    assert again.json["query"] == token
    forgotten = client.post("/api/search", data={"query": "0" * 64})
    assert forgotten.status_code == 404 and "no longer remembered" in forgotten.json["message"]


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ("0,0,1", "box must be four numbers x0,y0,x1,y1"),
        ("0,0,1,1,1", "box must be four numbers"),
        ("left,top,right,bottom", "box must be four numbers"),
        ("0;0;1;1", "box must be four numbers"),
        ("0.5,0,0.5,1", "0 <= x0 < x1 <= 1"),
        ("0,1,1,0", "0 <= y0 < y1 <= 1"),
        ("0,0,1,1.5", "0 <= y0 < y1 <= 1"),
        ("-1,0,1,1", "0 <= x0 < x1 <= 1"),
        ("nan,0,1,1", "finite"),
        ("0,0,inf,1", "finite"),
        ("0.2,0.2,0.25,0.3", "it must cover at least 1%"),
        ("0,0,0.02,1", "it must be at least 16 pixels a side"),  # 12 of the photo's 640 pixels wide
    ],
)
def test_nonsense_boxes_are_a_400_that_says_why(client, cat_and_rocket, box, message):
    response = search(client, cat_and_rocket, box=box)
    assert response.status_code == 400 and response.json["error"] == "bad_request"
    assert message in response.json["message"]


def test_the_preview_grid_shows_and_searches_the_box(client, cat_and_rocket):
    token = search(client, cat_and_rocket).json["query"]
    grid = client.get(f"/api/search/preview.png?query={token}&box=0.5,0,1,1&k=2")
    assert grid.status_code == 200 and grid.mimetype == "image/png"
    posted = client.post(
        "/api/search/preview.png",
        data={"image": (io.BytesIO(cat_and_rocket), "q.jpg"), "box": "0,0,0.5,1"},
        content_type="multipart/form-data",
    )
    assert posted.status_code == 200 and posted.mimetype == "image/png"
    assert client.get(f"/api/search/preview.png?query={token}&box=1,1,0,0").status_code == 400
    by_sku = client.get("/api/search/preview.png?sku=space/rocket&box=0,0,0.5,1")
    assert by_sku.status_code == 400 and "not to sku" in by_sku.json["message"]


def test_the_search_page_shows_the_photo_to_drag_a_box_on_and_searches_the_box(client, cat_and_rocket):
    first = client.post("/", data={"image": (io.BytesIO(cat_and_rocket), "q.jpg")}, content_type="multipart/form-data")
    html = first.get_data(as_text=True)
    assert first.status_code == 200 and 'id="query-photo"' in html and 'id="query-box" hidden' in html
    token = re.search(r'name="query" value="([0-9a-f]{64})"', html).group(1)
    # What the page's script submits after a drag over the right half: the token and the box, no upload.
    boxed = client.post("/", data={"query": token, "box": "0.5000,0.0000,1.0000,1.0000", "k": "3", "category": ""})
    html = boxed.get_data(as_text=True)
    assert boxed.status_code == 200
    assert html.index('href="/products/space/rocket"') < html.index('href="/products/animals/chelsea"')
    # The box the page's script draws on the photo (the page's Content-Security-Policy allows no style attribute).
    assert 'id="region-box" value="0.5,0,1,1"' in html and "style=" not in html
    assert 'value="0.5,0,1,1"' in html and "Search the whole photo" in html
    assert "&amp;box=0.5,0,1,1" in html  # the preview link searches the box too


def test_the_search_page_explains_a_bad_box_or_a_forgotten_photo(client):
    bad = client.post("/", data={"query": "0" * 64, "box": "0,0,2,1"})
    assert bad.status_code == 400 and "0 &lt;= x0 &lt; x1 &lt;= 1" in bad.get_data(as_text=True)
    forgotten = client.post("/", data={"query": "0" * 64})
    assert forgotten.status_code == 404 and "no longer remembered" in forgotten.get_data(as_text=True)
    empty_form = client.post("/", data={"image": (io.BytesIO(b""), "")}, content_type="multipart/form-data")
    assert empty_form.status_code == 400 and "file field named &#39;image&#39;" in empty_form.get_data(as_text=True)


# --- real shop photos: two products side by side, one half at a time ----------------------------------

PAIRS = 20
INDEXED_PER_CATEGORY = 24


@pytest.fixture(scope="module")
def grocery_pairs(grocery, base_settings, embedder, tmp_path_factory):
    """20 categories (the largest of each of the first 20 coarse groups with enough photos): 24 photos of each
    indexed, and two held-out photos of each composed into pairs, every category once left and once right."""
    rows = read_csv(grocery / "catalog.csv")
    by_category: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_category.setdefault(row["category"], []).append(row)
    largest: dict[str, str] = {}
    for category, members in sorted(by_category.items()):
        coarse = members[0]["coarse_category"]
        if len(members) >= INDEXED_PER_CATEGORY + 2 and len(members) > len(by_category.get(largest.get(coarse), [])):
            largest[coarse] = category
    categories = [largest[coarse] for coarse in sorted(largest)][:PAIRS]
    indexed, held_out = [], {}
    for category in categories:
        members = sorted(by_category[category], key=lambda row: row["sku"])
        held = [members[len(members) // 3], members[2 * len(members) // 3]]
        held_out[category] = held
        indexed += [row for row in members if row not in held][:: max(1, len(members) // INDEXED_PER_CATEGORY)][
            :INDEXED_PER_CATEGORY
        ]
    folder = tmp_path_factory.mktemp("grocery-regions")
    metadata = folder / "products.csv"
    with open(metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(indexed)
    settings = base_settings.with_overrides(data_dir=folder / "data", max_k=5)
    report = index_catalog(settings, embedder, grocery, metadata, progress=False)
    assert report.indexed == len(indexed), report.summary()
    pairs = []
    for i, left in enumerate(categories):
        right = categories[(i + 7) % PAIRS]
        photos = [open_image(grocery / held_out[c][side]["image"]) for c, side in ((left, 0), (right, 1))]
        pairs.append((side_by_side(*photos), left, right))
    return create_app(settings, embedder).test_client(), pairs, len(indexed)


def test_boxing_each_half_of_two_grocery_products_finds_that_halfs_category(grocery_pairs):
    client, pairs, indexed = grocery_pairs
    region_hits = whole_hits = 0
    for photo, left, right in pairs:
        whole = search(client, photo, k=1).json["results"][0]["category"]
        for box, expected in (("0,0,0.5,1", left), ("0.5,0,1,1", right)):
            found = search(client, photo, k=1, box=box).json["results"][0]["category"]
            region_hits += found == expected
            whole_hits += whole == expected
    searches = 2 * len(pairs)
    print(
        f"\nregion search on {len(pairs)} grocery pairs ({indexed} products indexed): the boxed half's category "
        f"first in {region_hits}/{searches} = {region_hits / searches:.1%} (whole photo: {whole_hits}/{searches})"
    )
    assert region_hits >= 0.9 * searches
