"""Variants: several products sharing one photo (sizes S/M/L at different prices), through `make index`,
import-vectors and the write API; each photo is embedded once, each variant is a product of its own. On SQLite and
PostgreSQL."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from indexer.config import REPO_ROOT
from indexer.index.live_index import Filters
from indexer.jobs.importing import import_vectors
from indexer.jobs.indexing import index_catalog
from indexer.jobs.pipeline import decode_photos
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store
from tests.conftest import (
    SKIMAGE_CATALOG,
    both_databases,
    live_index,
    new_database,
    read_csv,
    served_catalog,
    skimage_jpeg,
    write_skimage_catalog,
)
from tests.support.server import running_server

pytestmark = both_databases

SIZES = {"S": 0.0, "M": 5.0, "L": 10.0}  # each size's price above its photo's base price
PHOTOS = [(category, name) for category, names in SKIMAGE_CATALOG.items() for name in names]
KEY = "variants-key-for-tests"


def price(photo: int, size: str) -> float:
    return 20.0 * (photo + 1) + SIZES[size]


def variant_rows(photos=PHOTOS) -> list[dict[str, str]]:
    """Three products per photo, one per size, each with its own price."""
    return [
        {"sku": f"{name}-{size}", "image": f"{category}/{name}.jpg", "title": f"{name} in {size}",
         "category": category, "price": str(price(i, size)), "size": size}
        for i, (category, name) in enumerate(photos)
        for size in SIZES
    ]  # fmt: skip


def write_rows(path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def rows_by_sku(settings) -> dict[str, tuple[int, str, bytes]]:
    """sku -> (image row id, sha256, vector bytes) of each live photo row."""
    with Session(Store.open(settings).engine) as session:
        rows = session.execute(
            select(Product.sku, ProductImage.id, ProductImage.sha256, ProductImage.embedding)
            .join(Product)
            .where(LIVE, ProductImage.view == "")
        ).all()
    return {sku: (row_id, sha256, embedding) for sku, row_id, sha256, embedding in rows}


def filtered(settings, embedder, photo: bytes, filters: Filters) -> list[str]:
    """The skus a search for the photo finds with the filters, best first, as a server would."""
    vector = embedder.embed_pixels(decode_photos([photo], embedder.input_size)[0])[0]
    ids, _ = live_index(settings, embedder).search(vector, 10, filters)
    shown = Store.open(settings).products.result_rows([int(i) for i in ids])
    return list(dict.fromkeys(shown[int(i)].sku for i in ids if int(i) in shown))


@pytest.fixture
def variants(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    write_rows(catalog / "products.csv", variant_rows())
    report = index_catalog(settings, embedder, catalog, progress=False)
    return settings, catalog, report


def test_each_photo_is_embedded_once_and_every_variant_is_searchable_by_its_own_price(variants, embedder):
    settings, catalog, report = variants
    assert (report.scanned, report.embedded, report.products, report.problems) == (18, 6, 18, [])
    stored = rows_by_sku(settings)
    assert len(stored) == 18 and len(live_index(settings, embedder)) == 18
    for _, name in PHOTOS:  # one vector per photo, stored for each of its variants
        assert len({stored[f"{name}-{size}"][1:] for size in SIZES}) == 1
    products = Store.open(settings).products
    medium = products.by_sku("coffee-M")
    assert (medium.price, medium.attributes) == (price(1, "M"), {"size": "M"})
    coffee = (catalog / "drinks" / "coffee.jpg").read_bytes()
    for size in SIZES:
        band = Filters(min_price=price(1, size) - 1, max_price=price(1, size) + 1)
        assert filtered(settings, embedder, coffee, band)[0] == f"coffee-{size}"
    # unfiltered, the three variants are three results, each shown once, all ahead of other photos
    assert sorted(filtered(settings, embedder, coffee, Filters())[:3]) == ["coffee-L", "coffee-M", "coffee-S"]

    again = index_catalog(settings, embedder, catalog, progress=False)
    assert (again.embedded, again.unchanged, again.removed, again.products) == (0, 6, 0, 18)
    assert rows_by_sku(settings) == stored


def test_variants_follow_the_products_file_and_a_changed_photo_is_embedded_once_for_all(variants, embedder):
    settings, catalog, _ = variants
    stored = rows_by_sku(settings)
    rows = [row for row in variant_rows() if row["sku"] != "rocket-L"]  # a variant leaves
    rows.append({**rows[0], "sku": "chelsea-XL", "price": "99", "size": "XL"})  # a variant comes
    rows = [{**row, "sku": "retina-XS"} if row["sku"] == "retina-S" else row for row in rows]  # a sku changes
    write_rows(catalog / "products.csv", rows)
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert (report.embedded, report.removed, report.products, report.problems) == (0, 2, 18, [])
    now = rows_by_sku(settings)
    assert "rocket-L" not in now and now["rocket-S"] == stored["rocket-S"] and now["rocket-M"] == stored["rocket-M"]
    assert now["chelsea-XL"][1:] == now["chelsea-S"][1:] and now["retina-XS"][1:] == stored["retina-S"][1:]
    assert len(live_index(settings, embedder)) == 18

    (catalog / "drinks" / "coffee.jpg").write_bytes(skimage_jpeg("coffee", angle=90))
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert (report.embedded, report.unchanged, report.removed) == (1, 5, 0)
    changed = rows_by_sku(settings)
    assert len({changed[f"coffee-{size}"][1:] for size in SIZES}) == 1
    assert changed["coffee-M"][1:] != stored["coffee-M"][1:]
    assert [changed[f"coffee-{size}"][0] for size in SIZES] == [stored[f"coffee-{size}"][0] for size in SIZES]


def test_the_same_sku_and_photo_twice_is_reported_with_its_lines(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    rows = variant_rows()
    write_rows(catalog / "products.csv", [*rows, {**rows[4], "title": "again"}])
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert report.products == 18 and report.problems == [
        "line 20: sku 'coffee-M' with image 'drinks/coffee.jpg' is already listed on line 6; skipped"
    ]


def embedded_vectors(embedder, catalog) -> np.ndarray:
    photos = [(catalog / category / f"{name}.jpg").read_bytes() for category, name in PHOTOS]
    return embedder.embed_pixels(decode_photos(photos, embedder.input_size)[0])


def test_import_vectors_takes_variants_and_reports_conflicting_rows(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    rows = variant_rows()  # the size column is an attribute, as make index reads it
    vectors = np.repeat(embedded_vectors(embedder, catalog), len(SIZES), axis=0)  # row i describes vector i
    np.save(tmp_path / "vectors.npy", vectors)
    write_rows(tmp_path / "products.csv", rows)
    report = import_vectors(settings, embedder, tmp_path / "vectors.npy", tmp_path / "products.csv", progress=False)
    assert (report.stored, report.skipped, report.problems) == (18, 0, [])
    assert Store.open(settings).products.counts()[1] == 18
    coffee = (catalog / "drinks" / "coffee.jpg").read_bytes()
    band = Filters(min_price=price(1, "L") - 1, max_price=price(1, "L") + 1)
    assert filtered(settings, embedder, coffee, band)[0] == "coffee-L"
    assert filtered(settings, embedder, coffee, Filters(attributes=(("size", frozenset({"m"})),)))[0] == "coffee-M"

    again = import_vectors(settings, embedder, tmp_path / "vectors.npy", tmp_path / "products.csv", progress=False)
    assert (again.stored, again.unchanged) == (0, 18)

    # the same sku with the same image twice: reported with both lines, never a database error
    np.save(tmp_path / "more.npy", np.concatenate([vectors, vectors[:1]]))
    write_rows(tmp_path / "more.csv", [*rows, {**rows[0], "title": "again"}])
    report = import_vectors(settings, embedder, tmp_path / "more.npy", tmp_path / "more.csv", progress=False)
    assert (report.stored, report.skipped) == (0, 1)
    assert report.problems == [
        "line 20: sku 'chelsea-S' with image 'animals/chelsea.jpg' is already on line 2; skipped"
    ]


def test_the_import_command_reports_conflicting_rows_without_a_traceback(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    vectors = embedded_vectors(embedder, catalog)[:2]
    np.save(tmp_path / "vectors.npy", np.concatenate([vectors, vectors[:1]]))
    (tmp_path / "products.csv").write_text(
        "sku,title,category,price,url,image\nA,A,c,1,,a.jpg\nB,B,c,2,,a.jpg\nA,A,c,1,,a.jpg\n"
    )
    env = {**os.environ, "DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.database_url or ""}
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "import-vectors", "--vectors", str(tmp_path / "vectors.npy"),
         "--products", str(tmp_path / "products.csv"), "--quiet"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "IntegrityError" not in done.stdout + done.stderr
    assert "2 stored" in done.stdout and "line 4: sku 'A' with image 'a.jpg' is already on line 2" in done.stdout


@pytest.mark.slow
def test_through_the_api_a_variant_is_added_filtered_and_deleted_leaving_the_others(settings, embedder, tmp_path):
    rows = "".join(
        f"{r['sku']},{r['image']},{r['title']},{r['category']},{r['price']},{r['size']}\n" for r in variant_rows()
    )
    env, catalog = served_catalog(
        settings, embedder, tmp_path, products_csv="sku,image,title,category,price,size\n" + rows, API_KEY=KEY
    )
    coffee = (catalog / "drinks" / "coffee.jpg").read_bytes()
    auth = {"Authorization": f"Bearer {KEY}"}
    with running_server(env, timeout=120) as server:

        def search(**fields: str) -> list[dict]:
            files = {"image": ("q.jpg", io.BytesIO(coffee), "image/jpeg")}
            found = requests.post(f"{server.url}/api/search", files=files, data={"k": "6", **fields}, timeout=60)
            assert found.status_code == 200, found.text
            return found.json()["results"]

        assert sorted(r["sku"] for r in search()[:3]) == ["coffee-L", "coffee-M", "coffee-S"]
        medium = search(min_price=str(price(1, "M") - 1), max_price=str(price(1, "M") + 1))
        assert [r["sku"] for r in medium][:1] == ["coffee-M"] and medium[0]["price"] == price(1, "M")
        shown = requests.get(f"{server.url}/api/products/coffee-L", timeout=10).json()
        assert (shown["price"], shown["attributes"]) == (price(1, "L"), {"size": "L"})
        # the size filter returns the variant of that size, however it is spelt
        assert [r["sku"] for r in search(**{"attr.size": "m"})][:1] == ["coffee-M"]
        assert sorted(r["sku"] for r in search(**{"attr.size": "S", "category": "drinks"})) == ["coffee-S"]

        # a fourth variant of the same photo, through the write API
        fields = {"title": "coffee in XL", "category": "drinks", "price": "99", "size": "XL"}
        put = requests.put(f"{server.url}/api/products/coffee-XL", headers=auth, timeout=60, data=fields,
                           files={"image": ("p.jpg", io.BytesIO(coffee), "image/jpeg")})  # fmt: skip
        assert put.status_code == 201, put.text
        assert sorted(r["sku"] for r in search()[:4]) == ["coffee-L", "coffee-M", "coffee-S", "coffee-XL"]

        deleted = requests.delete(f"{server.url}/api/products/coffee-M", headers=auth, timeout=60)
        assert deleted.status_code == 200, deleted.text
        assert sorted(r["sku"] for r in search()[:3]) == ["coffee-L", "coffee-S", "coffee-XL"]
        assert search(min_price=str(price(1, "M") - 1), max_price=str(price(1, "M") + 1))[:1] != ["coffee-M"]
        assert requests.get(f"{server.url}/api/products/coffee-M", timeout=10).status_code == 404
        assert requests.get(f"{server.url}/api/products/coffee-S", timeout=10).status_code == 200

        # a field longer than the store holds is a 400 that says so, on either database
        long = requests.put(f"{server.url}/api/products/coffee-XXL", headers=auth, timeout=60,
                            files={"image": ("p.jpg", io.BytesIO(coffee), "image/jpeg")},
                            data={"title": "t" * 1100, "category": "drinks"})  # fmt: skip
        assert long.status_code == 400 and "at most 1024" in long.json()["message"]


def test_a_hundred_grocery_photos_in_three_sizes_index_as_three_hundred_products(
    request, database, settings, embedder, grocery, tmp_path
):
    photos = read_csv(grocery / "catalog.csv")[::30][:100]
    rows = [
        {"sku": f"{row['sku']}-{size}", "image": row["image"], "title": row["title"], "category": row["category"],
         "price": str(price(i, size)), "size": size}
        for i, row in enumerate(photos)
        for size in SIZES
    ]  # fmt: skip
    write_rows(tmp_path / "products.csv", rows)
    report = index_catalog(settings, embedder, grocery, tmp_path / "products.csv", progress=False)
    assert (report.embedded, report.products, report.problems) == (100, 300, [])
    assert len(live_index(settings, embedder)) == 300
    photo = (grocery / photos[7]["image"]).read_bytes()
    band = Filters(min_price=price(7, "M") - 1, max_price=price(7, "M") + 1)
    assert filtered(settings, embedder, photo, band)[0] == f"{photos[7]['sku']}-M"
    by_size = Filters(attributes=(("size", frozenset({"m"})),))
    medium = filtered(settings, embedder, photo, by_size)
    assert medium[0] == f"{photos[7]['sku']}-M" and all(sku.endswith("-M") for sku in medium)
    assert index_catalog(settings, embedder, grocery, tmp_path / "products.csv", progress=False).embedded == 0

    # the same 300 rows as an import of the vectors made elsewhere: row i describes vector i
    stored = rows_by_sku(settings)
    np.save(tmp_path / "vectors.npy", np.stack([np.frombuffer(stored[row["sku"]][2], np.float32) for row in rows]))
    imported = settings.with_overrides(data_dir=tmp_path / "imported", database_url=new_database(request, database))
    write_rows(tmp_path / "import.csv", [{k: v for k, v in row.items() if k != "size"} for row in rows])
    report = import_vectors(imported, embedder, tmp_path / "vectors.npy", tmp_path / "import.csv", progress=False)
    assert (report.stored, report.problems) == (300, [])
    assert Store.open(imported).products.counts()[1] == 300
    assert filtered(imported, embedder, photo, band)[0] == f"{photos[7]['sku']}-M"


def test_rows_the_store_cannot_hold_are_reported_by_line_and_the_rest_indexed(settings, embedder, tmp_path):
    catalog = write_skimage_catalog(tmp_path / "catalog")
    rows = variant_rows()
    rows[3] = {**rows[3], "category": "c" * 300}  # line 5
    rows[7] = {**rows[7], "title": "nul\x00title"}  # line 9
    rows[9] = {**rows[9], "sku": "s" * 600}  # line 11
    write_rows(catalog / "products.csv", rows)
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert report.products == 15 and report.problems == [
        "line 5: category is 300 characters long; at most 256 can be stored; skipped",
        "line 9: product fields may not contain NUL characters; skipped",
        "line 11: sku is 600 characters long; at most 512 can be stored; skipped",
    ]

    vectors = np.repeat(embedded_vectors(embedder, catalog), len(SIZES), axis=0)
    np.save(tmp_path / "vectors.npy", vectors)
    rows[12] = {**rows[12], "image": "i" * 2100}  # line 14
    write_rows(tmp_path / "products.csv", [{k: v for k, v in row.items() if k != "size"} for row in rows])
    imported = settings.with_overrides(data_dir=tmp_path / "imported")
    report = import_vectors(imported, embedder, tmp_path / "vectors.npy", tmp_path / "products.csv", progress=False)
    assert (report.stored, report.skipped) == (14, 4)
    assert report.problems == [
        "line 5: category is 300 characters long; at most 256 can be stored",
        "line 9: product fields may not contain NUL characters",
        "line 11: sku is 600 characters long; at most 512 can be stored",
        "line 14: image is 2100 characters long; at most 2041 can be stored",
    ]


def test_a_new_variant_gets_the_photos_extra_views_too(settings, embedder, tmp_path):
    settings = settings.with_overrides(catalog_views=("flip",))
    catalog = write_skimage_catalog(tmp_path / "catalog")
    rows = variant_rows()
    write_rows(catalog / "products.csv", rows[:-1])
    index_catalog(settings, embedder, catalog, progress=False)
    write_rows(catalog / "products.csv", rows)  # rocket-L comes
    report = index_catalog(settings, embedder, catalog, progress=False)
    assert (report.embedded, report.products) == (0, 18)
    with Session(Store.open(settings).engine) as session:
        views = session.execute(
            select(Product.sku, ProductImage.view, ProductImage.embedding).join(Product).where(LIVE)
        ).all()
    rocket = {(sku, view): vector for sku, view, vector in views if sku.startswith("rocket-")}
    assert len(views) == 36 and set(rocket) == {(f"rocket-{size}", view) for size in SIZES for view in ("", "flip")}
    assert rocket["rocket-L", "flip"] == rocket["rocket-S", "flip"] != rocket["rocket-S", ""]
