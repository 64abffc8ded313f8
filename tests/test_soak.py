"""Searches keep working, and stay right, while the catalog is re-indexed, products are written and the
base is compacted; and on two servers over one PostgreSQL database, every write through one is found on the other
while both are searched and the base is compacted. How fast is `make soak`'s to measure, not this test's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from indexer.config import REPO_ROOT
from tests.conftest import new_database

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop


def soak(arguments: list[str]) -> int:
    """`python -m bench.soak` as `make soak` runs it, in a process of its own; its exit status."""
    done = subprocess.run([sys.executable, "-m", "bench.soak", *arguments], cwd=REPO_ROOT, timeout=1800)
    return done.returncode


def test_no_failed_or_wrong_search_across_a_reindex_a_compaction_and_100_writes(grocery, tmp_path):
    out = tmp_path / "soak.json"
    status = soak(["--catalog", str(grocery), "--clients", "3", "--writes", "100", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["reindexed"] and report["writes"] == 100 and report["write_errors"] == 0
    assert report["compacted"], report["compaction_error"]
    assert report["searches"] > 100
    assert report["errors"] == 0, report
    assert report["wrong_results"] == 0, report["wrong_examples"]
    assert status == 0


@pytest.mark.postgresql
def test_two_servers_over_one_postgresql_database_show_each_others_writes(grocery, request, tmp_path):
    """`make soak SERVERS=2` at the size `make soak` runs it (600 products, 100 writes), on the suite's cluster."""
    out = tmp_path / "soak-two-servers.json"
    database_url = new_database(request, "postgresql")
    status = soak(["--servers", "2", "--catalog", str(grocery), "--writes", "100", "--database-url", database_url,
                   "--visible-within-ms", "60000", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["writes"] == 100 and report["write_errors"] == 0 and report["writer_error"] is None, report
    visible = report["visible_on_b"]
    assert visible["count"] == 100 and visible["not_visible_within_s"] == 0, visible
    assert report["searches_by_server"]["a"] > 50 and report["searches_by_server"]["b"] > 50
    assert report["errors"] == 0, report["error_statuses"]
    assert report["wrong_results"] == 0, report["wrong_examples"]
    assert report["compacted"], report["compaction_error"]
    assert report["base_after"] != report["base_before"] and report["after"]["both_on_compacted_base"], report["after"]
    assert report["after"]["disagreements"] == report["after"]["missing"] == report["after"]["resurrected"] == 0
    assert report["passed"] and status == 0
