"""`make eval COMPARE=1`'s configurations: each network without and with whitening, and with extra catalog views."""

from __future__ import annotations

from pathlib import Path

from eval.compare import baseline_of, configurations


def test_each_network_is_compared_without_and_with_whitening_and_with_catalog_views(base_settings):
    # Views configured for the shop's own index do not leak into the configurations without them.
    settings = base_settings.with_overrides(catalog_views=("crop",), finetuned=Path("models/finetuned/x.weights.h5"))
    runs = {
        name: (run.whitening, run.catalog_views, run.finetuned)
        for name, run in configurations(settings, None, ("flip",))
    }
    tuned = settings.finetuned
    assert runs == {
        "plain": (False, (), None),
        "plain+whitening": (True, (), None),
        "plain+whitening+views": (True, ("flip",), None),
        "finetuned": (False, (), tuned),
        "finetuned+whitening": (True, (), tuned),
        "finetuned+whitening+views": (True, ("flip",), tuned),
    }
    assert [name for name, _ in configurations(settings, "plain")] == ["plain", "plain+whitening"]
    # Each configuration's largest category loss is measured against the one with one option fewer.
    assert [baseline_of(name) for name in runs] == [
        "plain", "plain", "plain+whitening", "finetuned", "finetuned", "finetuned+whitening"
    ]  # fmt: skip
