"""Shared fixtures: settings in a temporary folder, the real embedding model, small real catalogs, and the
databases: SQLite (a file in the data folder) and PostgreSQL (a throwaway cluster, tests/support/postgres.py)."""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from sqlalchemy import event, make_url

from indexer.config import REPO_ROOT, Settings, load_settings
from indexer.index.live_index import LiveIndex
from indexer.index.segments import load_base
from indexer.storage.store import Store
from tests.support.postgres import NO_BINARIES, PostgresCluster, find_bindir

# The suite runs the fp32 model, here and in every process it starts. An int8 model is calibrated on the first
# catalog indexed, and the suite's tiny catalogs would leave that calibration in the repository's models/
# folder for the shop's own catalog. tests/test_precision.py covers int8 with a models folder of its own.
os.environ["PRECISION"] = "fp32"
# Likewise the whitening, fitted on the first catalog indexed: tests/test_whitening.py has its own models folder.
os.environ["WHITENING"] = "off"

GROCERY = Path(os.environ.get("GROCERY_DIR", REPO_ROOT.parent / "shared" / "datasets" / "grocery-store"))


def wait_until(condition: Callable[[], object], timeout: float = 60) -> None:
    """Poll condition() until it holds; fails once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() <= deadline, f"not within {timeout} s"
        time.sleep(0.02)


# Real photos that scikit-image ships, by category: a tiny catalog that is always there.
SKIMAGE_CATALOG = {
    "animals": ["chelsea"],
    "drinks": ["coffee"],
    "people": ["astronaut", "camera"],
    "space": ["rocket"],
    "medical": ["retina"],
}


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """config.toml as shipped, ignoring the environment's path overrides."""
    for name in ("DATA_DIR", "CATALOG", "METADATA", "DATABASE_URL", "SEARCH_CONFIG"):
        os.environ.pop(name, None)
    # The plain ImageNet model, even where `make finetune` has activated a fine-tuned version.
    return load_settings(REPO_ROOT / "config.toml").with_overrides(finetuned=None)


# The storage tests run on both databases: `@both_databases` on a test (or `pytestmark = both_databases` on a
# module) that uses `settings` or `database_url`, or params=DATABASES on a fixture of a wider scope.
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]
both_databases = pytest.mark.parametrize("database", DATABASES)


@contextmanager
def throwaway_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the caller's own, removed afterwards; the test skips, saying why, only where the
    server's binaries are not installed."""
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(NO_BINARIES)
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the session, started on first use."""
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def database() -> str:
    """The database a test's settings use: SQLite, unless the test is parametrised with both_databases."""
    return "sqlite"


def new_database(request: pytest.FixtureRequest, database: str) -> str:
    """settings.database_url for a new, empty database of that kind, for as long as the asking fixture lives:
    "" (SQLite, catalog.sqlite3 in the data folder), or a PostgreSQL database of its own, dropped afterwards."""
    if database == "sqlite":
        return ""
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = cluster.create_database()
    request.addfinalizer(lambda: cluster.drop_database(name))
    return cluster.url(name)


def copy_database(request: pytest.FixtureRequest, database_url: str) -> str:
    """A copy of a PostgreSQL database, dropped after the asking fixture; "" for SQLite, whose file is copied
    with its data folder."""
    if not database_url:
        return ""
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = cluster.create_database(template=make_url(database_url).database)
    request.addfinalizer(lambda: cluster.drop_database(name))
    return cluster.url(name)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, database: str) -> str:
    return new_database(request, database)


@pytest.fixture
def settings(tmp_path: Path, base_settings: Settings, database_url: str) -> Settings:
    return base_settings.with_overrides(
        data_dir=tmp_path / "data",
        catalog_dir=tmp_path / "catalog",
        metadata_path=None,
        batch_size=4,
        database_url=database_url,
    )


@pytest.fixture(scope="session")
def embedder(base_settings: Settings):
    """The real MobileNet v1 with genuine ImageNet weights, run by the default engine (LiteRT)."""
    from indexer.embedding.model import load_embedder

    return load_embedder(base_settings)


@pytest.fixture(scope="session")
def keras_embedder(base_settings: Settings):
    """The same model run by TensorFlow/Keras."""
    from indexer.embedding.model import load_embedder

    return load_embedder(base_settings, engine="keras")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def grocery_subset(grocery: Path, categories: tuple[str, ...], folder: Path) -> tuple[Path, Path, int]:
    """(catalog folder, products.csv, photos): the grocery catalog's photos of these categories, by a products.csv
    in `folder` whose image paths point into the shared dataset."""
    rows = [row for row in read_csv(grocery / "catalog.csv") if row["category"] in categories]
    return grocery, write_csv(folder / "products.csv", rows), len(rows)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    return path


