"""Reading a catalog folder and its products.csv / products.jsonl (indexer/catalog.py), on real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from indexer.catalog import CatalogError, CatalogImage, read_metadata, scan_catalog
from indexer.records import ProductFields


def photo(root: Path, rel: str, colour=(200, 30, 30)) -> Path:
    """Write a small real image at root/rel in the format its suffix names."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}
    Image.new("RGB", (8, 8), colour).save(path, fmt[path.suffix.lower()])
    return path


def by_path(images: list[CatalogImage]) -> dict[str, CatalogImage]:
    return {image.rel_path: image for image in images}


@pytest.fixture
def shop(tmp_path) -> Path:
    """A catalog folder with a few photos in category folders."""
    root = tmp_path / "shop"
    photo(root, "shoes/red_runner.jpg")
    photo(root, "shoes/blue-boot.png")
    photo(root, "bags/tote.webp")
    photo(root, "bags/leather/satchel.jpeg")
    return root


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# --- folders without metadata ----------------------------------------------------------------------


def test_folder_without_metadata_lists_every_image_recursively(shop):
    scan = scan_catalog(shop)

    assert scan.problems == []
    assert scan.root == shop.resolve()
    assert sorted(by_path(scan.images)) == [
        "bags/leather/satchel.jpeg",
        "bags/tote.webp",
        "shoes/blue-boot.png",
        "shoes/red_runner.jpg",
    ]


def test_folder_sku_is_relative_path_without_extension_and_category_is_parent_folder(shop):
    images = by_path(scan_catalog(shop).images)

    runner = images["shoes/red_runner.jpg"]
    assert runner.sku == "shoes/red_runner"
    assert runner.category == "shoes"
    assert runner.path == (shop / "shoes/red_runner.jpg").resolve()
    assert runner.path.is_file()
    assert runner.title == "red runner"
    assert runner.product.price is None
    assert runner.product.url is None
    assert runner.product.attributes == {}
    assert images["shoes/blue-boot.png"].title == "blue boot"
    satchel = images["bags/leather/satchel.jpeg"]
    assert (satchel.sku, satchel.category) == ("bags/leather/satchel", "leather")


def test_folder_image_at_the_top_level_has_no_category(tmp_path):
    photo(tmp_path, "loose.png")

    (image,) = scan_catalog(tmp_path).images

    assert (image.sku, image.category) == ("loose", None)


def test_folder_scan_keeps_only_jpg_jpeg_png_and_webp(tmp_path):
    for rel in ("a.jpg", "b.jpeg", "c.png", "d.webp", "e.gif", "f.bmp"):
        photo(tmp_path, rel)
    (tmp_path / "notes.txt").write_text("not a product\n")
    (tmp_path / "folder.jpg").mkdir()  # a directory with an image-like name

    scan = scan_catalog(tmp_path)

    assert sorted(by_path(scan.images)) == ["a.jpg", "b.jpeg", "c.png", "d.webp"]


def test_folder_scan_matches_suffixes_case_insensitively(tmp_path):
    photo(tmp_path, "shoes/RED.JPG")
    photo(tmp_path, "shoes/Blue.Png")
    photo(tmp_path, "shoes/green.WebP")
    photo(tmp_path, "shoes/grey.JPEG")

    images = by_path(scan_catalog(tmp_path).images)

    assert sorted(images) == ["shoes/Blue.Png", "shoes/RED.JPG", "shoes/green.WebP", "shoes/grey.JPEG"]
    assert images["shoes/RED.JPG"].sku == "shoes/RED"


def test_folder_scan_skips_hidden_folders_and_files(tmp_path):
    photo(tmp_path, "shoes/visible.jpg")
    photo(tmp_path, ".thumbnails/visible.jpg")
    photo(tmp_path, "shoes/.cache/deep/small.png")
    photo(tmp_path, "shoes/._visible.jpg")  # macOS resource-fork file

    scan = scan_catalog(tmp_path)

    assert [image.rel_path for image in scan.images] == ["shoes/visible.jpg"]


def test_catalog_inside_a_hidden_folder_is_still_scanned(tmp_path):
    root = tmp_path / ".private" / "shop"
    photo(root, "shoes/a.jpg")

    assert [image.sku for image in scan_catalog(root).images] == ["shoes/a"]


