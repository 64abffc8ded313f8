"""The HTTP service through Flask's test client, over a real index of real photos."""

from __future__ import annotations

import io
import json
import threading

import pytest
from PIL import Image

from indexer.config import REPO_ROOT
from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import both_databases, skimage_photo, statements_reading, write_skimage_catalog

PRODUCTS_CSV = """sku,image,title,category,price,url,colour
cat-1,animals/chelsea.jpg,Chelsea the cat,animals,9.99,https://shop.example/cat-1,ginger
cam-1,people/camera.jpg,<script>alert('x')</script> Cameraman,people,8.50,,grey
mug-1,drinks/coffee.jpg,Espresso cup,drinks,3.20,,
suit-1,people/astronaut.jpg,Astronaut portrait,people,,,
rocket-1,space/rocket.jpg,Rocket launch,space,1000000,,
eye-1,medical/retina.jpg,Retina scan,medical,,,
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = write_skimage_catalog(tmp_path_factory.mktemp("api") / "catalog")
    (folder / "products.csv").write_text(PRODUCTS_CSV)
    return folder


@pytest.fixture(scope="module")
def app_settings(base_settings, catalog):
    return base_settings.with_overrides(
        data_dir=catalog.parent / "data", catalog_dir=catalog, max_upload_bytes=2_000_000, max_k=5, default_k=3
    )


@pytest.fixture(scope="module")
def app(app_settings, embedder):
    app = create_app(app_settings, embedder)
    app.testing = True
    return app


@pytest.fixture(scope="module")
def client(app, app_settings, embedder, catalog):
    client = app.test_client()
    # Before any index exists the service is up but not ready.
    assert client.get("/readyz").status_code == 503
    index_catalog(app_settings, embedder, catalog, progress=False)
    return client


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cat_query() -> bytes:
    # A different crop of a catalog photo, as a shopper's photo would be.
    photo = skimage_photo("chelsea")
    return jpeg_bytes(photo.crop((30, 20, photo.width - 10, photo.height - 30)), quality=75)


def search(client, data: bytes | None, **fields):
    form = {key: str(value) for key, value in fields.items()}
    if data is not None:
        form["image"] = (io.BytesIO(data), "query.jpg")
    return client.post("/api/search", data=form, content_type="multipart/form-data")


def test_service_without_an_index_answers_503_with_what_to_do(base_settings, embedder, tmp_path, cat_query):
    client = create_app(base_settings.with_overrides(data_dir=tmp_path / "empty"), embedder).test_client()
    response = search(client, cat_query)
    assert response.status_code == 503 and "make index" in response.json["message"]
    assert response.headers["Retry-After"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200  # the page explains instead of failing


def test_readyz_reports_item_count_and_model(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json["items"] == 6 and response.json["model"]["model"] == "mobilenet_v1"
    assert response.json["model_version"] == "plain" and response.json["engine"] == "litert"


def test_search_by_photo_returns_the_matching_product_first(client, cat_query):
    response = search(client, cat_query)
    assert response.status_code == 200
    results = response.json["results"]
    assert results[0]["sku"] == "cat-1" and results[0]["category"] == "animals"
    assert set(results[0]) >= {"sku", "title", "category", "score", "image_url", "price"}
    assert results[0]["image_url"] == "/images/cat-1"
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) == 3  # default_k
    assert response.json["took_ms"] > 0


def test_searches_keep_faiss_to_one_thread_in_the_request_thread(client, cat_query):
    # OpenMP's thread count is per thread: a fresh request thread starts at the machine's
    # default, and an idle OpenMP team spins on the cores the interpreters need.
    import faiss

    seen = []

    def request_thread():
        faiss.omp_set_num_threads(4)
        assert search(client, cat_query).status_code == 200
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=request_thread)
    thread.start()
    thread.join()
    assert seen == [1]


def test_k_is_respected_and_capped(client, cat_query):
    assert len(search(client, cat_query, k=2).json["results"]) == 2
    capped = search(client, cat_query, k=10_000)
    assert capped.status_code == 200 and capped.json["k"] == 5 and len(capped.json["results"]) == 5


@pytest.mark.parametrize("k", ["0", "-3", "ten", "1.5"])
def test_invalid_k_is_a_400(client, cat_query, k):
    response = search(client, cat_query, k=k)
    assert response.status_code == 400 and "k must be" in response.json["message"]


def test_category_filter_returns_only_that_category(client, cat_query):
    results = search(client, cat_query, category="space", k=5).json["results"]
    assert [r["sku"] for r in results] == ["rocket-1"]


def test_unknown_category_is_a_400(client, cat_query):
    response = search(client, cat_query, category="shoes")
    assert response.status_code == 400 and "unknown category" in response.json["message"]


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("missing", None, "named 'image'"),
        ("empty", b"", "empty"),
        ("text", b"hello, I am not a photo", "not a recognised image"),
        ("truncated", "truncated", "truncated"),
    ],
)
def test_bad_uploads_get_a_json_400_and_the_service_keeps_serving(client, cat_query, name, payload, message):
    if payload == "truncated":
        payload = cat_query[: len(cat_query) // 2]
    response = search(client, payload)
    assert response.status_code == 400, name
    assert response.is_json and message in response.json["message"]
    assert search(client, cat_query).status_code == 200


def test_oversized_upload_is_a_413(client, cat_query):
    response = search(client, b"\xff" * 2_100_000)
    assert response.status_code == 413 and response.is_json
    assert "limit" in response.json["message"]
    assert search(client, cat_query).status_code == 200


def test_a_form_field_over_its_own_limit_is_a_413_that_names_that_limit(client, cat_query):
    """A 600 KB text field is under the request's limit: the answer names the per-field limit it hit."""
    response = client.post("/api/search", data={"image": (io.BytesIO(cat_query), "q.jpg"), "note": "x" * 600_000})
    assert (
        response.status_code == 413
        and "form field is larger than the limit of 500,000 bytes" in response.json["message"]
    )
    assert "2,000,000" not in response.json["message"]


