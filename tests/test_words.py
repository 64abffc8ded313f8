"""Search by words (q): the full-text index follows every write, returns only live products holding every word,
and is fused with the photo's ranking; through the real server, on SQLite and on PostgreSQL."""

from __future__ import annotations

import secrets

import pytest
import requests

from indexer.storage.store import Store
from indexer.storage.text import Words
from tests.conftest import DATABASES, served_on_database, skimage_jpeg

KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {KEY}"}
PRODUCTS_CSV = """sku,image,title,category,price,colour
cat,animals/chelsea.jpg,Tabby cat,animals,9.99,orange
mug,drinks/coffee.jpg,Espresso cup,drinks,3.20,White
rocket,space/rocket.jpg,Saturn rocket,space,120,white
eye,medical/retina.jpg,Retina scan,medical,,
cam,people/camera.jpg,Cameraman,people,,grey
suit,people/astronaut.jpg,Astronaut in a suit,people,,Whité
"""


@pytest.fixture(scope="module", params=DATABASES)
def served(request, base_settings, embedder, tmp_path_factory):
    """The real server over the catalog above, on each database, with the write API on; and its settings."""
    root = tmp_path_factory.mktemp(f"words-{request.param}")
    with served_on_database(request, base_settings, embedder, root, PRODUCTS_CSV, API_KEY=KEY) as (running, settings):
        yield running.url, settings


def words(url: str, q: str, **params) -> list[str]:
    response = requests.post(f"{url}/api/search", data={"q": q, **params}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["q"] == q and response.json()["query"] is None
    return [result["sku"] for result in response.json()["results"]]


def test_words_alone_find_the_live_products_holding_every_word_case_and_accents_folded(served):
    url, _ = served
    # "white" is in mug's colour as "White", and suit's "Whité" folds to it on SQLite (unicode61 drops accents).
    assert set(words(url, "white")) >= {"mug", "rocket"}
    assert words(url, "WHITE cup") == ["mug"]
    assert words(url, "cup", category="space") == []
    assert words(url, "white", max_price="50") == ["mug"]
    assert words(url, "white", min_price="50") == ["rocket"]
    assert words(url, "colour") == []  # an attribute's name is not a word of the product
    # Attribute filters apply to words as to photos: values case-folded, a repeated name is OR.
    assert set(words(url, "white", **{"attr.colour": "WHITE"})) == {"mug", "rocket"}
    assert words(url, "white", **{"attr.colour": "WHITE"}, max_price="50") == ["mug"]
    assert words(url, "tabby", **{"attr.colour": "grey"}) == []
    assert words(url, "scan retina") == ["eye"]
    results = requests.post(f"{url}/api/search", data={"q": "tabby"}, timeout=30).json()["results"]
    assert results[0]["match"] == {"visual_rank": None, "visual_score": None, "text_rank": 1}
    assert results[0]["score"] > 0


def test_writes_are_found_or_gone_at_once(served):
    url, settings = served
    # Asked before the write: the server keeps this ranking, and must not serve it after the write.
    assert words(url, "cameraman") == ["cam"] and words(url, "saturn") == ["rocket"]
    photo = {"image": ("c.jpg", skimage_jpeg("camera"))}
    put = requests.put(
        f"{url}/api/products/cam", headers=AUTH, files=photo, data={"title": "Vintage tripod"}, timeout=60
    )
    assert put.status_code == 200, put.text
    assert words(url, "tripod") == ["cam"]
    assert words(url, "cameraman") == []
    assert requests.delete(f"{url}/api/products/rocket", headers=AUTH, timeout=30).status_code == 200
    assert "rocket" not in words(url, "white") and words(url, "saturn") == []
    # The store's own reader agrees (and the same words reach it through each database's query language).
    store = Store.open(settings)
    assert [p.sku for p in store.text.search(Words.parse('"tripod" OR NEAR(x'), 10)] == []
    assert [p.sku for p in store.text.search(Words.parse("vintage, tripod!"), 10)] == ["cam"]


def test_words_beside_a_photo_put_the_products_matching_both_ahead(served):
    url, _ = served
    cat_photo = skimage_jpeg("chelsea")
    alone = requests.post(f"{url}/api/search", files={"image": ("q.jpg", cat_photo)}, data={"k": "6"}, timeout=60)
    assert alone.json()["results"][0]["sku"] == "cat" and "match" not in alone.json()["results"][0]
    fused = requests.post(
        f"{url}/api/search", files={"image": ("q.jpg", cat_photo)}, data={"k": "6", "q": "espresso"}, timeout=60
    ).json()
    first = fused["results"][0]
    # The mug holds the words and is among the photo's neighbours: ahead of the cat, which only looks alike.
    assert first["sku"] == "mug" and first["match"]["text_rank"] == 1 and first["match"]["visual_rank"] > 1
    assert fused["results"][1]["sku"] == "cat"
    assert fused["results"][1]["match"] == {
        "visual_rank": 1,
        "visual_score": alone.json()["results"][0]["score"],
        "text_rank": None,
    }
    assert fused["query"] and fused["q"] == "espresso"
    similar = requests.get(f"{url}/api/products/cat/similar", params={"q": "espresso", "k": 3}, timeout=30).json()
    assert similar["results"][0]["sku"] == "mug" and "cat" not in [r["sku"] for r in similar["results"]]


def test_the_search_page_searches_words_with_or_without_a_photo(served):
    url, _ = served
    page = requests.post(f"{url}/", data={"q": "espresso"}, timeout=30)
    assert page.status_code == 200 and "Espresso cup" in page.text and 'name="q"' in page.text
    page = requests.post(f"{url}/", files={"image": ("q.jpg", skimage_jpeg("chelsea"))}, data={"q": ""}, timeout=60)
    assert page.status_code == 200 and "Tabby cat" in page.text  # an empty words box is no words
    page = requests.post(f"{url}/", data={"q": "***"}, timeout=30)
    assert page.status_code == 400 and "no word" in page.text
