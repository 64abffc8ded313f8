"""`make soak SERVERS=2 OUTAGE=10`: PostgreSQL (the throwaway cluster) stopped under two servers' searches and
writes; every search must answer 200, writes during the outage 503, every accepted one be kept, and writes through
B show on A once the database is back."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import requests

from bench.soak_load import KEY, SearchLoad
from bench.timing import until_seen
from tests.support.http import Client, result_skus


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
