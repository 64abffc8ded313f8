"""The schema on SQLite and PostgreSQL: migrations (one revision at a time, with rows in the tables), the types
that differ, WAL mode, and ORM round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from indexer.config import REPO_ROOT
from indexer.embedding.model import l2_normalize
from indexer.storage.database import SCHEMA_REVISION, make_engine, migrate, shown_url
from indexer.storage.schema import Product, ProductImage
from indexer.storage.store import Store
from indexer.storage.text import Words
from tests.conftest import both_databases


def random_unit_vectors(count: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(count, dim)))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    return config


@both_databases
def test_migrations_create_the_catalog_tables_with_each_databases_types(settings, database):
    url = settings.db_url
    migrate(url)
    migrate(url)  # running again is harmless
    engine = make_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert {"products", "images", "store_state", "alembic_version"} <= tables
    columns = {column["name"]: column["type"] for column in inspect(engine).get_columns("images")}
    assert {"source", "deleted_at", "change", "file_size", "file_mtime_ns"} <= set(columns)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION
        if database == "sqlite":
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        else:
            types = dict(connection.execute(text(
                "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'public'"
            )).all())  # fmt: skip
            assert types["products.attributes"] == "jsonb"
            assert types["images.embedding"] == "bytea"
            assert types["images.updated_at"] == types["images.deleted_at"] == "timestamp with time zone"
            assert types["images.change"] == types["store_state.value"] == "bigint"
    engine.dispose()


@both_databases
def test_upgrading_one_revision_at_a_time_keeps_the_rows_and_downgrading_undoes_it(settings):
    """0000 -> 0001 with a product and an image in it -> ... -> head, then back to nothing and up again."""
    settings.data_dir.mkdir(parents=True)
    config = alembic_config(settings.db_url)
    command.upgrade(config, "0001")
    engine = make_engine(settings.db_url)
    vector = random_unit_vectors(1, 1024)[0].astype(np.float32)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO products (id, sku, title, attributes) VALUES (1, 'A1', 'Apple', :attributes)"),
            {"attributes": '{"origin": "NZ"}'},
        )
        connection.execute(
            text(
                "INSERT INTO images (id, product_id, rel_path, path, sha256, model_key, embedding, updated_at) "
                "VALUES (7, 1, 'a/1.jpg', '/c/a/1.jpg', :sha, 'm', :embedding, :updated_at)"
            ),
            {"sha": "0" * 64, "embedding": vector.tobytes(), "updated_at": datetime(2026, 11, 27, 12, tzinfo=UTC)},
        )
    for revision in ("0002", "0003", "0004", "0005", "0006"):  # 0007 below
        command.upgrade(config, revision)
    assert Store(engine).head() == 0
    with sessionmaker(engine)() as session:
        image = session.scalar(select(ProductImage))
        assert (image.id, image.source, image.change, image.deleted_at, image.view) == (7, "catalog", 0, None, "")
        assert image.product.attributes == {"origin": "NZ"}
        np.testing.assert_array_equal(np.frombuffer(image.embedding, np.float32), vector)
        assert image.updated_at.replace(tzinfo=UTC) == datetime(2026, 11, 27, 12, tzinfo=UTC)  # SQLite: naive UTC
    # 0006: a photo's extra view shares its rel_path; the same (rel_path, view) twice is still refused.
    add_view = text(
        "INSERT INTO images (product_id, rel_path, view, path, sha256, model_key, embedding, updated_at) "
        "VALUES (1, 'a/1.jpg', 'flip', '/c/a/1.jpg', 's', 'm', :embedding, :updated_at)"
    )
    view_row = {"embedding": vector.tobytes(), "updated_at": datetime(2026, 11, 28, tzinfo=UTC)}
    with engine.begin() as connection:
        connection.execute(add_view, view_row)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(add_view, view_row)
    # 0007: the products already stored are in the words index, by title and by attribute value.
    command.upgrade(config, "0007")
    words = Store(engine).text
    assert [p.sku for p in words.search(Words.parse("APPLE"), 10)] == ["A1"]
    assert [p.sku for p in words.search(Words.parse("nz"), 10)] == ["A1"]
    assert words.search(Words.parse("origin"), 10) == []  # attribute names are not words of the product
    # 0008: another product may have rows of the same photo (a variant); one product's (rel_path, view) twice is
    # still refused. Downgrading keeps each photo's rows of its first product.
    command.upgrade(config, "0008")
    variant = text(
        "INSERT INTO images (product_id, rel_path, view, path, sha256, model_key, embedding, updated_at) "
        "VALUES (:product, 'a/1.jpg', '', '/c/a/1.jpg', 's', 'm', :embedding, :updated_at)"
    )
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO products (id, sku, title, attributes) VALUES (2, 'A1-M', 'M', '{}')"))
        connection.execute(variant, {**view_row, "product": 2})
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(variant, {**view_row, "product": 2})
    command.downgrade(config, "0007")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM images WHERE view = ''")).scalars().all() == [7]
    engine.dispose()
    command.downgrade(config, "base")
    engine = make_engine(settings.db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate(settings.db_url)
    assert Store(make_engine(settings.db_url)).schema_problem() is None


OPEN_AND_REPORT_MODULES = """
import sys
from indexer.config import load_settings
from indexer.storage.store import Store
from indexer.storage.text import Words
Store.open(load_settings().with_overrides(data_dir=__import__("pathlib").Path(sys.argv[1])))
print("alembic" in sys.modules, "psycopg" in sys.modules)
"""


@both_databases
def test_opening_a_current_database_leaves_alembic_out_and_an_old_one_is_migrated(settings, database):
    env = {**os.environ, "DATABASE_URL": settings.database_url}

    def opened_with() -> tuple[bool, bool]:
        """(whether Alembic was imported to open the store, whether psycopg was)"""
        probe = [sys.executable, "-c", OPEN_AND_REPORT_MODULES, str(settings.data_dir)]
        done = subprocess.run(probe, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
        alembic, psycopg = done.stdout.split()
        return alembic == "True", psycopg == "True"

    uses_psycopg = database == "postgresql"  # the driver is imported only for a PostgreSQL URL
    assert opened_with() == (True, uses_psycopg)  # a new database: migrated
    assert opened_with() == (False, uses_psycopg)  # at the newest revision: Alembic is not even imported
    command.downgrade(alembic_config(settings.db_url), "0003")
    assert opened_with()[0]  # behind: migrated again
    with make_engine(settings.db_url).connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION


@both_databases
def test_a_database_that_cannot_be_reached_is_unavailable_not_unmigrated(database, tmp_path):
    if database == "sqlite":
        url = f"sqlite:///{tmp_path}"  # a folder: SQLite cannot open it
    else:
        url = f"postgresql+psycopg://app:s3cret@/catalog?host={tmp_path}"  # no server has a socket there
    assert "unavailable right now" in Store(make_engine(url)).schema_problem()
    assert "s3cret" not in shown_url(url)


@both_databases
def test_products_and_images_round_trip_through_the_orm(settings):
    sessions = sessionmaker(Store.open(settings).engine)
    vector = random_unit_vectors(1, 1024)[0]
    with sessions.begin() as session:
        product = Product(sku="SKU-1", title="Red apple", category="apples", price=0.5, attributes={"origin": "NZ"})
        product.images.append(
            ProductImage(
                rel_path="a/1.jpg", path="/x/a/1.jpg", sha256="0" * 64, model_key="m", embedding=vector.tobytes()
            )
        )
        session.add(product)
    with sessions() as session:
        stored = session.scalar(select(Product).where(Product.sku == "SKU-1"))
        assert stored.attributes == {"origin": "NZ"} and stored.price == 0.5
        np.testing.assert_array_equal(np.frombuffer(stored.images[0].embedding, np.float32), vector)
    with sessions.begin() as session:
        session.delete(session.scalar(select(Product).where(Product.sku == "SKU-1")))
    with sessions() as session:
        assert session.scalars(select(ProductImage)).all() == []  # images go with their product


def test_the_schema_revision_the_service_expects_is_alembics_head():
    from alembic.script import ScriptDirectory

    assert ScriptDirectory(str(REPO_ROOT / "migrations")).get_current_head() == SCHEMA_REVISION


def test_the_lengths_products_are_checked_against_are_the_columns():
    from indexer.records import MAX_LENGTHS

    assert {name: Product.__table__.c[name].type.length for name in MAX_LENGTHS} == MAX_LENGTHS
