"""gunicorn settings for `make serve`, taken from config.toml (PORT overrides the port)."""

import os
import shutil
import tempfile
from pathlib import Path

# Before numpy loads OpenBLAS: its worker threads spin after every matrix-vector product (the exact scans of
# the live index), taking the cores the request threads' interpreters need. Requests already run in parallel.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from indexer.config import load_settings

_settings = load_settings()
bind = f"{_settings.host}:{os.environ.get('PORT') or _settings.port}"
workers = _settings.server_workers  # 0: one per core
threads = _settings.server_threads
# The first request of a worker may wait for the model to load.
timeout = 120
accesslog = "-"

# /metrics sums every worker's counts through files in one folder (prometheus_client's multiprocess mode). Set
# here, before the workers fork and import prometheus_client; a fresh folder per server, so counts start at zero.
METRICS_DIR_PREFIX = "visual-search-metrics-"
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)


def child_exit(server, worker) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # drops its live gauges; its counts stay in the sums


def on_exit(server) -> None:
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if folder.name.startswith(METRICS_DIR_PREFIX):  # the one made above, not a folder chosen by the operator
        shutil.rmtree(folder, ignore_errors=True)
