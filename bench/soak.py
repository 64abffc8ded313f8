"""`make soak`: searches from several clients while the catalog is re-indexed, products are written
through the API and a compaction rebuilds the base; the acceptance is zero failed requests and zero
wrong results.

    python -m bench.soak --catalog ../shared/datasets/grocery-store --metadata catalog.csv
    python -m bench.soak --products 100000     # the same, over 100,000 products (synthetic vectors)

Loopback only, bounded in time and requests. A result is wrong when its sku was never in the
catalog nor written, was deleted through the API before the search was sent, or left the
catalog in a re-index that had finished publishing before the search was sent.
Writes bench/soak.json.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from bench.load import multipart_body
from bench.server import running_server
from indexer.config import REPO_ROOT

KEY = "soak-test-key"


def write_catalog(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sku", "image", "title", "category"])
        writer.writeheader()
        writer.writerows({k: row[k] for k in ("sku", "image", "title", "category")} for row in rows)


def indexer_command(arguments: list[str], env: dict) -> str:
    """Run `python -m indexer ...`; its output, or RuntimeError with its error output."""
    result = subprocess.run([sys.executable, "-m", "indexer", *arguments], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"indexer {arguments[0]} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def index(catalog: Path, metadata: Path, env: dict) -> None:
    indexer_command(["index", "--catalog", str(catalog), "--metadata", str(metadata), "--quiet"], env)


def synthetic_products(catalog: Path, metadata: Path, rows: list[dict], count: int, folder: Path):
    """`count` products whose vectors are clustered around the embeddings of some of the catalog's photos."""
    from bench.synthetic import embed_photos, generate, real_photos
    from indexer.config import load_settings
    from indexer.model import load_embedder

    _, photos = real_photos(200, catalog, seed=0)
    embedder = load_embedder(load_settings(), catalog=catalog, metadata=metadata)  # int8: calibrated on it if need be
    anchors = embed_photos(embedder, photos, progress=False)
    return generate(folder, count, anchors, [p.category for p in photos], seed=0, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", default=str(REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"))
    parser.add_argument("--metadata", default="catalog.csv")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--writes", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=60.0, help="upper bound on the search load's duration")
    parser.add_argument("--products", type=int, default=0,
                        help="bring the catalog up to this many products with synthetic vectors around the "
                             "photos' embeddings (bench.synthetic), imported with import-vectors")  # fmt: skip
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "soak.json"))
    args = parser.parse_args(argv)
    catalog = Path(args.catalog)
    with open(catalog / args.metadata, newline="") as handle:
        rows = list(csv.DictReader(handle))[::4][:700]
    first, second = rows[:600], rows[100:700]  # the re-index drops 100 products and adds 100
    photos = [(catalog / row["image"]).read_bytes() for row in rows[::7]]

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "DATA_DIR": str(tmp / "data"), "API_KEY": KEY}
        write_catalog(first, tmp / "first.csv")
        write_catalog(second, tmp / "second.csv")
        index(catalog, tmp / "first.csv", env)
        if args.products > len(first):
            synthetic = synthetic_products(catalog, catalog / args.metadata, first, args.products - len(first),
                                           tmp / "synthetic")  # fmt: skip
            indexer_command(["import-vectors", "--vectors", str(synthetic.vectors), "--products",
                             str(synthetic.products), "--quiet"], env)  # fmt: skip
        with running_server(env, timeout=300) as server:
            report = soak(server.url, catalog, tmp, env, photos, first, second, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "wrong_examples"}, indent=2))
    return 0 if report["errors"] == 0 and report["wrong_results"] == 0 else 1


