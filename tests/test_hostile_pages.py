"""What a hostile catalog, write or request makes the pages and the API send, through the real server: product
links only ever http(s), skus that would collide with a route refused, facet values shown as text, and every
page's security headers."""

from __future__ import annotations

import html
import io
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from flask import Flask
from markupsafe import escape
from PIL import Image

from indexer.catalog import scan_catalog
from indexer.jobs.importing import import_vectors
from indexer.records import ROUTE_SUFFIXES, ProductFields, ShownProduct, safe_link
from indexer.storage.store import Store
from indexer.writes import CatalogWriter
from service.preview import render_preview
from tests.conftest import served_catalog, skimage_jpeg
from tests.support.server import running_server

KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {KEY}"}

# Every way a product url tried to become a script: refused when the catalog is read.
HOSTILE_URLS = [
    "javascript:alert(document.domain)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "\x01javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)",
    "//evil.example/x",
    "https:///no-host",
]
PRODUCTS_CSV = """sku,image,title,category,price,url
cat-1,animals/chelsea.jpg,$\\foo$ cat,animals,9.99,https://shop.example/cat-1
mug-1,drinks/coffee.jpg,$a^{b$ cup,drinks,3.20,javascript:alert(document.domain)
rocket-1,space/rocket.jpg,Rocket launch,space,,JaVaScRiPt:alert(1)
eye-1,medical/retina.jpg,Retina scan,medical,,"data:text/html,<script>alert(1)</script>"
cam-1,people/camera.jpg,$\\sqrt[$ camera,people,,"java\tscript:alert(1)"
people/suit-1,people/astronaut.jpg,Only $5 and $,people,,HTTPS://shop.example/suit
foo/similar,people/astronaut.jpg,Collides,people,,
"""
# The catalog's only web links, as the pages and the API show them.
WEB_LINKS = {None, "https://shop.example/cat-1", "HTTPS://shop.example/suit"}
# The server draws at most 4 matches in a preview: fewer than the catalog's 5 others, so the cap shows.
PREVIEW_MAX_K = {"preview_max_k = 24": "preview_max_k = 4"}
MATH_TITLES = ["$\\foo$ cat", "$a^{b$ cup", "$\\sqrt[$ camera", "Only $5 and $"]
SKUS = ["cat-1", "mug-1", "rocket-1", "eye-1", "cam-1", "people/suit-1"]


@pytest.fixture(scope="module")
def served(base_settings, embedder, tmp_path_factory) -> Iterator[str]:
    """The real server over the catalog above; eye-1's url then rewritten through the core write path to a script
    link, as a store filled before links were checked would hold it."""
    root = tmp_path_factory.mktemp("hostile-pages")
    env, _ = served_catalog(
        base_settings, embedder, root, products_csv=PRODUCTS_CSV, API_KEY=KEY, config_changes=PREVIEW_MAX_K
    )
    settings = base_settings.with_overrides(data_dir=Path(env["DATA_DIR"]))
    legacy = ProductFields("eye-1", "Retina scan", "medical", None, " JaVaScRiPt:alert(document.cookie)")
    CatalogWriter(settings, Store.open(settings)).write([legacy])
    with running_server(env, timeout=120) as running:
        yield running.url


def hrefs(html: str) -> list[str]:
    return re.findall(r"""\bhref\s*=\s*["']?([^"'\s>]*)""", html, re.IGNORECASE)


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_no_other_scheme_is_a_link(url):
    assert safe_link(url) is None


@pytest.mark.parametrize("url", ["https://shop.example/a", " http://shop.example ", "HTTPS://shop.example/x?y=1"])
def test_web_addresses_are_links(url):
    assert safe_link(url) == url.strip()


