"""GET /openapi.json: a valid OpenAPI 3.1 document that matches Flask's routes, and that the real server keeps."""

from __future__ import annotations

import functools
import hashlib
import io
import re

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from openapi_spec_validator import validate
from schemathesis.specs.openapi.checks import allow_header_conformance, unsupported_method

from indexer.jobs.indexing import index_catalog
from service import create_app
from service.openapi import SPEC
from tests.conftest import SKIMAGE_CATALOG, served_catalog, skimage_photo, write_skimage_catalog
from tests.support.server import running_server

API_KEY = "openapi-test-key"
# Generated cases per operation in the fuzzing phase (fewer where there is little to vary); the examples and
# coverage phases add their own: about 850 cases in all, and 12 s on 2 cores.
MAX_EXAMPLES = 25
# HEAD and OPTIONS are Flask's automatic answers, not operations of the service.
AUTOMATIC = {"HEAD", "OPTIONS"}
SKUS = [f"{category}/{name}" for category, names in SKIMAGE_CATALOG.items() for name in names]


def openapi_path(rule: str) -> str:
    """/api/products/<path:sku>/similar -> /api/products/{sku}/similar"""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


@pytest.fixture(scope="module")
def app(base_settings, embedder, tmp_path_factory):
    return create_app(base_settings.with_overrides(data_dir=tmp_path_factory.mktemp("openapi") / "data"), embedder)


@pytest.fixture(scope="module")
def document(app) -> dict:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.json


def test_the_served_description_is_a_valid_openapi_3_1_document(document):
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises with the offending part when it is not