def test_empty_folder_is_an_empty_catalog(tmp_path):
    scan = scan_catalog(tmp_path)

    assert (scan.images, scan.problems, scan.skus) == ([], [], set())


def test_missing_folder_raises_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        scan_catalog(tmp_path / "no-such-folder")


def test_file_instead_of_folder_raises_catalog_error(tmp_path):
    path = photo(tmp_path, "one.jpg")

    with pytest.raises(CatalogError):
        scan_catalog(path)


# --- metadata: which file ----------------------------------------------------------------------------


def test_products_csv_in_the_folder_is_used_by_default(shop):
    (shop / "products.csv").write_text(
        "sku,image,title,category,price,url\nR1,shoes/red_runner.jpg,Red runner,running,59.90,https://shop.example/r1\n"
    )

    scan = scan_catalog(shop)

    assert scan.problems == []
    assert scan.images == [
        CatalogImage(
            rel_path="shoes/red_runner.jpg",
            path=(shop / "shoes/red_runner.jpg").resolve(),
            product=ProductFields("R1", "Red runner", "running", 59.9, "https://shop.example/r1"),
        )
    ]


def test_products_jsonl_in_the_folder_is_used_by_default(shop):
    write_jsonl(
        shop / "products.jsonl",
        [
            {"sku": "T1", "image": "bags/tote.webp", "title": "Canvas tote", "price": 12.5},
            {"sku": "S1", "image": "bags/leather/satchel.jpeg", "category": "leather goods", "price": None},
        ],
    )

    scan = scan_catalog(shop)

    assert scan.problems == []
    images = by_path(scan.images)
    assert sorted(images) == ["bags/leather/satchel.jpeg", "bags/tote.webp"]
    tote = images["bags/tote.webp"]
    assert (tote.sku, tote.title, tote.product.price, tote.category) == ("T1", "Canvas tote", 12.5, None)
    satchel = images["bags/leather/satchel.jpeg"]
    assert (satchel.sku, satchel.title, satchel.product.price, satchel.category) == ("S1", "S1", None, "leather goods")


def test_jsonl_numbers_become_strings_and_skus(shop):
    write_jsonl(shop / "products.jsonl", [{"sku": 1042, "image": "bags/tote.webp", "stock": 7, "price": "3"}])

    (image,) = scan_catalog(shop).images

    assert (image.sku, image.product.price, image.product.attributes) == ("1042", 3.0, {"stock": "7"})


def test_csv_is_preferred_when_both_metadata_files_exist(shop):
    (shop / "products.csv").write_text("sku,image\nFROM-CSV,shoes/red_runner.jpg\n")
    write_jsonl(shop / "products.jsonl", [{"sku": "FROM-JSONL", "image": "bags/tote.webp"}])

    assert scan_catalog(shop).skus == {"FROM-CSV"}


def test_explicit_metadata_path_is_used_instead_of_the_default(shop, tmp_path):
    (shop / "products.csv").write_text("sku,image\nDEFAULT,shoes/red_runner.jpg\n")
    elsewhere = tmp_path / "exports" / "spring.csv"
    elsewhere.parent.mkdir()
    elsewhere.write_text("sku,image\nSPRING,bags/tote.webp\n")

    scan = scan_catalog(shop, metadata=elsewhere)

    assert [(image.sku, image.rel_path) for image in scan.images] == [("SPRING", "bags/tote.webp")]


def test_explicit_jsonl_metadata_path_is_read_as_json_lines(shop, tmp_path):
    metadata = write_jsonl(tmp_path / "feed.jsonl", [{"sku": "J1", "image": "shoes/blue-boot.png"}])

    assert scan_catalog(shop, metadata=metadata).skus == {"J1"}


