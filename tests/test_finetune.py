"""Transfer learning on a tiny real catalog, and how its model version takes over."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.__main__ import main
from indexer.catalog import scan_catalog
from indexer.config import ACTIVE_MODEL_FILE, REPO_ROOT, load_settings
from indexer.embedding.engines import export_path
from indexer.embedding.images import load_pixels
from indexer.embedding.model import load_embedder, weights_key
from indexer.embedding.weights import WEIGHTS_FILE
from indexer.jobs.finetune import (
    FinetuneOptions,
    augmented_pixels,
    class_balanced_batches,
    finetune,
    multi_similarity_loss,
    stratified_split,
)
from indexer.jobs.held_out import MARGIN
from tests.conftest import read_csv, write_csv

pytestmark = pytest.mark.slow  # real servers, real runs: `pytest -m "not slow"` skips it for a quick loop

APPLES = ("Golden-Delicious", "Granny-Smith", "Pink-Lady", "Royal-Gala", "Red-Delicious")


def test_stratified_split_keeps_every_label_in_training_and_is_repeatable():
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 2
    train, val = stratified_split(labels, 0.1, seed=3)
    assert sorted([*train, *val]) == list(range(32))
    assert [labels[i] for i in val].count("a") == 2 and [labels[i] for i in val].count("b") == 1
    assert "c" not in [labels[i] for i in val]  # too few photos to hold any out
    again, _ = stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(train, again)


def test_class_balanced_batches_hold_k_photos_of_each_of_p_categories():
    labels = np.repeat(np.arange(10), np.arange(1, 11))  # category c has c + 1 photos
    train = np.flatnonzero(labels != 9)  # the last category is held out
    for batch in class_balanced_batches(labels, train, 20, 16, 4, np.random.default_rng(0)):
        counts = np.bincount(labels[batch], minlength=10)
        assert len(batch) == 16 and set(counts[counts > 0]) == {4} and counts[9] == 0
        assert set(batch) <= set(train)  # a category with fewer than 4 photos repeats them


def test_multi_similarity_loss_is_lower_when_photos_of_a_category_lie_together():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 4)
    centres = rng.normal(size=(4, 32))
    together = centres[labels] + 0.2 * rng.normal(size=(16, 32))
    apart = rng.normal(size=(16, 32))
    loss = {
        name: float(np.mean(multi_similarity_loss(labels, v))) for name, v in [("together", together), ("apart", apart)]
    }
    assert loss["together"] < 0.5 * loss["apart"]


def test_first_view_is_the_photo_as_indexed_and_others_are_repeatable_variations(skimage_catalog):
    image = scan_catalog(skimage_catalog).images[0]
    np.testing.assert_array_equal(augmented_pixels(image, 0, 224, seed=0), load_pixels(image.path, 224))
    view = augmented_pixels(image, 1, 224, seed=0)
    assert view.shape == (224, 224, 3) and not np.array_equal(view, load_pixels(image.path, 224))
    np.testing.assert_array_equal(view, augmented_pixels(image, 1, 224, seed=0))
    shop = [augmented_pixels(image, v, 224, seed=0, augmentation="shop") for v in range(1, 4)]
    assert all(s.shape == (224, 224, 3) for s in shop) and not np.array_equal(shop[0], view)
    np.testing.assert_array_equal(shop[2], augmented_pixels(image, 3, 224, seed=0, augmentation="shop"))


def leave_one_out_recall(vectors: np.ndarray, labels: list[str]) -> float:
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(np.array(labels)[similarity.argmax(axis=1)] == np.array(labels)))


def models_with_the_plain_network(tmp_path, base_settings):
    """A models folder of its own holding the plain network (its weights and fp32 LiteRT export, linked), so that
    what a test's fine-tune writes and activates stays in the test."""
    models = tmp_path / "models"
    (models / "litert").mkdir(parents=True)
    (models / WEIGHTS_FILE).symlink_to(base_settings.models_dir / WEIGHTS_FILE)
    plain_export = export_path(base_settings.models_dir, base_settings.network_name, weights_key(base_settings))
    for part in (plain_export, plain_export.with_suffix(".json")):
        (models / "litert" / part.name).symlink_to(part)
    return models


def photos_of(grocery, categories: tuple[str, ...], per_category: int, path):
    rows = read_csv(grocery / "catalog.csv")
    return write_csv(path, [r for c in categories for r in [r for r in rows if r["category"] == c][:per_category]])