def test_every_route_is_documented_and_every_documented_operation_is_served(app, document):
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":  # Flask's own file route for service/static/, not an API
            continue
        for method in rule.methods - AUTOMATIC:
            served[(openapi_path(rule.rule), method.lower())] = rule.endpoint
    documented = {
        (path, method): operation["x-endpoint"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method != "parameters"
    }
    assert sorted(set(served) - set(documented)) == [], "routes missing from service/openapi/paths.py"
    assert sorted(set(documented) - set(served)) == [], "service/openapi/paths.py documents operations nobody serves"
    # x-endpoint names the view that serves it, so a route moved to another view cannot keep a stale description.
    assert {key: documented[key] for key in served} == served


def test_a_description_mounted_under_a_prefix_names_that_prefix_as_its_server(app):
    response = app.test_client().get("/openapi.json", environ_overrides={"SCRIPT_NAME": "/visual-search"})
    assert response.json["servers"] == [{"url": "/visual-search"}]


# --- Answers the description promises and the service broke before it was written ----------------------------


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi-indexed")
    settings = base_settings.with_overrides(data_dir=root / "data", api_key=API_KEY)
    index_catalog(settings, embedder, write_skimage_catalog(root / "catalog"), progress=False)
    return settings


def test_a_405_names_the_allowed_methods(indexed, embedder):
    response = create_app(indexed, embedder).test_client().delete("/api/categories")
    assert response.status_code == 405 and response.json["error"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}


def test_a_missing_api_key_gets_a_401_that_names_the_bearer_scheme(indexed, embedder):
    response = create_app(indexed, embedder).test_client().delete("/api/products/drinks/coffee")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"


def test_a_page_that_cannot_be_served_yet_is_a_503_page_not_a_500(indexed, embedder):
    # The base would not fit the memory budget: the product exists, its similar products cannot be searched.
    client = create_app(indexed.with_overrides(memory_budget_mb=1), embedder).test_client()
    response = client.get("/products/drinks/coffee", headers={"Accept": "text/html"})
    assert response.status_code == 503 and response.mimetype == "text/html"
    assert response.headers["Retry-After"] and "memory_budget_mb" in response.get_data(as_text=True)


def test_a_phone_jpeg_with_a_second_view_is_served_as_a_jpeg(indexed, embedder):
    # Pillow reads such a file (MPO: a JPEG plus more views) as its own format, which has no media type.
    photo, buffer = skimage_photo("coffee"), io.BytesIO()
    photo.save(buffer, format="MPO", save_all=True, append_images=[photo.rotate(90)])
    client = create_app(indexed, embedder).test_client()
    written = client.put(
        "/api/products/phone-photo",
        data={"image": (io.BytesIO(buffer.getvalue()), "IMG_0001.JPG")},
        headers={"Authorization": f"Bearer {API_KEY}"},
        content_type="multipart/form-data",
    )
    assert written.status_code == 201
    served = client.get("/images/phone-photo")
    assert served.status_code == 200 and served.mimetype == "image/jpeg"


# --- Schemathesis against the production server --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(base_settings, embedder, tmp_path_factory):
    """The production server over the six scikit-image photos, with the write API on; yields its URL and the
    catalog's photos."""
    # FETCH_ALLOW_PRIVATE: so that an image_url can name this server's own photos (there is no other server).
    env, catalog = served_catalog(
        base_settings, embedder, tmp_path_factory.mktemp("openapi-server"), API_KEY=API_KEY, FETCH_ALLOW_PRIVATE="1"
    )
    with running_server(env, timeout=120) as running:
        assert requests.get(f"{running.url}/openapi.json", timeout=10).json() == {**SPEC, "servers": [{"url": "/"}]}
        yield running.url, [path.read_bytes() for path in sorted(catalog.rglob("*.jpg"))]


# The document the service serves (the server fixture checks that it does), loaded at collection time so that
# Schemathesis makes one test per operation (its lazy from_fixture loader fails under pytest 9.2: no Node._nodeid).
schema = schemathesis.openapi.from_dict(SPEC)
schema.config.checks.update(
    excluded_check_names=[
        # Whether a request succeeds depends on what a schema cannot say: whether the bytes are a photo, whether
        # the category, sku or token exists. So a schema-valid request may rightly get a 400 or a 404.
        "positive_data_acceptance",
        # On the wire every form and query field is text; the server reads the first of repeated fields and an
        # empty one as absent, as HTML forms need. So Schemathesis's mutations into arrays, objects and empty
        # values often arrive as valid requests. Invalid requests still go out, and still must get no 5xx and
        # documented answers.
        "negative_data_rejection",
    ]
)
# A 502 is the documented answer when image_url's server fails; any other 5xx fails the test.
schema.config.checks.not_a_server_error.expected_statuses = ["2xx", "3xx", "4xx", "502"]


def choose(value: object, choices: list) -> object:
    """The generated value half of the time, else one of choices; decided by the value itself, so that Hypothesis
    replays and shrinks the same case."""
    digest = hashlib.sha256(repr(value).encode()).digest()
    return value if digest[0] % 2 else choices[digest[1] % len(choices)]


def with_real_values(case: schemathesis.Case, url: str, photos: list[bytes], token: str) -> None:
    """Random bytes are never a photo and random skus never exist, so only errors would be checked: put real photos,
    skus, categories, tokens and image URLs into half of the valid cases (a valid value for a valid one, so the case
    stays valid), and the answers of searches, previews and writes that succeed are checked too."""
    real = {
        "image": photos,
        "sku": SKUS,
        "category": sorted(SKIMAGE_CATALOG),
        "query": [token],
        "image_url": [f"{url}/images/{sku}" for sku in SKUS],
        "facets": ["category,price,attr.colour", "price"],
    }
    for values in (case.body, case.path_parameters, case.query):
        if not isinstance(values, dict):
            continue
        for name, choices in real.items():
            if name in values and isinstance(values[name], bytes if name == "image" else str) and values[name]:
                values[name] = choose(values[name], choices)


# /api/products/x/similar is also the URL of the product "x/similar" (skus hold slashes), whose PUT and DELETE
# are declared: these two checks would take them for undeclared methods.
SHARED_PATH_CHECKS = [unsupported_method, allow_header_conformance]


@schema.parametrize()
# derandomize: the same cases on every run, so that `make test` never fails by chance; a change to the description
# changes the cases.
@hypothesis.settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_fuzzed_requests_get_no_5xx_and_every_answer_matches_the_description(case, server):
    """Schemathesis's examples, coverage and fuzzing phases, valid and invalid requests, over every operation."""
    url, photos = server
    if case.meta is not None and case.meta.generation.mode.is_positive:
        with_real_values(case, url, photos, token(url, photos[0]))
    excluded = SHARED_PATH_CHECKS if case.operation.path == "/api/products/{sku}/similar" else []
    case.call_and_validate(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, excluded_checks=excluded, timeout=60
    )


@functools.cache
def token(url: str, photo: bytes) -> str:
    """The query token of a search with this photo: the server remembers it (and a search with the same photo
    gives the same token, so the fuzzed searches keep it remembered)."""
    response = requests.post(f"{url}/api/search", files={"image": ("q.jpg", photo)}, timeout=60)
    return response.json()["query"]
