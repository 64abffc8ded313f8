"""One synthetic catalog end to end: imported with `indexer import-vectors` into an empty data folder, served,
and measured: /similar, photo searches, writes until visible, memory and disk; then the near-duplicate job."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.scale import KEY, K, log
from bench.scale.commands import disk_usage, peak_memory_mb, run_cli
from bench.scale.duplicates import measure_duplicates
from bench.scale.probes import delete_targets, measure_search, measure_similar, measure_visibility, mixed_writes
from bench.scale.products import Products, exact_neighbours
from bench.scale.sweep import measure_sweep
from bench.synthetic import SyntheticCatalog
from bench.timing import phase, ratio
from tests.support.http import Client
from tests.support.procfs import machine_steal, process_tree_memory_mb
from tests.support.server import running_server

# Products to delete are drawn from this many times as many candidates, for those that have a witness.
DELETE_POOL = 10


class MemorySampler(threading.Thread):
    """The server's resident memory every interval in the background; the peak and the samples."""

    def __init__(self, pid: int, interval: float = 0.1, limit_s: float = 3600):
        super().__init__(daemon=True)
        self.pid, self.interval, self.limit_s = pid, interval, limit_s
        self.stopped = threading.Event()
        self.peak_mb, self.samples = 0.0, 0

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped.is_set() and time.monotonic() - started < self.limit_s:
            try:
                self.peak_mb = max(self.peak_mb, process_tree_memory_mb(self.pid, proportional=False)["rss_mb"])
                self.samples += 1
            except (FileNotFoundError, ProcessLookupError, KeyError):
                pass  # a server worker replaced between listing and reading
            self.stopped.wait(self.interval)

    def stop(self) -> dict[str, float | int]:
        self.stopped.set()
        self.join(timeout=5)
        return {"peak_rss_mb": round(self.peak_mb, 1), "samples": self.samples}


def sample_size(args) -> int:
    """Products sampled from a catalog: 4 kinds of /similar, the deletes, and the mixed writes."""
    return 4 * args.requests + DELETE_POOL * args.writes + args.rss_writes


@dataclass(frozen=True)
class Samples:
    """Disjoint samples of a catalog's rows: the products asked about (per kind of /similar), the pool the
    deleted products are drawn from, and the products replaced and deleted in the mixed writes."""

    similar: dict[str, np.ndarray]
    delete_pool: np.ndarray
    mix_replace: list[int]
    mix_delete: list[int]

    def all(self) -> np.ndarray:
        return np.concatenate([*self.similar.values(), self.delete_pool, self.mix_replace, self.mix_delete])


