"""Batches against single searches on the production server: photos per second of a batch of 16 photos (POST
/api/search/batch) and of 16 single searches from 4 clients (POST /api/search, multipart as a browser sends them),
in rounds that alternate the two, and their ratio (the batch's target: at least 1).

    python -m bench.batch [--catalog <folder>] [--rounds 3]   # this step alone: indexes 1,000 of its photos first

Run alone, it first measures the ways of putting a batch's photos through the network in this process (one image
per invoke, one batched invoke, two interpreters side by side) and their decoding on one and two threads
(`--forward-passes-only`: only that). `make bench` runs the HTTP comparison on its int8 index and adds it to
bench/results.json ("batch"). The photos are distinct catalog photos, more than a server process's recent-query
cache holds (64), so every photo is decoded and embedded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from urllib3.filepost import encode_multipart_formdata

from bench.record import emit, provenance
from bench.synthetic import index_photos, real_photos
from indexer.config import REPO_ROOT, load_settings, run_with_config
from tests.support.load import run_wrk, search_bodies, wrk_path
from tests.support.server import running_server

BATCH = 16
CLIENTS = 4
FIELDS = {"k": "12"}


@contextmanager
def batch_bodies(photos: list[bytes], fields: dict[str, str]) -> Iterator[tuple[Path, str]]:
    """The photos BATCH at a time as batch request bodies (multipart, one boundary for all) in a temporary folder,
    for wrk.lua; yields the folder and the content type."""
    boundary = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as folder:
        for number in range(len(photos) // BATCH):
            group = photos[number * BATCH : (number + 1) * BATCH]
            parts = [*fields.items(), *(("image", (f"{i}.jpg", photo)) for i, photo in enumerate(group))]
            body, content_type = encode_multipart_formdata(parts, boundary=boundary)
            (Path(folder) / f"{number:05d}.body").write_bytes(body)
        yield Path(folder), content_type


def _check_answers(url: str, bodies: tuple[Path, str]) -> None:
    """Every item of a batch is answered with results before anything is timed: a batch of errors would be fast."""
    folder, content_type = bodies
    body = next(iter(sorted(folder.glob("*.body")))).read_bytes()
    answer = requests.post(f"{url}/api/search/batch", data=body, headers={"Content-Type": content_type}, timeout=120)
    items = answer.json().get("items", []) if answer.status_code == 200 else []
    if len(items) != BATCH or not all(item.get("results") for item in items):
        raise RuntimeError(f"the batch was not answered with results: {answer.status_code} {answer.text[:500]}")


def measure_batch(data_dir: Path, photos: list[bytes], seconds: int = 10, rounds: int = 2, **env: str) -> dict:
    """Start the server on an indexed data folder; in each round, single searches from CLIENTS clients, then batches
    of BATCH photos from one client and from CLIENTS clients, each for `seconds`; photos per second of each and the
    batches' over the singles' of the same round."""
    photos = photos[: len(photos) // BATCH * BATCH]
    search_url = "/api/search"
    with (
        running_server({"DATA_DIR": str(data_dir), **env}) as server,
        search_bodies(photos, FIELDS) as singles,
        batch_bodies(photos, FIELDS) as batches,
    ):
        _check_answers(server.url, batches)
        run_wrk(f"{server.url}{search_url}", *singles, clients=CLIENTS, seconds=2)  # warm-up: every worker's first
        run_wrk(f"{server.url}/api/search/batch", *batches, clients=1, seconds=2)
        measured = []
        for _ in range(rounds):
            single = run_wrk(f"{server.url}{search_url}", *singles, clients=CLIENTS, seconds=seconds)
            one = run_wrk(f"{server.url}/api/search/batch", *batches, clients=1, seconds=seconds)
            many = run_wrk(f"{server.url}/api/search/batch", *batches, clients=CLIENTS, seconds=seconds)
            singles_rate = single["requests_per_s"]
            measured.append(
                {
                    "singles_4_clients": {**single, "photos_per_s": singles_rate},
                    "batch_1_client": {**one, "photos_per_s": round(BATCH * one["requests_per_s"], 2)},
                    "batch_4_clients": {**many, "photos_per_s": round(BATCH * many["requests_per_s"], 2)},
                    "batch_1_client_over_singles": round(BATCH * one["requests_per_s"] / singles_rate, 3),
                    "batch_4_clients_over_singles": round(BATCH * many["requests_per_s"] / singles_rate, 3),
                }
            )
    return {
        "photos_per_batch": BATCH,
        "single_clients": CLIENTS,
        "distinct_photos": len(photos),
        "seconds_each": seconds,
        "rounds": measured,
        # The median round: the machine's neighbours move its speed between rounds.
        "batch_1_client_over_singles": statistics.median(r["batch_1_client_over_singles"] for r in measured),
        "batch_4_clients_over_singles": statistics.median(r["batch_4_clients_over_singles"] for r in measured),
        "errors": sum(
            r[key]["errors"] for r in measured for key in ("singles_4_clients", "batch_1_client", "batch_4_clients")
        ),
    }


def measure_forward_passes(photos: list[bytes], rounds: int = 3, repeats: int = 9) -> list[dict[str, float]]:
    """Photos per second of BATCH photos, in each round: through the configured network, one image per invoke on
    one single-threaded interpreter (LiteRTEngine), the whole batch in one invoke of an interpreter resized to take
    it, one image per invoke on two interpreters side by side (a server process's pool, on threads), and half the
    batch per invoke on each of two; and their decoding as a search decodes them (service.recent_queries: the photo
    re-encoded as kept, then decoded for the network), on one thread and on two."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from indexer.embedding.images import load_pixels, reencoded
    from indexer.embedding.model import INPUT_SIZE, load_embedder
    from service.recent_queries import STORED_SIDE

    group = photos[:BATCH]
    engine = load_embedder(load_settings().with_overrides(model_threads=1), create_export=False, concurrency=2).engine
    pixels = np.stack([load_pixels(photo, INPUT_SIZE) for photo in group])
    halves = np.array_split(pixels, 2)

    def resized(size: int):
        interpreter = Interpreter(model_content=engine.model_content, num_threads=1)
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [size, INPUT_SIZE, INPUT_SIZE, 3])
        interpreter.allocate_tensors()
        return interpreter

    def invoke(interpreter, batch: np.ndarray) -> None:
        source = interpreter.get_input_details()[0]
        interpreter.set_tensor(source["index"], batch.astype(source["dtype"]))
        interpreter.invoke()

    def decode(photo: bytes) -> np.ndarray:
        return load_pixels(reencoded(photo, STORED_SIDE)[0], INPUT_SIZE)

    whole, pair = resized(len(pixels)), [resized(len(half)) for half in halves]
    with ThreadPoolExecutor(max_workers=2) as pool:
        ways = {
            "one_interpreter_one_image_per_invoke": lambda: engine.features(pixels),
            "one_interpreter_whole_batch_per_invoke": lambda: invoke(whole, pixels),
            "two_interpreters_one_image_per_invoke": lambda: list(pool.map(engine.features, halves)),
            "two_interpreters_half_batch_per_invoke": lambda: list(pool.map(invoke, pair, halves)),
            "decode_one_thread": lambda: [decode(photo) for photo in group],
            "decode_two_threads": lambda: list(pool.map(decode, group)),
        }
        measured = []
        for _ in range(rounds):
            measured.append({name: round(len(group) / _median_seconds(way, repeats), 1) for name, way in ways.items()})
    return measured


