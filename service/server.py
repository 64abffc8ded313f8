"""The production HTTP server: Granian (HTTP in Rust) running the Flask app in worker processes behind
service.front (bodies read against a deadline), set up from config.toml. `make serve` and `python -m service`
start it; the bench, the soak and the tests start it too."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

# Before any worker loads numpy's OpenBLAS: its worker threads spin after every matrix-vector product (the exact
# scans of the live index), taking the cores the request threads' interpreters need. Requests already run in
# parallel. Set here, in the process the workers start from (which never loads numpy itself), so each of them
# sees it before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from indexer.config import Settings  # light: no numpy
from service.front import Front

APP = "service:create_app"
# The folder of every worker's metric files, when the operator chose none; tests find it by this prefix.
METRICS_DIR_PREFIX = "visual-search-metrics-"
# How long a stopping server waits for the requests in flight before it kills a worker.
STOP_TIMEOUT_S = 30
# How long a worker replaced on purpose (a reload) overlaps the one it replaces; one that died is replaced after
# service.supervision's back-off instead.
RESPAWN_INTERVAL_S = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@contextmanager
def metrics_folder() -> Iterator[Path]:
    """PROMETHEUS_MULTIPROC_DIR for the workers, so /metrics sums every worker's counts: the operator's folder,
    or a fresh one per server (counts start at zero), removed when the server stops."""
    if chosen := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield Path(chosen)
        return
    folder = Path(tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # before the workers start, so they all inherit it
    try:
        yield folder
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(folder, ignore_errors=True)


def serve(settings: Settings, *, port: int | None = None, access_log: bool = True) -> None:
    """Serve the app on settings.host:port (default settings.port) until SIGINT or SIGTERM: service.workers
    processes, each answering requests on service.threads threads while Granian reads and writes the sockets."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    from service.supervision import SupervisedGranian

    server = SupervisedGranian(
        APP,
        factory=True,  # each worker builds its own app (its interpreters, its store connections)
        # Granian's native async interface: service.front reads each body with a deadline in the worker's event
        # loop, then runs the Flask app on its own request threads (Granian's WSGI body reads never time out).
        interface=Interfaces.RSGI,
        address=settings.host,
        port=port or settings.port,
        workers=settings.server_workers,
        # HTTP/1.1 with keep-alive, as storefronts and proxies speak it; no HTTP/2 or WebSockets to expose. Headers
        # that have not all arrived within read_timeout_s close the connection (an idle keep-alive one too).
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=round(settings.read_timeout_s * 1000)),
        websockets=False,
        log_access=access_log,
        respawn_failed_workers=True,
        respawn_interval=RESPAWN_INTERVAL_S,
        workers_kill_timeout=STOP_TIMEOUT_S,
    )
    with metrics_folder():
        # The workers are forked from this process: each learns its pid, to notice if it is already gone.
        server.serve(target_loader=partial(_worker_app, main_pid=os.getpid()))


def _worker_app(target: str, *, main_pid: int) -> Front:
    """Granian's loader of `target` (APP), run in each worker as it starts: the Flask app behind its front."""
    # Until Granian installs the worker's graceful handlers (after this), a stop must end the worker: the handlers
    # inherited from the main process only set a flag there, and the server would wait out STOP_TIMEOUT_S for it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _stop_with_main_process(main_pid)
    from service import create_app
    from service.batch import BATCH_PATH

    app = create_app()
    settings = app.extensions["catalog_search"].settings
    return Front(
        app,
        threads=settings.server_threads,
        read_timeout_s=settings.read_timeout_s,
        max_body_bytes=settings.max_upload_bytes,
        larger_bodies={BATCH_PATH: settings.max_batch_bytes},  # a batch of photos: its own documented cap
    )


def _stop_with_main_process(main_pid: int) -> None:
    """Ask the kernel for a SIGTERM (a graceful stop) when the server's main process dies: Granian's workers do
    not watch it, and a main process killed outright would leave them answering on the port, unmanaged."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != main_pid:  # it died before the request above
        os.kill(os.getpid(), signal.SIGTERM)
