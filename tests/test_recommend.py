"""POST /api/recommend on real grocery photos: the unlike pushes the unliked category down (through the production
server), the examples are never results, the filters hold, query tokens count as examples, bad bodies get a 400
that says what to send, and storefronts may call it (CORS)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import requests

from indexer.index.recommend import Examples, average_query, best_scores, recommend
from indexer.index.search import IndexView
from indexer.jobs.indexing import index_catalog
from service import create_app
from tests.conftest import grocery_subset, indexed_skimage, read_csv, subprocess_config, write_csv
from tests.support.server import running_server

# Six kinds of milk carton, near one another: an unliked one has neighbours to push down.
CATEGORIES = (
    "Arla-Ecological-Medium-Fat-Milk", "Arla-Lactose-Medium-Fat-Milk", "Arla-Medium-Fat-Milk",
    "Arla-Standard-Milk", "Garant-Ecological-Medium-Fat-Milk", "Garant-Ecological-Standard-Milk",
)  # fmt: skip
SIZES = ("S", "M", "L")
SHOP = "https://shop.example"


@pytest.fixture(scope="module")
def catalog(base_settings, embedder, grocery, tmp_path_factory):
    """The milk cartons (about 210 photos), each with a price and a size, indexed; (settings, products by sku)."""
    folder = tmp_path_factory.mktemp("recommend")
    photos, products, _ = grocery_subset(grocery, CATEGORIES, folder)
    rows = read_csv(products)
    for number, row in enumerate(rows):
        row["price"], row["size"] = f"{1 + number % 20}.50", SIZES[number % 3]
    write_csv(products, rows)
    settings = base_settings.with_overrides(
        data_dir=folder / "data", catalog_dir=photos, metadata_path=products, max_k=50, cors_origins=(SHOP,)
    )
    index_catalog(settings, embedder, photos, metadata=products, progress=False)
    return settings, {row["sku"]: row for row in rows}


@pytest.fixture(scope="module")
def client(catalog, embedder):
    return create_app(catalog[0], embedder).test_client()


@pytest.fixture(scope="module")
def photos_client(base_settings, embedder, tmp_path_factory):
    """The scikit-image catalog (no dataset needed), for what a request may send: its checks and CORS."""
    settings = indexed_skimage(base_settings, embedder, tmp_path_factory.mktemp("recommend-input"), max_k=50,
                               cors_origins=(SHOP,))  # fmt: skip
    return create_app(settings, embedder).test_client()


# A product of the scikit-image catalog.
KNOWN = "people/astronaut"


def skus_of(products: dict, category: str) -> list[str]:
    return sorted(sku for sku, row in products.items() if row["category"] == category)


def recommended(client, **body) -> list[dict]:
    response = client.post("/api/recommend", json=body)
    assert response.status_code == 200, response.json
    return response.json["results"]


@pytest.mark.slow
def test_the_unlike_pushes_the_unliked_category_down_on_the_production_server(catalog, tmp_path):
    """Every ordered pair of categories: two products of one liked, one of the other unliked. Summed over the 30
    pairs, the unliked category holds at most three quarters as many of the top 20 with the unlike as without it
    (measured: 26 against 50, fp32 without whitening), and the liked one keeps at least as many."""
    settings, products = catalog
    env = {"DATA_DIR": str(settings.data_dir), "SEARCH_CONFIG": str(subprocess_config(tmp_path))}
    counts = {"unliked, without": 0, "unliked, with": 0, "liked, without": 0, "liked, with": 0}
    with running_server(env, timeout=120) as server:
        for liked, unliked in itertools.permutations(CATEGORIES, 2):
            body = {"like": skus_of(products, liked)[:2], "k": 20}
            for unlike, key in ((None, "without"), (skus_of(products, unliked)[:1], "with")):
                answer = requests.post(f"{server.url}/api/recommend", json=body | {"unlike": unlike or []}, timeout=60)
                assert answer.status_code == 200, answer.text
                found = [products[result["sku"]]["category"] for result in answer.json()["results"]]
                assert len(found) == 20
                counts[f"unliked, {key}"] += found.count(unliked)
                counts[f"liked, {key}"] += found.count(liked)
    assert counts["unliked, without"] >= 20, counts  # there was something to push down
    assert counts["unliked, with"] <= 0.75 * counts["unliked, without"], counts
    assert counts["liked, with"] >= counts["liked, without"], counts


@pytest.mark.parametrize("rule", ["average_vector", "best_score"])
def test_the_examples_are_never_results_and_the_filters_hold(catalog, embedder, rule):
    settings, products = catalog
    client = create_app(settings.with_overrides(recommend_rule=rule), embedder).test_client()
    like, unlike = skus_of(products, CATEGORIES[0])[:3], skus_of(products, CATEGORIES[1])[:2]
    response = client.post("/api/recommend", json={"like": like, "unlike": unlike, "k": 50})
    assert response.status_code == 200 and response.json["rule"] == rule
    results = response.json["results"]
    assert len(results) == 50 and not {r["sku"] for r in results} & {*like, *unlike}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    # The same examples among the catalog's others (the examples' own category too) with every kind of filter.
    filters = {"category": CATEGORIES[0], "min_price": 3, "max_price": 12.5, "attributes": {"size": ["m", "L"]}}
    answer = client.post("/api/recommend", json={"like": like, "unlike": unlike, "k": 50, **filters}).json
    assert answer["category"] == CATEGORIES[0] and answer["attributes"] == {"size": ["l", "m"]}
    found = [products[r["sku"]] for r in answer["results"]]
    passing = [
        row
        for sku, row in products.items()
        if row["category"] == CATEGORIES[0] and 3 <= float(row["price"]) <= 12.5 and row["size"] in ("M", "L")
    ]
    assert len(found) == len([row for row in passing if row["sku"] not in like])  # every one that passes, once
    assert all(row["category"] == CATEGORIES[0] and 3 <= float(row["price"]) <= 12.5 for row in found)
    assert all(row["size"] in ("M", "L") for row in found)


def test_words_beside_the_examples_are_fused_as_in_a_search(client, catalog):
    products = catalog[1]
    like = skus_of(products, CATEGORIES[3])[:2]
    answer = client.post("/api/recommend", json={"like": like, "q": "Garant", "k": 10}).json
    assert answer["q"] == "Garant"
    assert all("match" in result for result in answer["results"])
    assert answer["results"][0]["category"].startswith("Garant")  # in both rankings: first
    assert not {r["sku"] for r in answer["results"]} & set(like)


def test_a_query_token_of_an_earlier_search_is_an_example(client, catalog, grocery):
    products = catalog[1]
    shop_photo = next(q for q in read_csv(grocery / "queries.csv") if q["category"] == CATEGORIES[2])
    searched = client.post(
        "/api/search",
        data={"image": (io.BytesIO((grocery / shop_photo["image"]).read_bytes()), "q.jpg"), "k": "10"},
        content_type="multipart/form-data",
    ).json
    by_token = recommended(client, like=[searched["query"]], k=10)
    # One photo liked: the search for its vector, as the search itself answered.
    assert [r["sku"] for r in by_token] == [r["sku"] for r in searched["results"]]
    # Beside a sku: both count, and the sku is no result.
    sku = skus_of(products, CATEGORIES[2])[0]
    both = recommended(client, like=[searched["query"], sku], k=10)
    assert len(both) == 10 and sku not in {r["sku"] for r in both}
    assert [r["sku"] for r in both] != [r["sku"] for r in by_token]


def test_an_unknown_item_is_left_out_when_asked_to_ignore_it(client, catalog):
    like = skus_of(catalog[1], CATEGORIES[0])[:1]
    answer = client.post("/api/recommend", json={"like": ["no-such-sku", *like], "unknown": "ignore", "k": 5}).json
    assert answer["ignored"] == ["no-such-sku"] and len(answer["results"]) == 5
    nothing = client.post("/api/recommend", json={"like": ["no-such-sku"], "unknown": "ignore"}).json
    assert nothing["results"] == [] and nothing["ignored"] == ["no-such-sku"]


FORGOTTEN = "ab" * 32
BAD_BODIES = [
    ({"like": []}, "like must list one or more"),
    ({"unlike": ["x"]}, "like must list one or more"),
    ({"like": "milk-1"}, "like must list one or more"),
    ({"like": [7]}, "each item of like is a sku or a query token (a non-blank string), not a number"),
    ({"like": ["<known>"], "unlike": [None]}, "each item of unlike is a sku or a query token"),
    ({"like": [" "]}, "not a blank string"),
    ({"like": ["<known>"] * 17}, "like names 17 items; at most 16 (service.recommend_max_items)"),
    ({"like": ["<known>"], "unlike": [f"u{i}" for i in range(17)]}, "unlike names 17 items; at most 16"),
    ({"like": ["no-such-sku"]}, "'no-such-sku' is neither a product's sku nor the query token"),
    ({"like": ["<known>"], "unlike": [FORGOTTEN]}, f"'{FORGOTTEN}' is neither a product's sku nor the query token"),
    ({"like": ["<known>"], "unlike": ["<known>"]}, "is both liked and unliked"),
    ({"like": ["<known>"], "k": 0}, "k must be a whole number from 1 to 50"),
    ({"like": ["<known>"], "k": "many"}, "k must be a whole number from 1 to 50, not 'many'"),
    ({"like": ["<known>"], "k": [3]}, "k must be a string or a number, not an array"),
    ({"like": ["<known>"], "category": "Beer"}, "unknown category 'Beer'"),
    ({"like": ["<known>"], "min_price": 5, "max_price": 2}, "min_price is above max_price"),
    ({"like": ["<known>"], "max_price": True}, "max_price must be a string or a number, not a boolean"),
    ({"like": ["<known>"], "attributes": ["size"]}, "attributes must be an object of names and values"),
    ({"like": ["<known>"], "attributes": {"colour": "red"}}, "unknown attribute 'colour'"),
    ({"like": ["<known>"], "attributes": {"size": [{"M": 1}]}}, "attributes.size must be a string or a number"),
    ({"like": ["<known>"], "q": "  "}, "q is empty"),
    ({"like": ["<known>"], "unknown": "skip"}, 'unknown must be "error"'),
    ({"like": ["<known>"], "liked": ["x"]}, "unknown field 'liked'; a recommendation takes like, unlike, k"),
    ([["<known>"]], "the body must be a JSON object, not an array"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_a_bad_body_gets_a_400_that_says_what_is_wrong(photos_client, body, message):
    response = photos_client.post("/api/recommend", json=with_known(body, KNOWN))
    assert response.status_code == 400 and response.json["error"] == "bad_request"
    assert message.replace("<known>", KNOWN) in response.json["message"]


def with_known(value: object, known: str) -> object:
    """The body with "<known>" as a sku of the catalog."""
    if isinstance(value, dict):
        return {name: with_known(item, known) for name, item in value.items()}
    if isinstance(value, list):
        return [with_known(item, known) for item in value]
    return known if value == "<known>" else value


@pytest.mark.parametrize(
    ("data", "content_type", "message"),
    [
        (b'{"like": ["x"]}', "text/plain", "send a JSON object with Content-Type: application/json"),
        (b'{"like": [', "application/json", "the body is not valid JSON"),
        (b"\xff\xfe", "application/json", "the body is not valid JSON"),
        (b"[" * 100_000, "application/json", "the body is not valid JSON"),
        (b"null", "application/json", "the body must be a JSON object, not null"),
    ],
)
def test_a_body_that_is_not_a_json_object_gets_a_400(photos_client, data, content_type, message):
    response = photos_client.post("/api/recommend", data=data, content_type=content_type)
    assert response.status_code == 400 and message in response.json["message"]


def test_a_storefront_may_call_it_from_its_pages(client, catalog):
    # A POST of JSON is not a simple request: the browser sends a preflight first.
    preflight = client.options(
        "/api/recommend",
        headers={
            "Origin": SHOP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == SHOP
    assert "content-type" in preflight.headers["Access-Control-Allow-Headers"].lower()
    like = skus_of(catalog[1], CATEGORIES[0])[:2]
    answer = client.post("/api/recommend", json={"like": like}, headers={"Origin": SHOP})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == SHOP
    other = client.post("/api/recommend", json={"like": like}, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


class HeldElsewhere:
    """The live index as a Milvus collection is to a server: it searches, but holds no vector here."""

    def __init__(self, live):
        self._live = live

    def __getattr__(self, name: str):
        return getattr(self._live, name)

    def vector_of(self, image_id: int) -> None:
        return None


def test_best_score_reads_the_products_vectors_from_the_store_where_the_index_holds_none(catalog, embedder):
    settings, products = catalog
    search = create_app(settings, embedder).extensions["catalog_search"]
    view = search.current()
    vectors = [
        search.product_vector(view, sku)
        for sku in (*skus_of(products, CATEGORIES[4])[:2], skus_of(products, CATEGORIES[5])[0])
    ]
    examples = Examples(np.stack(vectors[:2]), np.stack(vectors[2:]))
    here = recommend(search, view, examples, 20, rule="best_score")
    elsewhere = recommend(
        search, IndexView(HeldElsewhere(view.live), view.rows, view.embedder), examples, 20, rule="best_score"
    )
    # Each product has one photo: its own vector is that photo's.
    assert [p.sku for p in elsewhere] == [p.sku for p in here]
    assert np.allclose([p.score for p in elsewhere], [p.score for p in here], atol=1e-5)


def test_the_rules_score_as_documented():
    liked = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    examples = Examples(liked, np.array([[0.0, 0.0, 1.0]], dtype=np.float32))
    query = average_query(examples, 0.5)
    assert np.allclose(query, np.array([0.5, 0.5, -0.5]) / np.linalg.norm([0.5, 0.5, -0.5]))
    # The same product liked and unliked at weight 1 points nowhere: the liked mean is searched for.
    assert np.allclose(average_query(Examples(liked[:1], liked[:1]), 1.0), liked[0])
    candidates = np.array([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]], dtype=np.float32)
    scores = best_scores(candidates, examples)
    # Nearer a liked example: its best similarity to one; nearer the unliked: below -1, lowest for the nearest.
    assert np.allclose(scores, [0.8, -1 - 0.9**2, -1 - 1.0])


def test_a_rule_or_weight_out_of_range_stops_at_start_saying_which(base_settings):
    from indexer.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"service\.recommend_rule = 'mean': choose one of"):
        validate(base_settings.with_overrides(recommend_rule="mean"))
    with pytest.raises(ConfigError, match=r"service\.unlike_weight must be from 0 to 10"):
        validate(base_settings.with_overrides(unlike_weight=-0.5))
