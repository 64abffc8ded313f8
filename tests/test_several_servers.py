"""Several servers, one catalog: two production servers (`make serve`'s `python -m service`) as two hosts would run
them, as separate processes with the same DATABASE_URL (PostgreSQL) and the same DATA_DIR (the shared folder: index
bases and manifest, uploads, lock files). A write through either is found on the other within 1 s, a compaction that
both decide on at once runs once and both switch to it, and killing one leaves the other serving and taking writes.
The quick tests below them check the parts on their own: held bases stay, a compaction decided on an older base does
nothing, and tombstones wait for a base without them to have been current a while."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

from indexer.index import compaction
from indexer.index.compaction import compact
from indexer.index.segments import load_base, read_manifest, remove_unused_bases
from indexer.jobs.indexing import index_catalog
from indexer.storage.locks import write_lock
from indexer.storage.schema import ProductImage
from indexer.storage.store import Store
from service import create_app
from tests.conftest import both_databases, new_database, served_catalog, skimage_jpeg, wait_until
from tests.support.server import running_server

KEY = "several-servers-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
COMPACT_AFTER = 4  # the delta a server folds into a new base: small, so that the test reaches it
# Seconds a write may take to reach the other server before the test calls it lost: generous, since how fast it
# is (milliseconds) is `make soak SERVERS=2`'s to measure, not a test's on a shared machine.
VISIBLE_WITHIN = 30.0


def search(url: str, photo: bytes, k: int = 3) -> list[str]:
    response = requests.post(f"{url}/api/search", files={"image": ("q.jpg", photo)}, data={"k": k}, timeout=30)
    assert response.status_code == 200, response.text
    return [r["sku"] for r in response.json()["results"]]


def put(url: str, sku: str, photo: bytes, **fields: str) -> requests.Response:
    return requests.put(f"{url}/api/products/{sku}", files={"image": ("p.jpg", photo)}, data=fields, headers=AUTH,
                        timeout=60)  # fmt: skip


def ready(url: str) -> dict:
    response = requests.get(f"{url}/readyz", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def compactions_running(data_dir: Path) -> list[int]:
    """Processes of `python -m indexer --data-dir <data_dir> compact`, whichever server started them."""
    running = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"indexer" in argv and b"compact" in argv and str(data_dir).encode() in argv:
            running.append(int(cmdline.parent.name))
    return running


@pytest.fixture(scope="module")
def two_hosts(request, base_settings, embedder, tmp_path_factory):
    """Servers A and B over one PostgreSQL database and one shared data folder, started the same way, each with
    its own local folders (its own temporary folder, as a host has)."""
    settings = base_settings.with_overrides(database_url=new_database(request, "postgresql"))
    root = tmp_path_factory.mktemp("several-servers")
    env, catalog = served_catalog(
        settings,
        embedder,
        root,
        data_dir=root / "shared" / "data",
        config_changes={"compact_after = 5000": f"compact_after = {COMPACT_AFTER}"},
        API_KEY=KEY,
    )
    data_dir = Path(env["DATA_DIR"])
    host_a, host_b = ({**env, "TMPDIR": str(tmp_path_factory.mktemp(f"host-{h}"))} for h in "ab")
    with running_server(host_a, timeout=180) as a, running_server(host_b, timeout=180) as b:
        servers = {"a": a, "b": b}
        for server in servers.values():  # the first search of a server sets up its interpreters
            assert search(server.url, (catalog / "drinks" / "coffee.jpg").read_bytes())[0] == "drinks/coffee"
        yield servers, catalog, data_dir
    for pid in compactions_running(data_dir):  # none should be left; never leave one behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.postgresql
def test_a_write_through_one_server_is_found_on_the_other_without_a_restart(two_hosts):
    servers, catalog, _ = two_hosts
    a, b = servers["a"].url, servers["b"].url
    photo = skimage_jpeg("hubble_deep_field")
    assert put(a, "api/galaxy", photo, title="Galaxy poster", category="space").status_code == 201
    wait_until(lambda: "api/galaxy" in search(b, photo), VISIBLE_WITHIN)
    # The photo is in the shared uploads folder: the other server serves it too.
    image = requests.get(f"{b}/images/api/galaxy", timeout=10)
    assert image.status_code == 200 and image.content == photo

    coffee = (catalog / "drinks" / "coffee.jpg").read_bytes()
    assert "drinks/coffee" in search(a, coffee)
    assert requests.delete(f"{b}/api/products/drinks/coffee", headers=AUTH, timeout=30).status_code == 200
    wait_until(lambda: "drinks/coffee" not in search(a, coffee), VISIBLE_WITHIN)
    assert requests.get(f"{a}/api/products/drinks/coffee", timeout=10).status_code == 404


@pytest.mark.slow
@pytest.mark.postgresql
def test_a_compaction_both_servers_decide_on_runs_once_and_both_switch_to_it(two_hosts):
    servers, _, data_dir = two_hosts
    a, b = servers["a"].url, servers["b"].url
    first = read_manifest(data_dir / "index")["version"]
    log = data_dir / "compaction.log"
    compactions_before = log.read_text().count("Compacted") if log.exists() else 0

    needed = COMPACT_AFTER - ready(a)["delta"]
    assert needed > 0
    photos = {f"api/clock-{i}": skimage_jpeg("clock" if i % 2 else "coins", angle=15 * i + 5) for i in range(needed)}
    for i, (sku, photo) in enumerate(photos.items()):
        # alternately, the last write through A, whose delta then reaches index.compact_after
        url = a if (needed - i) % 2 else b
        assert put(url, sku, photo).status_code == 201
    # A has decided to compact; B decides on its next request, before A's compaction process has even loaded
    # the model. Both servers keep answering searches meanwhile.
    last = list(photos)[-1]
    answers = []

    def ask(url: str) -> None:
        answers.append(search(url, photos[last]))

    askers = [threading.Thread(target=ask, args=(url,)) for url in (b, a, b)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert len(answers) == 3 and all(last in found for found in answers)

    deadline = time.monotonic() + 180
    while read_manifest(data_dir / "index")["version"] == first or compactions_running(data_dir):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    new = read_manifest(data_dir / "index")["version"]
    assert log.read_text().count("Compacted") == compactions_before + 1, log.read_text()[-3000:]

    for url in (a, b):  # both switch to the new base on their next request, with nothing left in the delta
        status = ready(url)
        assert status["index_version"].startswith(f"{new}+") and status["delta"] == 0, status
        for sku, photo in photos.items():
            assert sku in search(url, photo)
    # The old base is removed once no process holds it, a worker that got none of these requests included (it
    # switches on its own within FOLLOW_BASE_EVERY_S); the new one is the only one left.
    current = [read_manifest(data_dir / "index")["base"]]
    wait_until(lambda: [p.name for p in (data_dir / "index").glob("base-*")] == current, 30)


@pytest.mark.slow
@pytest.mark.postgresql
def test_killing_one_server_leaves_the_other_answering_and_taking_writes(two_hosts):
    servers, catalog, _ = two_hosts
    a, b = servers["a"], servers["b"]
    for pid in [a.process.pid, *descendants(a.process.pid)]:  # the whole host: master and workers, no goodbye
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    a.process.wait(timeout=30)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{a.url}/healthz", timeout=5)

    assert ready(b.url)["items"] > 0
    rocket = (catalog / "space" / "rocket.jpg").read_bytes()
    assert search(b.url, rocket)[0] == "space/rocket"
    photo = skimage_jpeg("immunohistochemistry")
    assert put(b.url, "api/stain", photo, title="Stain").status_code == 201
    assert "api/stain" in search(b.url, photo)
    assert requests.delete(f"{b.url}/api/products/space/rocket", headers=AUTH, timeout=30).status_code == 200
    assert "space/rocket" not in search(b.url, rocket)


# --- the parts on their own ---------------------------------------------------------------------------------


@pytest.fixture
def indexed(settings, embedder, skimage_catalog):
    index_catalog(settings, embedder, skimage_catalog, progress=False)
    return settings, Store.open(settings)


def test_every_base_a_server_holds_stays_on_disk(indexed, embedder):
    """On a shared folder the holder may be a server on another host, whose memory map does not survive the
    deletion: no held base is removed, however old."""
    settings, store = indexed
    oldest = load_base(settings.index_dir)  # a server that has not switched for two compactions
    compact(settings, store, embedder)
    older = load_base(settings.index_dir)
    compact(settings, store, embedder)
    names = {p.name for p in settings.index_dir.glob("base-*")}
    assert names == {oldest.name, older.name, read_manifest(settings.index_dir)["base"]}
    oldest.release()
    older.release()
    assert sorted(remove_unused_bases(settings.index_dir)) == sorted([oldest.name, older.name])
    assert [p.name for p in settings.index_dir.glob("base-*")] == [read_manifest(settings.index_dir)["base"]]


def test_a_server_that_gets_no_request_lets_go_of_the_old_base(indexed, embedder):
    """One of a server's workers may answer nothing for a while: it still switches to a new base on its own, so
    that the old one's disk space and memory are given back."""
    settings, store = indexed
    client = create_app(settings, embedder).test_client()
    assert client.get("/readyz").json["ready"]  # it holds the base, as after its last request
    old = read_manifest(settings.index_dir)["base"]
    compact(settings, store, embedder)
    assert read_manifest(settings.index_dir)["base"] != old
    wait_until(lambda: not (settings.index_dir / old).exists(), 30)  # without another request
    assert [p.name for p in settings.index_dir.glob("base-*")] == [read_manifest(settings.index_dir)["base"]]


