"""Saved evaluation results name folders relative to the repository or the catalog, never a machine's path."""

from __future__ import annotations

from pathlib import Path

from eval.protocols import catalog_path, repository_path
from indexer.config import REPO_ROOT


def test_a_catalog_beside_the_repository_is_named_from_it(tmp_path):
    catalog = tmp_path / "shop"
    catalog.mkdir()
    shown = repository_path(catalog)
    assert not Path(shown).is_absolute()
    assert (REPO_ROOT / shown).resolve() == catalog.resolve()
    assert repository_path(REPO_ROOT / "demo-catalog") == "demo-catalog"


def test_photos_inside_the_catalog_are_named_from_it(tmp_path):
    catalog = tmp_path / "shop"
    (catalog / "shoes").mkdir(parents=True)
    assert catalog_path(catalog / "shoes" / "red.jpg", catalog) == "shoes/red.jpg"
    assert catalog_path(str(catalog / "queries.csv"), catalog) == "queries.csv"


def test_a_path_that_leaves_the_catalog_is_named_from_the_repository(tmp_path):
    catalog = tmp_path / "demo"
    catalog.mkdir()
    (tmp_path / "demo-queries").mkdir()
    # As the demo's queries.csv names its photos: relative to the catalog, but outside it.
    outside = catalog / ".." / "demo-queries" / "sneaker-1.png"
    shown = catalog_path(outside, catalog)
    assert not shown.startswith("demo-queries") and not Path(shown).is_absolute()
    assert (REPO_ROOT / shown).resolve() == (tmp_path / "demo-queries" / "sneaker-1.png").resolve()