def test_a_catalog_reports_script_links_and_colliding_skus(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(skimage_jpeg("coffee"))
    (tmp_path / "products.csv").write_text(
        "sku,image,url\nok,a.jpg,javascript:alert(1)\nfoo/similar,b.jpg,\nx/../y,c.jpg,\n"
    )
    scan = scan_catalog(tmp_path)
    assert [image.sku for image in scan.images] == ["ok"] and scan.images[0].product.url is None
    assert len(scan.problems) == 3
    assert "line 2: url 'javascript:alert(1)' is not an http:// or https:// address" in scan.problems[0]
    assert "line 3: a sku may not end in '/similar'" in scan.problems[1]
    assert "line 4: a sku may not hold '.' or '..'" in scan.problems[2]


def test_a_folder_catalog_skips_a_photo_whose_sku_collides(tmp_path):
    (tmp_path / "shoes").mkdir()
    for name in ("similar.jpg", "boot.jpg"):
        (tmp_path / "shoes" / name).write_bytes(skimage_jpeg("coffee"))
    scan = scan_catalog(tmp_path)
    assert scan.skus == {"shoes/boot"}
    assert scan.problems == ["shoes/similar.jpg: a sku may not end in '/similar': "
                             "/api/products/<sku>/similar is another route; skipped"]  # fmt: skip


def test_every_route_below_a_sku_is_a_known_suffix():
    """ROUTE_SUFFIXES names every route that continues after a <path:sku>: a new one must be added there."""
    from service.api import api
    from service.openapi import openapi
    from service.pages import pages
    from service.widget import widget
    from service.writes import writes

    app = Flask("routes")
    for blueprint in (api, pages, writes, openapi, widget):
        app.register_blueprint(blueprint)
    suffixes = {rule.rule.split("<path:sku>", 1)[1] for rule in app.url_map.iter_rules() if "<path:sku>" in rule.rule}
    assert suffixes - {""} == set(ROUTE_SUFFIXES)


def test_no_page_or_answer_holds_a_script_link(served):
    for sku in SKUS:
        product = requests.get(f"{served}/api/products/{sku}", timeout=30).json()
        assert product["url"] in WEB_LINKS, product
        page = requests.get(f"{served}/products/{sku}", timeout=30)
        assert page.status_code == 200
        assert all(link.startswith(("/", "https://", "HTTPS://")) for link in hrefs(page.text)), hrefs(page.text)
        assert "javascript" not in page.text.lower() and "data:text" not in page.text
        similar = requests.get(f"{served}/api/products/{sku}/similar?k=10", timeout=30).json()
        assert {r["url"] for r in similar["results"]} <= WEB_LINKS
    assert requests.get(f"{served}/api/products/eye-1", timeout=30).json()["url"] is None  # stored, never shown
    cat = requests.get(f"{served}/products/cat-1", timeout=30).text
    assert 'href="https://shop.example/cat-1"' in cat  # a web link is still one
    search = requests.post(f"{served}/api/search", files={"image": skimage_jpeg("retina")}, timeout=60).json()
    assert search["results"][0]["sku"] == "eye-1" and search["results"][0]["url"] is None


def put(served: str, sku: str, **fields: str) -> requests.Response:
    files = {"image": ("p.jpg", io.BytesIO(skimage_jpeg("coffee", angle=10)))}
    return requests.put(f"{served}/api/products/{sku}", data=fields, files=files, headers=AUTH, timeout=60)


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_the_write_api_refuses_a_link_of_another_scheme(served, url):
    response = put(served, "new-1", title="New", url=url)
    assert response.status_code == 400, response.text
    assert "url must be an absolute http:// or https:// address" in response.json()["message"]
    assert requests.get(f"{served}/api/products/new-1", timeout=30).status_code == 404  # nothing was written


def test_the_write_api_stores_a_web_link(served):
    assert put(served, "new-2", title="New", url=" https://shop.example/new-2 ").status_code == 201
    assert requests.get(f"{served}/api/products/new-2", timeout=30).json()["url"] == "https://shop.example/new-2"


def test_a_sku_that_collides_with_a_route_is_refused(served):
    response = put(served, "foo/similar", title="Collides")
    assert response.status_code == 400
    assert response.json()["message"] == "a sku may not end in '/similar': /api/products/<sku>/similar is another route"
    assert put(served, "foo", title="Foo").status_code == 201
    # so /api/products/foo/similar is only ever foo's similar products, and the catalog's colliding row was skipped
    similar = requests.get(f"{served}/api/products/foo/similar", timeout=30).json()
    assert similar["sku"] == "foo" and "Collides" not in {r["title"] for r in similar["results"]}
    assert put(served, "foo/similar/more", title="Deeper").status_code == 201  # reachable: not the route
    assert requests.get(f"{served}/api/products/foo/similar/more", timeout=30).json()["title"] == "Deeper"


def test_every_answer_says_nosniff_and_every_page_its_policy(served):
    answers = {
        "/": requests.get(f"{served}/", timeout=30),
        "/products/cat-1": requests.get(f"{served}/products/cat-1", timeout=30),
        "a missing page": requests.get(f"{served}/products/nope", headers={"Accept": "text/html"}, timeout=30),
        "a search page": requests.post(f"{served}/", files={"image": skimage_jpeg("chelsea")}, timeout=60),
        "/api/products/cat-1": requests.get(f"{served}/api/products/cat-1", timeout=30),
        "a missing product": requests.get(f"{served}/api/products/nope", timeout=30),
        "/images/cat-1": requests.get(f"{served}/images/cat-1", timeout=30),
        "/widget.js": requests.get(f"{served}/widget.js", timeout=30),
        "/healthz": requests.get(f"{served}/healthz", timeout=30),
    }
    nonces = set()
    for name, answer in answers.items():
        assert answer.headers["X-Content-Type-Options"] == "nosniff", name
        if answer.headers["Content-Type"].startswith("text/html"):
            policy = answer.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, name
            assert answer.headers["X-Frame-Options"] == "DENY", name
            nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)
            nonces.add(nonce)
            # every script and style element carries the nonce; no attribute runs script or sets a style
            tags = re.findall(r"<(?:script|style)\b[^>]*>", answer.text)
            assert tags and all(f'nonce="{nonce}"' in tag for tag in tags), (name, tags)
            assert not re.search(r"\s(?:on\w+|style)\s*=", answer.text, re.IGNORECASE), name
    assert answers["a search page"].status_code == 200 and answers["a missing page"].status_code == 404
    assert len(nonces) == 4  # one per answer


