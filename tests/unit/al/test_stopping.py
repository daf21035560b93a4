"""When to stop: Cohen's kappa between consecutive models' predictions, the pool's uncertainty,
and the stabilising-predictions rule, as pure functions (no Ray, no files)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.al.stopping import cohens_kappa, is_stable, mean_uncertainty
from orchestrator.config import ConfigError, load_config

NAN = float("nan")


def test_kappa_matches_a_hand_computed_example():
    # agree on 4 of 6: p_o = 2/3; class shares (1/3, 1/3, 1/3) and (1/3, 1/2, 1/6):
    # p_e = (2·2 + 2·3 + 2·1) / 36 = 1/3; κ = (2/3 − 1/3) / (1 − 1/3) = 1/2
    assert cohens_kappa([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]) == pytest.approx(0.5)


def test_identical_predictions_agree_fully_even_when_both_predict_one_class():
    assert cohens_kappa([2, 0, 1, 1], [2, 0, 1, 1]) == 1.0
    assert cohens_kappa([1, 1, 1], [1, 1, 1], num_classes=3) == 1.0  # p_e = 1, not 0/0


def test_kappa_is_zero_at_chance_and_negative_below_it():
    assert cohens_kappa([0, 0, 0, 0], [0, 1, 0, 1], num_classes=2) == pytest.approx(0.0)
    assert cohens_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_kappa_of_no_rows_is_nan_and_of_unequal_lengths_an_error():
    assert math.isnan(cohens_kappa([], []))
    with pytest.raises(ValueError, match="same rows"):
        cohens_kappa([0, 1], [0])


def test_uncertainty_is_zero_for_certain_rows_and_one_for_uniform_rows():
    certain, uniform = np.zeros(3), np.full(3, math.log(4))  # entropies of 4-class predictions
    assert mean_uncertainty(certain, 4) == pytest.approx(0.0)
    assert mean_uncertainty(uniform, 4) == pytest.approx(1.0)
    assert mean_uncertainty(np.array([0.0, math.log(4)], np.float32), 4) == pytest.approx(0.5)
    assert math.isnan(mean_uncertainty(np.zeros(0), 4))
    assert mean_uncertainty(np.zeros(2), 1) == 0.0  # one class: nothing to be unsure about


@pytest.mark.parametrize("kappas, stable", [
    ([NAN, 0.995, 0.992, 0.999], True),   # the last three all reach 0.99
    ([NAN, 0.995, 0.98, 0.999, 0.995], False),  # one dip in the last three
    ([NAN, 0.995, 0.999], False),  # only two agreements so far
    ([0.999, NAN, 0.999, 0.999], False),  # a missing agreement is not a stable one
])
def test_the_rule_stops_only_when_each_of_the_last_cycles_reaches_the_threshold(kappas, stable):
    assert is_stable(kappas, threshold=0.99, cycles=3) is stable


def test_stopping_is_off_by_default_and_its_settings_are_checked_when_the_config_loads():
    budget = load_config(None).budget
    assert (budget.stop_when_stable, budget.stable_kappa, budget.stable_cycles) == (False, 0.99, 3)
    on = load_config(None, ["budget.stop_when_stable=true", "budget.stable_cycles=2"]).budget
    assert (on.stop_when_stable, on.stable_cycles) == (True, 2)
    with pytest.raises(ConfigError, match="stable_cycles at least 1"):
        load_config(None, ["budget.stable_cycles=0"])
