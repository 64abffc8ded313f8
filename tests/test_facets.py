"""Facets through the real server: the counts beside a search (photo, words, both, "more like this", filtered)
equal the counts of its returned matches worked out by hand; price bands partition the priced matches at round
figures; the results page's refine list runs the same search with one more filter; on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import math
import re
import secrets
from collections import Counter

import pytest
import requests

from indexer.index.facets import NICE_MANTISSAS, nice, price_bands
from tests.conftest import DATABASES, served_on_database, skimage_jpeg

KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {KEY}"}
PRODUCTS_CSV = """sku,image,title,category,price,colour,size
cat,animals/chelsea.jpg,Tabby cat,animals,9.99,orange,M
mug,drinks/coffee.jpg,Espresso cup,drinks,3.20,White,S
rocket,space/rocket.jpg,Saturn rocket,space,120,white,L
eye,medical/retina.jpg,Retina scan,medical,,red,
cam,people/camera.jpg,Cameraman,people,45,grey,M
suit,people/astronaut.jpg,Astronaut in a suit,people,,WHITE,L
"""
PHOTOS = {"cat": "chelsea", "mug": "coffee", "rocket": "rocket", "eye": "retina", "cam": "camera", "suit": "astronaut"}
COLOURS = ["red", "Red", "white", "black", "grey"]
# 18 more products through the write API, each another photo (turned) of a catalog one: 24 in all.
MORE = [
    (f"{sku}-{angle}", PHOTOS[sku], angle)
    for sku in ("cat", "mug", "rocket", "eye", "cam", "suit")
    for angle in (90, 180, 270)
]
ALL = 6 + len(MORE)
FACETS = "category,price,attr.colour,attr.size,attr.nothing"


@pytest.fixture(scope="module", params=DATABASES)
def served(request, base_settings, embedder, tmp_path_factory):
    """The real server over the catalog above and the products written after it, on each database."""
    root = tmp_path_factory.mktemp(f"facets-{request.param}")
    with served_on_database(request, base_settings, embedder, root, PRODUCTS_CSV, API_KEY=KEY) as (running, _):
        for n, (sku, photo, angle) in enumerate(MORE):
            fields = {"title": f"Another {photo}", "category": ["animals", "drinks", "people"][n % 3]}
            if n % 4:
                fields["price"] = f"{1.5 * n * n + 2:.2f}"
            fields["colour"] = COLOURS[n % len(COLOURS)]
            image = {"image": ("p.jpg", skimage_jpeg(photo, angle=angle))}
            put = requests.put(f"{running.url}/api/products/{sku}", data=fields, files=image, headers=AUTH, timeout=60)
            assert put.status_code == 201, put.text
        yield running.url


def by_hand(url: str, results: list[dict]) -> dict[str, list[dict]]:
    """The facets of FACETS over `results`, worked out here: each product's attributes read from its own page."""
    pages = {r["sku"]: requests.get(f"{url}/api/products/{r['sku']}", timeout=30).json() for r in results}
    attributes = {sku: page["attributes"] for sku, page in pages.items()}

    def ranked(counts: Counter) -> list[dict]:
        return [{"value": v, "count": n} for v, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]

    def folded(name: str) -> list[dict]:
        spellings: dict[str, Counter] = {}
        for r in results:
            if value := attributes[r["sku"]].get(name):
                spellings.setdefault(value.casefold(), Counter())[value] += 1
        return ranked(Counter({min(s, key=lambda v: (-s[v], v)): s.total() for s in spellings.values()}))

    return {
        "category": ranked(Counter(r["category"] for r in results if r["category"])),
        "price": [r["price"] for r in results if r["price"] is not None],  # checked against the bands below
        "attr.colour": folded("colour"),
        "attr.size": folded("size"),
        "attr.nothing": [],
    }


def check_bands(bands: list[dict], prices: list[float]) -> None:
    """The bands partition the prices: contiguous, open at both ends, each count the prices in [min, max)."""
    assert bands == price_bands(prices)  # the rule, recomputed here; and what it means:
    if not prices:
        return
    assert bands[0]["min"] is None and bands[-1]["max"] is None
    assert all(a["max"] == b["min"] for a, b in itertools.pairwise(bands))
    for band in bands:
        low, high = band["min"], band["max"]
        inside = [p for p in prices if (low is None or p >= low) and (high is None or p < high)]
        assert band["count"] == len(inside) > 0
        for edge in (low, high):
            if edge is not None:  # a round figure: one of the mantissas times a power of ten
                assert nice(edge) == edge and any(
                    math.isclose(edge / 10 ** math.floor(math.log10(edge)), m) for m in NICE_MANTISSAS
                )
    assert sum(b["count"] for b in bands) == len(prices)


