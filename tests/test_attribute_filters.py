"""Attribute filters (attr.<name>=<value>) applied inside the vector search, on the grocery catalog with a price and
derived attributes, on SQLite and PostgreSQL: 200 random filter combinations answer exactly what an exact scan of
the matching rows does, through the app; a write through the API is filterable at once and after a compaction."""

from __future__ import annotations

import io
import itertools
import json
import random
import zlib

import numpy as np
import pytest
from sqlalchemy import select

from indexer.index import live_index
from indexer.index.compaction import compact, compaction_due
from indexer.index.segments import read_manifest
from indexer.jobs.indexing import index_catalog
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store
from service import create_app
from tests.conftest import DATABASES, grocery_subset, new_database, read_csv, write_csv

KEY = "attribute-filters-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Enough photos for every plan: these coarse categories hold about 700 of the catalog's photos.
COARSE = ("Milk", "Tomato", "Pepper", "Pear", "Kiwi", "Banana")
SIZES = ("S", "M", "L")
COLOURS = ("Red", "green", "BLUE")
TOLERANCE = 2e-5


def _number(text: str) -> int:
    return zlib.crc32(text.encode())


@pytest.fixture(scope="module", params=DATABASES)
def indexed(request, base_settings, embedder, grocery, tmp_path_factory):
    """The grocery subset with a price, a size and a colour per product, indexed with an exact FAISS structure (so
    the selector path answers exactly too), and the app over it."""
    folder = tmp_path_factory.mktemp("attribute-filters")
    rows = [r for r in read_csv(grocery / "catalog.csv") if r["coarse_category"] in COARSE]
    catalog, products, _ = grocery_subset(grocery, tuple({r["category"] for r in rows}), folder)
    rows = read_csv(products)
    for row in rows:
        number = _number(row["sku"])
        row["price"] = f"{0.5 + number % 2000 / 100:.2f}"
        row["size"] = SIZES[number % 3]
        row["colour"] = COLOURS[number // 3 % 3]
    write_csv(products, rows)
    settings = base_settings.with_overrides(
        data_dir=folder / "data",
        catalog_dir=catalog,
        metadata_path=products,
        database_url=new_database(request, request.param),
        index_factory="IDMap,Flat",
        api_key=KEY,
        max_k=50,
    )
    index_catalog(settings, embedder, catalog, metadata=products, progress=False)
    client = create_app(settings, embedder).test_client()
    return settings, client


def stored(settings, embedder) -> tuple[np.ndarray, list[dict]]:
    """Every live photo's vector and its product (sku, category, price, attributes), read from the store."""
    store = Store.open(settings)
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(ProductImage.embedding, Product.sku, Product.category, Product.price, Product.attributes)
            .join(Product)
            .where(LIVE, ProductImage.view == "", ProductImage.model_key == embedder.identity.key)
        ).all()
    vectors = np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows])
    products = [{"sku": r[1], "category": r[2], "price": r[3], "attributes": r[4] or {}} for r in rows]
    return vectors, products


def passes(product: dict, filters: dict) -> bool:
    if filters.get("category") not in (None, product["category"]):
        return False
    price = product["price"]
    if "min_price" in filters and (price is None or np.float32(price) < np.float32(filters["min_price"])):
        return False
    if "max_price" in filters and (price is None or np.float32(price) > np.float32(filters["max_price"])):
        return False
    held = {name: str(value).casefold() for name, value in product["attributes"].items()}
    return all(held.get(name) in {v.casefold() for v in values} for name, values in filters["attr"].items())


def params(filters: dict, k: int) -> list[tuple[str, str]]:
    query = [("k", str(k))]
    query += [(name, str(filters[name])) for name in ("category", "min_price", "max_price") if name in filters]
    return query + [(f"attr.{name}", value) for name, values in filters["attr"].items() for value in values]


def random_filters(rng: random.Random, products: list[dict]) -> dict:
    filters: dict = {"attr": {}}
    if rng.random() < 0.3:
        filters["category"] = rng.choice(sorted({p["category"] for p in products}))
    if rng.random() < 0.4:
        low, high = sorted(rng.uniform(0.5, 20.5) for _ in range(2))
        filters |= rng.choice([{"min_price": round(low, 2)}, {"max_price": round(high, 2)},
                               {"min_price": round(low, 2), "max_price": round(high, 2)}])  # fmt: skip
    choices = {
        "size": SIZES,
        "colour": COLOURS,
        "coarse_category": (*COARSE, "Apple"),  # Apple: a value no product here has
    }
    for name in rng.sample(sorted(choices), rng.choice([1, 1, 2, 3])):
        values = rng.sample(choices[name], rng.choice([1, 1, 2]))
        # any case: values match case-insensitively
        filters["attr"][name] = [rng.choice([v, v.upper(), v.lower(), v.swapcase()]) for v in values]
    return filters


