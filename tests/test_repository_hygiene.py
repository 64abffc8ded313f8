"""What every tracked file owes a reader: no folder of the machine that wrote it, no account of how the work was
organised, and a README whose quick start comes first."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()

# A path of one machine: a checkout or shared folder under /work, a temporary folder's entry, a home folder, on
# Linux, macOS or Windows. Each must start a path (not continue a URL or another path), so that system paths a
# program really uses (/usr/lib/postgresql, /usr/bin/chromium, /proc, /dev/null, /etc, /srv/... in examples) and
# URLs pass; a bare "/tmp" (a place for short socket paths) passes too.
MACHINE_PATH = re.compile(
    r"(?<![\w.~/\\-])("
    r"/work/"
    r"|/tmp/[\w.-]"
    r"|/(?:private/)?var/folders/"
    r"|/home/[\w.-]+"
    r"|/root/"
    r"|/Users/[\w.-]+"
    r"|[A-Za-z]:\\{1,2}Users\\{1,2}"
    r")"
)
# The project speaks of the product: not of the numbered periods, tickets or issues it was made in.
NARRATION = re.compile(r"\bsessions?[ -]\d+|\bwork periods?\b|\b(?:issue|ticket)s? #?\d+", re.IGNORECASE)

README_MAX_LINES = 350
QUICK_START_LINES = 40


def tracked_text_files() -> list[tuple[str, list[str]]]:
    """(path, lines) of every file git tracks that reads as UTF-8 text; binaries (photos, weights) are left out."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed, so the tracked files cannot be listed")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=False)
    assert listing.returncode == 0, f"git ls-files failed in {REPO.name}: {listing.stderr.decode(errors='replace')}"
    files = []
    for name in listing.stdout.decode().split("\0"):
        path = REPO / name
        if not name or name == THIS_FILE or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            files.append((name, data.decode("utf-8").splitlines()))
        except UnicodeDecodeError:
            continue
    return files


def offending_lines(pattern: re.Pattern[str]) -> list[str]:
    return [
        f"{name}:{number}: {pattern.search(line).group(0)!r} in {line.strip()[:160]}"
        for name, lines in tracked_text_files()
        for number, line in enumerate(lines, start=1)
        if pattern.search(line)
    ]


def test_no_tracked_file_holds_a_path_of_the_machine_that_wrote_it():
    found = offending_lines(MACHINE_PATH)
    assert not found, (
        "absolute paths of one machine (write them relative to the repository or the catalog):\n" + "\n".join(found)
    )


def test_no_tracked_file_narrates_how_the_work_was_organised():
    found = offending_lines(NARRATION)
    assert not found, "numbered work periods or issues (date and commit say when; the text says what):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ("Indexed /work/shared/datasets/grocery-store: 3017 images", True),
        ('"output": "Indexed /tmp/bench-scale-zzm93zqy/rerun-catalog: 100000 images"', True),
        ("cp photos /home/alice/shop", True),
        ("see /root/.cache/pip", True),
        ("/Users/bob/Downloads/photo.jpg", True),
        (r"C:\Users\carol\photos", True),
        ("tempfile.mkdtemp(dir=None if short else '/tmp')", False),
        ("initdb from /usr/lib/postgresql/15/bin", False),
        ("Path('/proc/self/status'), /dev/null, /etc/passwd, /usr/bin/chromium", False),
        ("export DATA_DIR=/srv/search/data", False),
        ("https://example.com/work/photos and https://shop.example/home/page", False),
        ("../shared/datasets/grocery-store", False),
    ],
)
def test_the_machine_path_rule(line, flagged):
    assert bool(MACHINE_PATH.search(line)) is flagged


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        # Built from parts, so that this file holds no line the rule is about.
        ("Sess" + "ion 11 figures: the README table", True),
        ("the session-7 measurement", True),
        ("all four lines of issue 13 met", True),
        ("a numbered work period", True),
        ('@pytest.fixture(scope="session")', False),
        ("a session advisory lock in the database (pg_advisory_lock)", False),
        ("sessions set TCP keepalives", False),
    ],
)
def test_the_narration_rule(line, flagged):
    assert bool(NARRATION.search(line)) is flagged


def test_the_readme_is_short_and_starts_with_the_quick_start():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    opening = "\n".join(lines[:QUICK_START_LINES])
    for command in ("make demo", "make test"):
        assert command in opening, f"README.md's first {QUICK_START_LINES} lines do not show `{command}`"
