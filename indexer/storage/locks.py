"""Locks: one writer at a time (the indexer's commits and the write API's changes take the same lock, so
change numbers follow commit order), and one compaction at a time.

Each lock is two locks, taken in this order: a file lock in the data folder, which serialises the threads and
processes of this machine, then, when the database is PostgreSQL, a session-level advisory lock in the
database, which serialises every machine that writes to it. SQLite is one machine's file, so its file lock
is the whole lock. Both are released by the kernel or the server when their holder dies. The locks take
anything that holds the database's engine (an indexer.storage.store.Store), and import nothing of the store.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import BigInteger, func, literal, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

# PostgreSQL advisory lock keys (64-bit, per database): "vps" and a number, so that they are unlikely to
# meet another application's keys in a shared database.
WRITE_LOCK_KEY = 0x7670_7300_0000_0001
COMPACTION_LOCK_KEY = 0x7670_7300_0000_0002
# Taken inside the migration's transaction by indexer.storage.database.migrate.
MIGRATION_LOCK_KEY = 0x7670_7300_0000_0003


class HoldsEngine(Protocol):
    """What the locks need of a store: its engine."""

    engine: Engine


@contextmanager
def write_lock(data_dir: Path, store: HoldsEngine) -> Iterator[None]:
    """Exclusive, across threads and processes (<data_dir>/.write.lock) and, on PostgreSQL, across machines."""
    with _file_lock(data_dir / ".write.lock", wait=True), advisory_lock(store.engine, WRITE_LOCK_KEY, wait=True):
        yield


@contextmanager
def compaction_lock(data_dir: Path, store: HoldsEngine, *, wait: bool) -> Iterator[bool]:
    """One compaction at a time per data folder, and per database on PostgreSQL: yields True when this caller
    holds the lock, False when another compaction is running and wait is False."""
    with _file_lock(data_dir / ".compact.lock", wait=wait) as held_here:
        if not held_here:
            yield False
            return
        with advisory_lock(store.engine, COMPACTION_LOCK_KEY, wait=wait) as held:
            yield held


def compaction_running(data_dir: Path, store: HoldsEngine) -> bool:
    """Whether a compaction holds its lock now (this machine's, or on PostgreSQL any machine's)."""
    with compaction_lock(data_dir, store, wait=False) as held:
        return not held


@contextmanager
def advisory_lock(engine: Engine, key: int, *, wait: bool) -> Iterator[bool]:
    """PostgreSQL: hold the session-level advisory lock `key` while inside, on a connection of its own (so
    every machine that uses this database takes turns); yields False at once when another session holds it
    and wait is False. SQLite: yields True, its file lock is the whole lock. Taken after the file lock, by the
    locks above."""
    if engine.dialect.name != "postgresql":
        yield True
        return
    key_value = literal(key, BigInteger)
    with engine.connect() as connection:
        # No transaction stays open while the lock is held: a session lock outlives transactions.
        connection.execution_options(isolation_level="AUTOCOMMIT")
        if wait:
            connection.execute(select(func.pg_advisory_lock(key_value)))
        elif not connection.scalar(select(func.pg_try_advisory_lock(key_value))):
            yield False
            return
        try:
            yield True
        finally:
            try:
                connection.execute(select(func.pg_advisory_unlock(key_value)))
            except SQLAlchemyError:
                connection.invalidate()  # closing the session releases its locks


@contextmanager
def _file_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive flock on path; yields False at once when it is held elsewhere and wait is False."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)
