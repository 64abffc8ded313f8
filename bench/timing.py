"""Latency figures, and the time from a write until the server shows it: shared by `make bench-scale` and the
two-server soak."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from tqdm import tqdm

# How often, and for how long at most, a write is checked for until it shows.
POLL_S, VISIBLE_LIMIT_S = 0.02, 10.0


@contextmanager
def phase(phases: dict[str, float], name: str) -> Iterator[None]:
    """Times the block, in seconds, into phases[name]."""
    started = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - started, 1)


def stats(values_ms: list[float]) -> dict[str, float | int | None]:
    if not values_ms:
        return {"count": 0, "p50_ms": None, "p95_ms": None}
    return {
        "count": len(values_ms),
        "p50_ms": round(float(np.percentile(values_ms, 50)), 2),
        "p95_ms": round(float(np.percentile(values_ms, 95)), 2),
    }


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b rounded, None when either is unknown (or b is 0)."""
    return round(a / b, digits) if a is not None and b else None


def wait_until(check: Callable[[], bool], started: float) -> tuple[float | None, int]:
    """Polls check() every POLL_S until it holds or VISIBLE_LIMIT_S has passed since started;
    milliseconds from started until it held (None if never) and the number of checks."""
    checks = 0
    while True:
        checks += 1
        if check():
            return (time.perf_counter() - started) * 1000, checks
        if time.perf_counter() - started > VISIBLE_LIMIT_S:
            return None, checks
        time.sleep(POLL_S)


def until_seen(label: str, items: list, send: Callable, seen: Callable, missing_key: str) -> dict:
    """For each item: send the write, then time from sending it until seen(item) holds (or give up)."""
    visible_ms, request_ms, checks, errors, missing = [], [], [], [], []
    for item in tqdm(items, desc=label, leave=False):
        started = time.perf_counter()
        status, data, took_ms = send(item)
        if status not in (200, 201):
            errors.append(f"{status}: {str(data)[:200]}")
            continue
        request_ms.append(took_ms)
        ms, count = wait_until(lambda item=item: seen(item), started)
        checks.append(count)
        if ms is None:
            missing.append(item)
        else:
            visible_ms.append(ms)
    return {
        **stats(visible_ms),
        "request": stats(request_ms),
        missing_key: len(missing),
        # what was written (an item's fields but its photo), to look for in the logs and the database
        "missing_examples": [[f for f in item if not isinstance(f, bytes)] for item in missing[:5]],
        "errors": len(errors),
        "error_examples": errors[:3],
        "first_check_saw_it": sum(c == 1 for c in checks),
    }