def check(url: str, answer: dict, depth: int) -> None:
    assert answer["facet_depth"] == depth and len(answer["results"]) <= depth
    expected = by_hand(url, answer["results"])
    facets = answer["facets"]
    assert list(facets) == FACETS.split(",")
    check_bands(facets["price"], expected.pop("price"))
    assert {name: facets[name] for name in expected} == expected


def photo_search(url: str, **data: str) -> dict:
    photo = {"image": ("q.jpg", skimage_jpeg("chelsea", angle=10))}
    response = requests.post(f"{url}/api/search", files=photo, data=data, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_facet_counts_equal_the_counts_of_the_returned_matches(served):
    answer = photo_search(served, k=str(ALL), facet_depth=str(ALL), facets=FACETS)
    assert len(answer["results"]) == ALL  # every product: the counts cover the whole catalog
    check(served, answer, ALL)
    assert answer["facets"]["attr.nothing"] == []
    colours = {v["value"].casefold(): v["count"] for v in answer["facets"]["attr.colour"]}
    assert colours["white"] == 3 + 4 and colours["red"] == 1 + 8  # "White", "WHITE" and "Red" counted as one
    assert len(answer["facets"]["price"]) >= 3


@pytest.mark.parametrize(
    "data",
    [
        {"category": "people"},
        {"max_price": "50"},
        {"min_price": "10", "category": "drinks"},
        {"q": "another"},
        {"q": "white"},
    ],
    ids=["category", "max_price", "price-and-category", "words-fused", "attribute-words-fused"],
)
def test_facets_count_the_filtered_and_fused_matches(served, data):
    answer = photo_search(served, k="20", facet_depth="20", facets=FACETS, **data)
    assert answer["results"], answer
    check(served, answer, 20)
    if "category" in data:
        assert [v["value"] for v in answer["facets"]["category"]] == [data["category"]]
    if "max_price" in data:
        assert all(r["price"] is not None and r["price"] <= 50 for r in answer["results"])


def test_facets_of_words_alone_and_of_similar_products(served):
    words = requests.post(f"{served}/api/search", data={"q": "another", "k": "30", "facets": FACETS}, timeout=30)
    assert words.status_code == 200, words.text
    assert len(words.json()["results"]) == len(MORE)
    check(served, words.json(), 200)
    similar = requests.get(
        f"{served}/api/products/cat/similar", params={"k": "12", "facet_depth": "12", "facets": FACETS}, timeout=30
    )
    assert similar.status_code == 200, similar.text
    assert "cat" not in [r["sku"] for r in similar.json()["results"]]
    check(served, similar.json(), 12)


def test_results_are_the_first_k_of_the_matches_counted(served):
    deep = photo_search(served, k="15", facet_depth="15", facets="category")
    shallow = photo_search(served, k="5", facet_depth="15", facets="category")
    assert [r["sku"] for r in shallow["results"]] == [r["sku"] for r in deep["results"]][:5]
    assert shallow["facets"] == deep["facets"]
    # facets repeated rather than comma-separated; asked for nothing, the answer has no facets
    repeated = requests.post(
        f"{served}/api/search", data=[("q", "another"), ("facets", "price"), ("facets", "category")], timeout=30
    ).json()
    assert list(repeated["facets"]) == ["price", "category"] and repeated["facet_depth"] == 200
    assert "facets" not in photo_search(served, k="5")


def test_the_page_refines_with_a_facet_keeping_the_words_and_filters(served):
    page = requests.post(f"{served}/", data={"q": "another", "k": "30", "max_price": "500"}, timeout=30)
    assert page.status_code == 200 and 'class="refine"' in page.text
    forms = re.findall(r'<li><form method="post" action="/">(.*?)</form></li>', page.text, re.S)
    fields = [dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form)) for form in forms]
    people = next(f for f, form in zip(fields, forms, strict=True) if ">people <" in form)
    assert people == {"q": "another", "k": "30", "category": "people", "max_price": "500"}
    refined = requests.post(f"{served}/", data=people, timeout=30)
    assert refined.status_code == 200
    # the people of MORE (every third) that have a price (max_price leaves out the unpriced: every fourth)
    assert refined.text.count('class="card"') == sum(1 for n in range(len(MORE)) if n % 3 == 2 and n % 4)
    assert "Price" in page.text and "and over" in page.text  # the price bands of the words' matches
