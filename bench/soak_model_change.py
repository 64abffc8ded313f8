"""`make soak MODEL_CHANGE=fp32|int8|finetune`: `make index` with another model under the soak's load (after `make
finetune` into a copy of the models folder, for finetune); the server must switch to it without a failed search,
an answer mixing the two models or a lost write."""

from __future__ import annotations

import time
from collections import Counter

import requests

from bench.soak_load import KEY, SearchLoad, indexer_command, new_events, wrong_results
from tests.support.http import Client, result_skus

# A search's best score within this of its photo's under one model was answered by that model.
SAME_SCORE = 2e-4


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