def pick_samples(count: int, args) -> Samples:
    rng = np.random.default_rng([args.seed, count])
    picked = rng.choice(count, size=sample_size(args), replace=False)
    kinds = ("unfiltered", "category_own", "category_other", "price_range")
    similar = {kind: picked[n * args.requests : (n + 1) * args.requests] for n, kind in enumerate(kinds)}
    picked = picked[len(kinds) * args.requests :]
    delete_pool, picked = picked[: DELETE_POOL * args.writes], picked[DELETE_POOL * args.writes :]
    mix_replace, mix_delete = list(picked[: args.rss_writes // 3 + 1]), list(picked[args.rss_writes // 3 + 1 :])
    return Samples(similar, delete_pool, mix_replace, mix_delete)


def measure_catalog(catalog: SyntheticCatalog, work: Path, photos: list[bytes], embedder, args) -> dict:
    """Import a synthetic catalog into an empty data folder, start the server on it, and measure."""
    count = catalog.count
    data_dir = work / f"data-{count}"
    env = {**os.environ, "DATA_DIR": str(data_dir), "API_KEY": KEY}
    phases: dict[str, float] = {}
    report: dict[str, object] = {"products": count, "phase_seconds": phases}
    samples = pick_samples(count, args)
    with phase(phases, "import"):
        import_catalog(catalog, data_dir, env, args, report)
    with phase(phases, "exact_search"):
        products = Products(catalog.products)
        exact = exact_neighbours(catalog.vectors, samples.similar["unfiltered"], K)
    log(f"{count:,} products: starting the server")
    steal = machine_steal()
    measure_served(count, env, samples, products, exact, photos, embedder, args, report, catalog.vectors)
    with phase(phases, "duplicates"):
        report["duplicates"] = measure_duplicates(data_dir, env, work / f"duplicates-{count}.csv", args.seed,
                                                  args.import_timeout)  # fmt: skip
    stolen, total = (now - then for now, then in zip(machine_steal(), steal, strict=True))
    report["machine_steal_percent"] = round(100 * stolen / max(1, total), 1)
    memory = report["memory"]
    before = memory["before_writes"]["rss_mb"]
    memory["after_over_before"] = ratio(memory["after_writes"]["rss_mb"], before)
    memory["peak_over_before"] = ratio(max(memory["during_writes"]["peak_rss_mb"], before), before)
    report["disk_after_writes"] = disk_usage(data_dir)
    return report


def import_catalog(catalog: SyntheticCatalog, data_dir: Path, env: dict[str, str], args, report: dict) -> None:
    """`indexer migrate`, then `indexer import-vectors` of the catalog: its time, peak memory and the disk after."""
    run_cli(["migrate"], env, timeout=600)
    log(f"{catalog.count:,} products: python -m indexer import-vectors ...")
    seconds, output = run_cli(["import-vectors", "--vectors", str(catalog.vectors), "--products",
                               str(catalog.products), "--quiet"], env, timeout=args.import_timeout)  # fmt: skip
    report["import"] = {"seconds": round(seconds, 2), "products_per_s": round(catalog.count / seconds, 1),
                        "peak_rss_mb": peak_memory_mb(output), "output": output[-2000:]}  # fmt: skip
    report["disk_after_import"] = disk_usage(data_dir)
    os.sync()  # the import's gigabytes are written back now, not during the latency runs


def measure_served(count: int, env: dict[str, str], samples: Samples, products: Products, exact: np.ndarray,
                   photos: list[bytes], embedder, args, report: dict, vectors: Path) -> None:  # fmt: skip
    """The server started on the imported catalog: its readiness, the reads, then the writes."""
    phases = report["phase_seconds"]
    started = time.perf_counter()
    with running_server(env, timeout=args.ready_timeout) as server:
        pid = server.process.pid
        report["ready_seconds"] = round(server.ready_seconds, 2)
        client = Client(server.url, key=KEY)
        status, readyz, _ = client.call("GET", "/readyz")
        report["readyz"] = readyz if readyz is not None else {"status": status}
        report["memory"] = {"ready": process_tree_memory_mb(pid)}
        phases["ready"] = round(time.perf_counter() - started, 1)
        with phase(phases, "similar"):
            log(f"{count:,} products: /similar, {len(samples.similar['unfiltered'])} products for each of 4 kinds")
            report["similar"] = measure_similar(client, samples.similar, products, exact, samples.mix_delete[:5],
                                                args.seed)  # fmt: skip
        if args.sweep_requests:
            with phase(phases, "sweep"):
                log(f"{count:,} products: /similar at every selectivity, {args.sweep_requests} products a point")
                report["sweep"] = measure_sweep(client, products, vectors, args.sweep_requests, samples.all(),
                                                args.seed)  # fmt: skip
        with phase(phases, "search"):
            log(f"{count:,} products: /api/search, {args.searches} photos")
            report["search"] = measure_search(client, photos[: args.searches], embedder,
                                              report["similar"]["unfiltered"]["p50_ms"])  # fmt: skip
        with phase(phases, "writes"):
            measure_writes(client, pid, count, samples, products, photos, args, report)
        client.close()


def measure_writes(client: Client, pid: int, count: int, samples: Samples, products: Products, photos: list[bytes],
                   args, report: dict) -> None:  # fmt: skip
    """PUTs and DELETEs each until visible, then mixed writes while the server's memory is sampled."""
    tag = f"{count}"
    avoid = {int(r) for r in (*samples.mix_replace, *samples.mix_delete)}
    targets = delete_targets(client, samples.delete_pool, args.writes, avoid)
    report["memory"]["before_writes"] = process_tree_memory_mb(pid)
    sampler = MemorySampler(pid)
    sampler.start()
    log(f"{count:,} products: {args.writes} PUT and {args.writes} DELETE, each until visible")
    put_photos = photos[-args.writes :]  # not the ones the searches used: no recent-query cache hit
    report["writes_visible"] = measure_visibility(client, put_photos, targets, tag)
    report["memory"]["after_visible_writes"] = process_tree_memory_mb(pid)
    log(f"{count:,} products: {args.rss_writes} mixed writes, memory sampled every 100 ms")
    mix_photos = photos[args.searches : len(photos) - args.writes] or photos
    report["mixed_writes"] = mixed_writes(client, mix_photos, samples.mix_replace, samples.mix_delete, tag,
                                          args.rss_writes, products)  # fmt: skip
    report["memory"]["during_writes"] = sampler.stop()
    report["memory"]["after_writes"] = process_tree_memory_mb(pid)
