"""The label-efficiency benchmark's summary figures, on made-up curves."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.label_efficiency import FRACTIONS, accuracy_at, labels_to_reach, table  # noqa: E402


def test_labels_to_reach_interpolates_between_the_budgets_around_the_target():
    assert labels_to_reach([0.1, 0.2, 0.4], [0.5, 0.7, 0.9], 0.8) == 0.30000000000000004


def test_labels_to_reach_is_the_first_budget_when_it_already_reaches_the_target():
    assert labels_to_reach([0.1, 0.2], [0.9, 0.95], 0.8) == 0.1


def test_labels_to_reach_is_nan_when_the_curve_never_reaches_the_target():
    assert math.isnan(labels_to_reach([0.1, 0.2], [0.5, 0.6], 0.8))


def test_accuracy_at_a_budget_between_two_cycles_is_interpolated_and_outside_is_unknown():
    assert accuracy_at([0.1, 0.3], [0.4, 0.8], 0.2) == 0.6000000000000001
    assert math.isnan(accuracy_at([0.1, 0.3], [0.4, 0.8], 0.5))


def test_the_table_ranks_by_aubc_and_says_when_95_percent_of_full_is_not_reached():
    fractions = list(FRACTIONS)
    rows = [
        {"configuration": "weak", "n_complete": 3, "n_trials": 3, "fractions": fractions,
         "accuracy_mean": [0.1] * len(fractions), "accuracy_std": [0.0] * len(fractions),
         "aubc_mean": 0.1, "aubc_std": 0.0},
        {"configuration": "strong", "n_complete": 3, "n_trials": 3, "fractions": fractions,
         "accuracy_mean": [0.5] + [0.9] * (len(fractions) - 1),
         "accuracy_std": [0.0] * len(fractions), "aubc_mean": 0.85, "aubc_std": 0.01},
    ]
    text = table("toy", rows, (0.9, 0.01))
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| strong", "| weak"]
    assert lines[0].endswith("| 100% | 9% |")  # 95% of 0.9 = 0.855: at 5% + 0.355/0.4 × 5%
    assert lines[1].endswith(f"| 11% | > {100 * FRACTIONS[-1]:g}% |")