def assert_exact(answer: list[dict], vectors, products, query_sku: str, filters: dict, k: int) -> None:
    """The answer is the exact scan's: as many results, the same skus in the same order (ties aside)."""
    me = next(i for i, p in enumerate(products) if p["sku"] == query_sku)
    scores = vectors @ vectors[me]
    matching = [i for i, p in enumerate(products) if i != me and passes(p, filters)]
    best = sorted(matching, key=lambda i: -scores[i])[:k]
    by_sku = {p["sku"]: i for i, p in enumerate(products)}
    assert len(answer) == len(best), (filters, len(answer), len(best))
    for got, want in zip(answer, best, strict=True):
        assert passes(products[by_sku[got["sku"]]], filters), (filters, got)
        assert abs(got["score"] - scores[want]) < TOLERANCE, (filters, got, products[want]["sku"])
        if got["sku"] != products[want]["sku"]:  # only a tie may swap two
            assert abs(scores[by_sku[got["sku"]]] - scores[want]) < TOLERANCE, (filters, got)


def test_two_hundred_random_filters_answer_exactly_what_an_exact_scan_does(indexed, embedder, monkeypatch):
    settings, client = indexed
    # Every plan in turn, whatever this small catalog's costs would choose: gather, scan, the FAISS structure with
    # a selector, and over-fetching from it.
    plans: list[str] = []
    every = itertools.cycle(("gather", "scan", "ann", "overfetch"))
    monkeypatch.setattr(live_index, "plan", lambda *args: plans.append(next(every)) or plans[-1])
    vectors, products = stored(settings, embedder)
    rng = random.Random(27)
    empty = 0
    for _ in range(200):
        filters, k, sku = random_filters(rng, products), rng.choice([1, 5, 10, 30]), rng.choice(products)["sku"]
        answer = client.get(f"/api/products/{sku}/similar", query_string=params(filters, k))
        assert answer.status_code == 200, answer.json
        assert answer.json["attributes"] == {n: sorted({v.casefold() for v in vs}) for n, vs in filters["attr"].items()}
        assert_exact(answer.json["results"], vectors, products, sku, filters, k)
        empty += not answer.json["results"]
    assert {"gather", "scan", "ann", "overfetch"} <= set(plans), plans
    assert empty < 100  # most combinations match something


def test_or_within_a_name_and_across_names_and_any_case(indexed, embedder):
    settings, client = indexed
    _, products = stored(settings, embedder)
    by_sku = {p["sku"]: p["attributes"] for p in products}
    sku = products[0]["sku"]

    def found(*query: tuple[str, str]) -> list[dict]:
        answer = client.get(f"/api/products/{sku}/similar", query_string=[("k", "50"), *query])
        assert answer.status_code == 200, answer.json
        return [by_sku[r["sku"]] for r in answer.json["results"]]

    either = found(("attr.size", "s"), ("attr.size", "M"))
    assert {a["size"] for a in either} == {"S", "M"}
    both = found(("attr.size", "S"), ("attr.colour", "red"))
    assert both and all((a["size"], a["colour"]) == ("S", "Red") for a in both)
    assert found(("attr.colour", "RED")) == found(("attr.colour", "red")) == found(("attr.colour", "Red"))
    assert found(("attr.colour", "blue")) and all(a["colour"] == "BLUE" for a in found(("attr.colour", "blue")))
    assert found(("attr.size", "XS")) == []  # a value no product has: no results, not an error
    assert found(("attr.size", "")) == found()  # an empty value is no filter, as an unset form field


def test_unknown_attribute_is_a_400_that_lists_the_known_ones(indexed):
    _, client = indexed
    answer = client.get("/api/products/any/similar", query_string={"attr.flavour": "sweet"})
    assert answer.status_code == 400
    message = answer.json["message"]
    assert "unknown attribute 'flavour'" in message
    assert all(repr(name) in message for name in ("coarse_category", "colour", "size", "split"))


