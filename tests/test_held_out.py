"""What `make finetune` activates: the rule over the candidates' held-out figures, and the figures themselves."""

from __future__ import annotations

import numpy as np
import pytest

from eval.compare import active_check
from indexer.jobs.held_out import MARGIN, Candidate, decide, describe, measure, score, verdict


def candidates(plain, plain_whitened, tuned, tuned_whitened) -> list[Candidate]:
    """Candidates from (R@1, mAP@10) pairs; None: not measured."""
    figures = {("plain", False): plain, ("plain", True): plain_whitened, ("finetuned", False): tuned,
               ("finetuned", True): tuned_whitened}  # fmt: skip
    return [Candidate(network, whitened, *(pair or (None, None))) for (network, whitened), pair in figures.items()]


def test_the_best_fine_tuned_candidate_is_activated_when_it_beats_the_whitened_plain_default():
    decision = decide(candidates((0.55, 0.6), (0.70, 0.72), (0.80, 0.82), (0.81, 0.83)), None, 300, 2700)
    assert (decision.plain_default.name, decision.best.name, decision.activated) == (
        "plain+whitening", "finetuned+whitening", True
    )  # fmt: skip
    assert decision.as_dict()["activated"] == "finetuned+whitening"


def test_a_fine_tune_within_the_margin_of_the_plain_default_is_not_activated():
    decision = decide(candidates((0.55, 0.6), (0.70, 0.72), (0.70 + MARGIN, 0.9), None), None, 300, 2700)
    assert decision.best.name == "finetuned" and not decision.activated
    assert "Nothing new is active" in verdict(decision.as_dict())


def test_r_at_1_within_the_tie_is_decided_by_map_at_10():
    decision = decide(candidates((0.5, 0.5), (0.6, 0.6), (0.801, 0.80), (0.800, 0.84)), None, 300, 2700)
    assert decision.best.name == "finetuned+whitening"
    decision = decide(candidates((0.5, 0.5), (0.6, 0.6), (0.805, 0.80), (0.800, 0.84)), None, 300, 2700)
    assert decision.best.name == "finetuned"


def test_the_plain_network_without_its_whitening_is_activated_when_it_is_clearly_best():
    decision = decide(candidates((0.80, 0.8), (0.70, 0.7), (0.75, 0.75), (0.72, 0.72)), None, 300, 2700)
    assert decision.best.name == "plain" and decision.activated


@pytest.mark.parametrize("forced", [False, True])
def test_a_forced_whitening_leaves_only_candidates_with_it_in_the_running(forced):
    figures = candidates((0.60, 0.6), (0.70, 0.7), (0.75, 0.75), (0.90, 0.9))
    decision = decide(figures, forced, 300, 2700)
    assert decision.plain_default.whitened is forced and decision.best.whitened is forced
    assert decision.best.name == ("finetuned+whitening" if forced else "finetuned") and decision.activated


def test_without_a_whitening_to_measure_the_plain_default_is_the_plain_network():
    decision = decide(candidates((0.60, 0.6), None, (0.62, 0.7), None), None, 20, 60)
    assert decision.plain_default.name == "plain" and decision.best.name == "finetuned" and decision.activated
    table = "\n".join(describe(decision.as_dict()))
    assert "too few training photos to fit a whitening" in table and "<- plain default" in table


def test_held_out_photos_are_scored_against_the_training_photos_by_their_closest_vector():
    # Two categories on two axes; the last held-out photo (category 0) lies nearer category 1's photos.
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0.05], [0.3, 1]], np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True))[:, None]
    labels = np.array([0, 0, 1, 1, 0, 0])
    recall, average_precision = score(vectors, labels, np.arange(4), np.array([4, 5]))
    assert recall == 0.5 and average_precision == pytest.approx((1.0 + 0.5 * (1 / 3 + 2 / 4)) / 2)
    # An extra catalog view of a category-0 photo near the stray query: ranked by its closest vector, it is found.
    views = np.concatenate([vectors, vectors], axis=1)
    views[0, 1] = vectors[5, 0]
    assert score(views, labels, np.arange(4), np.array([4, 5]))[0] == 1.0


def test_a_network_is_measured_with_and_without_a_whitening_fitted_on_the_training_photos_alone():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    labels = np.repeat(np.arange(10), 30)
    vectors = centres[labels] + 2.0 * rng.normal(size=(300, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)[:, None]
    held = np.arange(0, 300, 6)  # 5 photos of each category
    train = np.setdiff1d(np.arange(300), held)
    plain, whitened = measure("plain", vectors, labels, train, held, 16)
    assert plain.name == "plain" and whitened.name == "plain+whitening" and whitened.measured
    # Fewer training photos than a whitening needs to be fitted on: listed, not measured.
    _, unfitted = measure("plain", vectors, labels, train[:150], held, 16)
    assert not unfitted.measured and unfitted.name == "plain+whitening"


def run(r1: float, map10: float) -> dict:
    return {"queries/category": {"recall@1": r1, "map@10": map10}}


def test_make_eval_checks_that_the_active_configuration_is_the_best_on_the_queries_too(base_settings, tmp_path):
    runs = {"plain": run(0.55, 0.6), "plain+whitening": run(0.70, 0.72), "plain+whitening+views": run(0.9, 0.9),
            "finetuned": run(0.809, 0.82), "finetuned+whitening": run(0.816, 0.83)}  # fmt: skip
    tuned = base_settings.with_overrides(finetuned=tmp_path / "v.weights.h5", whitening=None)
    check = active_check(tuned, runs)  # a fine-tuned version with no held-out measurement: not whitened
    assert (check["configuration"], check["best"], check["holds"]) == ("finetuned", "finetuned+whitening", False)
    check = active_check(tuned.with_overrides(held_out_whitening=True), runs)
    assert (check["configuration"], check["holds"]) == ("finetuned+whitening", True)
    # The extra catalog views are an option beside the candidates, not one of them.
    assert active_check(base_settings.with_overrides(whitening=True), runs)["best"] == "finetuned+whitening"
