"""`make bench`: throughput, latency and memory, each as a ratio to a baseline measured in the same run.

    python -m bench --catalog ../shared/datasets/grocery-store --metadata catalog.csv

Writes bench/results.json and bench/results.png. Everything runs on this machine;
the HTTP load (wrk) goes to the production server (`python -m service`) on 127.0.0.1 only, bounded in time.

A shared machine's speed drifts by 10-20 % within minutes, so each timed step is compared with
the raw engine rate measured just before and just after it (its "reference"), not with one
measurement taken minutes earlier.
"""

from __future__ import annotations

import os

# As the server runs (service/server.py), before numpy loads OpenBLAS: its idle threads spin after each
# matrix-vector product of an exact search, and on a busy machine that more than doubled the measured latency.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.batch import BATCH, CLIENTS, measure_batch
from bench.hostile_uploads import UPLOADS, measure_hostile_uploads
from bench.record import portable, provenance, relative
from bench.synthetic import catalog_metadata
from indexer.catalog import in_catalog, scan_catalog
from indexer.config import PRECISIONS, REPO_ROOT, cpu_count, load_settings, run_with_config
from indexer.embedding.images import load_pixels
from indexer.embedding.model import INPUT_SIZE, load_embedder
from tests.support.load import run_wrk, search_bodies, wrk_path
from tests.support.procfs import machine_steal, process_tree_cpu_seconds, process_tree_memory_mb
from tests.support.server import counter_total, running_server

# The precision `make index` runs (config.toml's): the one measured on a local Ray cluster too.
DEFAULT_PRECISION = "int8"

OUT_DIR = REPO_ROOT / "bench"
# The server's own count of its inference CPU time (service/metrics.py).
INFERENCE_CPU = "visual_search_inference_cpu_seconds_total"


def rate(function, items: list, min_seconds: float) -> float:
    """Items per second of calling function on each item, looping for at least min_seconds."""
    function(items[0])  # warm-up
    done, started = 0, time.perf_counter()
    while True:
        for item in items:
            function(item)
            done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def percentiles(values_ms: list[float]) -> dict[str, float]:
    return {f"p{p}_ms": round(float(np.percentile(values_ms, p)), 2) for p in (50, 95, 99)}


class Reference:
    """The raw engine's single-image rate (batch 1, one interpreter using every core: the limit)
    and the tutorial-style Keras rate (one image per predict call: the baseline), measurable again around any step."""

    def __init__(self, settings, tensors: np.ndarray, catalog: Path, metadata: Path | None):
        self.settings, self.tensors = settings, tensors
        # An int8 model not yet calibrated on a catalog is calibrated on this one, before anything is timed.
        self.embedder = load_embedder(settings, catalog=catalog, metadata=metadata)
        self._keras = None

    def engine_rate(self, seconds: float = 4.0) -> float:
        return rate(lambda x: self.embedder.engine.features(x[None]), list(self.tensors), seconds)

    def keras_rate(self, seconds: float = 6.0) -> float:
        """How tutorials embed: Keras model.predict on one image at a time."""
        if self._keras is None:
            from indexer.embedding.model import build_feature_model

            self._keras = build_feature_model(self.settings)
        images = list(self.tensors[:40])
        return rate(lambda x: self._keras.predict(x[None].astype(np.float32), verbose=0), images, seconds)

    def around(self, step, *, keras: bool = False) -> tuple[object, dict]:
        """Runs step between two measurements of the engine (and of Keras); returns its result and
        the rates before, after, and their mean (the reference its ratios use)."""
        before = {"engine": self.engine_rate(), **({"keras": self.keras_rate()} if keras else {})}
        result = step()
        after = {"engine": self.engine_rate(), **({"keras": self.keras_rate()} if keras else {})}
        reference = {key: round((before[key] + after[key]) / 2, 1) for key in before}
        return result, {"before": _rounded(before), "after": _rounded(after), "mean": reference}


def _rounded(rates: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 1) for key, value in rates.items()}