def test_a_write_is_filterable_at_once_gone_when_deleted_and_the_same_after_a_compaction(indexed, embedder, grocery):
    settings, client = indexed
    photo = (grocery / read_csv(settings.metadata_path)[0]["image"]).read_bytes()
    query = {"k": "50", "attr.size": "XXL", "attr.colour": "Purple"}
    seed = read_csv(settings.metadata_path)[1]["sku"]
    assert client.get(f"/api/products/{seed}/similar", query_string=query).json["results"] == []
    data = {"image": (io.BytesIO(photo), "p.jpg"), "title": "A giant purple one", "size": "XXL", "colour": "purple"}
    answer = client.put("/api/products/new-xxl", data=data, headers=AUTH, content_type="multipart/form-data")
    assert answer.status_code in (200, 201), answer.json
    found = client.get(f"/api/products/{seed}/similar", query_string=query).json["results"]
    assert [r["sku"] for r in found] == ["new-xxl"]
    assert client.delete("/api/products/new-xxl", headers=AUTH).status_code in (200, 204)
    assert client.get(f"/api/products/{seed}/similar", query_string=query).json["results"] == []

    data = {"image": (io.BytesIO(photo), "p.jpg"), "title": "Again", "size": "XXL", "colour": "PURPLE"}
    answer = client.put("/api/products/new-xxl", data=data, headers=AUTH, content_type="multipart/form-data")
    assert answer.status_code in (200, 201), answer.json
    before = client.get(f"/api/products/{seed}/similar", query_string={"k": "20", "attr.size": "m"}).json
    compact(settings, Store.open(settings), embedder)
    assert client.get(f"/api/products/{seed}/similar", query_string=query).json["results"][0]["sku"] == "new-xxl"
    after = client.get(f"/api/products/{seed}/similar", query_string={"k": "20", "attr.size": "m"}).json
    assert [r["sku"] for r in after["results"]] == [r["sku"] for r in before["results"]]
    assert client.delete("/api/products/new-xxl", headers=AUTH).status_code in (200, 204)


def test_the_search_page_keeps_the_attribute_filters_across_a_refinement(indexed, grocery):
    settings, client = indexed
    photo = (grocery / read_csv(settings.metadata_path)[0]["image"]).read_bytes()
    data = {"image": (io.BytesIO(photo), "q.jpg"), "attr.size": "S", "attr.colour": "red", "k": "5"}
    page = client.post("/", data=data, content_type="multipart/form-data")
    assert page.status_code == 200
    html = page.get_data(as_text=True).lower()  # as matched: case-folded, or as sent

    def form(html: str, marker: str) -> str:
        return html.split(marker, 1)[1].split("</form>", 1)[0]

    # the new-photo form and the region form (a box dragged on the photo) both carry them
    for marker in ('class="upload"', 'id="region-form"'):
        assert '<input type="hidden" name="attr.size" value="s">' in form(html, marker)
        assert '<input type="hidden" name="attr.colour" value="red">' in form(html, marker)
    token = page.get_data(as_text=True).split('name="query" value="')[1].split('"')[0]
    refined = client.post("/", data={"query": token, "box": "0,0,0.8,0.8", "attr.size": "s", "attr.colour": "red"})
    assert refined.status_code == 200
    assert 'name="attr.size" value="s"' in form(refined.get_data(as_text=True), 'id="whole-form"')  # the whole photo
    assert "attr.size=s" in refined.get_data(as_text=True)  # the preview grid's link


def test_a_base_written_without_postings_refuses_attribute_filters_until_compacted(indexed, embedder):
    settings, _ = indexed
    manifest = read_manifest(settings.index_dir)
    folder = settings.index_dir / manifest["base"]
    for name in ("attributes.json", "attribute_rows.npy"):
        (folder / name).unlink()
    del manifest["attribute_postings"]
    (settings.index_dir / "manifest.json").write_text(json.dumps(manifest))
    store = Store.open(settings)
    assert "attribute postings" in compaction_due(settings, store, embedder)
    old = create_app(settings, embedder).test_client()
    sku = read_csv(settings.metadata_path)[0]["sku"]
    answer = old.get(f"/api/products/{sku}/similar", query_string={"attr.size": "s"})
    assert answer.status_code == 400 and "python -m indexer compact" in answer.json["message"]
    assert old.get(f"/api/products/{sku}/similar", query_string={"category": "Banana"}).status_code == 200
    compact(settings, store, embedder)
    assert old.get(f"/api/products/{sku}/similar", query_string={"attr.size": "s"}).status_code == 200


def test_an_attribute_changed_in_the_catalog_is_filterable_after_make_index(indexed, embedder):
    settings, client = indexed
    rows = read_csv(settings.metadata_path)
    changed, seed = rows[2], rows[3]["sku"]
    query = {"k": "50", "attr.colour": "Turquoise"}
    assert client.get(f"/api/products/{seed}/similar", query_string=query).json["results"] == []
    changed["colour"] = "turquoise"  # only an attribute: no field a result shows
    write_csv(settings.metadata_path, rows)
    index_catalog(settings, embedder, settings.catalog_dir, metadata=settings.metadata_path, progress=False)
    found = client.get(f"/api/products/{seed}/similar", query_string=query).json["results"]
    assert [r["sku"] for r in found] == [changed["sku"]]