def test_finetuning_a_tiny_real_catalog_that_it_improves_on_held_out_photos_activates_it(
    grocery, base_settings, keras_embedder, tmp_path
):
    metadata = photos_of(grocery, APPLES, 16, tmp_path / "apples.csv")
    models = models_with_the_plain_network(tmp_path, base_settings)
    settings = base_settings.with_overrides(models_dir=models)

    summary = finetune(settings, grocery, metadata, FinetuneOptions(epochs=4, views=2, val_fraction=0.25),
                       progress=False)  # fmt: skip

    assert summary["train_images"] == 60 and summary["validation_images"] == 20 and summary["categories"] == 5
    held_out = summary["held_out"]
    figures = {c["name"]: c.get("recall@1") for c in held_out["candidates"]}
    # Too few training photos to fit a whitening on: those candidates are listed, not measured.
    assert figures["plain+whitening"] is None and figures["finetuned+whitening"] is None
    assert held_out["plain_default"] == "plain" and held_out["activated"] == "finetuned"
    assert figures["finetuned"] > figures["plain"] + MARGIN and summary["activated"]
    active = json.loads((models / ACTIVE_MODEL_FILE).read_text())
    assert active["version"] == summary["version"] and active["whitening"] is False
    tuned_settings = load_settings(REPO_ROOT / "config.toml", models_dir=models)
    assert tuned_settings.finetuned == models / active["weights"] and tuned_settings.held_out_whitening is False
    tuned = load_embedder(tuned_settings, engine="keras")
    assert tuned.version == summary["version"] and tuned.identity != keras_embedder.identity

    rows = read_csv(metadata)
    pixels = np.stack([load_pixels(grocery / r["image"], 224) for r in rows])
    labels = [r["category"] for r in rows]
    before = leave_one_out_recall(keras_embedder.embed_pixels(pixels), labels)
    after = leave_one_out_recall(tuned.embed_pixels(pixels), labels)
    assert after > before, f"leave-one-out R@1 {before:.3f} -> {after:.3f}"
    # The LiteRT export of the new version exists and agrees with Keras.
    litert = load_embedder(tuned_settings, create_export=False)
    assert (litert.embed_pixels(pixels[:4]) * tuned.embed_pixels(pixels[:4])).sum(axis=1).min() >= 0.9999


# Categories the plain network already tells apart on every photo: no fine-tune can do better on them.
DISTINCT = ("Banana", "Cucumber", "Garlic", "Ginger")


def test_a_finetune_that_cannot_beat_the_plain_network_is_not_activated_and_says_why(
    grocery, base_settings, tmp_path, monkeypatch, capsys
):
    metadata = photos_of(grocery, DISTINCT, 8, tmp_path / "distinct.csv")
    models = models_with_the_plain_network(tmp_path, base_settings)
    activate_a_finetuned_model(models)  # an earlier version, which stays active
    before = (models / ACTIVE_MODEL_FILE).read_text()
    monkeypatch.setenv("MODELS_DIR", str(models))
    monkeypatch.setenv("CATALOG_VIEWS", "flip")  # the candidates are measured with the catalog's extra views

    status = main(["finetune", "--catalog", str(grocery), "--metadata", str(metadata), "--epochs", "1",
                   "--views", "2", "--quiet"])  # fmt: skip

    out = capsys.readouterr().out
    assert status == 0
    assert (
        "Nothing new is active: no candidate beat the plain default (plain, held-out R@1 1.000) by more than 0.005"
        in out
    )
    assert "The active model is still v1" in out and "finetune --reset" in out
    assert (models / ACTIVE_MODEL_FILE).read_text() == before
    [kept] = (models / "finetuned").glob("mobilenet_v1-*.json")
    summary = json.loads(kept.read_text())
    assert summary["activated"] is False and summary["held_out"]["activated"] is None
    assert {c["name"]: c.get("recall@1") for c in summary["held_out"]["candidates"]}["plain"] == 1.0
    assert all(f"  {name} " in out for name in ("plain", "finetuned"))  # the table is printed


def activate_a_finetuned_model(models, **record):
    (models / "finetuned").mkdir(parents=True, exist_ok=True)
    (models / "finetuned" / "v1.weights.h5").write_bytes(b"weights")
    (models / ACTIVE_MODEL_FILE).write_text(json.dumps(
        {"weights": "finetuned/v1.weights.h5", "base_model": "mobilenet_v1", "base_weights": "pypi-mobilenet-v1",
         **record}
    ))  # fmt: skip


@pytest.mark.parametrize("use_finetuned", [True, False])
def test_use_finetuned_false_keeps_the_plain_model(tmp_path, use_finetuned):
    models = tmp_path / "models"
    activate_a_finetuned_model(models)
    config = tmp_path / "config.toml"
    config.write_text(
        (REPO_ROOT / "config.toml")
        .read_text()
        .replace("use_finetuned = true", f"use_finetuned = {str(use_finetuned).lower()}")
    )
    settings = load_settings(config, models_dir=models)
    expected = models / "finetuned" / "v1.weights.h5" if use_finetuned else None
    assert settings.finetuned == expected


@pytest.mark.parametrize(
    ("whitening", "active", "whitens"),
    [
        ("auto", None, True),
        ("auto", {}, False),  # a version activated before the held-out measurement: not whitened
        ("auto", {"whitening": True}, True),
        ("auto", {"whitening": False}, False),
        ("auto", {"weights": None, "whitening": False}, False),  # the plain network, measured best unwhitened
        ("on", {"whitening": False}, True),
        ("off", {"whitening": True}, False),
        ("off", None, False),
    ],
)
def test_auto_whitening_follows_what_the_held_out_photos_chose_for_the_active_model(
    tmp_path, monkeypatch, whitening, active, whitens
):
    monkeypatch.setenv("WHITENING", whitening)  # the suite's own WHITENING=off, replaced
    models = tmp_path / "models"
    if active is not None:
        activate_a_finetuned_model(models, **active)
    settings = load_settings(REPO_ROOT / "config.toml", models_dir=models)
    finetuned = active is not None and active.get("weights", "") is not None
    assert (settings.finetuned is not None, settings.whitens) == (finetuned, whitens)
    # The choice belongs to the model it was measured on: the plain network alone has its own default.
    if finetuned:
        assert settings.with_overrides(finetuned=None).whitens == (whitening != "off")


def test_the_shipped_config_leaves_the_whitening_to_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("WHITENING")
    assert load_settings(REPO_ROOT / "config.toml", models_dir=tmp_path).whitening is None
