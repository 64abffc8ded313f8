"""`make soak BACKUP=1`: a backup taken during the soak (searches, API writes, a re-index and a compaction under
way), and another once it is quiet, each verified and restored into an empty folder behind a server of its own.

The quiet one must answer exactly as the source does: every product's /similar top 10 and 30 photo searches.
The one taken under load restores the source's state at its change number, which the source no longer serves by
the end; it is judged against that state itself, read from the snapshot's database: the restored server is at
that change number, shows only products live in it, and finds their nearest neighbours (recall@10 against an exact
scan of every vector in it, for a sample of products) as well as the quiet snapshot's server finds its own.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from bench.soak_load import indexer_command
from bench.synthetic import sku_of
from tests.support.http import result_skus
from tests.support.server import running_server

# Products whose /similar is judged against a snapshot's own database (an exact scan of its vectors each): every
# real and API-written one, and this many synthetic ones. The quiet snapshot's answers are compared with the
# source's for every product.
SYNTHETIC_SAMPLE = 2000
PHOTO_SEARCHES = 30
# How much lower the recall@10 of the snapshot taken under load may be than the quiet one's, each against an exact
# scan of its own database's vectors (the two states differ by the writes in between).
RECALL_MARGIN = 0.02


def backup_after(seconds: float, env: dict, folder: Path, events: dict) -> Callable[[], None]:
    """A soak worker: `indexer backup --to folder` once `seconds` have passed, its start and end in events."""

    def run() -> None:
        time.sleep(seconds)
        started = time.monotonic()
        try:
            indexer_command(["backup", "--to", str(folder), "--quiet"], env)
        except RuntimeError as exc:
            events["backup_error"] = str(exc)
        events["backed_up"] = (started, time.monotonic())

    return run


def check_backups(url: str, env: dict, tmp: Path, during: Path, events: dict, photos: list[bytes],
                  real: list[str], synthetic: int) -> dict:  # fmt: skip
    """The backup taken under load and one taken now, each verified, restored and judged (the module's rules):
    `real` the real and API-written skus, `synthetic` how many synthetic products (syn-0000000, ...) there are."""
    quiet = tmp / "backup-quiet"
    report: dict = {"during": {"error": events.get("backup_error")}, "quiet": {}}
    if events.get("backup_error"):
        return {**report, "passed": False}
    started, ended = events["backed_up"]
    report["during"].update(
        seconds=round(ended - started, 1),
        compaction_overlapped=_overlapped(events.get("compaction_span"), (started, ended)),
        reindex_overlapped=_overlapped(events.get("reindex_span"), (started, ended)),
    )
    indexer_command(["backup", "--to", str(quiet), "--quiet"], env)
    skus = _sample(real, synthetic)
    every = real + [sku_of(row) for row in range(synthetic)]
    searches = photos[:: max(1, len(photos) // PHOTO_SEARCHES)][:PHOTO_SEARCHES]
    expected = _answers(url, every, searches)
    for name, snapshot in (("during", during), ("quiet", quiet)):
        entry = report[name]
        entry["verified"] = _succeeds(["backup", "--verify", str(snapshot), "--quiet"], env)
        entry["change"] = json.loads((snapshot / "snapshot.json").read_text())["change"]
        restored = {**env, "DATA_DIR": str(tmp / f"restored-{name}")}
        entry["restored"] = _succeeds(["restore", "--from", str(snapshot), "--quiet"], restored)
        with running_server(restored, timeout=600) as server:
            entry["restored_change"] = requests.get(f"{server.url}/readyz", timeout=60).json()["change"]
            if name == "quiet":
                got = _answers(server.url, every, searches)
                entry["answers_compared"] = len(got)
                entry["different"] = sorted(key for key in expected if got.get(key) != expected[key])[:20]
            entry.update(_against_snapshot(server.url, Path(restored["DATA_DIR"]) / "catalog.sqlite3", skus))
    during, quiet = report["during"], report["quiet"]
    report["passed"] = bool(
        all(
            entry["verified"] and entry["restored"] and entry["restored_change"] == entry["change"]
            and entry["not_live"] == entry["unanswered"] == 0
            for entry in (during, quiet)
        )
        # a snapshot whose base and database disagreed would find fewer of its own vectors' neighbours
        and during["recall_at_10"] >= quiet["recall_at_10"] - RECALL_MARGIN
        and not quiet["different"]
    )  # fmt: skip
    return report


def _overlapped(span: tuple[float, float] | None, backup: tuple[float, float]) -> bool:
    return span is not None and span[0] < backup[1] and backup[0] < span[1]


def _succeeds(arguments: list[str], env: dict) -> bool:
    try:
        indexer_command(arguments, env)
    except RuntimeError:
        return False
    return True


def _sample(real: list[str], synthetic: int) -> list[str]:
    """The real and API-written skus, and SYNTHETIC_SAMPLE of the synthetic ones."""
    picked = np.random.default_rng(28).choice(synthetic, size=min(SYNTHETIC_SAMPLE, synthetic), replace=False)
    return real + [sku_of(int(row)) for row in picked]


def _answers(url: str, skus: list[str], photos: list[bytes]) -> dict[str, list[str] | int]:
    """Each sku's /similar top 10 (or its status when not 200) and each photo search's top 10, four at a time."""

    def similar(sku: str) -> tuple[str, list[str] | int]:
        response = requests.get(f"{url}/api/products/{sku}/similar?k=10", timeout=60)
        return f"similar {sku}", result_skus(response.json()) if response.status_code == 200 else response.status_code

    def photo(number: int) -> tuple[str, list[str] | int]:
        response = requests.post(f"{url}/api/search?k=10", data=photos[number],
                                 headers={"Content-Type": "image/jpeg"}, timeout=60)  # fmt: skip
        return f"photo {number}", result_skus(response.json()) if response.status_code == 200 else response.status_code

    with ThreadPoolExecutor(4) as pool:
        return dict([*pool.map(similar, skus), *pool.map(photo, range(len(photos)))])


def _against_snapshot(url: str, database: Path, skus: list[str]) -> dict:
    """The restored server's /similar against the snapshot's own database: results live in it, and recall@10
    against an exact scan of its vectors."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT p.sku, i.embedding FROM images i JOIN products p ON p.id = i.product_id "
            "WHERE i.deleted_at IS NULL AND i.view = '' ORDER BY i.id"
        ).fetchall()
    live = np.array([sku for sku, _ in rows])
    vectors = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), -1)
    first = {}
    for position, sku in enumerate(live):
        first.setdefault(sku, position)
    live_set = set(first)
    answers = _answers(url, skus, [])
    recalls, not_live, missing = [], 0, 0
    asked = [sku for sku in skus if sku in live_set and isinstance(answers[f"similar {sku}"], list)]
    missing += sum(answers[f"similar {sku}"] != 404 for sku in skus if sku not in live_set)
    missing += sum(1 for sku in skus if sku in live_set and not isinstance(answers[f"similar {sku}"], list))
    for start in range(0, len(asked), 256):  # exact top 64 of a block of queries at a time
        block = asked[start : start + 256]
        scores = vectors[[first[sku] for sku in block]] @ vectors.T
        best = np.argpartition(-scores, 64, axis=1)[:, :64]
        for row, sku in enumerate(block):
            got = answers[f"similar {sku}"]
            not_live += sum(other not in live_set for other in got)
            order = best[row][np.argsort(-scores[row, best[row]], kind="stable")]
            exact = list(dict.fromkeys(s for s in live[order] if s != sku))[:10]
            recalls.append(len(set(got) & set(exact)) / max(1, len(exact)))
    return {
        "similar_compared": len(recalls),
        "not_live": not_live,
        "unanswered": missing,
        "recall_at_10": round(float(np.mean(recalls)), 4) if recalls else 0.0,
    }