def _median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--catalog", default=str(REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"),
                        help="photos to index and search with (default: the grocery-store dataset, else the demo "
                        "catalog or scikit-image's photos)")  # fmt: skip
    parser.add_argument("--index", type=int, default=1000, help="catalog photos to index")
    parser.add_argument("--photos", type=int, default=192, help="of them, distinct photos to search with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="each load, in each round")
    parser.add_argument("--out", help="write the figures here as JSON too")
    parser.add_argument("--forward-passes-only", action="store_true", help="only the in-process forward passes")
    args = parser.parse_args(argv)
    wrk_path()  # say at once when the load generator is missing
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        source, photos = real_photos(args.index, Path(args.catalog), seed=0)
        print(f"bench: indexing {len(photos)} photos of {source} ...", file=sys.stderr, flush=True)
        settings = index_photos(photos, Path(tmp))
        queries = [photo.data for photo in photos[: args.photos]]
        print(f"bench: {BATCH} photos through the network four ways, and decoded ...", file=sys.stderr, flush=True)
        results = {**provenance(), "precision": settings.precision, "indexed": len(photos)}
        results["forward_passes"] = measure_forward_passes(queries, args.rounds)
        if not args.forward_passes_only:
            print(f"bench: {BATCH} photos a batch against single searches from {CLIENTS} clients, {args.rounds} "
                  "rounds ...", file=sys.stderr, flush=True)  # fmt: skip
            results |= measure_batch(settings.data_dir, queries, args.seconds, args.rounds)
    emit(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_with_config(main))
