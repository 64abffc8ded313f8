"""Queries as an attacker would send them: many distinct photos padded with junk stay within
service.query_store_mb on disk, what is kept is the decoded photo written again (never the bytes as sent), and a
token tells nothing to whoever holds a copy of the photo; words (q) that are blank, too long, hold no word or
spell the full-text engines' own query syntax get a 400 or plain results, never a 5xx; attribute filters as an
attacker would send them, facets naming nothing known and facet depths out of range get clear 400s; all through
the real server, which keeps serving."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import requests
from markupsafe import escape
from PIL import Image

from indexer.index.attributes import MAX_ATTRIBUTE_NAME, MAX_ATTRIBUTE_VALUE
from indexer.storage.text import MAX_WORDS_CHARS
from service import create_app
from service.params import MAX_ATTRIBUTE_VALUES
from service.recent_queries import STORED_SIDE, QueryFolder
from tests.conftest import indexed_skimage, served_catalog, skimage_jpeg
from tests.support.server import running_server

CAP_MB = 1
JUNK = b"TRAILING-JUNK-" * 4000  # 56 kB after the JPEG's end marker: still decodes, must never be kept


@pytest.fixture(scope="module")
def indexed(base_settings, embedder, tmp_path_factory):
    settings = indexed_skimage(
        base_settings, embedder, tmp_path_factory.mktemp("hostile-queries"), query_store_mb=CAP_MB, workers=1
    )
    return settings


def noise_jpeg(seed: int, side: int = 160) -> bytes:
    """A distinct photo (noise compresses badly, so each kept copy is tens of kB)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def search(client, photo: bytes):
    return client.post("/api/search", data=photo, content_type="image/jpeg", query_string={"k": 1})


def kept(settings) -> list[Path]:
    return [path for path in (settings.data_dir / "queries").glob("*/*") if path.is_file()]


def disk_bytes(paths: list[Path]) -> int:
    return sum(max(p.stat().st_size, p.stat().st_blocks * 512) for p in paths)


def test_five_hundred_distinct_padded_photos_stay_under_the_cap(indexed, embedder):
    client = create_app(indexed, embedder).test_client()
    tokens = []
    for seed in range(500):
        answer = search(client, noise_jpeg(seed) + JUNK)
        assert answer.status_code == 200, answer.json
        tokens.append(answer.json["query"])
        if seed % 50 == 49:
            assert disk_bytes(kept(indexed)) <= CAP_MB * 1_000_000, seed
    assert len(set(tokens)) == 500
    files = kept(indexed)
    assert 0 < len(files) < 500 and disk_bytes(files) <= CAP_MB * 1_000_000
    assert not any(JUNK[:200] in path.read_bytes() for path in files)
    # The least recently used went first: the latest photo is still found by another process, the first is gone.
    other = create_app(indexed, embedder).test_client()
    assert other.post("/api/search", data={"query": tokens[-1], "k": "1"}).status_code == 200
    assert other.post("/api/search", data={"query": tokens[0], "k": "1"}).status_code == 404


def test_what_is_kept_is_the_decoded_photo_not_the_bytes_sent(indexed, embedder):
    client = create_app(indexed, embedder).test_client()
    photo = noise_jpeg(10_001)
    clean, padded = search(client, photo), search(client, photo + JUNK)
    assert clean.status_code == padded.status_code == 200
    token = padded.json["query"]
    assert clean.json["query"] == token  # the same pixels: one photo kept, whatever trails it
    path = indexed.data_dir / "queries" / token[:2] / token
    stored = path.read_bytes()
    assert JUNK[:200] not in stored and stored != photo and stored.endswith(b"\xff\xd9")
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG" and image.size == (160, 160)
    big = io.BytesIO()
    Image.fromarray(np.full((3000, 2000, 3), 200, np.uint8)).save(big, "PNG")
    large = search(client, big.getvalue())
    assert large.status_code == 200
    with Image.open(indexed.data_dir / "queries" / large.json["query"][:2] / large.json["query"]) as image:
        assert image.format == "JPEG" and max(image.size) == STORED_SIDE  # bounded in size, whatever was sent


def test_a_token_is_not_derivable_from_the_photo(indexed, embedder, tmp_path):
    photo = noise_jpeg(10_002)
    token = search(create_app(indexed, embedder).test_client(), photo).json["query"]
    stored = (indexed.data_dir / "queries" / token[:2] / token).read_bytes()
    assert token not in {hashlib.sha256(photo).hexdigest(), hashlib.sha256(stored).hexdigest()}
    # The same photo in another deployment (its own DATA_DIR, so its own key) has another token.
    assert QueryFolder(tmp_path / "queries", 3600).token(stored) != token
    assert QueryFolder(indexed.data_dir / "queries", 3600).token(stored) == token  # any process of this one
    key = indexed.data_dir / "queries" / ".token_key"
    assert key.stat().st_mode & 0o077 == 0  # readable by the service alone


