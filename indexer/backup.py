"""Snapshots of the service's state, taken while servers serve and write, and restored into an empty data folder.

A snapshot holds the database as of one change number (SQLite's online backup, or a pg_dump in one exported
snapshot), the index base that the manifest named then, the uploaded photos and the models folder, each file with
its size and SHA-256 in snapshot.json. The base and the database are read under the compaction lock, so no base can
be published or tombstone purged in between: the restored service applies the database's changes after the base,
as a server does, and answers as the source did at that change number. Nothing is incremental: each snapshot is
whole.

    python -m indexer backup --to DIR        write DIR.partial, then rename it DIR once complete
    python -m indexer backup --verify DIR    every file against snapshot.json
    python -m indexer restore --from DIR     into an empty data folder (and, on PostgreSQL, an empty database)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from tqdm import tqdm

from indexer.config import Settings
from indexer.embedding.weights import sha256_file
from indexer.errors import BackupError
from indexer.index.segments import MANIFEST, fsync_write, read_manifest
from indexer.storage.database import make_engine, read_head
from indexer.storage.locks import compaction_lock
from indexer.storage.store import Store

SNAPSHOT_FILE = "snapshot.json"
FORMAT = 1
PARTIAL = ".partial"
SQLITE_FILE = "database/catalog.sqlite3"
PG_DUMP_FILE = "database/catalog.pgdump"
CHUNK = 1 << 20
# Left out of a snapshot: locks and files still being written.
SKIPPED_SUFFIXES = (".lock", ".partial")


@dataclass(frozen=True)
class Snapshot:
    """What snapshot.json says: the change number, the base, the database's kind and every file's size and hash."""

    folder: Path
    change: int
    base: str | None
    database: str
    created: str
    files: dict[str, dict]

    @property
    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files.values())

    def summary(self) -> str:
        return (
            f"{self.folder}: change {self.change}, base {self.base or 'none'}, {self.database} database, "
            f"{len(self.files)} files, {self.total_bytes / 1e6:,.1f} MB, taken {self.created}"
        )


# --- backup ----------------------------------------------------------------------------------------


def take_backup(settings: Settings, store: Store, destination: Path, progress: bool = True) -> Snapshot:
    """Write a snapshot to `destination` (which must not exist), through destination.partial renamed when every
    file is written and flushed: a backup killed at any point leaves only a .partial folder, never a snapshot."""
    if settings.index_backend != "faiss":
        raise BackupError('backup covers the FAISS index (index.backend = "faiss"); back up Milvus with its tools')
    if destination.name.endswith(PARTIAL):
        raise BackupError(f"{destination}: a snapshot's name must not end in {PARTIAL}")
    if destination.exists():
        raise BackupError(f"{destination} already exists: give a new folder (a snapshot is never written over)")
    sqlite_file = make_url(settings.db_url).database if store.engine.dialect.name == "sqlite" else None
    problem = "no database" if sqlite_file and not Path(sqlite_file).is_file() else store.schema_problem()
    if problem:
        raise BackupError(
            f"there is no catalog to back up in {settings.data_dir} ({problem}): check DATA_DIR and DATABASE_URL, "
            "or run `make index` first"
        )
    partial = destination.with_name(destination.name + PARTIAL)
    if partial.exists():
        shutil.rmtree(partial)  # left by a backup that was stopped
    partial.mkdir(parents=True)
    try:
        return _write_snapshot(settings, store, destination, partial, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed backup leaves nothing behind (a killed one, .partial)
        raise


def _write_snapshot(settings: Settings, store: Store, destination: Path, partial: Path, progress: bool) -> Snapshot:
    files: dict[str, dict] = {}
    bar = tqdm(desc="Backup", unit="B", unit_scale=True, disable=not progress)
    with bar, compaction_lock(settings.data_dir, store, wait=True):
        # Nothing publishes a base or purges tombstones while the lock is held, so the base read here stays
        # the one the database's changes start from.
        manifest = read_manifest(settings.index_dir)
        change = _copy_database(settings, store, partial, files, bar)
        base = manifest.get("base") if manifest else None
        if base:
            if manifest.get("built_through", 0) > change:
                raise BackupError(f"the base {base} is ahead of the database ({manifest['built_through']} > {change})")
            for path in sorted((settings.index_dir / base).iterdir()):
                if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES):
                    files[f"index/{base}/{path.name}"] = _copy(path, partial / "index" / base / path.name, bar)
            files[f"index/{MANIFEST}"] = _copy(settings.index_dir / MANIFEST, partial / "index" / MANIFEST, bar)
    # Uploaded photos are named by their content and never rewritten or removed: every one is copied.
    for folder, prefix in ((settings.data_dir / "uploads", "uploads"), (settings.models_dir, "models")):
        for path in _files_below(folder):
            name = f"{prefix}/{path.relative_to(folder).as_posix()}"
            files[name] = _copy(path, partial / name, bar)
    snapshot = Snapshot(partial, change, base, store.engine.dialect.name, _now(), files)
    fsync_write(partial / SNAPSHOT_FILE, json.dumps(_as_json(snapshot), indent=2).encode())
    _fsync_tree(partial)
    partial.rename(destination)
    _fsync_dir(destination.parent)
    return Snapshot(destination, change, base, snapshot.database, snapshot.created, files)


def _copy_database(settings: Settings, store: Store, partial: Path, files: dict[str, dict], bar: tqdm) -> int:
    """The database as of one moment into the snapshot; that moment's change number."""
    if store.engine.dialect.name == "postgresql":
        return _pg_dump(settings, store, partial / PG_DUMP_FILE, files, bar)
    source = make_url(settings.db_url).database
    target = partial / SQLITE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    reading = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    with closing(reading) as reader, closing(sqlite3.connect(target)) as writer:
        reader.backup(writer)  # in one step: one consistent read, while writers go on (WAL)
    files[SQLITE_FILE] = _describe(target, bar)
    engine = make_engine(f"sqlite:///{target}")
    try:
        with engine.connect() as connection:
            return read_head(connection)
    finally:
        engine.dispose()


