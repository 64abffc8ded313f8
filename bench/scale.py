"""`make bench-scale`: N synthetic products beside 10,000, imported, served on 127.0.0.1 and measured side by side;
writes bench/scale.json and bench/scale.png.

    python -m bench.scale --products 1000000 [--rerun-files 100000] [--out bench/scale.json] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import numpy as np
from PIL import Image
from tqdm import tqdm

from bench.load import multipart_body
from bench.procfs import machine_steal, process_tree_memory_mb
from bench.server import running_server
from bench.synthetic import (
    SyntheticCatalog,
    cached_or_generate,
    catalog_metadata,
    cosine_to_anchors,
    embed_photos,
    prefix,
    real_photos,
    row_of,
)
from indexer.config import REPO_ROOT, load_settings, run_with_config
from indexer.embedding.model import load_embedder

KEY = "bench-scale-key"
SMALL = 10_000
K = 10
POLL_S, VISIBLE_LIMIT_S = 0.02, 10.0
# A deleted product's witness lists this many neighbours (the service's default max_k); products
# to delete are drawn from this many times as many candidates, for those that have a witness.
WITNESS_K, DELETE_POOL = 100, 10
# Rows of the base vectors per exact-search pass: 65,536 x 1024 float32 is 256 MB.
EXACT_CHUNK = 65_536
# The grocery-store dataset beside the repo, as `make bench` uses it.
DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"


def log(message: str) -> None:
    print(f"bench-scale: {message}", file=sys.stderr, flush=True)


# --- HTTP ------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection to the server on loopback; each call returns (status, JSON or None, ms)."""

    def __init__(self, url: str, timeout: float = 120, key: str = KEY):
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the benchmark only talks to this machine (loopback)")
        self.host, self.port, self.timeout, self.key = parts.hostname, parts.port, timeout, key
        self.connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict | None, float]:
        # A keep-alive connection the server has closed fails on first use: reconnect once. A
        # DELETE is never sent twice (a second one would answer 404), so it gets a fresh connection.
        if method == "DELETE":
            self.close()
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.connection.request(method, path, body=body, headers=headers or {})
                response = self.connection.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt or method == "DELETE":
                    raise
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if response.will_close:
                self.close()
            try:
                data = json.loads(payload)
            except ValueError:
                data = None
            return response.status, data, elapsed
        raise AssertionError("unreachable")

    def similar(self, sku: str, k: int = K, **filters: object) -> tuple[int, dict | None, float]:
        query = urlencode({"k": k, **{name: v for name, v in filters.items() if v is not None}})
        return self.call("GET", f"/api/products/{quote(sku, safe='/')}/similar?{query}")

    def search(self, photo: bytes, k: int = K) -> tuple[int, dict | None, float]:
        body, content_type = multipart_body(photo, {"k": str(k)})
        return self.call("POST", "/api/search", body, {"Content-Type": content_type})

    def put(self, sku: str, photo: bytes, fields: dict[str, str]) -> tuple[int, dict | None, float]:
        body, content_type = multipart_body(photo, fields)
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {self.key}"}
        return self.call("PUT", f"/api/products/{quote(sku, safe='/')}", body, headers)

    def delete(self, sku: str) -> tuple[int, dict | None, float]:
        headers = {"Authorization": f"Bearer {self.key}"}
        return self.call("DELETE", f"/api/products/{quote(sku, safe='/')}", None, headers)

    def product_status(self, sku: str) -> int:
        return self.call("GET", f"/api/products/{quote(sku, safe='/')}")[0]


def result_skus(data: dict | None) -> list[str]:
    return [r["sku"] for r in (data or {}).get("results", [])]


def stats(values_ms: list[float]) -> dict[str, float | int | None]:
    if not values_ms:
        return {"count": 0, "p50_ms": None, "p95_ms": None}
    return {
        "count": len(values_ms),
        "p50_ms": round(float(np.percentile(values_ms, 50)), 2),
        "p95_ms": round(float(np.percentile(values_ms, 95)), 2),
    }


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


# --- files and processes ---------------------------------------------------------------------


def disk_usage(folder: Path) -> dict[str, object]:
    """Bytes allocated on disk (as du counts them) under folder, in all and per top-level entry."""
    entries: dict[str, int] = {}
    for root, _, files in os.walk(folder):
        top = Path(root).relative_to(folder).parts
        for name in files:
            try:
                size = os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # an old index version removed while walking
                continue
            key = top[0] if top else name
            entries[key] = entries.get(key, 0) + size
    database = sum(size for name, size in entries.items() if name.startswith("catalog.sqlite3"))
    return {
        "total_bytes": sum(entries.values()),
        "index_bytes": entries.get("index", 0),
        "database_bytes": database,
        "entries": dict(sorted(entries.items())),
    }


