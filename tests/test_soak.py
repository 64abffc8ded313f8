"""Searches keep working, and stay right, while the catalog is re-indexed, products are written and the
base is compacted."""

from __future__ import annotations

import json

import pytest

from bench.soak import main as soak

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop


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
