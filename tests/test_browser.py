"""The search pages and the storefront widget in a real Chromium, against the production server on loopback.

Screenshots of every step go to tests/screenshots/ (git-ignored).
"""

from __future__ import annotations

import functools
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.conftest import served_catalog, skimage_photo, wait_until
from tests.support.server import running_server

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package: Playwright's own browser download is not reachable
SCREENSHOTS = Path(__file__).with_name("screenshots")

# A sku with a '/' (the widget must encode it per segment) and a title that would run if it were HTML.
# Four products of the brand Acme, for the words box.
PRODUCTS_CSV = """sku,image,title,category,price,url,brand
cat-1,animals/chelsea.jpg,Chelsea the cat,animals,9.99,https://shop.example/cat-1,Acme
cam-1,people/camera.jpg,<script>window.pwned = 1</script> Cameraman,people,8.50,,Acme
mug-1,drinks/coffee.jpg,Espresso cup,drinks,3.20,,Acme
people/suit-1,people/astronaut.jpg,Astronaut portrait,people,,,Other
rocket-1,space/rocket.jpg,Rocket launch,space,1000000,,Acme
eye-1,medical/retina.jpg,Retina scan,medical,,,Other
"""
SCRIPT_TITLE = "<script>window.pwned = 1</script> Cameraman"


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the test output is not an access log
        pass


@contextmanager
def static_site(folder: Path) -> Iterator[str]:
    """A storefront on its own origin: Python's http.server on another loopback port, serving folder."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("shop")
    with static_site(folder) as origin:
        yield origin, folder


@pytest.fixture(scope="module")
def service(base_settings, embedder, tmp_path_factory, shop) -> Iterator[str]:
    """The production server over the six-product catalog, with the shop's origin allowed by CORS."""
    env, _ = served_catalog(
        base_settings,
        embedder,
        tmp_path_factory.mktemp("browser"),
        products_csv=PRODUCTS_CSV,
        API_KEY=secrets.token_urlsafe(16),
        CORS_ORIGINS=shop[0],
    )
    with running_server(env, timeout=120) as running:
        yield running.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not at {CHROMIUM} (make test installs it with apt-get)")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def photo_file(folder: Path, name: str, image: Image.Image) -> Path:
    path = folder / name
    image.save(path, quality=80)
    return path


def cat_photo(folder: Path) -> Path:
    # A different crop of a catalog photo, as a shopper's photo would be.
    photo = skimage_photo("chelsea")
    return photo_file(folder, "cat.jpg", photo.crop((30, 20, photo.width - 10, photo.height - 30)))


