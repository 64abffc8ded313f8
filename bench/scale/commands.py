"""`python -m indexer ...` as a separate process, and what its output and its data folder say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from indexer.config import REPO_ROOT


def run_cli(arguments: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    """`python -m indexer ...` as a separate process; its seconds and output, or RuntimeError."""
    command = [sys.executable, "-m", "indexer", *arguments]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(command[2:])}` ran over {timeout:.0f} s") from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command[2:])}` failed ({done.returncode}):\n{done.stderr[-4000:]}{done.stdout[-1000:]}"
        )
    return seconds, (done.stdout + done.stderr).strip()


def peak_memory_mb(output: str) -> float | None:
    """The 'peak memory N MB' that the indexer's summaries report, if this one does."""
    found = re.search(r"peak memory ([\d.]+) ?MB", output)
    return float(found.group(1)) if found else None


def embedded_count(output: str) -> int | None:
    """How many photos an `index` run says it embedded."""
    found = re.search(r"embedded (\d+)", output)
    return int(found.group(1)) if found else None


def has_import_vectors() -> bool:
    done = subprocess.run([sys.executable, "-m", "indexer", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    return "import-vectors" in done.stdout


def disk_usage(folder: Path) -> dict[str, object]:
    """Bytes allocated on disk (as du counts them) under folder, in all and per top-level entry."""
    entries: dict[str, int] = {}
    for root, _, files in os.walk(folder):
        top = Path(root).relative_to(folder).parts
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # an old index version removed while walking
                continue
            key = top[0] if top else name
            entries[key] = entries.get(key, 0) + size
    database = sum(size for name, size in entries.items() if name.startswith("catalog.sqlite3"))
    return {
        "total_bytes": sum(entries.values()),
        "index_bytes": entries.get("index", 0),
        "database_bytes": database,
        "entries": dict(sorted(entries.items())),
    }
