"""The index's whitening and model swapped while searches and writes run: no request embeds its query with one and
searches the other, and every write is stored under the identity of the index it was checked against, or is
refused with 503 to be sent again. The real model, FAISS, SQLite and the Flask app, with requests in threads.

A search of a catalog photo's own pixels finds that product with a score of 1 only when the query was embedded as
the base it searched was built: with any other whitening the score drops (or the lengths differ), so the score of
each answer tells which embedder was used, and its index_version which base was searched. Besides the requests
that run all along, each swap holds a few at the worst moment: a search by image_url that has taken its view
(the test's photo server answers once the new base is in use), and a write waiting for the writers' lock while
the catalog's vectors are made again. A second app with its own embedder plays another worker process of the
server, whose first request is a write.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from indexer.embedding.images import load_pixels
from indexer.embedding.model import INPUT_SIZE, Embedder
from indexer.embedding.whitening import Whitening, keep
from indexer.index.compaction import compact
from indexer.index.segments import read_manifest
from indexer.jobs.indexing import index_catalog
from indexer.storage.locks import write_lock
from indexer.storage.schema import LIVE, Product, ProductImage
from indexer.storage.store import Store
from service import create_app
from tests.conftest import SKIMAGE_CATALOG, skimage_jpeg, wait_until, write_skimage_catalog

pytestmark = pytest.mark.slow  # a few hundred real embeddings

KEY = "swap-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PHOTOS = [name for names in SKIMAGE_CATALOG.values() for name in names]
# A catalog photo searched for finds itself at 1 up to the re-encoding of the query as kept (a JPEG of it), far
# above what a query embedded for another base scores.
SAME_PHOTO = 0.99
SKUS_PER_WRITER = 3  # each writer replaces its few products again and again


def projection(dim: int, dims: int, seed: int) -> Whitening:
    """A whitening that rotates the network's vectors (and keeps `dims` of the directions): another identity,
    whose vectors are far from the network's own."""
    rotation, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return Whitening("pca", np.zeros(dim, np.float32), rotation[:, :dims].astype(np.float32), {"seed": seed})


def unseen(photo: bytes, name: str) -> bytes:
    """The same pixels with a few bytes after the image's end: a photo the server has not seen, so that it embeds
    it rather than reuse a remembered vector."""
    return photo + name.encode()


def waiting_for_the_write_lock(data_dir: Path) -> bool:
    """Whether a writer is blocked on the writers' lock file (Linux lists the waiters of a lock with '->')."""
    inode = (data_dir / ".write.lock").stat().st_ino
    return any("->" in line and f":{inode} " in line for line in Path("/proc/locks").read_text().splitlines())


