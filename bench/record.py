"""What a result file records besides its figures: when, from which commit and on what machine it ran, and paths
that mean the same on any checkout (relative to the repository; the run's temporary working folder as <work-dir>),
never this machine's."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from indexer.config import REPO_ROOT, cpu_count

WORK_DIR = "<work-dir>"


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpus": cpu_count(), "processor": model, "python": platform.python_version()}


def commit() -> str | None:
    """The checkout's commit (short), with "+changes" when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                 capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    if head.returncode != 0:
        return None
    # The result files a run rewrites are tracked: they are no change to the code measured.
    code_changes = [line for line in changed.stdout.splitlines() if not line.endswith((".json", ".png"))]
    return head.stdout.strip() + ("+changes" if code_changes else "")


def provenance() -> dict:
    """The first keys of every result file: when it ran, the commit it measured, and the machine."""
    return {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit(), "machine": machine()}


def relative(path: Path | str) -> str:
    """A path as a result file stores it: relative to the repository (a catalog beside it: ../shared/...)."""
    return os.path.relpath(os.path.abspath(path), REPO_ROOT)


def portable(value: object, work: Path | None = None, folders: tuple[Path | str | None, ...] = ()) -> object:
    """value (a string, or the dicts and lists of a result holding strings) with the absolute paths of the
    work folder written as <work-dir>, and those of the folders given and of the repository relative to the
    repository: the catalog and data folders that the indexer's summaries and error messages name."""
    replacements: dict[str, str] = {}
    for folder in (*folders, REPO_ROOT):
        if folder is not None:
            inside = relative(folder)
            for spelling in {os.path.abspath(folder), os.path.realpath(folder)}:
                replacements[spelling + os.sep] = "" if inside == "." else inside + os.sep
                replacements[spelling] = inside
    if work is not None:
        for spelling in {os.path.abspath(work), os.path.realpath(work)}:
            replacements[spelling] = WORK_DIR
    # The longest first: a folder inside another is named by its own replacement, not its parent's.
    ordered = sorted(replacements.items(), key=lambda item: len(item[0]), reverse=True)
    return _replace(value, ordered)


def _replace(value: object, ordered: list[tuple[str, str]]) -> object:
    if isinstance(value, str):
        for absolute, replacement in ordered:
            value = value.replace(absolute, replacement)
        return value
    if isinstance(value, dict):
        return {key: _replace(item, ordered) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_replace(item, ordered) for item in value]
    return value


def emit(results: dict, out: str | None) -> None:
    """A standalone bench step's figures: printed as JSON, and written to `out` too when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        Path(out).write_text(text)
