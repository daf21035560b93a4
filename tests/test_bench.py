"""The label-efficiency benchmark's statistics, on made-up curves written as its CSV."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.label_efficiency import (  # noqa: E402
    COLUMNS, FRACTIONS, accuracy_at, labels_to_reach, mean_ci, planned, read_results, report,
    summarise_strategy, table,
)


def test_labels_to_reach_interpolates_between_the_budgets_around_the_target():
    assert labels_to_reach([0.1, 0.2, 0.4], [0.5, 0.7, 0.9], 0.8) == pytest.approx(0.3)


def test_labels_to_reach_is_the_first_budget_when_it_already_reaches_the_target():
    assert labels_to_reach([0.1, 0.2], [0.9, 0.95], 0.8) == 0.1


def test_labels_to_reach_is_nan_when_the_curve_never_reaches_the_target():
    assert math.isnan(labels_to_reach([0.1, 0.2], [0.5, 0.6], 0.8))


def test_accuracy_at_a_budget_between_two_cycles_is_interpolated_and_outside_is_unknown():
    assert accuracy_at([0.1, 0.3], [0.4, 0.8], 0.2) == pytest.approx(0.6)
    assert math.isnan(accuracy_at([0.1, 0.3], [0.4, 0.8], 0.5))


def test_the_confidence_interval_is_students_t_over_the_seeds():
    mean, half = mean_ci([0.5, 0.7])  # std 0.1414, t(0.975, 1) = 12.706
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(12.706 * 0.14142 / math.sqrt(2), rel=1e-3)
    assert math.isnan(mean_ci([0.5])[1])


def curve(level: float, seed: int) -> tuple[list, list, list]:
    accuracy = [level + 0.01 * seed] * len(FRACTIONS)
    return list(FRACTIONS), accuracy, accuracy


def test_the_paired_difference_from_random_removes_what_the_seeds_share():
    random = {s: curve(0.5, 10 * s) for s in range(3)}  # seeds differ a lot ...
    better = {s: curve(0.52, 10 * s) for s in range(3)}  # ... a strategy adds 0.02 to each
    summary = summarise_strategy(better, random)
    assert summary["vs_random"][0] == pytest.approx(0.02)
    assert summary["vs_random"][1] == pytest.approx(0.0, abs=1e-9)  # paired: no spread at all
    assert summary["aubc"][1] > 0.1  # unpaired, the seeds' spread hides the difference


def test_an_incomplete_campaign_is_left_out_of_the_summary():
    seeds = {0: curve(0.5, 0), 1: ([0.05], [0.4], [0.4])}
    assert summarise_strategy(seeds, None)["n"] == 1


def test_the_table_ranks_by_aubc_and_marks_a_difference_whose_ci_excludes_zero():
    random = {s: curve(0.5, s) for s in range(3)}
    strong = {s: ([*FRACTIONS], [0.6] + [0.9] * 5, [0.6] + [0.9] * 5) for s in range(3)}
    summaries = {"random": summarise_strategy(random, random),
                 "strong": summarise_strategy(strong, random)}
    lines = [line for line in table("toy", summaries, (0.9, 0.01)).splitlines()
             if line.startswith("| ")][1:]
    assert [line.split(" | ")[0] for line in lines] == ["| strong", "| random"]
    assert " *" in lines[0].split(" | ")[9]  # strong beats random with a CI excluding zero
    assert lines[1].endswith("| > 40% | > 40% |")  # random never reaches 95% of 0.9


def test_the_report_is_computed_from_the_csv_alone(tmp_path):
    results = tmp_path / "label_efficiency.csv"
    with open(results, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for seed in (0, 1):
            writer.writerow(["toy", "full", seed, 100, 1.0, 0.8, 0.8])
            for strategy, level in (("random", 0.5), ("ema_kl", 0.6)):
                for fraction in FRACTIONS:
                    writer.writerow(["toy", strategy, seed, int(100 * fraction), fraction,
                                     level, level + 0.01 * seed])
    assert set(read_results(results)["toy"]) == {"full", "random", "ema_kl"}
    text = report(results, tmp_path)
    assert "Full supervision (all train labels): 0.800" in text
    assert (tmp_path / "label_efficiency_toy.png").stat().st_size > 0


def test_the_plan_runs_full_supervision_and_the_first_wave_seed_by_seed_first():
    order = planned(["a", "b"], [0, 1], ["random", "ema_kl", "entropy"])
    assert order[:4] == [("a", "full", 0), ("a", "random", 0), ("a", "ema_kl", 0), ("a", "full", 1)]
    assert order.index(("a", "entropy", 0)) > order.index(("a", "ema_kl", 1))
    assert order.index(("b", "full", 0)) > order.index(("a", "entropy", 1))
