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
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from bench.record import portable, provenance
from bench.soak_backup import backup_after, check_backups
from bench.soak_load import KEY, SearchLoad, indexer_command, new_events, wrong_results
from bench.soak_model_change import soak_model_change
from bench.soak_outage import soak_outage
from bench.timing import until_seen
from indexer.config import REPO_ROOT, load_settings, run_with_config
from tests.support.http import Client, multipart_body, result_skus
from tests.support.server import running_server

VISIBLE_WITHIN_MS = 1000  # --servers 2: the p95 bound on a write through A reaching B


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
                                sorted({row["sku"] for row in first + second} | set(events["written"])),
                                max(0, args.products - len(first)))
        if args.backup else None,
    }  # fmt: skip


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


if __name__ == "__main__":
    sys.exit(run_with_config(main))