def measure_engine(reference: Reference) -> dict:
    """Forward passes on preprocessed tensors, batch 1: one interpreter using every core (the
    single-image rate), and one single-threaded interpreter per core side by side (how
    indexing workers and server threads run it)."""
    from concurrent.futures import ThreadPoolExecutor

    settings, tensors = reference.settings, reference.tensors
    single = reference.engine_rate(8.0)
    cores = cpu_count()
    per_core = load_embedder(settings.with_overrides(model_threads=1), concurrency=cores)
    with ThreadPoolExecutor(max_workers=cores) as pool:
        chunks = np.array_split(tensors, cores)
        parallel = sum(
            pool.map(lambda chunk: rate(lambda x: per_core.engine.features(x[None]), list(chunk), 8.0), chunks)
        )
    return {
        "engine": reference.embedder.engine.name,
        "precision": settings.precision,
        "threads": settings.inference_threads,
        "images_per_s": round(single, 1),
        "one_thread_per_core_images_per_s": round(parallel, 1),
        "one_thread_inference_ms": round(1000 * cores / parallel, 2),
    }


def measure_indexing(
    catalog: Path,
    metadata: Path | None,
    data_dir: Path,
    precision: str,
    ray_address: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """`python -m indexer index` from files into an empty data folder, as a separate process; with
    ray_address, decoding and embedding on that Ray cluster (`local`: one started by the indexer)."""
    command = [sys.executable, "-m", "indexer", "index", "--catalog", str(catalog), "--quiet"]
    command += ["--metadata", str(metadata)] if metadata else []
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"DATA_DIR": str(data_dir), "PRECISION": precision, **({"RAY_ADDRESS": ray_address} if ray_address else {})}
    env |= extra_env or {}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    output, errors = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"indexing failed:\n{errors}")
    count = int(output.split(" images of ")[0].rsplit(" ", 1)[-1])
    # The indexer reports its own peak (VmHWM): a child's ru_maxrss would include this process's size.
    peak = float(output.split("peak memory ")[1].split(" MB")[0])
    return {"images": count, "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
            "peak_rss_mb": peak, "summary": output.strip()}  # fmt: skip


def measure_ray_indexing(catalog: Path, metadata: Path | None, data_dir: Path, plain: dict) -> dict:
    """The same indexing run with RAY_ADDRESS=local (decoding and embedding on Ray actors, one LiteRT
    interpreter each), against the plain run's rate: on a few cores, Ray's overhead."""
    result = measure_indexing(catalog, metadata, data_dir, DEFAULT_PRECISION, ray_address="local")
    result["over_plain"] = round(result["images_per_s"] / plain["images_per_s"], 3)
    print(f"bench: indexing on local Ray: {result['images_per_s']} images/s in {result['seconds']} s, "
          f"{result['over_plain']}x the plain run's {plain['images_per_s']} images/s",
          file=sys.stderr, flush=True)  # fmt: skip
    return result


def measure_whitening(settings, catalog: Path, metadata: Path | None, work: Path, photos: list[bytes]) -> dict:
    """The catalog's whitening against none, at the default precision: `make index` into an empty data folder (a
    new database, so the run with the whitening fits it: the slowest case) and in-process query latency."""
    result = {}
    for name in ("off", "on"):
        indexing = measure_indexing(catalog, metadata, work / name, DEFAULT_PRECISION, extra_env={"WHITENING": name})
        result[name] = {"indexing": indexing}
    for name in ("off", "on"):  # the search follows the whitening its index was built with
        result[name]["in_process"] = measure_in_process(
            settings.with_overrides(precision=DEFAULT_PRECISION), work / name, photos
        )
    result["on_over_off"] = {
        "index_seconds": round(result["on"]["indexing"]["seconds"] / result["off"]["indexing"]["seconds"], 3),
        "query_p50": round(result["on"]["in_process"]["p50_ms"] / result["off"]["in_process"]["p50_ms"], 3),
    }
    print(f"bench: whitening on / off: make index {result['on_over_off']['index_seconds']}x, "
          f"in-process query p50 {result['on_over_off']['query_p50']}x", file=sys.stderr, flush=True)  # fmt: skip
    return result


def measure_in_process(settings, data_dir: Path, photos: list[bytes]) -> dict:
    """Query latency inside the service (decode + embed + search + product lookup), and its parts alone."""
    from indexer.index.search import CatalogSearch
    from indexer.storage.store import Store

    settings = settings.with_overrides(data_dir=data_dir)
    search = CatalogSearch(settings, load_embedder(settings), Store.open(settings))
    view = search.current()
    embedder = view.embedder  # followed by the index's whitening, as the service embeds queries
    embed_ms, search_ms, query_ms, decode_ms = [], [], [], []
    for photo in photos:  # interleaved, so that a slow patch of the machine hits all of them alike
        vector = embedder.embed_image(photo)
        decode_ms.append(_timed(lambda p: load_pixels(p, embedder.input_size), photo))
        embed_ms.append(_timed(embedder.embed_image, photo))
        search_ms.append(_timed(lambda v: view.live.search(v, settings.default_k * 3), vector))
        query_ms.append(_timed(lambda p: search.search(view, embedder.embed_image(p), settings.default_k), photo))
    one_embedding_and_search = float(np.median(embed_ms) + np.median(search_ms))
    return {
        **percentiles(query_ms),
        "embed_median_ms": round(float(np.median(embed_ms)), 2),
        "decode_and_resize_median_ms": round(float(np.median(decode_ms)), 2),
        "search_median_ms": round(float(np.median(search_ms)), 3),
        "p50_over_embed_plus_search": round(float(np.median(query_ms)) / one_embedding_and_search, 3),
    }


