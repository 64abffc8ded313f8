"""The near-duplicate job on a served catalog: `python -m indexer duplicates` end to end, and the pairs its vectors
propose (indexer.index.duplicates) against an exact scan of every photo for a sample of photos."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from bench.scale import log
from bench.scale.commands import run_cli
from indexer.config import cpu_count, load_settings
from indexer.index.duplicates import MOST_PAIRS, LiveVectors, near_photo_pairs
from indexer.jobs.duplicates import live_photos
from indexer.storage.store import Store

# Photos whose pairs are checked against an exact scan of every photo.
SAMPLE = 200
# Photos per block of the exact scan.
EXACT_CHUNK = 65_536


def measure_duplicates(data_dir: Path, env: dict[str, str], out: Path, seed: int, timeout: float) -> dict:
    """The job's wall time as a user runs it (its report replaces the data folder's last one), then the recall of the
    pairs its vectors propose."""
    log(f"python -m indexer duplicates on {data_dir.name} ...")
    seconds, output = run_cli(["duplicates", "--quiet", "--out", str(out)], env, timeout=timeout)
    proposed = re.search(r"of ([\d,]+) photo pairs the vectors proposed", output)
    result: dict[str, object] = {
        "job_seconds": round(seconds, 1),
        "proposed_pairs": int(proposed.group(1).replace(",", "")) if proposed else None,
        "summary": output.strip().splitlines()[-2:] if output.strip() else [],
    }
    result["proposal"] = proposal_recall(data_dir, seed)
    return result


def proposal_recall(data_dir: Path, seed: int) -> dict[str, object]:
    """The proposed pairs (at the configured threshold) of SAMPLE photos against each one's exact nearest photos at
    the threshold or more (its MOST_PAIRS best, as the job keeps): its nearest one, all of them, those above 0.8 and
    0.9."""
    settings = load_settings(data_dir=data_dir)
    threshold = settings.duplicates_threshold
    with live_photos(settings, Store.open(settings)) as (live, photos):
        started = time.perf_counter()
        pairs = near_photo_pairs(live, photos.query_ids, photos.photo_of_id, threshold, threads=cpu_count())
        seconds = time.perf_counter() - started
        count = len(photos.query_ids)
        sample = np.sort(np.random.default_rng(seed).choice(count, size=min(SAMPLE, count), replace=False))
        best_scores, best_photos = _exact_best(live, photos.query_ids, sample, threshold)
    found = set((pairs.first.astype(np.int64) * count + pairs.second).tolist())
    # A near-copy is its photo's nearest: "nearest" is each sampled photo's nearest other photo, when at the threshold.
    nearest = np.zeros_like(best_scores, dtype=bool)
    nearest[np.arange(len(sample)), np.argmax(best_scores, axis=1)] = True
    rows = {"nearest": nearest & (best_scores >= threshold), "all": best_scores >= threshold,
            "above_0.8": best_scores >= 0.8, "above_0.9": best_scores >= 0.9}  # fmt: skip
    recall = {}
    for name, wanted in rows.items():
        at, column = np.nonzero(wanted)
        first = np.minimum(sample[at], best_photos[at, column])
        second = np.maximum(sample[at], best_photos[at, column])
        hits = sum(int(key) in found for key in first * count + second)
        recall[name] = {"pairs": len(at), "recall": round(hits / len(at), 4) if len(at) else None}
    return {"threshold": threshold, "photos": count, "seconds": round(seconds, 1), "pairs": len(pairs),
            "sample": len(sample), "recall": recall}  # fmt: skip


def _exact_best(
    live: LiveVectors, query_ids: np.ndarray, sample: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, photo positions) of each sampled photo's MOST_PAIRS nearest other photos, by an exact scan of all;
    scores below the threshold are -inf."""
    queries = live.vectors_of(query_ids[sample])[1]
    best_scores = np.full((len(sample), MOST_PAIRS), -np.inf, dtype=np.float32)
    best_photos = np.full((len(sample), MOST_PAIRS), -1, dtype=np.int64)
    for start in range(0, len(query_ids), EXACT_CHUNK):
        scores = queries @ live.vectors_of(query_ids[start : start + EXACT_CHUNK])[1].T
        positions = np.arange(start, start + scores.shape[1])
        scores[positions[None, :] == sample[:, None]] = -np.inf  # never a photo with itself
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_photos = np.concatenate([best_photos, np.broadcast_to(positions, scores.shape)], axis=1)
        top = np.argpartition(-merged_scores, MOST_PAIRS - 1, axis=1)[:, :MOST_PAIRS]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_photos = np.take_along_axis(merged_photos, top, axis=1)
    best_scores[best_scores < threshold] = -np.inf
    return best_scores, best_photos