# q values that hold no word, or too many characters: a 400 that says what to send.
REFUSED_WORDS = {
    "": "empty",
    "   \t ": "empty",
    '"': "no word",
    "*": "no word",
    "-": "no word",
    "()^:+": "no word",
    "%_%": "no word",
    "\x00": "no word",
    "\u0301\u0301": "no word",  # combining accents alone
    "x" * (MAX_WORDS_CHARS + 1): f"at most {MAX_WORDS_CHARS}",
}
# q values that spell FTS5's or tsquery's syntax, or SQL: searched as plain words (quoted), never as syntax.
PLAIN_WORDS = [
    "NEAR(",
    "OR",
    "AND NOT",
    '"coffee',
    "coffee*",
    "title:coffee",
    "^coffee",
    "coffee OR -x",
    "NEAR(coffee chelsea, 2)",
    "coffee & !chelsea | (x:*)",
    "'; DROP TABLE products; --",
    "🍎 apple",
    "a " * (MAX_WORDS_CHARS // 2),  # a hundred tokens: the first few are searched
]


@pytest.fixture(scope="module")
def served(base_settings, embedder, tmp_path_factory):
    env, _ = served_catalog(base_settings, embedder, tmp_path_factory.mktemp("hostile-words"))
    with running_server(env, timeout=120) as running:
        yield running.url


def a_sku(url: str) -> str:
    return requests.post(f"{url}/api/search", data={"q": "drinks"}, timeout=30).json()["results"][0]["sku"]


@pytest.mark.parametrize("q", list(REFUSED_WORDS), ids=range(len(REFUSED_WORDS)))
def test_words_without_a_word_or_too_long_get_a_400_that_says_why(served, q):
    for response in (
        requests.post(f"{served}/api/search", data={"q": q}, timeout=30),
        requests.post(f"{served}/api/search", files={"image": ("q.jpg", skimage_jpeg("coffee"))}, data={"q": q},
                      timeout=60),
        requests.get(f"{served}/api/products/{a_sku(served)}/similar", params={"q": q}, timeout=30),
    ):  # fmt: skip
        assert response.status_code == 400, response.text
        assert REFUSED_WORDS[q] in response.json()["message"]


@pytest.mark.parametrize("q", PLAIN_WORDS, ids=range(len(PLAIN_WORDS)))
def test_query_syntax_in_words_is_searched_as_plain_words(served, q):
    alone = requests.post(f"{served}/api/search", data={"q": q}, timeout=30)
    assert alone.status_code == 200, alone.text
    page = requests.post(f"{served}/", data={"q": q}, timeout=30)
    assert page.status_code == 200, page.text
    similar = requests.get(f"{served}/api/products/{a_sku(served)}/similar", params={"q": q}, timeout=30)
    assert similar.status_code == 200, similar.text


def test_words_search_the_catalog_after_hostile_ones(served):
    for q in ('"', "NEAR(", "x" * 1000):
        requests.post(f"{served}/api/search", data={"q": q}, timeout=30)
    response = requests.post(f"{served}/api/search", data={"q": "drinks"}, timeout=30)
    assert response.status_code == 200 and len(response.json()["results"]) == 1


ATTRIBUTED_CSV = """sku,image,title,category,size,colour
cat-1,animals/chelsea.jpg,Cat,animals,S,Ginger
cup-1,drinks/coffee.jpg,Cup,drinks,M,Brown
suit-1,people/astronaut.jpg,Suit,people,L,White
"""


def test_hostile_attribute_filters_get_clear_400s_from_a_real_server(settings, embedder, tmp_path):
    env, _ = served_catalog(settings, embedder, tmp_path, products_csv=ATTRIBUTED_CSV)
    photo = noise_jpeg(7)
    with running_server(env) as server:
        similar = f"{server.url}/api/products/cat-1/similar"

        def refused(query: list[tuple[str, str]], says: str) -> None:
            for answer in (
                requests.get(similar, params=query, timeout=30),
                requests.post(
                    f"{server.url}/api/search",
                    params=query,
                    data=photo,
                    headers={"Content-Type": "image/jpeg"},
                    timeout=30,
                ),
                requests.post(f"{server.url}/api/search", data=query, files={"image": photo}, timeout=30),
            ):
                assert answer.status_code == 400, (query, answer.text)
                assert says in answer.json()["message"], (query, answer.json())

        refused([("attr.", "M")], "needs a name")
        refused([("attr.   ", "M")], "needs a name")
        refused([("attr." + "n" * (MAX_ATTRIBUTE_NAME + 1), "M")], f"at most {MAX_ATTRIBUTE_NAME} characters")
        refused([("attr.size", "M" * (MAX_ATTRIBUTE_VALUE + 1))], f"at most {MAX_ATTRIBUTE_VALUE} characters")
        refused([("attr.size", str(i)) for i in range(MAX_ATTRIBUTE_VALUES + 1)], f"at most {MAX_ATTRIBUTE_VALUES}")
        refused([(f"attr.a{i}", "x") for i in range(500)], f"at most {MAX_ATTRIBUTE_VALUES}")
        refused([("attr.brand", "Acme")], "unknown attribute 'brand'; the known attributes are 'colour', 'size'")
        refused([("attr.\x00", "x")], "unknown attribute")
        # the HTML page answers the same with a page that says so
        page = requests.post(f"{server.url}/", data={"attr.brand": "x"}, files={"image": photo}, timeout=30)
        assert page.status_code == 400 and "unknown attribute" in page.text
        # and the server keeps serving, filters and all
        answer = requests.get(similar, params=[("attr.size", "m"), ("attr.size", "L"), ("k", "5")], timeout=30)
        assert answer.status_code == 200
        assert sorted(r["sku"] for r in answer.json()["results"]) == ["cup-1", "suit-1"]
        assert answer.json()["attributes"] == {"size": ["l", "m"]}


# facets lists naming nothing that can be counted, and facet_depth values that are not a whole number from 1 to
# service.max_facet_depth (1000): a 400 that says what to send, on every search and on the page.
REFUSED_FACETS = {
    "foo": "unknown facet 'foo'; ask for category, price or attr.<name>",
    "attr.": "unknown facet 'attr.'",
    "attr.  ,price": "unknown facet 'attr.'",
    "category,Price": "unknown facet 'Price'",
    "<script>": "unknown facet '<script>'",
    ",".join(f"attr.a{n}" for n in range(21)): "ask for at most 20",
    "attr." + "x" * 101: "an attribute name is at most 100 long",
}
REFUSED_DEPTHS = ["abc", "0", "-1", "1.5", "1e3", "1001", "10" * 40, "9" * 5000, "NaN"]


def refused(served: str, data: dict[str, str], message: str) -> None:
    """The same parameters on every search that counts facets (a photo, words alone, "more like this", the
    page): each a 400 that holds `message` (escaped on the page)."""
    photo = {"image": ("q.jpg", skimage_jpeg("coffee"))}
    for response in (
        requests.post(f"{served}/api/search", files=photo, data=data, timeout=60),
        requests.post(f"{served}/api/search", data={"q": "drinks", **data}, timeout=30),
        requests.get(f"{served}/api/products/{a_sku(served)}/similar", params=data, timeout=30),
    ):
        assert response.status_code == 400, response.text
        assert message in response.json()["message"]
    page = requests.post(f"{served}/", data={"q": "drinks", **data}, timeout=30)
    assert page.status_code == 400 and str(escape(message)) in page.text


@pytest.mark.parametrize("facets", list(REFUSED_FACETS), ids=range(len(REFUSED_FACETS)))
def test_a_facets_list_naming_nothing_known_gets_a_400_that_lists_what_to_ask_for(served, facets):
    refused(served, {"facets": facets}, REFUSED_FACETS[facets])


@pytest.mark.parametrize("depth", REFUSED_DEPTHS, ids=range(len(REFUSED_DEPTHS)))
def test_a_facet_depth_that_is_not_a_whole_number_up_to_the_cap_gets_a_400(served, depth):
    refused(served, {"facets": "category", "facet_depth": depth}, "facet_depth must be a whole number from 1 to 1000")


def test_facets_of_an_attribute_no_product_has_are_empty_and_the_service_keeps_serving(served):
    for facets in ("attr.nothing", "attr.<img src=x>", "attr.%00", "attr.colour,attr.colour"):
        response = requests.post(f"{served}/api/search", data={"q": "drinks", "facets": facets}, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["facets"] == {facets.split(",")[0]: []}
    blank = requests.post(f"{served}/api/search", data={"q": "drinks", "facets": " , "}, timeout=30)
    assert blank.status_code == 200 and "facets" not in blank.json()  # a blank list asks for none
    deepest = requests.post(
        f"{served}/api/search", data={"q": "drinks", "facets": "category", "facet_depth": "1000"}, timeout=30
    )
    assert deepest.json()["facets"] == {"category": [{"value": "drinks", "count": 1}]}