@pytest.mark.parametrize("title", [*MATH_TITLES, "$", "\\", "$$", "a_b^c {x}"])
def test_a_preview_title_is_drawn_as_text(title):
    query = Image.new("RGB", (64, 64), "white")
    png = render_preview(query, [(ShownProduct("x", title, score=0.5), Path("missing.jpg"))])
    assert Image.open(io.BytesIO(png)).size == (2 * 192, 216)  # two panels: the query and the match


def test_previews_of_products_with_math_in_their_titles_answer(served):
    titles = {requests.get(f"{served}/api/products/{sku}", timeout=30).json()["title"] for sku in SKUS}
    assert set(MATH_TITLES) <= titles
    for sku in SKUS:
        grid = requests.get(f"{served}/api/search/preview.png", params={"sku": sku, "k": 4}, timeout=60)
        assert grid.status_code == 200 and grid.headers["Content-Type"] == "image/png", grid.text[:300]


def test_a_preview_draws_at_most_preview_max_k_matches(served):
    def size(k: int) -> tuple[int, int]:
        grid = requests.get(f"{served}/api/search/preview.png", params={"sku": "rocket-1", "k": k}, timeout=60)
        assert grid.status_code == 200
        return Image.open(io.BytesIO(grid.content)).size

    # 2.4 x 2.7 inches a panel at 80 dpi, five to a row: the query and 4 matches fill one row, 5 would start a second
    assert size(100) == size(4) == (5 * 192, 216)
    assert size(2) == (3 * 192, 216)
    similar = requests.get(f"{served}/api/products/rocket-1/similar?k=100", timeout=30).json()
    assert len(similar["results"]) >= 5  # the JSON API keeps service.max_k


def test_an_import_reports_script_links_and_colliding_skus(base_settings, embedder, tmp_path):
    vectors = np.random.default_rng(0).normal(size=(3, embedder.network.dim)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", vectors)
    (tmp_path / "products.csv").write_text(
        "sku,title,category,price,url,image\n"
        "a,A,c,,javascript:alert(1),\nfoo/similar,B,c,,,\nc,C,c,,https://shop.example/c,\n"
    )
    settings = base_settings.with_overrides(data_dir=tmp_path / "data")
    report = import_vectors(settings, embedder, tmp_path / "vectors.npy", tmp_path / "products.csv", progress=False)
    assert (report.stored, report.skipped) == (2, 1)
    assert report.problems == [
        "line 2: url 'javascript:alert(1)' is not an http:// or https:// address; stored without a url",
        "line 3: a sku may not end in '/similar': /api/products/<sku>/similar is another route",
    ]
    products = Store.open(settings).products
    assert products.by_sku("a").url is None and products.by_sku("c").url == "https://shop.example/c"


def test_facet_values_from_shop_data_stay_text_in_the_refine_list(served):
    category, colour = "<img src=x onerror=alert(1)>", '"><script>alert(1)</script>'
    assert (
        put(served, "hostile-1", title="Hostile facets", category=category, colour=colour, price="5").status_code == 201
    )
    answer = requests.post(f"{served}/api/search", data={"q": "hostile", "facets": "category,attr.colour"}, timeout=30)
    assert answer.json()["facets"] == {
        "category": [{"value": category, "count": 1}],
        "attr.colour": [{"value": colour, "count": 1}],
    }
    page = requests.post(f"{served}/", data={"q": "hostile", "facets": "category,attr.colour"}, timeout=30)
    assert page.status_code == 200
    assert category not in page.text and "<script>alert" not in page.text
    assert page.text.count(str(escape(category))) >= 2 and str(escape(colour)) in page.text  # a label, a field
    # The refine form sends the category back as it was stored, and the search finds the product by it.
    sent = re.search(r'name="category" value="([^"]*)"', page.text)
    assert sent is not None and html.unescape(sent.group(1)) == category
    refined = requests.post(f"{served}/", data={"q": "hostile", "category": category}, timeout=30)
    assert refined.status_code == 200 and refined.text.count('class="card"') == 1
