"""Worker processes that die are replaced, however often: Granian's server without its crash-loop exit, pacing
the replacements of a worker that keeps dying with a back-off while the others go on serving.

Granian replaces a dead worker, but exits altogether (stopping the healthy ones) when a worker it replaced less
than a few seconds ago dies again. A worker killed by the kernel for memory, or by a crash in a native decoder, can
die that often under one bad load; the service should then serve on with fewer workers, not stop.
"""

from __future__ import annotations

import logging
import signal
import time
from collections import deque

from granian import Granian

log = logging.getLogger("service.supervision")

# The first replacement of a worker waits this long; each further death of it within DEATHS_WINDOW_S doubles the
# wait, up to MAX_BACKOFF_S: a worker that dies at once on start (a bad deployment) is retried without spinning.
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 16.0
DEATHS_WINDOW_S = 60.0
# How often a back-off looks whether the server is being stopped.
STOP_POLL_S = 0.1


def backoff_s(deaths_in_window: int) -> float:
    """How long to wait before replacing a worker that died for the n-th time within DEATHS_WINDOW_S."""
    return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, deaths_in_window - 1))


def cause_of(exitcode: int | None) -> str:
    """How a worker process ended, as a metric label: the signal's name, or "exit"."""
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return "exit"


class SupervisedGranian(Granian):
    """Granian's server whose dead workers are replaced, each after its back-off, and which never exits because
    workers died. Each death is logged and counted (visual_search_worker_deaths_total, in /metrics)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deaths: dict[int, deque[float]] = {}
        self._death_counter = None

    def _respawn_workers(self, workers, spawn_target, target_loader, delay: float = 0):
        dead = [idx for idx in workers if not self.wrks[idx].is_alive()]
        if dead:
            self._wait_out_backoff(dead)
            if self.interrupt_signal:  # stopping: replace nothing
                return
        super()._respawn_workers(workers, spawn_target, target_loader, delay=delay)
        for idx in dead:
            # Granian's main loop exits when a worker replaced moments ago dies again; the back-off paces it instead.
            self.respawned_wrks.pop(idx, None)

    def _wait_out_backoff(self, dead: list[int]) -> None:
        now = time.monotonic()
        wait = 0.0
        for idx in dead:
            deaths = self._deaths.setdefault(idx, deque())
            deaths.append(now)
            while deaths and now - deaths[0] > DEATHS_WINDOW_S:
                deaths.popleft()
            cause = cause_of(self.wrks[idx].inner.exitcode)
            self._count(cause)
            wait = max(wait, backoff_s(len(deaths)))
            log.error(
                "worker-%d died (%s), %d time(s) in the last %.0f s; replacing it in %.1f s while the other workers "
                "serve", idx + 1, cause, len(deaths), DEATHS_WINDOW_S, backoff_s(len(deaths)),
            )  # fmt: skip
        until = now + wait
        while not self.interrupt_signal and (left := until - time.monotonic()) > 0:
            time.sleep(min(STOP_POLL_S, left))

    def _count(self, cause: str) -> None:
        """One more death in /metrics: the workers' scrape sums this process's file in PROMETHEUS_MULTIPROC_DIR."""
        if self._death_counter is None:
            # Imported here, once the metrics folder is set: prometheus_client reads it when it is imported.
            from prometheus_client import Counter

            self._death_counter = Counter(
                "visual_search_worker_deaths_total",
                "Server worker processes that died and were replaced, by cause (the signal that ended them, or exit).",
                ["cause"],
            )
        self._death_counter.labels(cause=cause).inc()