def search_raw(client, data: bytes, content_type: str = "image/jpeg", url: str = "/api/search", **params):
    """The photo's bytes as the whole body, the other fields in the query string."""
    return client.post(url, data=data, content_type=content_type, query_string=params)


def test_a_raw_jpeg_body_finds_what_the_same_photo_sent_as_a_form_finds(client, cat_query):
    raw, form = search_raw(client, cat_query), search(client, cat_query)
    assert raw.status_code == 200 and raw.json["results"][0]["sku"] == "cat-1"
    assert raw.json["results"] == form.json["results"] and raw.json["query"] == form.json["query"]


@pytest.mark.parametrize(("format", "content_type"), [("PNG", "image/png"), ("WEBP", "image/webp")])
def test_a_raw_png_or_webp_body_is_searched_too(client, format, content_type):
    buffer = io.BytesIO()
    skimage_photo("chelsea").save(buffer, format=format)
    response = search_raw(client, buffer.getvalue(), content_type)
    assert response.status_code == 200 and response.json["results"][0]["sku"] == "cat-1"


def test_k_and_filters_come_from_the_query_string_with_a_raw_body(client, cat_query):
    assert len(search_raw(client, cat_query, k=2).json["results"]) == 2
    response = search_raw(client, cat_query, k=5, category="space")
    assert response.json["k"] == 5 and response.json["category"] == "space"
    assert [r["sku"] for r in response.json["results"]] == ["rocket-1"]
    assert search_raw(client, cat_query, k="ten").status_code == 400


def test_an_empty_raw_body_is_a_400_that_says_so(client):
    response = search_raw(client, b"")
    assert response.status_code == 400 and response.json["message"] == "the uploaded image is empty (0 bytes)"


@pytest.mark.parametrize("field", ["image_url", "query"])
def test_a_raw_body_and_another_photo_is_a_400(client, cat_query, field):
    response = search_raw(client, cat_query, **{field: "https://shop.example/x.jpg" if field == "image_url" else "ab"})
    assert response.status_code == 400 and "send only one of" in response.json["message"]
    assert f"image and {field}" in response.json["message"]


def test_a_raw_body_that_is_not_an_image_is_a_400_and_the_service_keeps_serving(client, cat_query):
    response = search_raw(client, b"\x00garbage, not a photo" * 50)
    assert response.status_code == 400 and "not a recognised image" in response.json["message"]
    assert search_raw(client, cat_query).status_code == 200


def test_an_oversized_raw_body_is_a_413(client):
    response = search_raw(client, b"\xff" * 2_100_000)
    assert response.status_code == 413 and "limit" in response.json["message"]


