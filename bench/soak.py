"""`make soak`: searches from several clients while the catalog is re-indexed, products are written
through the API and a compaction rebuilds the base; the acceptance is zero failed requests, zero
wrong results, and no old base left on disk a few seconds after the end.

    python -m bench.soak --catalog ../shared/datasets/grocery-store --metadata catalog.csv
    python -m bench.soak --products 100000     # the same, over 100,000 products (synthetic vectors)
    python -m bench.soak --servers 2           # two servers over one PostgreSQL database and one index folder

Loopback only, bounded in time and requests. A result is wrong when its sku was never in the
catalog nor written, was deleted through the API before the search was sent, or left the
catalog in a re-index that had finished publishing before the search was sent.
Writes bench/soak.json.

With --servers 2: two servers (`python -m service`) on two ports share one DATA_DIR and one PostgreSQL database
(DATABASE_URL when it names one, else a database in a throwaway cluster, tests/support/postgres.py). Writes
go through server A, each timed from its request until a photo search on server B shows it (a
DELETE: until B's GET answers 404 and the search no longer shows it); the clients search A and B in
turn, judged as above; a compaction runs a quarter of the way through the writes; afterwards both
servers must be on the compacted base and answer alike, with every write in place. No re-index.
Writes bench/soak-two-servers.json.

With --servers 2 --outage S (the throwaway cluster only): PostgreSQL is stopped for S seconds while the clients
search both servers and one writes through A; every search must answer 200 (from what each server holds, marked
stale), writes during the outage 503, every accepted write be found on both servers afterwards, and writes through
B, once the database is back, show on A within the bound. Writes bench/soak-outage.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import requests

from bench.record import portable, provenance
from bench.soak_backup import backup_after, check_backups
from bench.timing import until_seen
from indexer.config import REPO_ROOT, load_settings, run_with_config
from tests.support.http import Client, multipart_body, result_skus
from tests.support.server import running_server

KEY = "soak-test-key"
VISIBLE_WITHIN_MS = 1000
# --model-change: a search's best score within this of its photo's under one model was answered by that model.
SAME_SCORE = 2e-4  # --servers 2: the p95 bound on a write through A reaching B


class Search(NamedTuple):
    """A search as recorded: when it was sent (time.monotonic), its latency (s), status and result skus, the server
    ("a" or "b" with two, else None), which of the query photos it sent, and its best result's score."""

    sent: float
    latency: float
    status: int
    skus: list[str]
    server: str | None
    photo: int
    score: float | None