def _timed(function, argument) -> float:
    started = time.perf_counter()
    function(argument)
    return (time.perf_counter() - started) * 1000


def measure_http(reference: Reference, data_dir: Path, photos: list[bytes], levels: tuple[int, ...]) -> dict:
    """Start the production server as `make serve` does, time it until ready, then load it with
    each number of concurrent clients in turn (raw JPEG bodies, as a storefront's server sends them),
    the engine measured around each; and once with multipart forms (as a browser's form sends them)."""
    env = {"DATA_DIR": str(data_dir), "PRECISION": reference.settings.precision}
    with (
        running_server(env) as server,
        search_bodies(photos, {"k": "12"}, raw=True) as raw,
        search_bodies(photos, {"k": "12"}) as multipart,
    ):
        idle_memory = process_tree_memory_mb(server.process.pid)
        search = f"{server.url}/api/search"
        run_wrk(f"{search}?k=12", *raw, clients=1, seconds=2)  # warm-up
        loads = [_load(reference, server, f"{search}?k=12", raw, clients) for clients in levels]
        multipart_load = _load(reference, server, search, multipart, 4)
        loaded_memory = process_tree_memory_mb(server.process.pid)
    return {"ready_seconds": round(server.ready_seconds, 2), "memory_idle": idle_memory,
            "memory_after_load": loaded_memory, "load": loads, "multipart_4_clients": multipart_load}  # fmt: skip


def _load(reference: Reference, server, url: str, bodies: tuple[Path, str], clients: int) -> dict:
    # The server counts its own inference CPU time; read outside the CPU window, so the scrapes are not in it.
    inference = counter_total(server.url, INFERENCE_CPU)
    cpu, steal = process_tree_cpu_seconds(server.process.pid), machine_steal()
    load, rates = reference.around(lambda: run_wrk(url, *bodies, clients=clients, seconds=10))
    # The server is idle while the engine is measured around the load, so this is the load's CPU.
    cpu = process_tree_cpu_seconds(server.process.pid) - cpu
    stolen, total = (now - then for now, then in zip(machine_steal(), steal, strict=True))
    inference = counter_total(server.url, INFERENCE_CPU) - inference
    requests = max(1, load["requests"])
    return {
        **load,
        "engine_around": rates,
        "over_engine": round(load["requests_per_s"] / rates["mean"]["engine"], 3),
        "server_cpu_ms_per_request": round(1000 * cpu / requests, 2),
        "inference_cpu_ms_per_request": round(1000 * inference / requests, 2),
        "machine_steal_percent": round(100 * stolen / max(1, total), 1),
    }


def _with_reference(result: dict, rates: dict) -> dict:
    return {**result, "around": rates}


def ratios(results: dict, cpus: int) -> dict[str, float]:
    """One precision's figures: each step against the reference measured around it."""
    indexing, four = results["indexing"], next(r for r in results["http"]["load"] if r["clients"] == 4)
    around = indexing["around"]["mean"]
    request_cpu_ms, inference_ms = four["server_cpu_ms_per_request"], four["inference_cpu_ms_per_request"]
    engine_inference_ms = results["engine"]["one_thread_inference_ms"]
    return {
        "indexing_over_engine": round(indexing["images_per_s"] / around["engine"], 3),
        "indexing_over_seed_baseline": round(indexing["images_per_s"] / around["keras"], 1),
        "in_process_p50_over_embed_plus_search": results["in_process"]["p50_over_embed_plus_search"],
        "http_4_clients_over_engine": four["over_engine"],
        # What the HTTP figure could be if the server's CPU time per request kept every core busy,
        # and how much of that CPU time the inference itself is.
        "http_4_clients_ceiling_from_cpu_per_request": round(
            1000 * cpus / request_cpu_ms / four["engine_around"]["mean"]["engine"], 3
        ),
        "server_cpu_ms_per_request": request_cpu_ms,
        # Inference as the server measured it (its CPU time on the request threads, under this very load) ...
        "server_inference_cpu_ms_per_request": inference_ms,
        "inference_share_of_request_cpu": round(inference_ms / request_cpu_ms, 3),
        "server_cpu_ms_per_request_outside_inference": round(request_cpu_ms - inference_ms, 2),
        # ... and the older estimate: less the engine step's inference time per core (bench/README.md compares them).
        "server_cpu_ms_per_request_less_engine_inference": round(request_cpu_ms - engine_inference_ms, 2),
        "server_ready_seconds": results["http"]["ready_seconds"],
        "server_rss_mb_minus_index": round(results["http"]["memory_after_load"]["rss_mb"] - results["index_mb"], 1),
    }


