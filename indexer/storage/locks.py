"""Locks: one writer at a time (the indexer's commits and the write API's changes take the same lock, so
change numbers follow commit order), and one compaction at a time.

Each lock is two locks, taken in this order: a file lock in the data folder, which serialises the threads and
processes of this machine, then, when the database is PostgreSQL, a session-level advisory lock in the
database, which serialises every machine that writes to it. SQLite is one machine's file, so its file lock
is the whole lock. Both are released by the kernel or the server when their holder dies.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from indexer.storage.store import Store

# PostgreSQL advisory lock keys (64-bit, per database): "vps" and a number, so that they are unlikely to
# meet another application's keys in a shared database.
WRITE_LOCK_KEY = 0x7670_7300_0000_0001
COMPACTION_LOCK_KEY = 0x7670_7300_0000_0002
# Taken inside the migration's transaction by indexer.storage.schema.migrate.
MIGRATION_LOCK_KEY = 0x7670_7300_0000_0003


@contextmanager
def write_lock(data_dir: Path, store: Store) -> Iterator[None]:
    """Exclusive, across threads and processes (<data_dir>/.write.lock) and, on PostgreSQL, across machines."""
    with _file_lock(data_dir / ".write.lock", wait=True), store.advisory_lock(WRITE_LOCK_KEY, wait=True):
        yield


@contextmanager
def compaction_lock(data_dir: Path, store: Store, *, wait: bool) -> Iterator[bool]:
    """One compaction at a time per data folder, and per database on PostgreSQL: yields True when this caller
    holds the lock, False when another compaction is running and wait is False."""
    with _file_lock(data_dir / ".compact.lock", wait=wait) as held_here:
        if not held_here:
            yield False
            return
        with store.advisory_lock(COMPACTION_LOCK_KEY, wait=wait) as held:
            yield held


def compaction_running(data_dir: Path, store: Store) -> bool:
    with compaction_lock(data_dir, store, wait=False) as held:
        return not held


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
