"""Searches keep working, and stay right, while the catalog is re-indexed and products are written."""

from __future__ import annotations

import json

from bench.soak import main as soak


def test_no_failed_or_wrong_search_across_an_index_swap_and_100_writes(grocery, tmp_path):
    out = tmp_path / "soak.json"
    status = soak(["--catalog", str(grocery), "--clients", "3", "--writes", "100", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["reindexed"] and report["writes"] == 100 and report["write_errors"] == 0
    assert report["searches"] > 100
    assert report["errors"] == 0, report
    assert report["wrong_results"] == 0, report["wrong_examples"]
    assert status == 0