def _pg_dump(settings: Settings, store: Store, target: Path, files: dict[str, dict], bar: tqdm) -> int:
    """pg_dump of the database inside one exported snapshot, whose change number is read in the same snapshot."""
    pg_dump = _pg_tool("pg_dump")
    target.parent.mkdir(parents=True, exist_ok=True)
    with store.engine.connect() as connection:
        connection = connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            exported = connection.scalar(text("SELECT pg_export_snapshot()"))
            change = read_head(connection)
            dsn, env = _libpq(settings.db_url)
            done = subprocess.run(
                [pg_dump, "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={exported}",
                 f"--file={target}", f"--dbname={dsn}"],
                env=env, capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode:
                raise BackupError(f"pg_dump failed: {done.stderr.strip()[-2000:]}")
    files[PG_DUMP_FILE] = _describe(target, bar)
    return change


# --- verify ----------------------------------------------------------------------------------------


def verify_backup(folder: Path, progress: bool = True) -> Snapshot:
    """The snapshot in `folder`, once every file it lists has its size and SHA-256; BackupError naming the first
    that does not, or when the folder is not a complete snapshot."""
    if folder.name.endswith(PARTIAL):
        raise BackupError(f"{folder} is an unfinished backup (it was stopped before it completed): take a new one")
    try:
        raw = json.loads((folder / SNAPSHOT_FILE).read_text())
        snapshot = Snapshot(folder, int(raw["change"]), raw["base"], raw["database"], raw["created"], raw["files"])
        if raw.get("format") != FORMAT:
            raise BackupError(f"{folder}: snapshot format {raw.get('format')!r}, this code reads {FORMAT}")
    except FileNotFoundError:
        raise BackupError(f"{folder} is not a snapshot: it has no {SNAPSHOT_FILE}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{folder / SNAPSHOT_FILE} is damaged ({exc})") from None
    with tqdm(total=snapshot.total_bytes, desc="Verify", unit="B", unit_scale=True, disable=not progress) as bar:
        for name, entry in sorted(snapshot.files.items()):
            path = folder / name
            if ".." in Path(name).parts or not path.is_file():
                raise BackupError(f"{folder}: {name} is missing")
            if path.stat().st_size != entry["size"]:
                raise BackupError(
                    f"{folder}: {name} has {path.stat().st_size} bytes, the snapshot says {entry['size']}"
                )
            if _describe(path, bar)["sha256"] != entry["sha256"]:
                raise BackupError(f"{folder}: {name} is corrupted (its SHA-256 differs from the snapshot's)")
    return snapshot


# --- restore ---------------------------------------------------------------------------------------


def restore_backup(settings: Settings, source: Path, progress: bool = True) -> Snapshot:
    """Verify the snapshot in `source`, then restore it into settings' data folder (which must be empty or
    missing) and database (on PostgreSQL, an empty one), and the models folder (files it lacks; one that differs
    stops the restore before anything is written)."""
    snapshot = verify_backup(source, progress)
    data_dir = settings.data_dir
    if data_dir.exists() and any(data_dir.iterdir()):
        raise BackupError(f"{data_dir} is not empty: restore into a new data folder (DATA_DIR=<new folder>)")
    dialect = make_url(settings.db_url).get_backend_name()
    if dialect != snapshot.database:
        raise BackupError(
            f"the snapshot holds a {snapshot.database} database and DATABASE_URL names a {dialect} one: restore it "
            f"into {snapshot.database}"
        )
    if dialect == "postgresql":
        engine = make_engine(settings.db_url)
        try:
            if tables := inspect(engine).get_table_names():
                raise BackupError(
                    f"the database DATABASE_URL names is not empty ({len(tables)} tables): create a new one"
                )
        finally:
            engine.dispose()
    models = {name[len("models/") :]: entry for name, entry in snapshot.files.items() if name.startswith("models/")}
    differing = [
        name for name, entry in models.items()
        if (settings.models_dir / name).is_file() and sha256_file(settings.models_dir / name) != entry["sha256"]
    ]  # fmt: skip
    if differing:
        raise BackupError(
            f"the models folder {settings.models_dir} holds other versions of {', '.join(sorted(differing)[:5])}: "
            "restore with MODELS_DIR=<an empty folder>, or move them aside"
        )
    with tqdm(total=snapshot.total_bytes, desc="Restore", unit="B", unit_scale=True, disable=not progress) as bar:
        data_dir.mkdir(parents=True, exist_ok=True)
        _restore_database(settings, source, snapshot, bar)
        for name in snapshot.files:
            if name.startswith("uploads/"):
                _copy(source / name, data_dir / name, bar)
            elif name.startswith("models/") and not (settings.models_dir / name[len("models/") :]).is_file():
                _copy(source / name, settings.models_dir / name[len("models/") :], bar)
        store = Store.open(settings, upgrade=False)
        try:
            store.vectors.relocate_uploads(data_dir / "uploads")
        finally:
            store.engine.dispose()
        if snapshot.base:
            for name in snapshot.files:
                if name.startswith(f"index/{snapshot.base}/"):
                    _copy(source / name, data_dir / name, bar)
            # Last: the manifest is what makes the base the one servers load.
            _copy(source / "index" / MANIFEST, data_dir / "index" / MANIFEST, bar)
    _fsync_tree(data_dir)
    return snapshot


def _restore_database(settings: Settings, source: Path, snapshot: Snapshot, bar: tqdm) -> None:
    if snapshot.database == "postgresql":
        dsn, env = _libpq(settings.db_url)
        done = subprocess.run(
            [_pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", f"--dbname={dsn}",
             str(source / PG_DUMP_FILE)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            raise BackupError(
                f"pg_restore failed: {done.stderr.strip()[-2000:]}; drop and create the database, empty the data "
                "folder, then restore again"
            )
        bar.update(snapshot.files[PG_DUMP_FILE]["size"])
        return
    _copy(source / SQLITE_FILE, Path(make_url(settings.db_url).database), bar)


# --- files -----------------------------------------------------------------------------------------


def _copy(source: Path, target: Path, bar: tqdm) -> dict:
    """Copy a file, flushed to disk; its size and SHA-256 as read."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(CHUNK):
            writer.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _describe(path: Path, bar: tqdm) -> dict:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return {"size": size, "sha256": digest.hexdigest()}


def _files_below(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.rglob("*")
        if path.is_file() and not path.is_symlink() and not path.name.endswith(SKIPPED_SUFFIXES)
    )  # fmt: skip


def _fsync_tree(root: Path) -> None:
    """Flush every folder below root (the files were flushed as they were written)."""
    for folder, _, _ in os.walk(root):
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _as_json(snapshot: Snapshot) -> dict:
    return {
        "format": FORMAT,
        "change": snapshot.change,
        "base": snapshot.base,
        "database": snapshot.database,
        "created": snapshot.created,
        "files": snapshot.files,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- PostgreSQL's tools ------------------------------------------------------------------------------


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(
            f"{name} is not installed: install PostgreSQL's client tools (apt-get install postgresql-client)"
        )
    return found


def _libpq(database_url: str) -> tuple[str, dict[str, str]]:
    """A SQLAlchemy URL as libpq's (for pg_dump and pg_restore), the password in the environment rather than on a
    command line that other users can read."""
    url = make_url(database_url)
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    dsn = url.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    return dsn, env
