"""What each way of searching a filtered base costs, measured on the base itself when a server loads it.

A few timed probes on the base's own vectors and ANN structure (Costs.measure, a few tens of milliseconds at a
million vectors) give the constants that live_index.plan() compares: measured where the server runs, since the
balance between reading scattered rows, scanning a block and probing FAISS lists depends on the machine's memory,
cache and SIMD, and on this base's dimension and factory. Each probe keeps the fastest of a few repeats, so a
busy moment of the machine does not skew the constants.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.index.ann import EF_SEARCH_CAP, _core, _is_hnsw, _is_ivf, candidates

REPEATS = 5
# Rows in the scan and gather probes, and ids in the selector probe's bitmap (as a share of the base).
PROBE_ROWS = 4096
PROBE_SHARE = 0.01
# The selector probe widens the tuned setting this much (or to every list).
SKIP_PROBE_WIDEN = 64.0
# The most candidates an over-fetching search asks FAISS for (count / share): beyond that its result heap and the
# filtering afterwards cost more than a selector would.
OVERFETCH_MAX = 4096
# Over-fetching asks for this many times the candidates the share of matching rows should yield, so that enough
# of them pass even when the matching rows are unevenly spread over the probed lists.
OVERFETCH_MARGIN = 1.5


@dataclass(frozen=True)
class Costs:
    """Seconds per unit of each way of searching, for one base.

    scan_row: one row of a contiguous block scored. gather_row: one scattered row read and scored.
    ann_fixed + ann_effort x effort: one ANN search, effort being the widening of nprobe (IVF) or efSearch (HNSW)
    over the tuned setting, up to widen_cap. skip_ratio: what a vector that a selector rejects costs inside the
    probed lists, as a share of one that is scored (a bitmap test instead of a distance). bitmap_row: making a
    selector's bitmap, per row of the base (paid when it is not cached)."""

    rows: int
    scan_row: float
    gather_row: float
    ann_fixed: float = 0.0
    ann_effort: float = 0.0
    widen_cap: float = 1.0
    skip_ratio: float = 1.0
    bitmap_row: float = 0.0
    rerank: int = 0
    has_ann: bool = False

    @classmethod
    def measure(cls, vectors: np.ndarray, ids: np.ndarray, ann: faiss.Index | None, tuning) -> Costs:
        """The constants of this base, from timed probes on its vectors (and ANN structure, when it has one)."""
        rows = len(vectors)
        if rows == 0:
            return cls(rows=0, scan_row=0.0, gather_row=0.0)
        rng = np.random.default_rng(0)
        probe = min(rows, PROBE_ROWS)
        query = np.ascontiguousarray(vectors[int(rng.integers(rows))], dtype=np.float32)
        start = int(rng.integers(rows - probe + 1))
        scattered = np.sort(rng.choice(rows, size=probe, replace=False))
        scan_row = _fastest(lambda: np.asarray(vectors[start : start + probe]) @ query) / probe
        gather_row = _fastest(lambda: vectors[scattered] @ query) / probe
        if ann is None:
            return cls(rows=rows, scan_row=scan_row, gather_row=gather_row)
        cap = widen_cap(ann, tuning)
        wide = min(4.0, cap)
        narrow_s = _fastest(lambda: candidates(ann, tuning, query, 10))
        wide_s = _fastest(lambda: candidates(ann, tuning, query, 10, widen=wide))
        effort = (wide_s - narrow_s) / (wide - 1) if wide > 1 else narrow_s
        fixed = max(0.0, narrow_s - effort)
        effort = max(effort, 1e-9)
        members = ids[rng.choice(rows, size=max(1, int(rows * PROBE_SHARE)), replace=False)]
        half = ids[rng.choice(rows, size=max(1, rows // 2), replace=False)]
        size = int(ids.max()) + 1
        bitmap_s = _fastest(lambda: bitmap(half, size))
        packed = bitmap(members, size)
        selector = faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))
        # wide enough that the vectors the selector rejects outweigh the fixed part (at 4 lists they do not)
        widest = min(SKIP_PROBE_WIDEN, cap)
        selected_s = _fastest(lambda: candidates(ann, tuning, query, 10, selector=selector, widen=widest))
        # selected = fixed + effort x widest x (share + (1 - share) x skip)
        scored = (selected_s - fixed) / (effort * widest)
        skip = min(1.0, max(0.0, (scored - PROBE_SHARE) / (1 - PROBE_SHARE)))
        return cls(rows=rows, scan_row=scan_row, gather_row=gather_row, ann_fixed=fixed, ann_effort=effort,
                   widen_cap=cap, skip_ratio=skip, bitmap_row=bitmap_s / rows,
                   rerank=tuning.rerank, has_ann=True)  # fmt: skip

    # --- what each plan costs ----------------------------------------------------------------------

    def scan(self, span: int) -> float:
        return self.scan_row * span

    def gather(self, matches: int) -> float:
        return self.gather_row * matches

    def widen(self, share: float) -> float:
        """How much a search restricted to this share of the base widens nprobe/efSearch: as many matching
        vectors are then visited as an unfiltered search visits vectors, which keeps recall."""
        return min(1.0 / max(share, 1e-12), self.widen_cap)

    def selector(self, share: float, cached: bool) -> float:
        """The ANN structure with a bitmap of the matching ids: the widened probes score only the matching
        vectors and test the others against the bitmap."""
        effort = self.ann_effort * self.widen(share) * (share + (1 - share) * self.skip_ratio)
        return self._ann(effort) + (0.0 if cached else self.bitmap_row * self.rows)

    def overfetch_count(self, count: int, share: float) -> int:
        return math.ceil(count * OVERFETCH_MARGIN / max(share, 1e-12))

    def overfetch(self, count: int, share: float) -> float | None:
        """The unfiltered ANN search, widened the same way, asked for count / share candidates that are filtered
        afterwards; None when that is more candidates than OVERFETCH_MAX."""
        if self.overfetch_count(count, share) > OVERFETCH_MAX:
            return None
        return self._ann(self.ann_effort * self.widen(share))

    def _ann(self, effort: float) -> float:
        """One ANN search: its fixed part, the probes, and the exact re-ranking of its candidates."""
        return self.ann_fixed + effort + self.gather_row * self.rerank

    def as_dict(self) -> dict:
        """For /readyz: microseconds, readable."""
        return {
            "scan_row_us": round(self.scan_row * 1e6, 4),
            "gather_row_us": round(self.gather_row * 1e6, 4),
            "ann_fixed_us": round(self.ann_fixed * 1e6, 1),
            "ann_effort_us": round(self.ann_effort * 1e6, 1),
            "widen_cap": round(self.widen_cap, 2),
            "skip_ratio": round(self.skip_ratio, 4),
            "bitmap_row_us": round(self.bitmap_row * 1e6, 5),
        }


def widen_cap(ann: faiss.Index, tuning) -> float:
    """The most a filtered search can widen this structure's tuned setting: to every IVF list, or to efSearch
    EF_SEARCH_CAP."""
    core = _core(ann)
    if _is_ivf(core):
        return core.nlist / max(1, tuning.nprobe or core.nprobe)
    if _is_hnsw(core):
        ef = tuning.ef_search or core.hnsw.efSearch
        return max(1.0, EF_SEARCH_CAP / max(1, ef))
    return 1.0


def bitmap(members: np.ndarray, size: int) -> np.ndarray:
    """A FAISS IDSelectorBitmap's bytes: bit i set for each image id i among members (ids below size)."""
    bits = np.zeros(size, dtype=bool)
    bits[members] = True
    return np.packbits(bits, bitorder="little")


def _fastest(probe: Callable[[], object]) -> float:
    """Seconds of the fastest of REPEATS runs (after one untimed run that warms caches and pages)."""
    probe()
    best = math.inf
    for _ in range(REPEATS):
        started = time.perf_counter()
        probe()
        best = min(best, time.perf_counter() - started)
    return best
