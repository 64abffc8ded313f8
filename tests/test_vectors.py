"""The FAISS index on disk and the SQLite schema: round trips and atomic publishing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
from sqlalchemy import inspect, select, text

from indexer.config import REPO_ROOT
from indexer.model import l2_normalize
from indexer.schema import SCHEMA_REVISION, Product, ProductImage, make_engine, migrate, open_database
from indexer.vectors import KEEP_OLD_SECONDS, MANIFEST, build_index, load_index, publish_index


def random_unit_vectors(count: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).normal(size=(count, dim)))


def test_published_index_round_trips_ids_vectors_and_manifest(tmp_path):
    vectors = random_unit_vectors(50)
    ids = np.arange(100, 150, dtype=np.int64)
    publish_index(tmp_path, build_index(ids, vectors), {"model": "test", "dim": 32})
    version = load_index(tmp_path)
    assert version.manifest["model"] == "test" and version.manifest["count"] == 50
    scores, found = version.index.search(vectors[7:8], 3)
    assert found[0][0] == 107 and abs(scores[0][0] - 1.0) < 1e-5
    np.testing.assert_array_equal(version.index.reconstruct(123), vectors[23])


def test_inner_product_on_unit_vectors_ranks_by_cosine(tmp_path):
    vectors = random_unit_vectors(200, seed=1)
    index = build_index(np.arange(200), vectors)
    query = vectors[0]
    _, found = index.search(query[None], 5)
    expected = np.argsort(-(vectors @ query))[:5]
    np.testing.assert_array_equal(found[0], expected)


def test_nothing_published_means_no_index(tmp_path):
    assert load_index(tmp_path / "missing") is None


def test_publishing_replaces_the_manifest_and_leaves_no_partial_files(tmp_path):
    publish_index(tmp_path, build_index(np.arange(3), random_unit_vectors(3)), {})
    publish_index(tmp_path, build_index(np.arange(5), random_unit_vectors(5)), {})
    assert load_index(tmp_path).index.ntotal == 5
    assert not list(tmp_path.glob("*.partial"))
    assert (tmp_path / MANIFEST).exists()


def test_old_index_files_are_kept_for_a_grace_period_then_removed(tmp_path):
    first = publish_index(tmp_path, build_index(np.arange(3), random_unit_vectors(3)), {})
    second = publish_index(tmp_path, build_index(np.arange(4), random_unit_vectors(4)), {})
    assert first.exists()  # a service may still be reading it
    long_ago = time.time() - KEEP_OLD_SECONDS - 10
    os.utime(first, (long_ago, long_ago))
    publish_index(tmp_path, build_index(np.arange(5), random_unit_vectors(5)), {})
    assert not first.exists() and second.exists()


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
from indexer.schema import open_database
open_database(load_settings().with_overrides(data_dir=__import__("pathlib").Path(sys.argv[1])))
print("alembic" in sys.modules)
"""


def test_opening_a_current_database_leaves_alembic_out_and_an_old_one_is_migrated(tmp_path):
    def opened_with_alembic() -> bool:
        probe = [sys.executable, "-c", OPEN_AND_REPORT_ALEMBIC, str(tmp_path)]
        return subprocess.run(probe, cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip() == "True"

    assert opened_with_alembic()  # a new database: migrated
    assert not opened_with_alembic()  # at the newest revision: Alembic is not even imported
    with make_engine(f"sqlite:///{tmp_path / 'catalog.sqlite3'}").begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0002'"))
        connection.execute(text("DROP INDEX ix_images_deleted_at"))
        connection.execute(text("ALTER TABLE images DROP COLUMN deleted_at"))
    assert opened_with_alembic()  # behind: migrated again
    with make_engine(f"sqlite:///{tmp_path / 'catalog.sqlite3'}").connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION


def test_products_and_images_round_trip_through_the_orm(settings):
    sessions = open_database(settings)
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