def test_the_preview_grid_takes_a_raw_body_too(client, cat_query):
    response = search_raw(client, cat_query, url="/api/search/preview.png", k=2)
    assert response.status_code == 200 and response.mimetype == "image/png"


def test_more_like_this_excludes_the_product_itself(client):
    response = client.get("/api/products/cat-1/similar?k=5")
    assert response.status_code == 200
    skus = [r["sku"] for r in response.json["results"]]
    assert "cat-1" not in skus and len(skus) == 5


def test_unknown_sku_is_a_404(client):
    for url in ("/api/products/nope/similar", "/api/products/nope", "/images/nope", "/products/nope"):
        assert client.get(url).status_code == 404, url
    assert client.get("/api/products/nope/similar").json["error"] == "not_found"


def test_product_details_include_extra_attributes(client):
    product = client.get("/api/products/cat-1").json
    assert product["price"] == 9.99 and product["attributes"] == {"colour": "ginger"}


def test_catalog_images_are_served_by_sku(client, catalog):
    response = client.get("/images/mug-1")
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    assert response.data == (catalog / "drinks" / "coffee.jpg").read_bytes()


@pytest.mark.parametrize("sku", ["../products.csv", "..%2Fproducts.csv", "%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"])
def test_paths_in_the_url_never_reach_the_filesystem(client, sku):
    response = client.get(f"/images/{sku}", follow_redirects=True)
    assert response.status_code == 404
    assert b"sku,image" not in response.data and b"root:" not in response.data


def test_preview_grid_is_a_png_for_uploads_tokens_and_skus(client, cat_query):
    token = search(client, cat_query).json["query"]
    posted = client.post(
        "/api/search/preview.png", data={"image": (io.BytesIO(cat_query), "q.jpg")}, content_type="multipart/form-data"
    )
    for response in (
        posted,
        client.get(f"/api/search/preview.png?query={token}&k=4"),
        client.get("/api/search/preview.png?sku=rocket-1"),
    ):
        assert response.status_code == 200 and response.mimetype == "image/png"
        image = Image.open(io.BytesIO(response.data))
        assert image.width > 300 and image.height > 150
    assert client.get("/api/search/preview.png").status_code == 400
    assert client.get("/api/search/preview.png?query=deadbeef").status_code == 404