def soak(url, catalog, tmp, env, photos, first, second, args) -> dict:
    lock = threading.Lock()
    # sku -> time the change had finished
    events = {"written": {}, "deleted": {}, "reindexed_at": None, "compacted_at": None}
    searches: list[tuple[float, float, int, list[str]]] = []  # (sent, latency, status, skus)
    stop = threading.Event()
    bodies = [multipart_body(photo, {"k": "10"}) for photo in photos]

    def search_client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        number = offset
        while not stop.is_set():
            body, content_type = bodies[number % len(bodies)]
            number += args.clients
            sent = time.monotonic()
            try:
                connection.request("POST", "/api/search", body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                payload = response.read()
                status = response.status
                skus = [r["sku"] for r in json.loads(payload)["results"]] if status == 200 else []
            except (OSError, http.client.HTTPException, ValueError):
                status, skus = 0, []
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
            with lock:
                searches.append((sent, time.monotonic() - sent, status, skus))
        connection.close()

    write_statuses: list[int] = []

    def writer() -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {KEY}"}
        for i in range(args.writes):
            if stop.is_set():
                break
            sku = f"api-{i % 40}"
            if i % 5 == 4:  # every fifth write deletes the product written just before
                sku = f"api-{(i - 1) % 40}"
                response = session.delete(f"{url}/api/products/{sku}", headers=headers, timeout=60)
                if response.status_code == 200:
                    events["deleted"][sku] = time.monotonic()
            else:
                photo = photos[i % len(photos)]
                response = session.put(f"{url}/api/products/{sku}", files={"image": ("p.jpg", photo)},
                                       data={"title": f"API product {i}", "category": "api"}, headers=headers,
                                       timeout=60)  # fmt: skip
                if response.status_code in (200, 201):
                    events["written"][sku] = time.monotonic()
                    events["deleted"].pop(sku, None)
            write_statuses.append(response.status_code)

    def reindexer() -> None:
        time.sleep(3)
        try:
            index(catalog, tmp / "second.csv", env)
            events["reindexed_at"] = time.monotonic()
        except RuntimeError as exc:
            events["reindex_error"] = str(exc)

    def compactor() -> None:
        time.sleep(6)  # while the writes go on: every server switches base and replays the later changes
        try:
            indexer_command(["compact", "--quiet"], env)
            events["compacted_at"] = time.monotonic()
        except RuntimeError as exc:
            events["compaction_error"] = str(exc)

    threads = [threading.Thread(target=search_client, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=t) for t in (writer, reindexer, compactor)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads[args.clients :]:
        thread.join(timeout=args.seconds)
    time.sleep(2)  # a little more load on the final state
    stop.set()
    for thread in threads[: args.clients]:
        thread.join()
    seconds = time.monotonic() - started

    known = {row["sku"] for row in first} | {row["sku"] for row in second} | set(events["written"])
    synthetic = args.products > len(first)  # synthetic skus (syn-0000001) stay in the catalog throughout
    removed = {row["sku"] for row in first} - {row["sku"] for row in second}
    wrong = []
    for sent, _, _, skus in searches:
        for sku in skus:
            deleted_at = events["deleted"].get(sku)
            if (
                (sku not in known and not (synthetic and sku.startswith("syn-")))
                or (deleted_at is not None and deleted_at < sent)
                or (sku in removed and events["reindexed_at"] is not None and events["reindexed_at"] < sent)
            ):
                wrong.append({"sku": sku, "sent": round(sent - started, 3)})  # fmt: skip
    latencies = [latency * 1000 for _, latency, status, _ in searches if status == 200]
    return {
        "products": max(args.products, len(first)),
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "searches": len(searches),
        "requests_per_s": round(len(searches) / seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        "errors": sum(1 for _, _, status, _ in searches if status != 200),
        "wrong_results": len(wrong),
        "wrong_examples": wrong[:20],
        "writes": len(write_statuses),
        "write_errors": sum(1 for status in write_statuses if status not in (200, 201)),
        "reindexed": events["reindexed_at"] is not None,
        "reindex_error": events.get("reindex_error"),
        "compacted": events["compacted_at"] is not None,
        "compaction_error": events.get("compaction_error"),
    }


if __name__ == "__main__":
    sys.exit(main())