@both_databases
def test_a_compaction_decided_on_a_base_that_was_replaced_meanwhile_does_nothing(indexed, embedder):
    """What a server starts (compact --if-base): where servers on two hosts decide at once, one compacts."""
    settings, store = indexed
    decided_on = read_manifest(settings.index_dir)["version"]
    assert compact(settings, store, embedder, wait=False, if_base=decided_on) is not None  # the first one
    replaced_by = read_manifest(settings.index_dir)["version"]
    assert compact(settings, store, embedder, wait=False, if_base=decided_on) is None  # the second one
    assert read_manifest(settings.index_dir)["version"] == replaced_by


def test_tombstones_wait_until_a_base_without_them_has_been_current_for_a_while(indexed, embedder, monkeypatch):
    """A server on another host may see a new manifest late (its NFS attribute cache); it must still find the
    tombstone in the database until it has switched to a base without the deleted vector."""
    settings, store = indexed
    monkeypatch.setattr(compaction, "PURGE_AFTER", timedelta(0))  # "a while" is now: only the order is tested

    def image_rows() -> int:
        with store.engine.connect() as connection:
            return connection.scalar(select(func.count()).select_from(ProductImage))

    rows = image_rows()
    with write_lock(settings.data_dir, store):
        assert store.products.delete("space/rocket") is not None
    compact(settings, store, embedder)  # the first base without it: just published, so it is kept
    assert image_rows() == rows
    compact(settings, store, embedder)  # that base has been current long enough: purged
    assert image_rows() == rows - 1