def test_results_page_shows_matches_linking_to_product_pages(client, cat_query):
    response = client.post(
        "/", data={"image": (io.BytesIO(cat_query), "q.jpg"), "k": "3"}, content_type="multipart/form-data"
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert "Chelsea the cat" in html and 'href="/products/cat-1"' in html
    assert "/api/search/preview.png?query=" in html and "data:image/jpeg;base64," in html


def test_results_page_shows_a_readable_error_for_a_bad_upload(client):
    response = client.post("/", data={"image": (io.BytesIO(b"nope"), "q.jpg")}, content_type="multipart/form-data")
    assert response.status_code == 400 and "not a recognised image" in response.get_data(as_text=True)


def test_product_page_escapes_titles_and_lists_similar_products(client):
    html = client.get("/products/cam-1").get_data(as_text=True)
    assert "Cameraman" in html and "More like this" in html and 'href="/products/cat-1"' in html
    assert "<script>alert" not in html and "&lt;script&gt;" in html


def test_service_refuses_an_index_built_by_another_model(client, app_settings, catalog):
    manifest_path = app_settings.index_dir / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    try:
        manifest_path.write_text(json.dumps({**manifest, "weights_sha256": "0" * 64}))
        response = client.get("/readyz")
        assert response.status_code == 503 and "built with" in response.json["reason"]
    finally:
        manifest_path.write_text(original)
    assert client.get("/readyz").status_code == 200


def test_a_new_index_version_is_served_without_a_restart(client, app_settings, embedder, catalog):
    extra = catalog / "space" / "hubble.png"
    skimage_photo("hubble_deep_field").save(extra)
    with open(catalog / "products.csv", "a") as handle:
        handle.write("hubble-1,space/hubble.png,Deep field,space,,,\n")
    try:
        index_catalog(app_settings, embedder, catalog, progress=False)
        assert client.get("/readyz").json["items"] == 7
        assert client.get("/api/products/hubble-1").status_code == 200
    finally:
        (catalog / "products.csv").write_text(PRODUCTS_CSV)
        extra.unlink()
        index_catalog(app_settings, embedder, catalog, progress=False)
    assert client.get("/readyz").json["items"] == 6


def test_result_rows_are_read_from_the_store_once_until_they_change(app, client, cat_query):
    engine = app.extensions["catalog_search"].store.engine
    with statements_reading(engine, "FROM images JOIN products") as reads:
        assert search(client, cat_query).status_code == 200
        first_reads = len(reads)
        again = search(client, cat_query)
    assert again.json["results"] and len(reads) == first_reads <= 1


def test_a_changed_title_shows_in_results_after_make_index(client, app_settings, embedder, catalog, cat_query):
    # Only the metadata changes, not one photo: results must not keep showing the cached title.
    assert search(client, cat_query).json["results"][0]["title"] == "Chelsea the cat"
    (catalog / "products.csv").write_text(PRODUCTS_CSV.replace("Chelsea the cat,animals,9.99", "Kitty,animals,7"))
    try:
        index_catalog(app_settings, embedder, catalog, progress=False)
        first = search(client, cat_query).json["results"][0]
        assert (first["sku"], first["title"], first["price"]) == ("cat-1", "Kitty", 7.0)
    finally:
        (catalog / "products.csv").write_text(PRODUCTS_CSV)
        index_catalog(app_settings, embedder, catalog, progress=False)
    assert search(client, cat_query).json["results"][0]["title"] == "Chelsea the cat"


def test_result_links_are_the_ones_url_for_builds(app):
    from flask import url_for

    from indexer.records import ShownProduct
    from service.api import results_json

    skus = ["plain", "with space", "a/b", "q?x=1#frag", "100%", "ünïcode", "x:y@z;(1)", "sku"]
    # Mounted under a path prefix, as behind a reverse proxy.
    with app.test_request_context(base_url="http://shop.example/visual-search"):
        results = results_json([ShownProduct(sku, "t", score=1.0) for sku in skus])
        for sku, result in zip(skus, results, strict=True):
            assert result["image_url"] == url_for("api.product_image", sku=sku)
            assert result["product_url"] == url_for("pages.product_page", sku=sku)
    assert results[0]["image_url"] == "/visual-search/images/plain"


@both_databases
def test_a_database_behind_the_code_gets_503_until_migrated(settings, embedder, skimage_catalog):
    from alembic import command
    from alembic.config import Config

    from indexer.storage.database import migrate

    index_catalog(settings, embedder, skimage_catalog, progress=False)
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.db_url)
    command.downgrade(config, "0002")  # as if new code met an old database
    client = create_app(settings, embedder).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503 and "make migrate" in response.json["reason"]
    migrate(settings.db_url)
    assert client.get("/readyz").status_code == 200  # no restart needed


def test_a_base_over_the_memory_budget_is_refused_and_the_old_one_kept(base_settings, embedder, tmp_path, caplog):
    from indexer.index.compaction import compact
    from indexer.storage.store import Store

    settings = base_settings.with_overrides(data_dir=tmp_path / "data", memory_budget_mb=1_000_000)
    index_catalog(settings, embedder, write_skimage_catalog(tmp_path / "catalog"), progress=False)
    app = create_app(settings, embedder)
    client = app.test_client()
    served = client.get("/readyz").json["index_version"]
    app.extensions["catalog_search"].settings = settings.with_overrides(memory_budget_mb=1)  # the catalog outgrew it
    compact(settings, Store.open(settings), embedder)  # a new base is published
    with caplog.at_level("ERROR"):
        status = client.get("/readyz")
    assert status.status_code == 200 and status.json["index_version"] == served  # still the base it had
    assert "service.memory_budget_mb = 1 MB" in caplog.text
    fresh = create_app(settings.with_overrides(memory_budget_mb=1), embedder).test_client().get("/readyz")
    assert fresh.status_code == 503 and "memory_budget_mb" in fresh.json["reason"]


@both_databases
def test_a_database_never_migrated_gets_503_with_what_to_do_not_500(settings, embedder):
    client = create_app(settings, embedder).test_client()
    for path in ("/api/products/sku-1", "/images/sku-1", "/products/sku-1"):
        response = client.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 503 and "make migrate" in response.json["message"], path