def comparison(fp32: dict, int8: dict) -> dict[str, float]:
    """int8 against fp32, both measured in this run: the engine, `make index`, HTTP and CPU ratios."""

    def http(result: dict, clients: int) -> float:
        return next(r for r in result["http"]["load"] if r["clients"] == clients)["requests_per_s"]

    return {
        "engine_int8_over_fp32": round(int8["engine"]["images_per_s"] / fp32["engine"]["images_per_s"], 2),
        "engine_one_thread_per_core_int8_over_fp32": round(
            int8["engine"]["one_thread_per_core_images_per_s"] / fp32["engine"]["one_thread_per_core_images_per_s"], 2
        ),
        "make_index_int8_over_fp32": round(fp32["indexing"]["seconds"] / int8["indexing"]["seconds"], 2),
        **{f"http_{c}_clients_int8_over_fp32": round(http(int8, c) / http(fp32, c), 2) for c in (1, 2, 4, 8)},
        "in_process_p50_int8_over_fp32": round(int8["in_process"]["p50_ms"] / fp32["in_process"]["p50_ms"], 2),
    }


COLOURS = {"fp32": "#2c7fb8", "int8": "#fd8d3c"}


def chart(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    rates, latency = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    groups = ["LiteRT forward", "make index", *(f"HTTP, {c} client{'s' * (c > 1)}" for c in (1, 2, 4, 8))]
    width = 0.4
    for offset, (precision, result) in zip((-width / 2, width / 2), results["precisions"].items(), strict=True):
        values = [result["engine"]["images_per_s"], result["indexing"]["images_per_s"],
                  *(r["requests_per_s"] for r in result["http"]["load"])]  # fmt: skip
        drawn = rates.bar(np.arange(len(groups)) + offset, values, width, label=precision, color=COLOURS[precision])
        rates.bar_label(drawn, labels=[f"{v:.0f}" for v in values], fontsize=7)
        loads = result["http"]["load"]
        for key, style in (("p50_ms", "-o"), ("p95_ms", "--s")):
            latency.plot([r["clients"] for r in loads], [r[key] for r in loads], style, color=COLOURS[precision],
                         label=f"{precision} HTTP {key[:3]}")  # fmt: skip
    rates.set_xticks(np.arange(len(groups)), groups, fontsize=8)
    rates.set_ylabel("images or requests per second")
    rates.set_title(f"Throughput (Keras predict, one image: {results['seed_baseline']['images_per_s']:.0f}/s)",
                    fontsize=10)  # fmt: skip
    rates.legend(fontsize=8)
    rates.margins(y=0.15)
    latency.set_xscale("log", base=2)
    latency.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    latency.set_xlabel("concurrent clients")
    latency.set_ylabel("ms")
    latency.set_title("Search latency over HTTP")
    latency.legend(fontsize=8)
    figure.suptitle(f"{results['machine']['cpus']} CPUs, {results['machine']['processor']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    default_catalog = REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"
    parser.add_argument("--catalog", default=str(default_catalog))
    parser.add_argument("--metadata", help="default: <catalog>/catalog.csv or products.csv when present")
    parser.add_argument("--queries", type=int, default=200, help="query photos for the latency runs")
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)
    catalog = Path(args.catalog)
    metadata = Path(args.metadata) if args.metadata else catalog_metadata(catalog)
    metadata = in_catalog(catalog, metadata)
    settings = load_settings()
    images = scan_catalog(catalog, metadata).images
    if not images:
        print(f"error: no images in {catalog}", file=sys.stderr)
        return 2
    # More distinct photos than the service's recent-query cache holds (64), so that every HTTP
    # request is decoded and embedded, never answered from that cache.
    sample = images[:: max(1, len(images) // args.queries)][: args.queries]
    photos = [image.path.read_bytes() for image in sample]
    tensors = np.stack([load_pixels(photo, INPUT_SIZE) for photo in photos])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: dict = {**provenance(), "catalog": relative(catalog)}
    wrk_path()  # say at once when the load generator is missing, not after the indexing run
    references = {p: Reference(settings.with_overrides(precision=p), tensors, catalog, metadata) for p in PRECISIONS}
    per: dict[str, dict] = {p: {} for p in PRECISIONS}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        data_dirs = {p: Path(tmp) / p for p in PRECISIONS}
        # Step by step, both precisions one after the other: each comparison is made minutes apart at most.
        steps = [
            ("engine", "raw engine forward rate", lambda p: measure_engine(references[p])),
            ("indexing", f"python -m indexer index ({len(images)} images), engine and Keras measured around it",
             lambda p: _with_reference(*references[p].around(
                 lambda: measure_indexing(catalog, metadata, data_dirs[p], p), keras=True))),
            ("in_process", "in-process query latency",
             lambda p: measure_in_process(references[p].settings, data_dirs[p], photos)),
            ("http", "HTTP against the server (wrk), engine measured around each load",
             lambda p: measure_http(references[p], data_dirs[p], photos, (1, 2, 4, 8))),
        ]  # fmt: skip
        for key, title, step in steps:
            for precision in PRECISIONS:
                print(f"bench: {title}, {precision} ...", file=sys.stderr, flush=True)
                per[precision][key] = step(precision)
            if key == "engine":
                print("bench: Keras per-image predict (the seed's way) ...", file=sys.stderr, flush=True)
                results["seed_baseline"] = {"images_per_s": round(references["fp32"].keras_rate(), 1)}
            if key == "indexing":
                print(f"bench: python -m indexer index with RAY_ADDRESS=local, {DEFAULT_PRECISION} ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                per[DEFAULT_PRECISION]["indexing_ray_local"] = measure_ray_indexing(
                    catalog, metadata, Path(tmp) / "ray-local", per[DEFAULT_PRECISION]["indexing"]
                )
        print(f"bench: {UPLOADS} hostile PNG uploads at once, {DEFAULT_PRECISION} ...", file=sys.stderr, flush=True)
        results["hostile_uploads"] = measure_hostile_uploads(data_dirs[DEFAULT_PRECISION], photos[0])
        print(f"bench: batches of {BATCH} photos against single searches from {CLIENTS} clients, "
              f"{DEFAULT_PRECISION} ...", file=sys.stderr, flush=True)  # fmt: skip
        results["batch"] = measure_batch(data_dirs[DEFAULT_PRECISION], photos, PRECISION=DEFAULT_PRECISION)
        print("bench: whitening on and off (make index, in-process latency) ...", file=sys.stderr, flush=True)
        results["whitening"] = measure_whitening(settings, catalog, metadata, Path(tmp) / "whitening", photos)
        for precision, data_dir in data_dirs.items():
            # The base segment a server maps: the vectors, ids, categories, prices and any FAISS structure.
            base = data_dir / "index" / json.loads((data_dir / "index" / "manifest.json").read_text())["base"]
            per[precision]["index_mb"] = round(sum(f.stat().st_size for f in base.iterdir()) / 2**20, 2)
    for result in per.values():
        result["ratios"] = ratios(result, results["machine"]["cpus"])
    results["precisions"] = per
    results["int8_over_fp32"] = comparison(per["fp32"], per["int8"])
    # The indexer's summaries name the catalog and the data folders: relative to the repository, <work-dir>.
    (out / "results.json").write_text(json.dumps(portable(results, Path(tmp), (catalog, metadata)), indent=2))
    chart(results, out / "results.png")
    ray_local = per[DEFAULT_PRECISION]["indexing_ray_local"]
    print(json.dumps({"int8_over_fp32": results["int8_over_fp32"], "whitening": results["whitening"]["on_over_off"],
                      **{p: r["ratios"] for p, r in per.items()},
                      "hostile_uploads_worst_peak_rss_rise_mb": results["hostile_uploads"]["worst_peak_rss_rise_mb"],
                      "batch_1_client_over_singles": results["batch"]["batch_1_client_over_singles"],
                      f"{DEFAULT_PRECISION}_indexing_ray_local": {k: ray_local[k] for k in
                                                                  ("seconds", "images_per_s", "over_plain")}},
                     indent=2))  # fmt: skip
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_with_config(main))