def test_explicit_metadata_path_that_does_not_exist_raises_catalog_error(shop, tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        scan_catalog(shop, metadata=tmp_path / "missing.csv")


def test_metadata_rows_are_the_whole_catalog(shop):
    (shop / "products.csv").write_text("sku,image\nR1,shoes/red_runner.jpg\n")

    scan = scan_catalog(shop)

    assert [image.rel_path for image in scan.images] == ["shoes/red_runner.jpg"]
    assert scan.problems == []  # photos without a row are simply not products


# --- metadata: rows ----------------------------------------------------------------------------------


def test_extra_columns_become_attributes_and_empty_ones_are_dropped(shop):
    (shop / "products.csv").write_text("sku,image,title,colour,size,material\nR1,shoes/red_runner.jpg,Runner,red,42,\n")

    (image,) = scan_catalog(shop).images

    assert image.product.attributes == {"colour": "red", "size": "42"}


def test_csv_values_are_stripped_of_surrounding_spaces(shop):
    (shop / "products.csv").write_text("sku,image,title,price\n  R1 , shoes/red_runner.jpg ,  Runner  , 10 \n")

    (image,) = scan_catalog(shop).images

    assert (image.sku, image.rel_path, image.title) == ("R1", "shoes/red_runner.jpg", "Runner")
    assert image.product.price == 10.0


@pytest.mark.parametrize(("text", "price"), [("59.90", 59.9), ("0", 0.0), ("1e3", 1000.0), ("", None)])
def test_valid_prices_are_parsed(shop, text, price):
    (shop / "products.csv").write_text(f"sku,image,price\nR1,shoes/red_runner.jpg,{text}\n")

    scan = scan_catalog(shop)

    assert scan.problems == []
    assert scan.images[0].product.price == price


@pytest.mark.parametrize("text", ["$12.99", "12,99", "cheap", "nan", "inf", "-inf", "1e999"])
def test_bad_price_is_reported_and_the_product_is_kept_without_a_price(shop, text):
    (shop / "products.csv").write_text(f'sku,image,price\nR1,shoes/red_runner.jpg,"{text}"\n')

    scan = scan_catalog(shop)

    assert [image.sku for image in scan.images] == ["R1"]
    assert scan.images[0].product.price is None
    assert len(scan.problems) == 1
    assert "line 2" in scan.problems[0]
    assert "price" in scan.problems[0]
    assert repr(text) in scan.problems[0]


def test_rows_missing_sku_or_image_are_reported_and_skipped(shop):
    (shop / "products.csv").write_text(
        "sku,image,title\n"
        ",shoes/red_runner.jpg,no sku\n"
        "B1,,no image\n"
        "   ,   ,only spaces\n"
        "OK,bags/tote.webp,fine\n"
        "SHORT\n"
    )

    scan = scan_catalog(shop)

    assert scan.skus == {"OK"}
    assert len(scan.problems) == 4
    for number, problem in zip((2, 3, 4, 6), scan.problems, strict=True):
        assert problem.startswith(f"line {number}:")
        assert "needs both sku and image" in problem


def test_image_that_does_not_exist_is_reported_and_skipped(shop):
    (shop / "products.csv").write_text("sku,image\nGONE,shoes/missing.jpg\nR1,shoes/red_runner.jpg\n")

    scan = scan_catalog(shop)

    assert scan.skus == {"R1"}
    assert scan.problems == ["line 2: image 'shoes/missing.jpg' does not exist"]


def test_image_path_naming_a_folder_is_reported_as_missing(shop):
    (shop / "products.csv").write_text("sku,image\nDIR,shoes\n")

    scan = scan_catalog(shop)

    assert scan.images == []
    assert "does not exist" in scan.problems[0]


def test_image_paths_escaping_the_folder_are_reported_and_not_included(shop, tmp_path):
    outside = photo(tmp_path, "secret.jpg")  # exists, next to the catalog folder
    (shop / "products.csv").write_text(
        "sku,image\n"
        f"UP,../secret.jpg\n"
        f"ABS,{outside.resolve()}\n"
        f"SNEAKY,shoes/../../secret.jpg\n"
        "R1,shoes/red_runner.jpg\n"
    )

    scan = scan_catalog(shop)

    assert scan.skus == {"R1"}
    assert len(scan.problems) == 3
    assert all("outside the catalog folder" in problem for problem in scan.problems)
    assert all(image.path.is_relative_to(shop.resolve()) for image in scan.images)


def test_symlink_pointing_outside_the_folder_is_reported_and_not_included(shop, tmp_path):
    outside = photo(tmp_path, "secret.jpg")
    (shop / "shoes" / "link.jpg").symlink_to(outside)
    (shop / "products.csv").write_text("sku,image\nLINK,shoes/link.jpg\n")

    scan = scan_catalog(shop)

    assert scan.images == []
    assert "outside the catalog folder" in scan.problems[0]


def test_symlinked_folder_pointing_outside_is_reported_and_one_inside_is_followed(shop, tmp_path):
    photo(tmp_path / "elsewhere", "secret.jpg")
    (shop / "away").symlink_to(tmp_path / "elsewhere")
    (shop / "alias").symlink_to(shop / "shoes")
    (shop / "products.csv").write_text("sku,image\nAWAY,away/secret.jpg\nALIAS,alias/red_runner.jpg\n")

    scan = scan_catalog(shop)

    assert scan.skus == {"ALIAS"} and scan.images[0].rel_path == "shoes/red_runner.jpg"
    assert len(scan.problems) == 1 and "outside the catalog folder" in scan.problems[0]


def test_path_that_stays_inside_the_folder_is_normalised(shop):
    (shop / "products.csv").write_text("sku,image\nR1,./bags/../shoes/red_runner.jpg\n")

    (image,) = scan_catalog(shop).images

    assert image.rel_path == "shoes/red_runner.jpg"


def test_rows_naming_one_photo_with_different_skus_are_variants_read_once(shop):
    (shop / "products.csv").write_text(
        "sku,image,title,size\nRUN-S,shoes/red_runner.jpg,Runner,S\nRUN-M,shoes/./red_runner.jpg,Runner,M\n"
    )

    scan = scan_catalog(shop)

    assert scan.problems == []
    assert [(image.sku, image.rel_path, image.product.attributes) for image in scan.images] == [
        ("RUN-S", "shoes/red_runner.jpg", {"size": "S"}),
        ("RUN-M", "shoes/red_runner.jpg", {"size": "M"}),
    ]
    assert [image.sku for image in scan.photos] == ["RUN-S"]  # the file is read once


def test_the_same_sku_and_photo_twice_is_reported_with_both_lines(shop):
    (shop / "products.csv").write_text(
        "sku,image,title\nFIRST,shoes/red_runner.jpg,First\nFIRST,shoes/./red_runner.jpg,Again\n"
    )

    scan = scan_catalog(shop)

    assert [(image.sku, image.title) for image in scan.images] == [("FIRST", "First")]
    assert scan.problems == [
        "line 3: sku 'FIRST' with image 'shoes/./red_runner.jpg' is already listed on line 2; skipped"
    ]


def test_one_sku_with_other_fields_on_another_photo_keeps_the_first_rows_fields(shop):
    (shop / "products.csv").write_text("sku,image,price\nBAG-1,bags/tote.webp,10\nBAG-1,bags/leather/satchel.jpeg,12\n")

    scan = scan_catalog(shop)

    assert [image.rel_path for image in scan.images] == ["bags/tote.webp", "bags/leather/satchel.jpeg"]
    assert scan.problems == [
        "line 3: sku 'BAG-1' is listed on line 2 with other fields; its photo is kept, with line 2's fields"
    ]


def test_several_images_of_the_same_sku_are_all_kept(shop):
    (shop / "products.csv").write_text(
        "sku,image,title\nBAG-1,bags/tote.webp,Tote\nBAG-1,bags/leather/satchel.jpeg,Tote\n"
    )

    scan = scan_catalog(shop)

    assert scan.problems == []
    assert [(image.sku, image.rel_path) for image in scan.images] == [
        ("BAG-1", "bags/tote.webp"),
        ("BAG-1", "bags/leather/satchel.jpeg"),
    ]
    assert scan.skus == {"BAG-1"}


def test_csv_line_numbers_in_problems_count_blank_lines(shop):
    (shop / "products.csv").write_text("sku,image\n\nR1,shoes/red_runner.jpg\n\n\nGONE,missing.jpg\n")

    scan = scan_catalog(shop)

    assert scan.skus == {"R1"}
    assert scan.problems == ["line 6: image 'missing.jpg' does not exist"]


def test_csv_quoted_field_keeps_its_line_break(shop):
    (shop / "products.csv").write_text(
        'sku,image,title\nR1,shoes/red_runner.jpg,"Red runner\nlimited edition"\nGONE,missing.jpg,x\n'
    )

    scan = scan_catalog(shop)

    assert scan.images[0].title == "Red runner\nlimited edition"
    assert scan.problems == ["line 4: image 'missing.jpg' does not exist"]


def test_csv_with_windows_line_endings_is_read(shop):
    (shop / "products.csv").write_bytes(b"sku,image,title\r\nR1,shoes/red_runner.jpg,Runner\r\n")

    (image,) = scan_catalog(shop).images

    assert (image.sku, image.title) == ("R1", "Runner")


# --- metadata: unusable files -----------------------------------------------------------------------


@pytest.mark.parametrize("header", ["sku,title,price", "image,title", "SKU,Image", "title,price"])
def test_csv_without_sku_and_image_columns_raises_catalog_error(shop, header):
    (shop / "products.csv").write_text(f"{header}\nR1,shoes/red_runner.jpg,1\n")

    with pytest.raises(CatalogError, match="needs at least sku,image"):
        scan_catalog(shop)


def test_empty_csv_raises_catalog_error(shop):
    (shop / "products.csv").write_text("")

    with pytest.raises(CatalogError):
        scan_catalog(shop)


def test_header_only_csv_is_an_empty_catalog(shop):
    (shop / "products.csv").write_text("sku,image,title\n")

    scan = scan_catalog(shop)

    assert (scan.images, scan.problems) == ([], [])


@pytest.mark.parametrize("name", ["products.csv", "products.jsonl"])
def test_non_utf8_metadata_raises_catalog_error(shop, name):
    (shop / name).write_bytes("sku,image,title\nR1,shoes/red_runner.jpg,Schuh grün\n".encode("latin-1"))

    with pytest.raises(CatalogError, match="not UTF-8"):
        scan_catalog(shop)


def test_utf8_bom_at_the_start_of_the_csv_is_ignored(shop):
    (shop / "products.csv").write_bytes("sku,image,title\nR1,shoes/red_runner.jpg,Schuh grün\n".encode("utf-8-sig"))

    scan = scan_catalog(shop)

    assert scan.problems == []
    assert [(image.sku, image.title) for image in scan.images] == [("R1", "Schuh grün")]


def test_utf8_bom_at_the_start_of_the_jsonl_is_ignored(shop):
    (shop / "products.jsonl").write_bytes(
        (json.dumps({"sku": "R1", "image": "shoes/red_runner.jpg"}) + "\n").encode("utf-8-sig")
    )

    scan = scan_catalog(shop)

    assert (scan.skus, scan.problems) == ({"R1"}, [])


def test_invalid_json_line_is_reported_with_its_line_number(shop):
    (shop / "products.jsonl").write_text(
        json.dumps({"sku": "R1", "image": "shoes/red_runner.jpg"})
        + "\n"
        + "\n"  # blank lines are skipped but still counted
        + '{"sku": "BROKEN", "image": \n'
        + json.dumps(["not", "an", "object"])
        + "\n"
        + json.dumps({"sku": "T1", "image": "bags/tote.webp"})
        + "\n"
    )

    scan = scan_catalog(shop)

    assert scan.skus == {"R1", "T1"}
    assert len(scan.problems) == 2
    assert scan.problems[0].startswith("products.jsonl:3: not valid JSON")
    assert scan.problems[1] == "products.jsonl:4: expected a JSON object"


def test_jsonl_line_numbers_in_row_problems_match_the_file(shop):
    (shop / "products.jsonl").write_text('\n{"sku": "GONE", "image": "missing.jpg"}\n')

    assert scan_catalog(shop).problems == ["line 2: image 'missing.jpg' does not exist"]


def test_jsonl_values_may_contain_unicode_line_separators(shop):
    # json.dumps(..., ensure_ascii=False) writes U+2028 and U+0085 as they are, inside the string
    title = "Red runner\u2028limited\x85edition"
    (shop / "products.jsonl").write_text(
        json.dumps({"sku": "R1", "image": "shoes/red_runner.jpg", "title": title}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )

    scan = scan_catalog(shop)

    assert scan.problems == []
    assert scan.images[0].title == title


def test_read_metadata_returns_rows_with_line_numbers(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("sku,image,colour\nA,a.jpg,red\nB,b.jpg,\n")

    rows, problems = read_metadata(path)

    assert problems == []
    assert rows == [
        (2, {"sku": "A", "image": "a.jpg", "colour": "red"}),
        (3, {"sku": "B", "image": "b.jpg", "colour": ""}),
    ]
