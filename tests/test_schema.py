"""The SQLite schema: migrations, WAL mode, and ORM round trips."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import sessionmaker

from indexer.config import REPO_ROOT
from indexer.model import l2_normalize
from indexer.schema import SCHEMA_REVISION, Product, ProductImage, make_engine, migrate
from indexer.store import Store


def random_unit_vectors(count: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(count, dim)))


def test_migrations_create_the_catalog_tables_in_wal_mode(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate(url)
    migrate(url)  # running again is harmless
    engine = make_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert {"products", "images", "alembic_version"} <= tables
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION
        assert {"source", "deleted_at"} <= {column["name"] for column in inspect(engine).get_columns("images")}


OPEN_AND_REPORT_ALEMBIC = """
import sys
from indexer.config import load_settings
from indexer.store import Store
Store.open(load_settings().with_overrides(data_dir=__import__("pathlib").Path(sys.argv[1])))
print("alembic" in sys.modules)
"""


def test_opening_a_current_database_leaves_alembic_out_and_an_old_one_is_migrated(tmp_path):
    def opened_with_alembic() -> bool:
        probe = [sys.executable, "-c", OPEN_AND_REPORT_ALEMBIC, str(tmp_path)]
        return subprocess.run(probe, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip() == "True"

    assert opened_with_alembic()  # a new database: migrated
    assert not opened_with_alembic()  # at the newest revision: Alembic is not even imported
    with make_engine(f"sqlite:///{tmp_path / 'catalog.sqlite3'}").begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0003'"))  # as 0004's downgrade
        connection.execute(text("DROP TABLE store_state"))
        connection.execute(text("DROP INDEX ix_images_change"))
        for column in ("change", "file_size", "file_mtime_ns"):
            connection.execute(text(f"ALTER TABLE images DROP COLUMN {column}"))
    assert opened_with_alembic()  # behind: migrated again
    with make_engine(f"sqlite:///{tmp_path / 'catalog.sqlite3'}").connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION


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

    from indexer.config import REPO_ROOT

    assert ScriptDirectory(str(REPO_ROOT / "migrations")).get_current_head() == SCHEMA_REVISION