def write_catalog(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sku", "image", "title", "category"])
        writer.writeheader()
        writer.writerows({k: row[k] for k in ("sku", "image", "title", "category")} for row in rows)


def old_bases_left(index_dir: Path) -> list[str]:
    """Index bases on disk besides the current one, once every server process (idle workers included) has had
    time to let go of its old one: each must be removed by then."""
    from indexer.index.search import FOLLOW_BASE_EVERY_S
    from indexer.index.segments import read_manifest

    deadline = time.monotonic() + 2 * FOLLOW_BASE_EVERY_S + 3
    while True:
        current = read_manifest(index_dir)["base"]
        left = sorted(p.name for p in index_dir.glob("base-*") if p.name != current)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


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
    from indexer.embedding.model import load_embedder

    _, photos = real_photos(200, catalog, seed=0)
    embedder = load_embedder(load_settings(), catalog=catalog, metadata=metadata)  # int8: calibrated on it if need be
    anchors = embed_photos(embedder, photos, progress=False)
    return generate(folder, count, anchors, [p.category for p in photos], seed=0, progress=False)


# --- the run ---------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", default=str(REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"))
    parser.add_argument("--metadata", default="catalog.csv")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--writes", type=int, help="default 120; with --servers 2, 100")
    parser.add_argument("--seconds", type=float, default=60.0, help="upper bound on the search load's duration")
    parser.add_argument("--products", type=int, default=0,
                        help="bring the catalog up to this many products with synthetic vectors around the "
                             "photos' embeddings (bench.synthetic), imported with import-vectors")  # fmt: skip
    parser.add_argument("--servers", type=int, choices=(1, 2), default=1,
                        help="2: two servers over one PostgreSQL database and one shared DATA_DIR")  # fmt: skip
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="--servers 2: a PostgreSQL database the soak may fill (default: DATABASE_URL; "
                             "without either, a throwaway cluster)")  # fmt: skip
    parser.add_argument("--visible-within-ms", type=float, default=VISIBLE_WITHIN_MS,
                        help="--servers 2: p95 bound for a write through A to reach B (ms)")  # fmt: skip
    parser.add_argument("--backup", action="store_true",
                        help="a backup during the soak and one after, each restored and judged "
                             "(bench/soak_backup.py)")  # fmt: skip
    parser.add_argument("--model-change", choices=("int8", "fp32", "finetune"),
                        help="re-index the catalog at this precision, or with a version `finetune` activates first "
                             "(in a copy of the models folder), under the load instead: the server switches models "
                             "without a restart (real products only: imported vectors cannot be embedded "
                             "again)")  # fmt: skip
    parser.add_argument("--outage", type=float, default=0.0,
                        help="--servers 2: stop PostgreSQL for this many seconds under the load instead (the "
                             "throwaway cluster only)")  # fmt: skip
    parser.add_argument("--out", help="default bench/soak.json, with --servers 2 bench/soak-two-servers.json, "
                                      "with --outage bench/soak-outage.json")  # fmt: skip
    args = parser.parse_args(argv)
    if args.model_change and (args.servers != 1 or args.products or args.backup):
        parser.error("--model-change runs one server over the real products alone (no --products, no --backup)")
    if args.outage and (args.servers != 2 or args.database_url):
        parser.error("--outage stops the throwaway PostgreSQL cluster of --servers 2: leave DATABASE_URL unset")
    if args.writes is None:
        args.writes = 120 if args.servers == 1 else 100
    if args.out is None:
        name = "soak-outage.json" if args.outage else "soak-two-servers.json" if args.servers == 2 else "soak.json"
        name = "soak-backup.json" if args.backup else name
        if args.model_change:
            name = "soak-model-change-finetune.json" if args.model_change == "finetune" else "soak-model-change.json"
        args.out = str(REPO_ROOT / "bench" / name)
    return args


def prepare_catalog(catalog: Path, first: list[dict], second: list[dict], tmp: Path, env: dict, args) -> None:
    """The first catalog indexed (and brought up to --products with synthetic vectors); the second, which the
    re-index publishes, written beside it."""
    write_catalog(first, tmp / "first.csv")
    write_catalog(second, tmp / "second.csv")
    index(catalog, tmp / "first.csv", env)
    if args.products > len(first):
        synthetic = synthetic_products(catalog, catalog / args.metadata, first, args.products - len(first),
                                       tmp / "synthetic")  # fmt: skip
        indexer_command(["import-vectors", "--vectors", str(synthetic.vectors), "--products",
                         str(synthetic.products), "--quiet"], env)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    catalog = Path(args.catalog)
    with open(catalog / args.metadata, newline="") as handle:
        rows = list(csv.DictReader(handle))[::4][:700]
    first, second = rows[:600], rows[100:700]  # the re-index drops 100 products and adds 100
    every_photo = [(catalog / row["image"]).read_bytes() for row in rows]
    photos = every_photo[::7]  # what writes send
    # What searches send: more distinct photos than the servers remember (service/recent_queries.py), so that
    # each search decodes and embeds its photo, as a shopper's does.
    queries = [multipart_body(photo, {"k": "10"}) for photo in every_photo]

    with tempfile.TemporaryDirectory(prefix="soak-") as folder, contextlib.ExitStack() as stack:
        tmp = Path(folder)
        env = {**os.environ, "DATA_DIR": str(tmp / "data"), "API_KEY": KEY}
        cluster = None
        if args.servers == 2:
            env["DATABASE_URL"], database, cluster = stack.enter_context(postgresql_database(args.database_url))
        if args.model_change == "finetune":  # the fine-tuned version goes to a copy, not to the checkout's models
            env["MODELS_DIR"] = str(tmp / "models")
            shutil.copytree(load_settings().models_dir, tmp / "models")
        prepare_catalog(catalog, first, second, tmp, env, args)
        if args.servers == 2:
            urls = []
            for host in "ab":  # as two hosts: the same shared folder and database, a temporary folder each
                (tmp / f"host-{host}").mkdir()
                server = stack.enter_context(running_server({**env, "TMPDIR": str(tmp / f"host-{host}")}, timeout=300))
                urls.append(server.url)
            run = soak_outage if args.outage else soak_two_servers
            report = {"servers": 2, "database": database, **run(urls, env, photos, queries, first, args, cluster)}
        else:
            with running_server(env, timeout=300) as server:
                if args.model_change:
                    report = soak_model_change(server.url, catalog, tmp, env, photos, queries, first, args)
                else:
                    report = soak(server.url, catalog, tmp, env, photos, queries, first, second, args)
    # Error messages name the catalog and the data folder: relative to the repository, <work-dir>.
    report = portable({**provenance(), **report}, tmp, (catalog,))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "wrong_examples"}, indent=2))
    if args.servers == 2 or args.model_change:
        return 0 if report["passed"] else 1
    backup_failed = report.get("backup") is not None and not report["backup"]["passed"]
    return (
        0
        if report["errors"] == report["wrong_results"] == 0 and not report["old_bases_left"] and not backup_failed
        else 1
    )