class Swapper:
    """Publishes bases of other identities, as `make index` with a new whitening, or with another model, does: every
    live vector made again from its photo by the next embedder, then a base of them. Both under the writers' lock,
    so that no write commits between the two. Before each swap, and when asked at the end, it checks every live
    row: stored under the identity of the current base, and holding the vector that identity makes of its photo."""

    def __init__(self, settings, store: Store, first: Embedder):
        self.settings, self.store, self.current = settings, store, first
        self.identity_of = {read_manifest(settings.index_dir)["version"]: first.identity.key}
        self.problems: list[str] = []

    def _checked_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, network features) of every live row, each row checked against the current identity."""
        with self.store.engine.connect() as connection:
            rows = connection.execute(
                select(Product.sku, ProductImage.id, ProductImage.path, ProductImage.model_key, ProductImage.embedding)
                .join(Product)
                .where(LIVE)
                .order_by(ProductImage.id)
            ).all()
        features = self.current.engine.features(np.stack([load_pixels(row.path, INPUT_SIZE) for row in rows]))
        key = self.current.identity.key
        for row, vector in zip(rows, self.current.finish(features), strict=True):
            stored = np.frombuffer(row.embedding, np.float32)
            if row.model_key != key:
                self.problems.append(f"{row.sku} is stored under {row.model_key} while the index is {key}")
            elif stored.shape != vector.shape or not np.allclose(stored, vector, atol=1e-4):
                self.problems.append(f"{row.sku}'s vector under {key} is not the one {key} makes of its photo")
        return np.array([row.id for row in rows], np.int64), features

    def check(self) -> None:
        with write_lock(self.settings.data_dir, self.store):
            self._checked_features()

    def swap(self, target: Embedder, first: Callable[[], None] = lambda: None) -> None:
        """Swap to the target's identity; `first` runs once the writers' lock is held."""
        with write_lock(self.settings.data_dir, self.store):
            first()
            ids, features = self._checked_features()
            if target.whitening is not None:
                keep(self.store, target.network.key, target.whitening)
            self.store.vectors.replace(ids, target.finish(features), target.identity.key)
            compact(self.settings, self.store, target)
            self.identity_of[read_manifest(self.settings.index_dir)["version"]] = target.identity.key
        self.current = target


class PhotoServer(ThreadingHTTPServer):
    """Serves catalog photos for image_url, /<number>/<anything>, each answer held until `release` is set."""

    def __init__(self, photos: list[bytes]):
        super().__init__(("127.0.0.1", 0), HeldPhoto)
        self.photos = photos
        self.release = threading.Event()
        self.asked = 0
        self.lock = threading.Lock()

    def url(self, number: int, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{number}/{name}"


class HeldPhoto(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        server: PhotoServer = self.server
        with server.lock:
            server.asked += 1
        server.release.wait(timeout=600)
        _, number, name = self.path.split("/")
        body = unseen(server.photos[int(number)], name)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class Answers:
    """Every answer the request threads got, and how many each thread has had."""

    searches: list[tuple[str, int, dict]] = field(default_factory=list)  # (sku expected first, status, body)
    writes: list[tuple[str, int, dict]] = field(default_factory=list)  # (sku, status, body)
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, thread: str, answer: tuple[str, int, dict]) -> None:
        with self.lock:
            (self.searches if kind == "search" else self.writes).append(answer)
            self.counts[thread] += 1


def search_loop(client, catalog_photos: list[tuple[str, bytes]], answers: Answers, name: str, stop) -> None:
    """A catalog photo searched by its pixels, then again by the query token the answer gave."""
    for turn in range(10**9):
        if stop.is_set():
            return
        sku, photo = catalog_photos[turn % len(catalog_photos)]
        response = client.post("/api/search", data=unseen(photo, f"{name} {turn}"), content_type="image/jpeg",
                               query_string={"k": 1})  # fmt: skip
        answers.add("search", name, (sku, response.status_code, response.get_json()))
        if response.status_code == 200:
            again = client.post("/api/search", data={"query": response.json["query"], "k": "1"})
            answers.add("search", name, (sku, again.status_code, again.get_json()))


def put(client, sku: str, photo: bytes):
    return client.put(f"/api/products/{sku}", data={"image": (io.BytesIO(photo), "p.jpg"), "title": sku},
                      headers=AUTH, content_type="multipart/form-data")  # fmt: skip


def write_loop(client, answers: Answers, name: str, first: int, stop) -> None:
    """Products replaced again and again, each time with a photo never sent before."""
    for turn in range(10**9):
        if stop.is_set():
            return
        sku = f"{name}-{turn % SKUS_PER_WRITER}"
        response = put(client, sku, skimage_jpeg(PHOTOS[turn % len(PHOTOS)], angle=first + turn))
        answers.add("write", name, (sku, response.status_code, response.get_json()))


def mixed_searches(answers: Answers, identity_of: dict[str, str]) -> tuple[list[str], Counter]:
    """The searches whose query was not embedded as the base they searched was built (a catalog photo that does not
    find itself with a score of 1), and how many searches each identity answered."""
    mixed, searched = [], Counter()
    for sku, status, body in answers.searches:
        if status != 200:
            continue
        identity = identity_of[body["index_version"].split("+")[0]]
        searched[identity] += 1
        top = body["results"][0] if body["results"] else {}
        if top.get("sku") != sku or top.get("score", 0) < SAME_PHOTO:
            mixed.append(f"{sku} searched in the base of {identity}: found {top.get('sku')} at {top.get('score')}")
    return mixed, searched


def started(target: Callable, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)  # a failed test must not hang the run
    thread.start()
    return thread


def test_no_request_mixes_two_identities_while_the_whitening_and_the_model_change(settings, embedder, tmp_path):
    settings = settings.with_overrides(api_key=KEY, fetch_allow_private=True, fetch_timeout_s=600.0)
    catalog = write_skimage_catalog(tmp_path / "catalog")
    network = embedder.with_whitening(None)
    index_catalog(settings, network, catalog, progress=False)
    store = Store.open(settings)
    swapper = Swapper(settings, store, network)
    dim = network.network.dim
    narrow = network.with_whitening(projection(dim, 256, seed=1))  # another length
    rotated = network.with_whitening(projection(dim, dim, seed=2))  # the same length, other directions
    # Another model: a server refuses its base (503) until a base of its own model is back.
    other_model = Embedder(network.engine, replace(network.network, weights_sha256="f" * 64), network.tflite_sha256)
    catalog_photos = [(f"{c}/{n}", (catalog / c / f"{n}.jpg").read_bytes()) for c, ns in SKIMAGE_CATALOG.items()
                      for n in ns]  # fmt: skip
    photo_server = PhotoServer([photo for _, photo in catalog_photos])
    started(photo_server.serve_forever)
    settings = settings.with_overrides(fetch_ports=(photo_server.server_address[1],))

    first_app = create_app(settings, embedder)
    swapper.swap(narrow)
    # Another worker process, started now: nothing loaded, and its first request is a write. Its product must be
    # stored as the index's vectors are, whitened (it used to be stored unwhitened, and never found).
    second_app = create_app(settings, Embedder(network.engine, network.network, network.tflite_sha256))
    apps = (first_app, second_app)
    first_request = put(second_app.test_client(), "first-request", skimage_jpeg("astronaut", angle=90))
    assert first_request.status_code == 201, first_request.json
    swapper.check()
    answers, stop = Answers(), threading.Event()
    loops = {
        "first-writer": (write_loop, first_app.test_client(), 5),
        "second-writer": (write_loop, second_app.test_client(), 200),
        "first-searcher-1": (search_loop, first_app.test_client(), catalog_photos),
        "first-searcher-2": (search_loop, first_app.test_client(), catalog_photos[::-1]),
        "second-searcher": (search_loop, second_app.test_client(), catalog_photos[2:] + catalog_photos[:2]),
    }
    threads = []
    for name, (loop, client, argument) in loops.items():
        if loop is search_loop:
            arguments = (client, argument, answers, name, stop)
        else:
            arguments = (client, answers, name, argument, stop)
        threads.append(started(loop, *arguments))

    def held_search(app, number: int, name: str) -> None:
        response = app.test_client().post("/api/search", data={"image_url": photo_server.url(number, name), "k": "1"})
        answers.add("search", "held", (catalog_photos[number][0], response.status_code, response.get_json()))

    def held_write(sku: str, photo: bytes) -> None:
        response = put(first_app.test_client(), sku, photo)
        answers.add("write", "held", (sku, response.status_code, response.get_json()))

    def swap_under_held_requests(target: Embedder, turn: int) -> None:
        """Swap while a search on each app has taken its view and waits for its photo, and while a write waits for
        the writers' lock; each app then takes the new base, and the held search gets its photo."""
        # With nothing to search, a request ends at once (503): nothing to hold.
        servable = swapper.current is not other_model
        photo_server.release.clear()
        asked = photo_server.asked
        held = [started(held_search, app, turn % len(catalog_photos), f"held-{turn}-{n}") for n, app in
                enumerate(apps)] if servable else []  # fmt: skip
        wait_until(lambda: photo_server.asked == asked + len(held), timeout=300)

        def write_waiting_for_the_lock() -> None:
            if not servable:
                return
            photo = skimage_jpeg(PHOTOS[turn % len(PHOTOS)], angle=100 + turn)
            held.append(started(held_write, f"held-{turn % SKUS_PER_WRITER}", photo))
            wait_until(lambda: waiting_for_the_write_lock(settings.data_dir), timeout=300)

        swapper.swap(target, first=write_waiting_for_the_lock)
        for app in apps:
            app.test_client().get("/readyz")  # the first look at the new base, as any next request would be
        photo_server.release.set()
        for thread in held:
            thread.join()

    def after_a_few_more_requests() -> None:
        seen = dict(answers.counts)
        wait_until(lambda: all(answers.counts[name] >= seen.get(name, 0) + 3 for name in loops), timeout=300)

    try:
        for turn, target in enumerate((rotated, network, other_model, narrow, rotated)):
            after_a_few_more_requests()
            swap_under_held_requests(target, turn)
        after_a_few_more_requests()
    finally:
        stop.set()
        photo_server.release.set()
        for thread in threads:
            thread.join()
        photo_server.shutdown()
    swapper.check()

    unexpected = [(kind, a) for kind, group in (("search", answers.searches), ("write", answers.writes))
                  for a in group if a[1] not in (200, 201, 503)]  # fmt: skip
    assert not unexpected, unexpected[:5]
    mixed, searched = mixed_searches(answers, swapper.identity_of)
    assert not mixed, f"{len(mixed)} searches embedded their query otherwise than the base they searched: {mixed[:5]}"
    assert not swapper.problems, swapper.problems[:5]
    # Every identity that a server can search was searched while the swaps went on, and written to.
    assert set(searched) == {narrow.identity.key, rotated.identity.key, network.identity.key}, searched
    stored = [(sku, body) for sku, status, body in answers.writes if status in (200, 201)]
    assert len({swapper.identity_of[body["index_version"].split("+")[0]] for _, body in stored}) >= 2, stored
    # Refused only while the base was another model's, or when it changed under a write: to be sent again.
    refused = [body["message"] for _, status, body in answers.searches + answers.writes if status == 503]
    assert refused and all("built with" in m or "changed models" in m for m in refused), set(refused)

    # No write was lost: each product's live photo finds it, on both apps.
    with store.engine.connect() as connection:
        written = connection.execute(
            select(Product.sku, ProductImage.path).join(Product).where(LIVE, ProductImage.source == "api")
        ).all()
    assert {sku for sku, _ in stored} <= {sku for sku, _ in written}
    for app in apps:
        client = app.test_client()
        for sku, path in written:
            photo = Path(path).read_bytes()
            assert hashlib.sha256(photo).hexdigest() == Path(path).stem
            found = client.post("/api/search", data=photo, content_type="image/jpeg").json["results"]
            assert (found[0]["sku"], found[0]["score"] >= SAME_PHOTO) == (sku, True), (sku, found[:2])