def skimage_photo(name: str) -> Image.Image:
    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")


def skimage_jpeg(name: str, angle: int = 0, quality: int = 90) -> bytes:
    """A scikit-image photo (turned by `angle` degrees: another photo of the same thing) as JPEG bytes."""
    buffer = io.BytesIO()
    skimage_photo(name).rotate(angle).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_skimage_catalog(folder: Path) -> Path:
    """A category-per-folder catalog of scikit-image's real photos, as JPEGs."""
    for category, names in SKIMAGE_CATALOG.items():
        (folder / category).mkdir(parents=True, exist_ok=True)
        for name in names:
            skimage_photo(name).save(folder / category / f"{name}.jpg", quality=92)
    return folder


@pytest.fixture
def skimage_catalog(tmp_path: Path) -> Path:
    return write_skimage_catalog(tmp_path / "catalog")


@pytest.fixture(scope="session")
def grocery() -> Path:
    if not (GROCERY / "catalog.csv").exists():
        pytest.skip(f"the grocery-store dataset is not at {GROCERY} (set GROCERY_DIR to its folder)")
    return GROCERY


@contextmanager
def statements_reading(engine, sql: str) -> Iterator[list[str]]:
    """The statements the real database receives that contain sql, as they happen."""
    seen: list[str] = []

    def record(connection, cursor, statement, *_):
        if sql in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def live_index(settings: Settings, embedder) -> LiveIndex:
    """What a server starting now would search: the current base with every committed change applied."""
    base = load_base(settings.index_dir)
    assert base is not None, "nothing has been indexed"
    live = LiveIndex(base)
    live.apply(
        Store.open(settings).vectors.changes_since(base.built_through, embedder.identity.key, embedder.identity.dim)
    )
    return live


def subprocess_config(folder: Path, **replacements: str) -> Path:
    """config.toml for a command or server the test starts: the plain ImageNet model (whatever `make finetune`
    activated here) and this checkout's models, plus any text replacements."""
    text = (REPO_ROOT / "config.toml").read_text().replace("use_finetuned = true", "use_finetuned = false")
    text = text.replace('models_dir = "models"', f'models_dir = "{REPO_ROOT / "models"}"')
    for old, new in replacements.items():
        text = text.replace(old, new)
    path = folder / "config.toml"
    path.write_text(text)
    return path


def indexed_skimage(settings: Settings, embedder, folder: Path, **overrides: object) -> Settings:
    """The scikit-image catalog written into `folder` and indexed into its data folder: the settings over them,
    with the overrides given."""
    from indexer.jobs.indexing import index_catalog

    settings = settings.with_overrides(data_dir=folder / "data", catalog_dir=folder / "catalog", **overrides)
    index_catalog(settings, embedder, write_skimage_catalog(settings.catalog_dir), progress=False)
    return settings


def served_catalog(
    settings: Settings,
    embedder,
    root: Path,
    *,
    data_dir: Path | None = None,
    products_csv: str | None = None,
    config_changes: dict[str, str] | None = None,
    **env: str,
) -> tuple[dict[str, str], Path]:
    """The scikit-image catalog (with products_csv as its metadata, if given) indexed into a data folder, and
    the environment for tests.support.server.running_server over it: the plain model, plus the variables given."""
    from indexer.jobs.indexing import index_catalog

    catalog = write_skimage_catalog(root / "catalog")
    if products_csv is not None:
        (catalog / "products.csv").write_text(products_csv)
    data_dir = data_dir or root / "data"
    index_catalog(settings.with_overrides(data_dir=data_dir), embedder, catalog, progress=False)
    config = subprocess_config(root, **(config_changes or {}))
    if settings.database_url:
        env = {"DATABASE_URL": settings.database_url, **env}
    return {"DATA_DIR": str(data_dir), "SEARCH_CONFIG": str(config), **env}, catalog


@contextmanager
def served_on_database(request: pytest.FixtureRequest, base_settings: Settings, embedder, root: Path,
                       products_csv: str, **env: str) -> Iterator[tuple[object, Settings]]:  # fmt: skip
    """A real server over the scikit-image catalog with products_csv as its metadata, on the database that
    request.param names (a fixture parametrised with DATABASES); yields the running server and its settings."""
    from tests.support.server import running_server

    url = new_database(request, request.param)
    settings = base_settings.with_overrides(database_url=url) if url else base_settings
    served_env, _ = served_catalog(settings, embedder, root, products_csv=products_csv, **env)
    with running_server(served_env, timeout=120) as running:
        yield running, settings.with_overrides(data_dir=root / "data")
