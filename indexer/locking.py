"""Locks per data folder: one writer at a time (the indexer's commits and the write API's changes take
the same lock, so change numbers follow commit order), and one compaction at a time."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def write_lock(data_dir: Path) -> Iterator[None]:
    """An exclusive advisory lock on <data_dir>/.write.lock, across threads and processes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(data_dir / ".write.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by the kernel if the holder dies
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


@contextmanager
def compaction_lock(data_dir: Path, *, wait: bool) -> Iterator[bool]:
    """One compaction at a time per data folder: yields True when this caller holds the lock, False when
    another compaction is running and wait is False."""
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(data_dir / ".compact.lock", os.O_RDWR | os.O_CREAT, 0o644)
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


def compaction_running(data_dir: Path) -> bool:
    with compaction_lock(data_dir, wait=False) as held:
        return not held
