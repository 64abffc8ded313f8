"""CORS: configured storefront origins may call the read API from a browser; the write API stays closed to them."""

from __future__ import annotations

import io

import pytest

from indexer.config import REPO_ROOT, ConfigError, load_settings
from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import skimage_jpeg, write_skimage_catalog

SHOP = "https://shop.example"
OTHER = "https://evil.example"
KEY = "cors-test-key"
ACAO = "Access-Control-Allow-Origin"
ACAM = "Access-Control-Allow-Methods"


@pytest.fixture(scope="module")
def client(base_settings, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cors")
    settings = base_settings.with_overrides(
        data_dir=root / "data", cors_origins=(SHOP, "http://[::1]:8080"), api_key=KEY
    )
    index_catalog(settings, embedder, write_skimage_catalog(root / "catalog"), progress=False)
    return create_app(settings, embedder).test_client()


def preflight(client, url: str, method: str, origin: str = SHOP, headers: str | None = None):
    request_headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        request_headers["Access-Control-Request-Headers"] = headers
    return client.options(url, headers=request_headers)


@pytest.mark.parametrize(
    ("url", "method"),
    [
        ("/api/search", "POST"),
        ("/api/products/animals/chelsea/similar", "GET"),
        ("/api/products/animals/chelsea", "GET"),
        ("/api/categories", "GET"),
        ("/images/animals/chelsea", "GET"),
        ("/widget.js", "GET"),
    ],
)
def test_a_preflight_from_an_allowed_origin_opens_the_read_api(client, url, method):
    response = preflight(client, url, method, headers="Content-Type")
    assert response.status_code == 200
    assert response.headers[ACAO] == SHOP
    allowed = {m.strip() for m in response.headers[ACAM].split(",")}
    assert method in allowed and not allowed & {"PUT", "DELETE"}
    assert "Origin" in response.headers.get("Vary", "")


def test_a_preflight_for_a_raw_image_search_allows_its_content_type(client):
    # Content-Type image/jpeg is not a CORS-safelisted one: the browser asks first.
    response = preflight(client, "/api/search", "POST", headers="Content-Type")
    assert response.headers[ACAO] == SHOP
    assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()
    found = client.post("/api/search", data=skimage_jpeg("coffee"), content_type="image/jpeg", headers={"Origin": SHOP})
    assert found.status_code == 200 and found.json["results"][0]["sku"] == "drinks/coffee"
    assert found.headers[ACAO] == SHOP


def test_a_preflight_from_another_origin_gets_no_cors_headers(client):
    for url, method in [("/api/search", "POST"), ("/api/categories", "GET"), ("/api/products/animals/chelsea", "GET")]:
        response = preflight(client, url, method, origin=OTHER)
        assert ACAO not in response.headers and ACAM not in response.headers, url


def test_a_simple_get_from_an_allowed_origin_may_be_read(client):
    response = client.get("/api/categories", headers={"Origin": SHOP})
    assert response.status_code == 200 and response.headers[ACAO] == SHOP
    assert "Origin" in response.headers["Vary"]
    image = client.get("/images/animals/chelsea", headers={"Origin": "HTTPS://Shop.Example"})  # origins ignore case
    assert image.status_code == 200 and image.headers[ACAO] == "HTTPS://Shop.Example"


def test_an_ipv6_origin_matches_exactly(client):
    assert client.get("/api/categories", headers={"Origin": "http://[::1]:8080"}).headers[ACAO] == "http://[::1]:8080"
    for near_miss in ("http://[::1]:80800", "http://:8080", "http://1:8080"):
        assert ACAO not in client.get("/api/categories", headers={"Origin": near_miss}).headers, near_miss


def test_a_search_from_an_allowed_origin_may_be_read_also_when_it_fails(client):
    photo = skimage_jpeg("coffee")
    found = client.post(
        "/api/search",
        data={"image": (io.BytesIO(photo), "q.jpg")},
        headers={"Origin": SHOP},
        content_type="multipart/form-data",
    )
    assert found.status_code == 200 and found.json["results"][0]["sku"] == "drinks/coffee"
    assert found.headers[ACAO] == SHOP
    missing = client.get("/api/products/nope", headers={"Origin": SHOP})
    assert missing.status_code == 404 and missing.headers[ACAO] == SHOP  # the shop's script can read why


def test_other_origins_and_requests_without_an_origin_get_no_cors_headers(client):
    assert ACAO not in client.get("/api/categories", headers={"Origin": OTHER}).headers
    assert ACAO not in client.get("/api/categories").headers
    assert ACAO not in client.get("/api/categories", headers={"Origin": SHOP + ".evil.example"}).headers


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_the_write_api_is_never_opened_by_a_preflight(client, method):
    response = preflight(client, "/api/products/animals/chelsea", method, headers="Authorization, Content-Type")
    assert ACAO not in response.headers and ACAM not in response.headers
    assert "Access-Control-Allow-Headers" not in response.headers


def test_writes_from_an_allowed_origin_work_but_carry_no_cors_headers(client):
    headers = {"Origin": SHOP, "Authorization": f"Bearer {KEY}"}
    put = client.put(
        "/api/products/cors-mug",
        data={"image": (io.BytesIO(skimage_jpeg("coffee")), "p.jpg"), "title": "Mug"},
        headers=headers,
        content_type="multipart/form-data",
    )
    assert put.status_code == 201 and ACAO not in put.headers
    deleted = client.delete("/api/products/cors-mug", headers=headers)
    assert deleted.status_code == 200 and ACAO not in deleted.headers
    refused = client.delete("/api/products/cors-mug", headers={"Origin": SHOP})  # no key: 401, still closed
    assert refused.status_code == 401 and ACAO not in refused.headers


def test_other_endpoints_stay_same_origin(client):
    for url in ("/healthz", "/readyz", "/metrics", "/api/search/preview.png?sku=animals/chelsea"):
        assert ACAO not in client.get(url, headers={"Origin": SHOP}).headers, url
    assert ACAO not in preflight(client, "/api/search/preview.png", "POST").headers


def test_without_configured_origins_nothing_is_cross_origin(base_settings, embedder, tmp_path):
    client = create_app(base_settings.with_overrides(data_dir=tmp_path / "data"), embedder).test_client()
    assert base_settings.cors_origins == ()
    assert ACAO not in preflight(client, "/api/search", "POST").headers
    assert ACAO not in client.get("/api/categories", headers={"Origin": SHOP}).headers


def test_cors_origins_come_from_the_environment_comma_separated(monkeypatch):
    monkeypatch.setenv("CORS_ORIGINS", " https://shop.example, http://localhost:3000 ,")
    settings = load_settings(REPO_ROOT / "config.toml")
    assert settings.cors_origins == ("https://shop.example", "http://localhost:3000")


@pytest.mark.parametrize(
    "origin", ["*", "shop.example", "https://shop.example/", "https://shop.example/path", "https://"]
)
def test_a_value_that_is_not_an_origin_is_a_config_error(monkeypatch, origin):
    monkeypatch.setenv("CORS_ORIGINS", origin)
    with pytest.raises(ConfigError, match="scheme://host"):
        load_settings(REPO_ROOT / "config.toml")
