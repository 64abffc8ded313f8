"""Writers take turns: on SQLite through the data folder's file lock, on PostgreSQL also through the database's
advisory locks, which hold across machines (here: stores with data folders of their own on one database)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sqlalchemy import text

from indexer.config import REPO_ROOT
from indexer.embedding.model import l2_normalize
from indexer.records import ProductFields
from indexer.storage.database import SCHEMA_REVISION, make_engine
from indexer.storage.locks import MIGRATION_LOCK_KEY, compaction_lock, compaction_running, write_lock
from indexer.storage.store import Store
from indexer.storage.vectors import ImageVector
from tests.conftest import both_databases

DIM = 8
WRITERS, WRITES = 4, 12


def machine(settings, name: str):
    """What another machine sees: its own data folder (so its own file locks) and its own connections."""
    here = settings.with_overrides(data_dir=settings.data_dir.parent / name)
    return here, Store.open(here)


def write(store: Store, data_dir, sku: str, seed: int) -> int:
    vector = l2_normalize(np.random.default_rng(seed).normal(size=(1, DIM)))[0].astype(np.float32)
    with write_lock(data_dir, store):
        _, change = store.products.put(ProductFields(sku, sku), ImageVector(f"api/{sku}", "", sku, vector), "m")
    return change


@both_databases
def test_concurrent_writers_get_distinct_change_numbers_in_commit_order(settings, database):
    """Writers on four machines (on SQLite: four processes' worth of stores on one data folder) write at once,
    while a reader follows the changes the way a server does. Every write takes its own number, each writer's
    numbers increase, and the reader, which only ever asks for rows after the last number it saw, misses none:
    a number is never committed after a higher one."""
    machines = [machine(settings, f"machine-{i}" if database == "postgresql" else "data") for i in range(WRITERS)]
    reader = Store.open(settings)
    seen, found, done = 0, set(), threading.Event()

    def follow() -> None:
        nonlocal seen
        while True:
            last = done.is_set()
            changes = reader.vectors.changes_since(seen, "m", DIM)
            found.update(changes.ids.tolist())
            seen = changes.head
            if last:
                return
            threading.Event().wait(0.005)

    def writer(number: int) -> list[int]:
        here, store = machines[number]
        return [write(store, here.data_dir, f"w{number}-{i}", 100 * number + i) for i in range(WRITES)]

    following = threading.Thread(target=follow)
    following.start()
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        numbers = list(pool.map(writer, range(WRITERS)))
    done.set()
    following.join(timeout=60)
    changes = [change for own in numbers for change in own]
    assert sorted(changes) == list(range(1, WRITERS * WRITES + 1))  # distinct, none skipped
    assert all(own == sorted(own) for own in numbers)
    assert reader.head() == seen == WRITERS * WRITES
    assert len(found) == WRITERS * WRITES  # every row was seen by the follower


def test_the_sqlite_change_marker_moves_with_every_commit_and_only_then(settings):
    """What lets a server skip reading head before a search: the marker stays while nothing is committed and
    moves with a commit from another store (another process's) or from another connection of the reader's own."""
    reader = Store.open(settings)
    here, other = machine(settings, settings.data_dir.name)
    first = reader.change_marker()
    assert first is not None and reader.change_marker() == first
    write(other, here.data_dir, "a", 1)
    second = reader.change_marker()
    assert second != first and reader.change_marker() == second
    write(reader, settings.data_dir, "b", 2)
    assert reader.change_marker() != second


@pytest.mark.postgresql
def test_postgresql_has_no_change_marker_so_a_server_reads_head(postgres, settings):
    store = Store.open(settings.with_overrides(database_url=postgres.url(postgres.create_database())))
    assert store.change_marker() is None


@pytest.mark.postgresql
def test_a_writer_on_another_machine_waits_for_the_database_write_lock(postgres, settings):
    settings = settings.with_overrides(database_url=postgres.url(postgres.create_database()))
    (here, store), (there, other) = machine(settings, "a"), machine(settings, "b")
    entered = threading.Event()

    def other_writer() -> None:
        with write_lock(there.data_dir, other):  # another folder: only the database lock stands in the way
            entered.set()

    with write_lock(here.data_dir, store):
        waiting = threading.Thread(target=other_writer)
        waiting.start()
        assert not entered.wait(1.0)
    assert entered.wait(30)
    waiting.join()


@pytest.mark.postgresql
def test_one_compaction_at_a_time_across_machines(postgres, settings):
    settings = settings.with_overrides(database_url=postgres.url(postgres.create_database()))
    (here, store), (there, other) = machine(settings, "a"), machine(settings, "b")
    assert not compaction_running(there.data_dir, other)
    with compaction_lock(here.data_dir, store, wait=False) as held:
        assert held
        assert compaction_running(there.data_dir, other)
        with compaction_lock(there.data_dir, other, wait=False) as held_there:
            assert not held_there
        with write_lock(there.data_dir, other):  # writes go on during a compaction
            pass
    assert not compaction_running(there.data_dir, other)


def migrate_command(database_url: str) -> subprocess.Popen:
    """`make migrate`'s command, on a machine whose DATABASE_URL is database_url."""
    return subprocess.Popen([sys.executable, "-m", "indexer", "migrate"], cwd=REPO_ROOT, text=True,
                            env={**os.environ, "DATABASE_URL": database_url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


@pytest.mark.postgresql
def test_machines_that_migrate_at_once_take_turns(postgres):
    """Three `make migrate` at once on an empty database wait for the migration lock (held here at first), then
    run one after the other: one creates the tables, the others find nothing left to do."""
    url = postgres.url(postgres.create_database())
    engine = make_engine(url)
    with engine.connect() as holder:
        holder.execution_options(isolation_level="AUTOCOMMIT")
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        migrations = [migrate_command(url) for _ in range(3)]
        deadline = time.monotonic() + 120
        while holder.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")) < 3:
            assert all(m.poll() is None for m in migrations), "a migration did not wait for the lock"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    for migration in migrations:  # without the lock, all but one: "relation ... already exists"
        _, errors = migration.communicate(timeout=120)
        assert migration.returncode == 0, errors
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == SCHEMA_REVISION
    engine.dispose()


@pytest.mark.postgresql
def test_make_migrate_takes_database_url_and_prints_it_without_the_password(postgres, settings):
    name = postgres.create_database()
    url = postgres.url(name).replace("postgres@", "postgres:s3cret@")  # trust authentication ignores it
    output, errors = (migration := migrate_command(url)).communicate(timeout=120)
    assert migration.returncode == 0, errors
    assert f"/{name}" in output and "s3cret" not in output + errors
    store = Store.open(settings.with_overrides(database_url=url), upgrade=False)
    assert store.schema_problem() is None and store.head() == 0