def cat_and_rocket_photo(folder: Path) -> tuple[Path, float]:
    """The cat large on the left, a small rocket on the right: the whole photo finds the cat first.
    Returns the file and where the rocket's part starts, as a fraction of the width."""
    cat, rocket = skimage_photo("chelsea"), skimage_photo("rocket")
    cat = cat.resize((500, round(cat.height * 500 / cat.width)))
    rocket = rocket.resize((round(rocket.width * 220 / rocket.height), 220))
    both = Image.new("RGB", (cat.width + 20 + rocket.width, 400), "white")
    both.paste(cat, (0, (both.height - cat.height) // 2))
    both.paste(rocket, (cat.width + 20, (both.height - rocket.height) // 2))
    return photo_file(folder, "cat-and-rocket.jpg", both), (cat.width + 10) / both.width


def search_with(page: Page, service: str, photo: Path, category: str | None = None) -> None:
    page.goto(service + "/")
    page.set_input_files("input[name=image]", str(photo))
    if category is not None:
        page.select_option("select[name=category]", category)
    page.click("button[type=submit]")


def card_titles(page: Page) -> list[str]:
    return page.locator(".card .title").all_inner_texts()


def all_images_loaded(page: Page, selector: str) -> bool:
    return page.eval_on_selector_all(
        selector, "images => images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0)"
    )


def test_widget_script_is_cacheable_javascript(service):
    response = requests.get(f"{service}/widget.js", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/javascript")
    assert "max-age=3600" in response.headers["Cache-Control"] and "data-similar-sku" in response.text
    again = requests.get(f"{service}/widget.js", headers={"If-None-Match": response.headers["ETag"]}, timeout=10)
    assert again.status_code == 304


def test_similar_answers_an_unknown_sku_with_no_results_only_when_asked(service):
    # What the widget asks for, so that an unknown sku leaves no failed request in the shop's console.
    assert requests.get(f"{service}/api/products/nope/similar", timeout=10).status_code == 404
    quiet = requests.get(f"{service}/api/products/nope/similar?unknown=empty", timeout=10)
    assert quiet.status_code == 200 and quiet.json()["results"] == []
    known = requests.get(f"{service}/api/products/people/suit-1/similar?unknown=empty&k=2", timeout=10)
    assert known.status_code == 200 and len(known.json()["results"]) == 2


@pytest.mark.slow
def test_uploading_a_photo_through_the_form_shows_result_cards(page, service, tmp_path):
    search_with(page, service, cat_photo(tmp_path))
    expect(page.locator(".card")).to_have_count(6)  # every product: default_k is 12
    assert card_titles(page)[0] == "Chelsea the cat"
    assert page.locator(".card a").first.get_attribute("href") == "/products/cat-1"
    assert all_images_loaded(page, ".query img")
    screenshot(page, "search-results")


@pytest.mark.slow
def test_choosing_a_category_shows_only_that_category(page, service, tmp_path):
    search_with(page, service, cat_photo(tmp_path), category="people")
    expect(page.locator(".card")).to_have_count(2)
    assert sorted(card_titles(page)) == sorted(["Astronaut portrait", SCRIPT_TITLE])
    assert all(meta.startswith("people") for meta in page.locator(".card .meta:first-of-type").all_inner_texts())
    expect(page.locator("select[name=category]")).to_have_value("people")
    screenshot(page, "search-category")


@pytest.mark.slow
def test_words_then_facets_narrow_the_results_keeping_what_was_chosen(page, service):
    page.goto(service + "/")
    page.fill("input[name=q]", "acme")
    page.click("button[type=submit]")
    expect(page.locator(".card")).to_have_count(4)  # the products of the brand, and no other
    refine = page.locator(".refine")
    expect(refine.locator("h3")).to_have_text(["Category", "Price"])
    screenshot(page, "refine-words")
    # The prices 3.20, 8.50, 9.99 and 1,000,000 in bands cut at round figures.
    expect(refine.locator("button")).to_contain_text(["under 7.50 1", "7.50 – 10 2", "10 and over 1"])
    refine.locator("button", has_text="7.50 – 10").click()
    expect(page.locator(".card")).to_have_count(2)
    assert sorted(card_titles(page)) == sorted(["Chelsea the cat", SCRIPT_TITLE])
    expect(page.locator("form.upload input[name=q]")).to_have_value("acme")  # the words box still holds the words
    page.locator(".refine button", has_text="animals").click()
    expect(page.locator(".card")).to_have_count(1)
    assert card_titles(page) == ["Chelsea the cat"]
    expect(page.locator("select[name=category]")).to_have_value("animals")
    screenshot(page, "refine-words-price-category")


@pytest.mark.slow
def test_a_facet_refines_a_photo_search_and_keeps_the_photo(page, service, tmp_path):
    search_with(page, service, cat_photo(tmp_path))
    expect(page.locator(".card")).to_have_count(6)
    page.locator(".refine button", has_text="people").click()
    expect(page.locator(".card")).to_have_count(2)
    assert sorted(card_titles(page)) == sorted(["Astronaut portrait", SCRIPT_TITLE])
    expect(page.locator("#query-photo")).to_be_visible()  # the same photo, searched again by its token
    screenshot(page, "refine-photo-category")


@pytest.mark.slow
def test_dragging_a_box_on_the_query_photo_searches_that_region(page, service, tmp_path):
    photo, rocket_starts = cat_and_rocket_photo(tmp_path)
    search_with(page, service, photo)
    expect(page.locator(".card .title").first).to_have_text("Chelsea the cat")
    query_photo = page.locator("#query-photo")
    expect(query_photo).to_be_visible()
    screenshot(page, "region-before")
    box = query_photo.bounding_box()
    assert box is not None
    left, right = box["x"] + box["width"] * (rocket_starts + 0.02), box["x"] + box["width"] * 0.98
    top, bottom = box["y"] + box["height"] * 0.05, box["y"] + box["height"] * 0.95
    page.mouse.move(left, top)
    page.mouse.down()
    page.mouse.move((left + right) / 2, (top + bottom) / 2, steps=5)
    page.mouse.move(right, bottom, steps=5)
    page.mouse.up()
    # Whether the page re-searches in place or reloads, the rocket's region must find the rocket.
    expect(page.locator(".card .title").first).to_have_text("Rocket launch")
    # The box searched is drawn on the photo by the page's own script, on the right part of it.
    overlay = page.locator("#query-box")
    expect(overlay).to_be_visible()
    drawn = overlay.bounding_box()
    assert drawn is not None and drawn["x"] > box["x"] + box["width"] * rocket_starts
    screenshot(page, "region-after")


@pytest.mark.slow
def test_product_page_and_its_preview_grid_load(page, service):
    page.goto(f"{service}/products/cat-1")
    expect(page.locator("h2").first).to_have_text("Chelsea the cat")
    expect(page.locator(".card")).to_have_count(5)  # the other products, not itself
    # Polled from here: wait_for_function evaluates its text with eval, which the page's policy refuses.
    wait_until(lambda: page.evaluate("[...document.images].every(i => i.complete)"), timeout=20)
    assert all_images_loaded(page, "img")
    screenshot(page, "product-page")
    preview = page.get_by_role("link", name="preview grid (PNG)")
    assert "/api/search/preview.png?sku=cat-1" in (preview.get_attribute("href") or "")
    with page.expect_response(lambda r: "/api/search/preview.png" in r.url) as answer:
        preview.click()
    assert answer.value.status == 200 and answer.value.headers["content-type"] == "image/png"
    page.wait_for_function("document.images.length === 1 && document.images[0].complete")
    assert page.evaluate("document.images[0].naturalWidth") > 300
    screenshot(page, "preview-grid")


@pytest.mark.slow
def test_a_file_that_is_not_an_image_gets_a_friendly_error(page, service, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a photo")
    page.goto(service + "/")
    page.set_input_files("input[name=image]", str(notes))
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 400
    expect(page.locator(".error")).to_contain_text("not a recognised image")
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and 'File "' not in text
    expect(page.locator("input[name=image]")).to_be_visible()  # the form is there to try again
    screenshot(page, "upload-error")


def storefront_page(folder: Path, service: str) -> str:
    (folder / "product.html").write_text(
        f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>A storefront</title><link rel="icon" href="data:,"></head>
<body>
  <h1>Astronaut portrait</h1>
  <h2>You may also like</h2>
  <div id="known" data-similar-sku="people/suit-1" data-k="5"></div>
  <h2>Not in the catalog</h2>
  <div id="unknown" data-similar-sku="no/such sku?" data-k="5"></div>
  <script src="{service}/widget.js" async></script>
</body>
</html>
"""
    )
    return "product.html"


@contextmanager
def console_errors(page: Page) -> Iterator[list[str]]:
    """Error-level console messages and uncaught exceptions of the page, as they happen."""
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(f"console: {message.text} ({message.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
    yield errors


@pytest.mark.slow
def test_widget_on_another_origin_shows_similar_products_and_nothing_for_an_unknown_sku(page, service, shop):
    origin, folder = shop
    with console_errors(page) as errors:
        page.goto(f"{origin}/{storefront_page(folder, service)}")
        known, unknown = page.locator("#known"), page.locator("#unknown")
        expect(unknown).to_have_attribute("data-similar-state", "empty")
        expect(known).to_have_attribute("data-similar-state", "loaded")
        cards = known.locator(".vps-card")
        expect(cards).to_have_count(5)
        page.wait_for_function("[...document.querySelectorAll('#known img')].every(i => i.complete)")
        assert all_images_loaded(page, "#known .vps-image")
        screenshot(page, "storefront-widget")
    assert errors == []
    titles = known.locator(".vps-title").all_text_contents()
    assert SCRIPT_TITLE in titles and "Astronaut portrait" not in titles  # the product itself is left out
    assert known.locator("script").count() == 0 and page.evaluate("window.pwned") is None
    links = dict(zip(titles, known.locator("a.vps-link").evaluate_all("links => links.map(a => a.href)"), strict=True))
    assert links["Chelsea the cat"] == "https://shop.example/cat-1"  # the product's own url when known
    assert links["Espresso cup"] == f"{service}/products/mug-1"  # else the service's product page
    assert "9.99" in known.locator(".vps-card", has_text="Chelsea").inner_text()
    assert unknown.evaluate("div => div.childNodes.length") == 0


@pytest.mark.slow
def test_widget_fills_a_div_the_shop_adds_later(page, service, shop):
    origin, folder = shop
    with console_errors(page) as errors:
        page.goto(f"{origin}/{storefront_page(folder, service)}")
        expect(page.locator("#known")).to_have_attribute("data-similar-state", "loaded")
        page.evaluate(
            """() => {
                const div = document.createElement("div");
                div.id = "later";
                div.dataset.similarSku = "rocket-1";
                div.dataset.k = "2";
                document.body.appendChild(div);
            }"""
        )
        expect(page.locator("#later .vps-card")).to_have_count(2)
        page.evaluate("document.getElementById('later').dataset.k = '3'")  # and re-fills it when k changes
        expect(page.locator("#later .vps-card")).to_have_count(3)
        screenshot(page, "storefront-widget-later")
    assert errors == []


@pytest.mark.slow
def test_widget_shows_recommendations_for_a_list_of_liked_skus(page, service, shop):
    """data-like (and data-unlike): a POST of JSON to /api/recommend from the shop's origin, preflight and all; the
    liked and unliked products are not shown, and a list of skus the catalog no longer has leaves the div empty."""
    origin, folder = shop
    (folder / "basket.html").write_text(
        f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>A basket</title><link rel="icon" href="data:,"></head>
<body>
  <h2>Complete the look</h2>
  <div id="basket" data-like="cat-1, mug-1" data-unlike="rocket-1" data-k="5"></div>
  <div id="gone" data-like="no-such-sku,another" data-k="5"></div>
  <script src="{service}/widget.js" async></script>
</body>
</html>
"""
    )
    with console_errors(page) as errors:
        page.goto(f"{origin}/basket.html")
        basket = page.locator("#basket")
        expect(basket).to_have_attribute("data-similar-state", "loaded")
        expect(page.locator("#gone")).to_have_attribute("data-similar-state", "empty")
        page.wait_for_function("[...document.querySelectorAll('#basket img')].every(i => i.complete)")
        assert all_images_loaded(page, "#basket .vps-image")
        screenshot(page, "storefront-widget-recommend")
    assert errors == []
    # Six products: two liked and one unliked leave three, shown as text.
    titles = basket.locator(".vps-title").all_text_contents()
    assert sorted(titles) == sorted([SCRIPT_TITLE, "Astronaut portrait", "Retina scan"])
    assert page.evaluate("window.pwned") is None
    page.evaluate("document.getElementById('basket').dataset.unlike = ''")  # re-filled when the lists change
    expect(basket.locator(".vps-card")).to_have_count(4)


@pytest.mark.slow
def test_pages_run_their_own_script_and_styles_and_nothing_else(page, service, tmp_path):
    with console_errors(page) as errors:
        search_with(page, service, cat_photo(tmp_path))
        expect(page.locator(".card")).to_have_count(6)
        # the page's stylesheet applies (its nonce), and nothing of the page was refused
        assert page.locator(".card").first.evaluate("card => getComputedStyle(card).borderRadius") == "8px"
    assert errors == []
    policy = requests.get(f"{service}/", timeout=10).headers["Content-Security-Policy"]
    assert "script-src 'nonce-" in policy and "frame-ancestors 'none'" in policy
    # Nor may the page reach anywhere else: a fetch is refused (connect-src falls back to default-src 'none').
    assert page.evaluate("() => fetch(location.href).then(() => 'fetched', () => 'refused')") == "refused"
    # A script that found its way into the page (no nonce) does not run.
    page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.injected = 1";
            document.body.appendChild(script);
        }"""
    )
    assert page.evaluate("window.injected") is None


@pytest.mark.slow
def test_another_site_cannot_frame_the_pages(page, service, shop):
    origin, folder = shop
    (folder / "framing.html").write_text(
        f'<!doctype html><html><body><iframe id="framed" src="{service}/products/cat-1"></iframe></body></html>'
    )
    with page.expect_response(lambda r: r.url == f"{service}/products/cat-1") as answer:
        page.goto(f"{origin}/framing.html")
    assert answer.value.status == 200 and answer.value.headers["x-frame-options"] == "DENY"
    framed = next(frame for frame in page.frames if frame != page.main_frame)
    page.wait_for_timeout(500)  # the refused frame shows the browser's error page, never the product
    assert "Chelsea the cat" not in framed.content()