def run_cli(arguments: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    """`python -m indexer ...` as a separate process; its seconds and output, or RuntimeError."""
    command = [sys.executable, "-m", "indexer", *arguments]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(command[2:])}` ran over {timeout:.0f} s") from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command[2:])}` failed ({done.returncode}):\n{done.stderr[-4000:]}{done.stdout[-1000:]}"
        )
    return seconds, (done.stdout + done.stderr).strip()


def peak_memory_mb(output: str) -> float | None:
    """The 'peak memory N MB' that the indexer's summaries report, if this one does."""
    found = re.search(r"peak memory ([\d.]+) ?MB", output)
    return float(found.group(1)) if found else None


def has_import_vectors() -> bool:
    done = subprocess.run([sys.executable, "-m", "indexer", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    return "import-vectors" in done.stdout


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


# --- the products' own data ------------------------------------------------------------------


class Products:
    """The category and price of every row of a synthetic products CSV."""

    def __init__(self, path: Path):
        codes, prices, names = [], [], {}
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                codes.append(names.setdefault(row["category"], len(names)))
                prices.append(float(row["price"]) if row["price"] else np.nan)
        self.categories = list(names)
        self.codes = np.asarray(codes, dtype=np.int32)
        self.prices = np.asarray(prices, dtype=np.float64)

    def category(self, row: int) -> str:
        return self.categories[self.codes[row]]

    def price_range(self, low_quantile: float = 0.40, high_quantile: float = 0.55) -> tuple[float, float, float]:
        """A price range holding about 15 % of the products, and the share it really holds."""
        # Rounded to cents as sent, so that the check of the results uses the bounds the server got.
        low, high = (round(float(np.nanquantile(self.prices, q)), 2) for q in (low_quantile, high_quantile))
        share = float(np.mean((self.prices >= low) & (self.prices <= high)))
        return low, high, share


def exact_neighbours(vectors: Path, rows: np.ndarray, k: int, progress: bool = True) -> np.ndarray:
    """The k nearest rows (inner product) of each given row among all rows but itself, in chunks of
    the memory-mapped vectors so that a 4 GB file never has to fit in memory at once."""
    import faiss

    base = np.load(vectors, mmap_mode="r")
    queries = np.ascontiguousarray(base[rows], dtype=np.float32)
    best_scores = np.full((len(rows), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(rows), 0), dtype=np.int64)
    starts = range(0, len(base), EXACT_CHUNK)
    for start in tqdm(starts, desc="Exact neighbours", disable=not progress or len(starts) < 4):
        chunk = np.ascontiguousarray(base[start : start + EXACT_CHUNK], dtype=np.float32)
        scores, ids = faiss.knn(queries, chunk, min(k + 1, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        ids = ids + start
        scores[ids == rows[:, None]] = -np.inf  # the query itself
        best_scores, best_ids = np.hstack([best_scores, scores]), np.hstack([best_ids, ids])
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids


# --- measurements against a running server ---------------------------------------------------


def measure_similar(
    client: Client, samples: dict[str, np.ndarray], products: Products, exact: np.ndarray, warm_up: list[int], seed: int
) -> dict:
    """/similar?k=10 unfiltered, in the product's own category, in another category and in a price
    range, each kind on products of its own (a product asked about twice would be answered from
    warm caches) and interleaved, so that a slow patch of the machine hits all four alike; recall@10
    of the unfiltered answers against exact search (exact: its sample's true neighbours); results
    that break their filter counted."""
    rng = np.random.default_rng(seed)
    low, high, share = products.price_range()
    price = {"min_price": f"{low:.2f}", "max_price": f"{high:.2f}"}
    kinds: dict[str, list[float]] = {kind: [] for kind in samples}
    errors = dict.fromkeys(kinds, 0)
    violations = dict.fromkeys(kinds, 0)
    short = dict.fromkeys(kinds, 0)
    recalls: list[float] = []
    for row in warm_up:  # the first use of each filter may build a cache
        client.similar(f"syn-{row:07d}")
        client.similar(f"syn-{row:07d}", category=products.category(row))
        client.similar(f"syn-{row:07d}", **price)
    for number in tqdm(range(len(samples["unfiltered"])), desc="/similar", leave=False):
        other = products.categories[int(rng.integers(len(products.categories)))]
        for kind, sample in samples.items():
            row = int(sample[number])
            sku = f"syn-{row:07d}"
            filters = {
                "unfiltered": {},
                "category_own": {"category": products.category(row)},
                "category_other": {"category": other},
                "price_range": price,
            }[kind]
            status, data, ms = client.similar(sku, **filters)
            if status != 200:
                errors[kind] += 1
                continue
            kinds[kind].append(ms)
            found = [r for r in data["results"] if r["sku"] != sku]
            short[kind] += len(found) < K
            for result in found:
                if "category" in filters and result.get("category") != filters["category"]:
                    violations[kind] += 1
                value = result.get("price")
                if kind == "price_range" and (value is None or not low <= value <= high):
                    violations[kind] += 1
            if kind == "unfiltered":
                returned = {row_of(r["sku"]) for r in found}
                recalls.append(len(returned & set(exact[number].tolist())) / K)
    base = stats(kinds["unfiltered"])["p50_ms"]
    report = {}
    for kind, values in kinds.items():
        report[kind] = {**stats(values), "errors": errors[kind], "fewer_than_k": short[kind]}
        if kind != "unfiltered":
            report[kind] |= {
                "over_unfiltered_p50": _ratio(report[kind]["p50_ms"], base),
                "violations": violations[kind],
            }
    report["price_range"] |= {"min_price": round(low, 2), "max_price": round(high, 2), "share": round(share, 3)}
    report["recall_at_10"] = {
        "mean": round(float(np.mean(recalls)), 4) if recalls else None,
        "min": round(float(np.min(recalls)), 2) if recalls else None,
        "queries": len(recalls),
    }
    return report


def measure_search(client: Client, photos: list[bytes], embedder, similar_p50: float | None) -> dict:
    """POST /api/search with distinct real photos (more than the server's recent-query cache holds),
    each after embedding the same photo in-process (1 thread): the reference is one embedding plus
    one /similar, the search that needs no embedding."""
    client.search(photos[-1])  # warm-up
    http_ms, embed_ms, errors = [], [], 0
    for photo in tqdm(photos, desc="/api/search", leave=False):
        started = time.perf_counter()
        embedder.embed_image(photo)
        embed_ms.append((time.perf_counter() - started) * 1000)
        status, _, ms = client.search(photo)
        if status == 200:
            http_ms.append(ms)
        else:
            errors += 1
    embed_p50 = float(np.median(embed_ms))
    reference = embed_p50 + similar_p50 if similar_p50 is not None else None
    report = {**stats(http_ms), "errors": errors, "embed_in_process_p50_ms": round(embed_p50, 2)}
    report["reference_ms"] = round(reference, 2) if reference else None
    report["over_reference"] = _ratio(report["p50_ms"], reference)
    return report


def _wait_until(check, started: float) -> tuple[float | None, int]:
    """Polls check() every POLL_S until it holds or VISIBLE_LIMIT_S has passed since started;
    milliseconds from started until it held (None if never) and the number of checks."""
    checks = 0
    while True:
        checks += 1
        if check():
            return (time.perf_counter() - started) * 1000, checks
        if time.perf_counter() - started > VISIBLE_LIMIT_S:
            return None, checks
        time.sleep(POLL_S)


def measure_visibility(client: Client, photos: list[bytes], targets: list[tuple[str, str | None]], tag: str) -> dict:
    """PUT new products with real photos, then DELETE existing ones: from sending the request until
    a photo search shows the new sku, or until the deleted sku is gone (its GET answers 404 and a
    neighbour's /similar that showed it no longer does)."""

    def put(item: tuple[int, bytes]) -> tuple[int, object, float]:
        number, photo = item
        fields = {"title": f"Bench product {number}", "category": "bench", "price": "9.99"}
        return client.put(f"bench-{tag}-new-{number}", photo, fields)

    def shown(item: tuple[int, bytes]) -> bool:
        number, photo = item
        return f"bench-{tag}-new-{number}" in result_skus(client.search(photo)[1])

    def gone(item: tuple[str, str | None]) -> bool:
        sku, witness = item
        if client.product_status(sku) != 404:
            return False
        if witness is None:
            return True
        status, data, _ = client.similar(witness, k=WITNESS_K)
        return status == 200 and sku not in result_skus(data)

    # Until visible includes the check that saw it (for a PUT, a photo search: one embedding), so the
    # request's own latency is reported beside it.
    report: dict[str, dict] = {
        "put": _until_seen("PUT until visible", list(enumerate(photos)), put, shown, "not_visible_within_s"),
        "delete": _until_seen(
            "DELETE until gone", targets, lambda item: client.delete(item[0]), gone, "not_gone_within_s"
        ),
    }
    report["delete"]["with_witness"] = sum(w is not None for _, w in targets)
    return report


def _until_seen(label: str, items: list, send, seen, missing_key: str) -> dict:
    """For each item: send the write, then time from sending it until seen(item) holds (or give up)."""
    visible_ms, request_ms, checks, errors, missing = [], [], [], [], []
    for item in tqdm(items, desc=label, leave=False):
        started = time.perf_counter()
        status, data, took_ms = send(item)
        if status not in (200, 201):
            errors.append(f"{status}: {str(data)[:200]}")
            continue
        request_ms.append(took_ms)
        ms, count = _wait_until(lambda item=item: seen(item), started)
        checks.append(count)
        if ms is None:
            missing.append(item)
        else:
            visible_ms.append(ms)
    return {
        **stats(visible_ms),
        "request": stats(request_ms),
        missing_key: len(missing),
        # what was written (an item's fields but its photo), to look for in the logs and the database
        "missing_examples": [[f for f in item if not isinstance(f, bytes)] for item in missing[:5]],
        "errors": len(errors),
        "error_examples": errors[:3],
        "first_check_saw_it": sum(c == 1 for c in checks),
    }


def delete_targets(client: Client, pool: np.ndarray, count: int, avoid: set[int]) -> list[tuple[str, str | None]]:
    """`count` products to delete, each with a witness: one of its three nearest neighbours whose
    /similar?k=100 shows it now, so that its disappearance from results can be checked. Many
    products are in no neighbour's list (the hubs are), so they are drawn from a larger pool;
    products without a witness fill up the count (checked by their 404 alone)."""
    chosen: dict[str, str | None] = {}
    witnesses: set[str] = set()
    skus = [f"syn-{row:07d}" for row in pool]
    deadline = time.monotonic() + 300
    for sku in skus:
        if len(chosen) == count or time.monotonic() > deadline:
            break
        if sku in witnesses:
            continue
        status, data, _ = client.similar(sku)
        neighbours = result_skus(data)[:3] if status == 200 else []
        for candidate in neighbours:
            if candidate in chosen or row_of(candidate) in avoid:
                continue
            if sku in result_skus(client.similar(candidate, k=WITNESS_K)[1]):
                chosen[sku] = candidate
                witnesses.add(candidate)
                break
    for sku in skus:
        if len(chosen) == count:
            break
        if sku not in chosen and sku not in witnesses:
            chosen[sku] = None
    return list(chosen.items())


def mixed_writes(client: Client, photos: list[bytes], replace_rows: list[int], delete_rows: list[int], tag: str,
                 count: int, products: Products) -> dict:  # fmt: skip
    """`count` writes in turn: PUT a new product, PUT over an existing one (new photo and fields),
    DELETE an existing one; each request's own latency and status."""
    latencies: dict[str, list[float]] = {"put_new": [], "put_replace": [], "delete": []}
    errors: list[str] = []
    deadline = time.monotonic() + 1800
    for number in tqdm(range(count), desc="Mixed writes", leave=False):
        if time.monotonic() > deadline:
            break
        kind = ("put_new", "put_replace", "delete")[number % 3]
        photo = photos[number % len(photos)]
        if kind == "put_new":
            status, data, ms = client.put(f"bench-{tag}-mix-{number}", photo, {"title": "Mixed", "price": "3.50"})
        elif kind == "put_replace":
            row = replace_rows[number // 3]
            fields = {"title": f"Replaced {row}", "category": products.category(row), "price": "12.00"}
            status, data, ms = client.put(f"syn-{row:07d}", photo, fields)
        else:
            status, data, ms = client.delete(f"syn-{delete_rows[number // 3]:07d}")
        if status in (200, 201):
            latencies[kind].append(ms)
        else:
            errors.append(f"{kind} {status}: {str(data)[:200]}")
    return {
        **{kind: stats(values) for kind, values in latencies.items()},
        "writes": sum(len(v) for v in latencies.values()),
        "errors": len(errors),
        "error_examples": errors[:3],
    }


# --- one catalog, end to end -----------------------------------------------------------------


def sample_size(args) -> int:
    """Products sampled from a catalog: 4 kinds of /similar, the deletes, and the mixed writes."""
    return 4 * args.requests + DELETE_POOL * args.writes + args.rss_writes


def measure_catalog(catalog: SyntheticCatalog, work: Path, photos: list[bytes], embedder, args) -> dict:
    """Import a synthetic catalog into an empty data folder, start the server on it, and measure."""
    count, tag = catalog.count, f"{catalog.count}"
    data_dir = work / f"data-{count}"
    env = {**os.environ, "DATA_DIR": str(data_dir), "API_KEY": KEY}
    phases: dict[str, float] = {}
    report: dict[str, object] = {"products": count, "phase_seconds": phases}
    rng = np.random.default_rng([args.seed, count])
    # Disjoint samples: the products asked about (per kind of /similar), deleted, replaced and
    # deleted in the mixed writes.
    picked = rng.choice(count, size=sample_size(args), replace=False)
    kinds = ("unfiltered", "category_own", "category_other", "price_range")
    samples = {kind: picked[n * args.requests : (n + 1) * args.requests] for n, kind in enumerate(kinds)}
    picked = picked[len(kinds) * args.requests :]
    delete_pool, picked = picked[: DELETE_POOL * args.writes], picked[DELETE_POOL * args.writes :]
    mix_replace, mix_delete = list(picked[: args.rss_writes // 3 + 1]), list(picked[args.rss_writes // 3 + 1 :])
    rows = samples["unfiltered"]

    started = time.perf_counter()
    run_cli(["migrate"], env, timeout=600)
    log(f"{count:,} products: python -m indexer import-vectors ...")
    seconds, output = run_cli(["import-vectors", "--vectors", str(catalog.vectors), "--products",
                               str(catalog.products), "--quiet"], env, timeout=args.import_timeout)  # fmt: skip
    report["import"] = {"seconds": round(seconds, 2), "products_per_s": round(count / seconds, 1),
                        "peak_rss_mb": peak_memory_mb(output), "output": output[-2000:]}  # fmt: skip
    report["disk_after_import"] = disk_usage(data_dir)
    os.sync()  # the import's gigabytes are written back now, not during the latency runs
    phases["import"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    products = Products(catalog.products)
    exact = exact_neighbours(catalog.vectors, rows, K)
    phases["exact_search"] = round(time.perf_counter() - started, 1)

    log(f"{count:,} products: starting the server")
    steal = machine_steal()
    started = time.perf_counter()
    with running_server(env, timeout=args.ready_timeout) as server:
        pid = server.process.pid
        report["ready_seconds"] = round(server.ready_seconds, 2)
        client = Client(server.url)
        status, readyz, _ = client.call("GET", "/readyz")
        report["readyz"] = readyz if readyz is not None else {"status": status}
        report["memory"] = {"ready": process_tree_memory_mb(pid)}
        phases["ready"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        log(f"{count:,} products: /similar, {len(rows)} products for each of 4 kinds")
        report["similar"] = measure_similar(client, samples, products, exact, mix_delete[:5], args.seed)
        phases["similar"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        log(f"{count:,} products: /api/search, {args.searches} photos")
        report["search"] = measure_search(client, photos[: args.searches], embedder,
                                          report["similar"]["unfiltered"]["p50_ms"])  # fmt: skip
        phases["search"] = round(time.perf_counter() - started, 1)

        started = time.perf_counter()
        avoid = {int(r) for r in (*mix_replace, *mix_delete)}
        targets = delete_targets(client, delete_pool, args.writes, avoid)
        report["memory"]["before_writes"] = process_tree_memory_mb(pid)
        sampler = MemorySampler(pid)
        sampler.start()
        log(f"{count:,} products: {args.writes} PUT and {args.writes} DELETE, each until visible")
        put_photos = photos[-args.writes :]  # not the ones the searches used: no recent-query cache hit
        report["writes_visible"] = measure_visibility(client, put_photos, targets, tag)
        report["memory"]["after_visible_writes"] = process_tree_memory_mb(pid)
        log(f"{count:,} products: {args.rss_writes} mixed writes, memory sampled every 100 ms")
        mix_photos = photos[args.searches : len(photos) - args.writes] or photos
        report["mixed_writes"] = mixed_writes(client, mix_photos, mix_replace, mix_delete, tag, args.rss_writes,
                                              products)  # fmt: skip
        report["memory"]["during_writes"] = sampler.stop()
        report["memory"]["after_writes"] = process_tree_memory_mb(pid)
        phases["writes"] = round(time.perf_counter() - started, 1)
        client.close()
    stolen, total = (now - then for now, then in zip(machine_steal(), steal, strict=True))
    report["machine_steal_percent"] = round(100 * stolen / max(1, total), 1)
    memory = report["memory"]
    before = memory["before_writes"]["rss_mb"]
    memory["after_over_before"] = _ratio(memory["after_writes"]["rss_mb"], before)
    memory["peak_over_before"] = _ratio(max(memory["during_writes"]["peak_rss_mb"], before), before)
    report["disk_after_writes"] = disk_usage(data_dir)
    return report


# --- re-running the indexer on an unchanged catalog ------------------------------------------


def tiny_photo(seed: list[int]) -> bytes:
    """A distinct 32x32 JPEG: a 4x4 grid of random colours, smoothed, plus pixel noise."""
    rng = np.random.default_rng(seed)
    grid = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8))
    pixels = np.asarray(grid.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.int16)
    pixels = np.clip(pixels + rng.integers(-12, 13, size=pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_path(folder: Path, number: int) -> Path:
    return folder / f"d{number // 1000:03d}" / f"{number:06d}.jpg"


def write_photo_folder(folder: Path, count: int, seed: int) -> None:
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == f"{count} {seed}":
        return  # a kept --work-dir from an earlier run
    for number in tqdm(range(count), desc="Tiny catalog photos", unit="img", unit_scale=True):
        path = photo_path(folder, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_photo([seed, number]))
    marker.write_text(f"{count} {seed}")


def embedded_count(output: str) -> int | None:
    """How many photos an `index` run says it embedded."""
    found = re.search(r"embedded (\d+)", output)
    return int(found.group(1)) if found else None


def measure_rerun(work: Path, files: int, seed: int, args) -> dict:
    """`python -m indexer index` on a folder of `files` photos: once (embeds them all), again on the
    unchanged folder, and after 10 photos changed, until a running server finds those 10."""
    folder, data_dir = work / "rerun-catalog", work / "data-rerun"
    env = {**os.environ, "DATA_DIR": str(data_dir), "API_KEY": KEY}
    write_photo_folder(folder, files, seed)
    run_cli(["migrate"], env, timeout=600)
    index = ["index", "--catalog", str(folder), "--quiet"]
    log(f"re-run: first index of {files:,} photos (embeds them all)")
    first, first_output = run_cli(index, env, timeout=args.import_timeout)
    report: dict[str, object] = {
        "files": files,
        "first_run": {"seconds": round(first, 1), "output": first_output[-800:]},
    }
    with running_server(env, timeout=args.ready_timeout) as server:
        client = Client(server.url)
        log("re-run: the unchanged folder")
        second, output = run_cli(index, env, timeout=600)
        report["unchanged_run"] = {"seconds": round(second, 2), "output": output[-800:]}
        changed = np.random.default_rng([seed, 1]).choice(files, size=min(10, files), replace=False)
        # New content on every run: a folder kept by --work-dir holds the last run's changed photos, and
        # writing the same bytes again would change nothing (and measure nothing).
        run_nonce = time.time_ns() % 2**32
        photos = {}
        for number in changed:
            photos[f"d{number // 1000:03d}/{number:06d}"] = photo = tiny_photo([seed, int(number), run_nonce])
            path = photo_path(folder, int(number))
            partial = path.with_suffix(".partial")
            partial.write_bytes(photo)
            partial.replace(path)  # as rsync does: whole new files, renamed into place
        log(f"re-run: {len(photos)} photos changed, until searchable")
        started = time.perf_counter()
        run_seconds, output = run_cli(index, env, timeout=600)
        missing = dict(photos)
        deadline = time.perf_counter() + 60
        while missing and time.perf_counter() < deadline:
            for sku, photo in list(missing.items()):
                if sku in result_skus(client.search(photo)[1]):
                    del missing[sku]
            if missing:
                time.sleep(0.2)
        report["changed_run"] = {
            "changed": len(photos),
            "embedded": embedded_count(output),
            "index_seconds": round(run_seconds, 2),
            "visible_seconds": round(time.perf_counter() - started, 2) if not missing else None,
            "not_visible": sorted(missing),
            "output": output[-800:],
        }
        client.close()
    return report


# --- report ----------------------------------------------------------------------------------


def _get(report: dict | None, *keys: str):
    for key in keys:
        if not isinstance(report, dict):
            return None
        report = report.get(key)
    return report


def done_when(results: dict) -> list[dict]:
    """The scale checks, each with its figure at N and whether it holds (None: not measured)."""
    small, large = results["catalogs"].get(str(results["small"])), results["catalogs"].get(str(results["products"]))
    lines = []

    def line(what: str, figure: str, holds: bool | None) -> None:
        lines.append({"what": what, "figure": figure, "holds": holds})

    def known(*values) -> bool:
        return all(v is not None for v in values)

    for kind in ("put", "delete"):
        p95, base = _get(large, "writes_visible", kind, "p95_ms"), _get(small, "writes_visible", kind, "p95_ms")
        ratio = _ratio(p95, base, 2)
        line(f"{kind.upper()} visible p95 <= 1 s and <= 2x the 10k figure",
             f"{p95} ms; {ratio}x ({base} ms at 10k)",
             known(p95) and p95 <= 1000 and (ratio is None or ratio <= 2))  # fmt: skip
    memory = _get(large, "memory") or {}
    after, peak = memory.get("after_over_before"), memory.get("peak_over_before")
    line("RSS after the writes <= 1.2x before", f"{after}x", known(after) and after <= 1.2)
    line("RSS peak during the writes <= 1.5x before", f"{peak}x", known(peak) and peak <= 1.5)
    p50, recall = _get(large, "similar", "unfiltered", "p50_ms"), _get(large, "similar", "recall_at_10", "mean")
    line("/similar p50 <= 15 ms with recall@10 >= 0.95", f"{p50} ms, recall {recall}",
         known(p50, recall) and p50 <= 15 and recall >= 0.95)  # fmt: skip
    filtered = {kind: _get(large, "similar", kind, "over_unfiltered_p50")
                for kind in ("category_own", "category_other", "price_range")}  # fmt: skip
    line("filtered /similar p50 <= 2x unfiltered (each filter)",
         ", ".join(f"{kind} {ratio}x" for kind, ratio in filtered.items()),
         all(r is not None and r <= 2 for r in filtered.values()))  # fmt: skip
    ratio = _get(large, "search", "over_reference")
    line("/api/search p50 <= 1.5x (one embedding + one search)", f"{ratio}x", known(ratio) and ratio <= 1.5)
    ready = _get(large, "ready_seconds")
    line("ready <= 5 s", f"{ready} s", known(ready) and ready <= 5)
    rerun = results.get("rerun")
    unchanged, visible = _get(rerun, "unchanged_run", "seconds"), _get(rerun, "changed_run", "visible_seconds")
    measured = rerun is not None and "error" not in rerun
    line("re-run on the unchanged catalog <= 15 s", f"{unchanged} s" if measured else "not measured",
         (known(unchanged) and unchanged <= 15) if measured else None)  # fmt: skip
    embedded = _get(rerun, "changed_run", "embedded")
    line("10 changed photos searchable <= 20 s", f"{visible} s ({embedded} embedded)" if measured else "not measured",
         (known(visible, embedded) and visible <= 20 and embedded == 10) if measured else None)  # fmt: skip
    return lines


def summary(results: dict) -> str:
    sizes = [key for key in (str(results["small"]), str(results["products"])) if key in results["catalogs"]]
    sizes = list(dict.fromkeys(sizes))
    catalogs = [results["catalogs"][key] for key in sizes]

    def mb(value) -> str:
        return "-" if value is None else f"{value / 2**20:,.0f} MB"

    def ms(report, *keys) -> str:
        p50, p95 = _get(report, *keys, "p50_ms"), _get(report, *keys, "p95_ms")
        return "-" if p50 is None else f"{p50} / {p95} ms"

    rows = [
        ("import", lambda c: f"{_get(c, 'import', 'seconds')} s"),
        ("ready", lambda c: f"{_get(c, 'ready_seconds')} s"),
        ("disk: index / database", lambda c: f"{mb(_get(c, 'disk_after_import', 'index_bytes'))} / "
                                             f"{mb(_get(c, 'disk_after_import', 'database_bytes'))}"),
        ("/similar p50 / p95", lambda c: ms(c, "similar", "unfiltered")),
        ("recall@10", lambda c: f"{_get(c, 'similar', 'recall_at_10', 'mean')}"),
        *[(f"/similar {kind} p50 / p95 (x unfiltered)",
           lambda c, kind=kind: f"{ms(c, 'similar', kind)} ({_get(c, 'similar', kind, 'over_unfiltered_p50')}x)")
          for kind in ("category_own", "category_other", "price_range")],
        ("/api/search p50 / p95 (x embed + search)",
         lambda c: f"{ms(c, 'search')} ({_get(c, 'search', 'over_reference')}x)"),
        ("PUT until visible p50 / p95", lambda c: ms(c, "writes_visible", "put")),
        ("DELETE until gone p50 / p95", lambda c: ms(c, "writes_visible", "delete")),
        ("RSS before / peak / after writes",
         lambda c: f"{_get(c, 'memory', 'before_writes', 'rss_mb')} / "
                   f"{_get(c, 'memory', 'during_writes', 'peak_rss_mb')} / "
                   f"{_get(c, 'memory', 'after_writes', 'rss_mb')} MB"),
        ("PSS (shared pages counted once) before / after writes",
         lambda c: f"{_get(c, 'memory', 'before_writes', 'pss_mb')} / "
                   f"{_get(c, 'memory', 'after_writes', 'pss_mb')} MB"),
    ]  # fmt: skip
    lines = ["| what | " + " | ".join(f"{int(key):,} products" for key in sizes) + " |",
             "|---|" + "---|" * len(sizes)]  # fmt: skip
    for title, figure in rows:
        cells = [figure(c) if "error" not in c else "error" for c in catalogs]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "| done when (at N) | figure | holds |", "|---|---|---|"]
    marks = {True: "yes", False: "**no**", None: "not measured"}
    lines += [f"| {line['what']} | {line['figure']} | {marks[line['holds']]} |" for line in results["done_when"]]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = [key for key in dict.fromkeys((str(results["small"]), str(results["products"])))
             if "error" not in results["catalogs"].get(key, {"error": 1})]  # fmt: skip
    if not sizes:
        return
    figure = Figure(figsize=(14, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    panels = [
        ("Read latency, p50 (ms)", {
            "/similar": ("similar", "unfiltered", "p50_ms"),
            "same\ncategory": ("similar", "category_own", "p50_ms"),
            "other\ncategory": ("similar", "category_other", "p50_ms"),
            "price\nrange": ("similar", "price_range", "p50_ms"),
            "/api/search": ("search", "p50_ms"),
        }),
        ("Write until visible, p95 (ms)", {
            "PUT": ("writes_visible", "put", "p95_ms"),
            "DELETE": ("writes_visible", "delete", "p95_ms"),
        }),
        ("Server memory (RSS, MB)", {
            "ready": ("memory", "ready", "rss_mb"),
            "before\nwrites": ("memory", "before_writes", "rss_mb"),
            "peak during\nwrites": ("memory", "during_writes", "peak_rss_mb"),
            "after\nwrites": ("memory", "after_writes", "rss_mb"),
        }),
    ]  # fmt: skip
    width = 0.8 / len(sizes)
    for number, (title, bars) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), number)
        positions = np.arange(len(bars))
        for offset, size in enumerate(sizes):
            values = [_get(results["catalogs"][size], *keys) or 0 for keys in bars.values()]
            drawn = axes.bar(positions + offset * width, values, width, label=f"{int(size):,} products")
            axes.bar_label(drawn, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], fontsize=7)
        axes.set_xticks(positions + width * (len(sizes) - 1) / 2, list(bars), fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.margins(y=0.15)
        axes.legend(fontsize=8)
    large = results["catalogs"][sizes[-1]]
    recall = _get(large, "similar", "recall_at_10", "mean")
    figure.suptitle(f"{int(sizes[-1]):,} synthetic products: recall@10 {recall}, ready {large.get('ready_seconds')} s"
                    f" — {results['machine']['cpus']} CPUs, {results['machine']['processor']}", fontsize=9)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path)


# --- main ------------------------------------------------------------------------------------


def machine_description() -> dict:
    from bench.__main__ import machine

    return machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--products", type=int, default=1_000_000, help="N, the large catalog (default 1,000,000)")
    parser.add_argument("--small", type=int, default=SMALL, help="the catalog measured beside it (default 10,000)")
    parser.add_argument(
        "--rerun-files",
        type=int,
        default=None,
        help="photos for the re-run check (default 100,000 when N >= 1,000,000, else 0: skipped)",
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "scale.json"), help="the chart goes beside it")
    parser.add_argument("--work-dir", help="keep the synthetic data and data folders here (default: a temporary one)")
    parser.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="real photos for the anchors and the queries")
    parser.add_argument("--anchors", type=int, default=300, help="real photos embedded as cluster anchors")
    parser.add_argument("--requests", type=int, default=200, help="products asked /similar about (and recall)")
    parser.add_argument("--searches", type=int, default=100, help="photo searches")
    parser.add_argument("--writes", type=int, default=20, help="PUTs and DELETEs timed until visible")
    parser.add_argument("--rss-writes", type=int, default=100, help="mixed writes while memory is sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--import-timeout", type=float, default=4 * 3600, help="seconds")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds")
    args = parser.parse_args(argv)
    if args.rerun_files is None:
        args.rerun_files = 100_000 if args.products >= 1_000_000 else 0
    if min(args.products, args.small) < sample_size(args):
        parser.error("--products and --small must be at least 4 x requests + 10 x writes + rss-writes (samples)")
    if args.anchors <= args.searches + args.writes:
        parser.error("--anchors must be more than searches + writes: each PUT and search has a photo of its own")
    if not has_import_vectors():
        log("`python -m indexer import-vectors` does not exist in this checkout yet")
        return 2
    out = Path(args.out)
    results: dict = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_description(),
                     "products": args.products, "small": min(args.small, args.products), "seed": args.seed,
                     "catalogs": {}, "phase_seconds": {}}  # fmt: skip
    phases = results["phase_seconds"]
    everything = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scale-", ignore_cleanup_errors=True) as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        settings = load_settings()
        # One single-threaded interpreter: as the server's request threads run theirs. An int8 model not yet
        # calibrated is calibrated on the real photos.
        photo_folder = Path(args.photos) if Path(args.photos).is_dir() else None
        metadata = catalog_metadata(photo_folder) if photo_folder else None
        embedder = load_embedder(settings.with_overrides(model_threads=1), catalog=photo_folder, metadata=metadata)
        started = time.perf_counter()
        source, photos = real_photos(args.anchors, Path(args.photos), args.seed)
        if len(photos) <= args.searches + args.writes:
            log(f"{source} has {len(photos)} usable photos; --searches + --writes must be fewer")
            return 2
        anchors = embed_photos(embedder, photos)
        categories = [photo.category for photo in photos]
        phases["anchors"] = round(time.perf_counter() - started, 1)
        results["anchors"] = {"source": source, "photos": len(photos), "categories": len(set(categories))}

        started = time.perf_counter()
        identity = {"model": embedder.identity.as_dict(), "source": source}
        large, reused = cached_or_generate(work / f"synthetic-{args.products}", args.products, anchors, categories,
                                           args.seed, identity)  # fmt: skip
        catalogs = [large]
        if args.small < args.products:
            catalogs.insert(0, prefix(large, work / f"synthetic-{args.small}", args.small))
        phases["generate"] = round(time.perf_counter() - started, 1)
        results["synthetic"] = {"reused": reused, "vectors_bytes": large.vectors.stat().st_size,
                                "cosine": cosine_to_anchors(large, anchors, seed=args.seed)}  # fmt: skip

        failed = False
        for catalog in catalogs:
            started = time.perf_counter()
            try:
                results["catalogs"][str(catalog.count)] = measure_catalog(
                    catalog, work, [p.data for p in photos], embedder, args
                )
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
                failed = True
                log(f"{catalog.count:,} products failed: {exc}")
                results["catalogs"][str(catalog.count)] = {"products": catalog.count, "error": str(exc)[-4000:]}
            phases[f"catalog_{catalog.count}"] = round(time.perf_counter() - started, 1)
        if args.rerun_files:
            started = time.perf_counter()
            try:
                results["rerun"] = measure_rerun(work, args.rerun_files, args.seed, args)
            except (RuntimeError, OSError) as exc:
                failed = True
                log(f"re-run check failed: {exc}")
                results["rerun"] = {"files": args.rerun_files, "error": str(exc)[-4000:]}
            phases["rerun"] = round(time.perf_counter() - started, 1)
        else:
            results["rerun"] = None
    phases["total"] = round(time.perf_counter() - everything, 1)
    results["done_when"] = done_when(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    chart(results, out.with_suffix(".png"))
    print(summary(results))
    log(f"wrote {out} and {out.with_suffix('.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_with_config(main))