@contextlib.contextmanager
def postgresql_database(url: str | None) -> Iterator[tuple[str, str, object]]:
    """(DATABASE_URL, where it is from, the cluster or None): the given URL, which must name PostgreSQL; without
    one, a database in a throwaway cluster (tests/support/postgres.py), stopped and removed afterwards."""
    if url:
        from sqlalchemy import make_url

        if make_url(url).get_backend_name() != "postgresql":
            raise SystemExit(f"--servers 2 shares one PostgreSQL database; DATABASE_URL is {make_url(url).drivername}")
        yield url, "PostgreSQL (DATABASE_URL)", None
        return
    from tests.support.postgres import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit(
            "--servers 2 without DATABASE_URL starts a throwaway PostgreSQL cluster, but initdb and postgres are not "
            "installed (Debian's postgresql package; PG_BINDIR names another folder of them)"
        )
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
        yield cluster.url(cluster.create_database(prefix="soak")), "PostgreSQL (throwaway cluster)", cluster
    finally:
        cluster.stop()


# --- the searches and how they are judged ----------------------------------------------------


def search_client(urls: list[str], offset: int, clients: int, bodies: list, stop: threading.Event, record) -> None:
    """Photo searches until stop is set, each to the next of urls in turn (one keep-alive connection each);
    record(Search) for each."""
    connections: list[http.client.HTTPConnection | None] = [None] * len(urls)
    number, turn = offset, offset
    while not stop.is_set():
        photo = number % len(bodies)
        body, content_type = bodies[photo]
        number += clients
        server, turn = turn % len(urls), turn + 1
        if connections[server] is None:
            connections[server] = http.client.HTTPConnection("127.0.0.1", int(urls[server].rsplit(":", 1)[1]),
                                                             timeout=30)  # fmt: skip
        connection = connections[server]
        sent = time.monotonic()
        try:
            connection.request("POST", "/api/search", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
            status = response.status
            results = json.loads(payload)["results"] if status == 200 else []
        except (OSError, http.client.HTTPException, ValueError):
            status, results = 0, []
            connection.close()
            connections[server] = None
        name = "ab"[server] if len(urls) > 1 else None
        best = results[0]["score"] if results else None
        record(Search(sent, time.monotonic() - sent, status, [r["sku"] for r in results], name, photo, best))
    for connection in connections:
        if connection is not None:
            connection.close()


class SearchLoad:
    """Photo searches from several clients (search_client) while other work runs, each search recorded."""

    def __init__(self, urls: list[str], clients: int, bodies: list):
        self.urls, self.clients, self.bodies = urls, clients, bodies
        self.searches: list[Search] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def record(self, search: Search) -> None:
        with self._lock:
            self.searches.append(search)

    def beside(self, workers: list[Callable[[], None]], timeout: float | None) -> tuple[float, float]:
        """Searches while the workers run: waits for each worker (up to timeout), searches 2 s more on the final
        state and stops; when the searches started (time.monotonic) and for how many seconds they ran."""
        arguments = [(self.urls, i, self.clients, self.bodies, self.stop, self.record) for i in range(self.clients)]
        searching = [threading.Thread(target=search_client, args=each) for each in arguments]
        working = [threading.Thread(target=worker) for worker in workers]
        started = time.monotonic()
        for thread in searching + working:
            thread.start()
        for thread in working:
            thread.join(timeout=timeout)
        time.sleep(2)  # a little more load on the final state
        self.stop.set()
        for thread in searching:
            thread.join()
        return started, time.monotonic() - started

    def latencies(self) -> dict[str, float | None]:
        """p50 and p99 of the answered searches, in ms."""
        latencies = [search.latency * 1000 for search in self.searches if search.status == 200]
        return {
            "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
            "p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
        }

    def errors(self) -> int:
        return sum(1 for search in self.searches if search.status != 200)


def wrong_results(searches: list[Search], events: dict, first: list[dict], second: list[dict], synthetic: bool,
                  started: float) -> list[dict]:  # fmt: skip
    """The results no search should have returned (the rules of the module's docstring)."""
    known = {row["sku"] for row in first} | {row["sku"] for row in second} | set(events["written"])
    removed = {row["sku"] for row in first} - {row["sku"] for row in second}
    wrong = []
    for sent, _, _, skus, server, *_ in searches:
        for sku in skus:
            deleted_at = events["deleted"].get(sku)
            if (
                (sku not in known and not (synthetic and sku.startswith("syn-")))
                or (deleted_at is not None and deleted_at < sent)
                or (sku in removed and events["reindexed_at"] is not None and events["reindexed_at"] < sent)
            ):
                wrong.append({"sku": sku, "sent": round(sent - started, 3), **({"server": server} if server else {})})
    return wrong


def new_events() -> dict:
    """When each change had finished (time.monotonic): sku -> time for the writes and deletions."""
    return {"written": {}, "deleted": {}, "reindexed_at": None, "compacted_at": None}


def compact_when(ready: Callable[[], object], env: dict, events: dict) -> None:
    """`indexer compact` once ready() returns, while the writes go on: every server switches base and replays
    the later changes."""
    ready()
    started = time.monotonic()
    try:
        indexer_command(["compact", "--quiet"], env)
        events["compacted_at"] = time.monotonic()
        events["compaction_span"] = (started, events["compacted_at"])
    except RuntimeError as exc:
        events["compaction_error"] = str(exc)


# --- one server ------------------------------------------------------------------------------


def write_through_api(url: str, photos: list[bytes], writes: int, events: dict, stop: threading.Event,
                      statuses: list[int]) -> None:  # fmt: skip
    """Products written through the API, each write's status kept; every fifth write deletes the product
    written just before."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEY}"}
    for i in range(writes):
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
        statuses.append(response.status_code)


def reindex_after(seconds: float, catalog: Path, metadata: Path, env: dict, events: dict) -> None:
    time.sleep(seconds)
    started = time.monotonic()
    try:
        index(catalog, metadata, env)
        events["reindexed_at"] = time.monotonic()
        events["reindex_span"] = (started, events["reindexed_at"])
    except RuntimeError as exc:
        events["reindex_error"] = str(exc)


def soak(url, catalog, tmp, env, photos, queries, first, second, args) -> dict:
    """One server searched while products are written through it, the catalog is re-indexed (after 3 s) and the
    base is compacted (after 6 s)."""
    events = new_events()
    load = SearchLoad([url], args.clients, queries)
    write_statuses: list[int] = []
    workers = [
        lambda: write_through_api(url, photos, args.writes, events, load.stop, write_statuses),
        lambda: reindex_after(3, catalog, tmp / "second.csv", env, events),
        lambda: compact_when(lambda: time.sleep(6), env, events),
    ]
    if args.backup:  # while the re-index and the writes run, as the compaction starts
        workers.append(backup_after(5, env, tmp / "backup-during", events))
    started, seconds = load.beside(workers, timeout=args.seconds)

    synthetic = args.products > len(first)  # synthetic skus (syn-0000001) stay in the catalog throughout
    wrong = wrong_results(load.searches, events, first, second, synthetic, started)
    return {
        "products": max(args.products, len(first)),
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "searches": len(load.searches),
        "requests_per_s": round(len(load.searches) / seconds, 1),
        **load.latencies(),
        "errors": load.errors(),
        "wrong_results": len(wrong),
        "wrong_examples": wrong[:20],
        "writes": len(write_statuses),
        "write_errors": sum(1 for status in write_statuses if status not in (200, 201)),
        "reindexed": events["reindexed_at"] is not None,
        "reindex_error": events.get("reindex_error"),
        "compacted": events["compacted_at"] is not None,
        "compaction_error": events.get("compaction_error"),
        "old_bases_left": old_bases_left(Path(env["DATA_DIR"]) / "index"),
        "backup": check_backups(url, env, tmp, tmp / "backup-during", events, photos,
                                sorted({row["sku"] for row in first + second} | set(events["written"])))
        if args.backup else None,
    }  # fmt: skip


# --- a change of model ------------------------------------------------------------------------


def soak_model_change(url, catalog, tmp, env, photos, queries, first, args) -> dict:
    """--model-change P: the catalog indexed again at precision P, or with the version `finetune` activates (run
    first, without load), 3 s into the load while the clients search and one writes through the API; the server
    switches to the new model and its base together, without a restart."""
    finetuned = None
    if args.model_change == "finetune":
        started = time.monotonic()
        output = indexer_command(["finetune", "--catalog", str(catalog), "--metadata", str(tmp / "first.csv"),
                                  "--quiet"], env)  # fmt: skip
        finetuned = {"minutes": round((time.monotonic() - started) / 60, 1),
                     "summary": [line for line in output.splitlines() if "active" in line][-1:]}  # fmt: skip
    index_env = env if finetuned else {**env, "PRECISION": args.model_change}
    model_before = requests.get(f"{url}/readyz", timeout=30).json()["model"]
    before = best_scores(url, queries)
    load = SearchLoad([url], args.clients, queries)
    writes: list[tuple[str, int, bytes]] = []
    watched: list[dict] = []
    span: dict[str, float] = {}

    def write() -> None:
        writer = Client(url, key=KEY)
        for number in range(args.writes):
            photo = photos[number % len(photos)]
            status, _, _ = writer.put(f"change-{number}", photo, {"title": f"Written {number}", "category": "api"})
            writes.append((f"change-{number}", status, photo))
            time.sleep(0.05)
        writer.close()

    def change() -> None:
        time.sleep(3)
        span["started"] = time.monotonic()
        indexer_command(["index", "--catalog", str(catalog), "--metadata", str(tmp / "first.csv"), "--quiet"],
                        index_env)  # fmt: skip
        span["ended"] = time.monotonic()

    def watch() -> None:  # /readyz every 0.25 s until the change is over
        while "ended" not in span or time.monotonic() < span["ended"] + 3:
            ready = requests.get(f"{url}/readyz", timeout=30).json()
            watched.append({"at": time.monotonic(), "model": ready["model"], "version": ready["model_version"],
                            "model_change": ready.get("model_change")})  # fmt: skip
            time.sleep(0.25)

    started, seconds = load.beside([write, change, watch], timeout=args.seconds)
    after = best_scores(url, queries)
    # A catalog photo's best match is itself throughout (the writes add copies of some, at the same score): a
    # search answered by one model finds it at that model's own score; one that embedded the query with one model
    # and searched the other's vectors would match neither. (The photos beyond the catalog find other products,
    # and later the copies written of them: their best scores move with the writes, so they are not judged.)
    judged = [s for s in load.searches if s.status == 200 and s.score is not None and s.photo < len(first)]
    mixed = [s for s in judged if min(abs(s.score - before[s.photo]), abs(s.score - after[s.photo])) > SAME_SCORE]
    accepted = [(sku, photo) for sku, status, photo in writes if status in (200, 201)]
    client = Client(url, key=KEY)
    lost = [sku for sku, photo in accepted if sku not in result_skus(client.search(photo, k=20)[1])]
    client.close()
    switched_at = next((w["at"] for w in watched if w["model"] != model_before), None)
    by_new_model = [s for s in load.searches if s.score is not None and s.photo in after
                    and abs(s.score - after[s.photo]) <= SAME_SCORE]  # fmt: skip
    events = {**new_events(), "written": dict.fromkeys((sku for sku, _ in accepted), started)}
    wrong = wrong_results(load.searches, events, first, first, False, started)
    report = {
        "products": len(first),
        "clients": args.clients,
        "model_change": args.model_change,
        "seconds": round(seconds, 1),
        "searches": len(load.searches),
        "requests_per_s": round(len(load.searches) / seconds, 1),
        **load.latencies(),
        "errors": load.errors(),
        "error_statuses": dict(Counter(str(search.status) for search in load.searches if search.status != 200)),
        "judged_for_mixing": len(judged),
        "mixed_answers": len(mixed),
        "answered_by_new_model": len(by_new_model),
        "reindex_seconds": round(span["ended"] - span["started"], 1) if "ended" in span else None,
        "switched_after_reindex_s": round(switched_at - span["ended"], 2) if switched_at and "ended" in span else None,
        "change_under_way_seen": any(w["model_change"] for w in watched),
        "finetune": finetuned,
        "model_before": {**model_before, "version": watched[0]["version"] if watched else None},
        "model_after": {**watched[-1]["model"], "version": watched[-1]["version"]} if watched else None,
        "writes": len(writes),
        "writes_refused": sum(1 for _, status, _ in writes if status not in (200, 201)),
        "accepted": len(accepted),
        "accepted_then_lost": len(lost),
        "lost_examples": lost[:5],
        "wrong_results": len(wrong),
    }
    report["passed"] = bool(
        report["errors"] == report["mixed_answers"] == report["accepted_then_lost"] == report["wrong_results"] == 0
        and switched_at is not None
        and (finetuned is not None or report["model_after"]["precision"] == args.model_change)
        and report["answered_by_new_model"] > 0
    )
    return report


def best_scores(url: str, queries: list) -> dict[int, float]:
    """Each query photo's best result score, searched once."""
    client = Client(url, key=KEY)
    scores = {}
    for number, (body, content_type) in enumerate(queries):
        status, data, _ = client.call("POST", "/api/search", body, {"Content-Type": content_type})
        if status == 200 and data["results"]:
            scores[number] = data["results"][0]["score"]
    client.close()
    return scores


# --- two servers -----------------------------------------------------------------------------

# A write as sent: ("put" or "delete", sku, photo).
Write = tuple[str, str, bytes]


def planned_writes(count: int, photos: list[bytes]) -> list[Write]:
    """Four new products, then the deletion of the fourth, and so on; a photo each (none used twice)."""
    writes: list[Write] = []
    for i in range(count):
        writes.append(("delete", *writes[-1][1:]) if i % 5 == 4 else ("put", f"two-{i}", photos[i % len(photos)]))
    return writes


class WritesThroughA:
    """The writes sent to server A in turn, each timed until server B shows it; the compaction is let go a quarter
    of the way through them (compact_now)."""

    def __init__(self, on_a: Client, on_b: Client, writes: list[Write], events: dict):
        self.on_a, self.on_b, self.writes, self.events = on_a, on_b, writes, events
        self.statuses: list[int] = []
        self.sent_at: dict[int, float] = {}
        self.visible_ms: list[float] = []
        self.outcome: dict = {}
        self.compact_now = threading.Event()

    def send(self, item: Write) -> tuple[int, object, float]:
        kind, sku, photo = item
        if len(self.statuses) == len(self.writes) // 4:
            self.compact_now.set()
        self.sent_at[id(item)] = time.perf_counter()
        if kind == "put":
            fields = {"title": f"Two-server product {len(self.statuses)}", "category": "api"}
            status, data, ms = self.on_a.put(sku, photo, fields)
        else:
            status, data, ms = self.on_a.delete(sku)
        self.statuses.append(status)
        if status in (200, 201):
            if kind == "put":
                self.events["written"][sku] = time.monotonic()
                self.events["deleted"].pop(sku, None)
            else:
                self.events["deleted"][sku] = time.monotonic()
        return status, data, ms

    def seen_on_b(self, item: Write) -> bool:
        kind, sku, photo = item
        status, data, _ = self.on_b.search(photo)
        if status != 200:
            return False
        if kind == "put":
            shown = sku in result_skus(data)
        else:
            shown = sku not in result_skus(data) and self.on_b.product_status(sku) == 404
        if shown:
            self.visible_ms.append((time.perf_counter() - self.sent_at[id(item)]) * 1000)
        return shown

    def run(self) -> None:
        try:
            self.outcome["visible"] = until_seen("writes on A until visible on B", self.writes, self.send,
                                                 self.seen_on_b, "not_visible_within_s")  # fmt: skip
        except Exception as exc:  # reported, and the run fails
            self.outcome["writer_error"] = repr(exc)
        finally:
            self.compact_now.set()
            self.events["writes_done_at"] = time.monotonic()


def state_after(on_a: Client, on_b: Client, writes: list[Write], events: dict, base_after: str) -> tuple[dict, dict]:
    """Afterwards: whether both servers are on the compacted base, give the same answers, and have every write in
    place; and the model server B reports."""
    after: dict = {"index_versions": {}, "disagreements": 0, "missing": 0, "resurrected": 0, "wrong_skus": []}
    answers: dict[str, list[list[str]]] = {}
    for name, client in (("a", on_a), ("b", on_b)):
        status, data, _ = client.call("GET", "/readyz")
        after["index_versions"][name] = (data or {}).get("index_version", f"/readyz answered {status}")
        model = (data or {}).get("model", {})
        answers[name] = []
        for kind, _, photo in writes:
            if kind == "put":
                status, data, _ = client.search(photo)
                answers[name].append(result_skus(data))
                if status != 200:
                    after.setdefault("errors", []).append(f"{name}: {status} {str(data)[:200]}")
    after["both_on_compacted_base"] = all(v.startswith(f"{base_after}+") for v in after["index_versions"].values())
    puts = [sku for kind, sku, _ in writes if kind == "put"]
    for number, sku in enumerate(puts):
        found = [sku in answers[name][number] for name in "ab"]
        after["disagreements"] += answers["a"][number] != answers["b"][number]
        if sku in events["deleted"]:
            after["resurrected"] += sum(found)
        else:
            after["missing"] += found.count(False)
        if (sku in events["deleted"]) == any(found) or answers["a"][number] != answers["b"][number]:
            after["wrong_skus"].append(sku)
    return after, model


def soak_two_servers(urls: list[str], env: dict, photos: list[bytes], queries: list, first: list[dict], args,
                     cluster: object = None) -> dict:  # fmt: skip
    """--servers 2: writes through A, each until B shows it; searches on both meanwhile; a compaction."""
    from indexer.index.segments import read_manifest

    index_dir = Path(env["DATA_DIR"]) / "index"
    base_before = read_manifest(index_dir)["version"]
    events = new_events()
    load = SearchLoad(urls, args.clients, queries)
    on_a, on_b = Client(urls[0], key=KEY), Client(urls[1], key=KEY)
    writer = WritesThroughA(on_a, on_b, planned_writes(args.writes, photos), events)
    # The compaction a quarter of the way through the writes: both servers switch base and replay the rest.
    started, seconds = load.beside([writer.run, lambda: compact_when(writer.compact_now.wait, env, events)],
                                   timeout=None)  # fmt: skip
    base_after = read_manifest(index_dir)["version"]
    after, model = state_after(on_a, on_b, writer.writes, events, base_after)
    on_a.close()
    on_b.close()

    wrong = wrong_results(load.searches, events, first, first, args.products > len(first), started)
    statuses, visible_ms = writer.statuses, writer.visible_ms
    report = {
        "products": max(args.products, len(first)),
        "model": {name: model.get(name) for name in ("model", "dim", "precision", "whitening")},
        "clients": args.clients,
        "seconds": round(seconds, 1),
        "searches": len(load.searches),
        "searches_by_server": {name: sum(1 for search in load.searches if search.server == name) for name in "ab"},
        "requests_per_s": round(len(load.searches) / seconds, 1),
        **load.latencies(),
        "errors": load.errors(),
        "error_statuses": dict(Counter(str(search.status) for search in load.searches if search.status != 200)),
        "wrong_results": len(wrong),
        "wrong_examples": wrong[:20],
        "writes": len(statuses),
        "write_errors": sum(1 for status in statuses if status not in (200, 201)),
        "writer_error": writer.outcome.get("writer_error"),
        "visible_on_b": {
            **writer.outcome.get("visible", {}),
            "max_ms": round(max(visible_ms), 2) if visible_ms else None,
            "bound_ms": args.visible_within_ms,
            "over_bound": sum(ms > args.visible_within_ms for ms in visible_ms),
        },
        "compacted": events["compacted_at"] is not None,
        "compaction_error": events.get("compaction_error"),
        "compacted_during_writes": events["compacted_at"] is not None
        and events["compacted_at"] < events["writes_done_at"],
        "base_before": base_before,
        "base_after": base_after,
        "after": after,
        "old_bases_left": old_bases_left(index_dir),
    }
    report["passed"] = two_servers_passed(report, args.writes, args.visible_within_ms)
    return report


def two_servers_passed(report: dict, writes: int, visible_within_ms: float) -> bool:
    """No failed or wrong search; every write through A made, and shown on B within the bound at p95; the
    base compacted; both servers on it, answering alike with every write in place; no old base left."""
    visible, after = report["visible_on_b"], report["after"]
    return bool(
        report["errors"] == 0
        and report["wrong_results"] == 0
        and report["writes"] == writes
        and report["write_errors"] == 0
        and visible.get("not_visible_within_s") == 0
        and (visible.get("p95_ms") or 0) <= visible_within_ms
        and report["compacted"]
        and report["base_after"] != report["base_before"]
        and after["both_on_compacted_base"]
        and after["disagreements"] == after["missing"] == after["resurrected"] == 0
        and not report["old_bases_left"]
    )


# --- a database outage -----------------------------------------------------------------------


def soak_outage(urls: list[str], env: dict, photos: list[bytes], queries: list, first: list[dict], args,
                cluster) -> dict:  # fmt: skip
    """--outage S: PostgreSQL stopped for S seconds while the clients search A and B and one writes through A."""
    on_a, on_b = Client(urls[0], key=KEY), Client(urls[1], key=KEY)
    load = SearchLoad(urls, args.clients, queries)
    writes: list[tuple[str, int, float]] = []  # (sku, status, sent)
    stale: list[dict] = []
    timeline: dict[str, float] = {}

    def write() -> None:  # until 3 s after the database is back
        number = 0
        while "resumed" not in timeline or time.monotonic() < timeline["resumed"] + 3:
            sku = f"outage-{number}"
            sent = time.monotonic()
            status, _, _ = on_a.put(sku, photos[number % len(photos)], {"title": sku, "category": "api"})
            writes.append((sku, status, sent))
            number += 1
            time.sleep(0.05)

    def outage() -> None:
        time.sleep(3)
        timeline["stopped"] = time.monotonic()
        cluster.pause()
        time.sleep(args.outage / 2)
        for name, url in zip("ab", urls, strict=True):  # a client of its own: the writer's is in use
            response = requests.get(f"{url}/readyz", timeout=30)
            stale.append({"server": name, "status": response.status_code, "stale": response.json().get("stale")})
        time.sleep(args.outage / 2)
        cluster.resume()
        timeline["resumed"] = time.monotonic()

    # The outage in this thread: the cluster's server is told to stop when the thread that started it ends.
    searching = threading.Thread(target=lambda: timeline.update(seconds=load.beside([write], timeout=None)[1]))
    searching.start()
    outage()
    searching.join()
    seconds = timeline["seconds"]
    down = (timeline["stopped"], timeline["resumed"])
    during = [status for _, status, sent in writes if down[0] <= sent < down[1]]
    accepted = [sku for sku, status, _ in writes if status in (200, 201)]
    lost = [sku for sku in accepted for client in (on_a, on_b) if client.product_status(sku) != 200]
    # Once it is back: writes through B, each timed until a photo search on A shows it.
    after = [("put", f"after-{number}", photos[-1 - number]) for number in range(20)]
    visible = until_seen(
        "writes on B until visible on A", after, lambda item: on_b.put(item[1], item[2], {}),
        lambda item: item[1] in result_skus(on_a.search(item[2])[1]), "not_visible_within_s",
    )  # fmt: skip
    on_a.close()
    on_b.close()
    report = {
        "products": max(args.products, len(first)),
        "clients": args.clients,
        "outage_s": round(down[1] - down[0], 1),
        "seconds": round(seconds, 1),
        "searches": len(load.searches),
        "searches_during_outage": sum(1 for sent, *_ in load.searches if down[0] <= sent < down[1]),
        **load.latencies(),
        "errors": load.errors(),
        "error_statuses": dict(Counter(str(search.status) for search in load.searches if search.status != 200)),
        # the reason names the cluster's socket: a temporary folder of this machine
        "readyz_during_outage": json.loads(json.dumps(stale).replace(str(cluster.folder), "<cluster>")),
        "writes": len(writes),
        "writes_during_outage": len(during),
        "refused_during_outage": sum(1 for status in during if status == 503),
        "accepted": len(accepted),
        "accepted_then_lost": len(lost),
        "lost_examples": lost[:5],
        "visible_on_a_after": visible,
        "bound_ms": args.visible_within_ms,
    }
    report["passed"] = bool(
        report["errors"] == 0
        and report["searches_during_outage"] > 0
        and all(entry["status"] == 200 and entry["stale"] for entry in stale)
        and report["refused_during_outage"] > 0
        and not report["accepted_then_lost"]
        and visible["not_visible_within_s"] == 0
        and visible["errors"] == 0
        and (visible.get("p95_ms") or 0) <= args.visible_within_ms
    )
    return report


if __name__ == "__main__":
    sys.exit(run_with_config(main))
