"""The label-efficiency benchmark's statistics, on made-up curves written as its CSV."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT))

from bench.label_efficiency import (  # noqa: E402
    COLUMNS, FRACTIONS, accuracy_at, balance, balance_table, class_counts, labels_to_reach, mean_ci, planned, read_results, report,
    summarise_strategy, table,
)
from bench.junk_detection import auroc, kinds_of  # noqa: E402


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
    assert lines[1].endswith("| > 40% | > 40% | 5% |")  # random never reaches 95% of 0.9


def test_the_table_says_how_few_labels_reach_randoms_accuracy_at_the_last_budget():
    random = {s: ([*FRACTIONS], [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
              for s in range(2)}
    faster = {s: ([*FRACTIONS], [0.3, 0.6, 0.8, 0.8, 0.8, 0.8], [0.3, 0.6, 0.8, 0.8, 0.8, 0.8])
              for s in range(2)}
    summaries = {"random": summarise_strategy(random, random),
                 "faster": summarise_strategy(faster, random)}
    rows = {line.split(" | ")[0]: line for line in table("toy", summaries, (0.9, 0.01)).splitlines()
            if line.startswith("| ") and " | 2 | " in line}
    assert rows["| faster"].endswith("| 15% |")  # random's 0.8 at 40%, reached at 15%
    assert rows["| random"].endswith("| 40% |")


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


def test_the_plan_leaves_full_supervision_out_when_told():
    order = planned(["a"], [5, 6], ["cold_random_5pct"], full=False)
    assert order == [("a", "cold_random_5pct", 5), ("a", "cold_random_5pct", 6)]


# --- issue 17: the last wave's rows, junk and arms ------------------------------------------------


def test_cold_start_rows_are_one_cycle_campaigns_at_their_own_budget():
    from bench.label_efficiency import RUNS, campaign_sets

    runs = {run[0]: run for run in RUNS}
    sets = campaign_sets(runs["cold_typiclust_2pct"], 3, 1000)
    assert "budget.counts=[20]" in sets and "strategy.initial=typiclust" in sets
    assert "strategy.initial_options={embedding: radial}" in sets  # the first rows' embedding
    density = campaign_sets(runs["cold_typiclust_density_5pct"], 3, 1000)
    assert "budget.counts=[50]" in density and "strategy.initial_options={embedding: density}" in density
    assert "budget.counts=[50, 100, 150, 200, 300, 400]" in campaign_sets(runs["albl"], 0, 1000)


def write_run(run_dir, selections, answers):
    """A finished run's selection files and ledger: selections = {cycle: [(id, chosen_by)]}."""
    for cycle, picks in selections.items():
        folder = run_dir / "cycles" / f"c{cycle:02d}"
        folder.mkdir(parents=True)
        with open(folder / "selection.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", "subtomo_id", "source", "pred", "pred_prob", "chosen_by"])
            writer.writerows([i, sid, "x", 0, 0.5, by] for i, (sid, by) in enumerate(picks))
    with open(run_dir / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subtomo_id", "label", "cycle", "source", "annotator", "time"])
        writer.writerows([sid, label, 0, "initial", "", ""] for sid, label in answers.items())


def test_a_runs_queries_are_counted_per_cycle_and_chooser_with_their_junk(tmp_path):
    from bench.label_efficiency import run_queries

    write_run(tmp_path, {0: [("a", "random"), ("b", "random")],
                         1: [("c", "entropy"), ("d", "random"), ("e", "entropy")]},
              {"a": -1, "b": 0, "c": -1, "d": 2, "e": -1})
    assert run_queries(tmp_path) == [[0, "random", 2, 1], [1, "entropy", 2, 2], [1, "random", 1, 0]]


def test_a_runs_junk_answers_are_counted_by_the_junk_kind_their_ids_name(tmp_path):
    from bench.label_efficiency import run_junk_kinds

    write_run(tmp_path, {0: [("junk-edge-000001", "random"), ("a", "random")],
                         1: [("junk-fragment-000002", "entropy"), ("junk-fragment-000007", "entropy"),
                             ("junk-empty-000003", "random"), ("b", "random")]},
              {"junk-edge-000001": -1, "a": 0, "junk-fragment-000002": -1,
               "junk-fragment-000007": -1, "junk-empty-000003": 4, "b": -1})
    # an id the person called a particle is not junk; a particle id answered junk is "unnamed"
    assert run_junk_kinds(tmp_path) == [[0, "edge", 1], [1, "fragment", 2], [1, "unnamed", 1]]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finish_run(run_dir, accuracy):
    """A finished one-cycle campaign: its state, one query and the ledger."""
    import json

    write_run(run_dir, {0: [("a", "random")]}, {"a": 1})
    cycle = {"labelled": 1, "labelled_fraction": 0.5, "val_accuracy": accuracy, "test_accuracy": accuracy}
    (run_dir / "state.json").write_text(json.dumps({"done": True, "cycles": [cycle]}))


def test_a_campaign_records_the_code_it_ran_under_and_a_resume_under_other_code_adds_it(tmp_path):
    from bench.label_efficiency import CODE_FILE, record_code

    run_dir = tmp_path / "random-seed0"
    record_code(run_dir, "abc1234")
    record_code(run_dir, "abc1234")  # resumed under the same code: nothing new
    record_code(run_dir, "def5678+changes")
    assert (run_dir / CODE_FILE).read_text().split() == ["abc1234", "def5678+changes"]


def test_code_version_names_the_last_commit_of_the_campaign_code():
    from bench.label_efficiency import code_version

    version = code_version()
    assert version == "unknown" or len(version.split("+")[0]) >= 7


def test_the_report_names_the_pairs_whose_two_runs_ran_different_code(tmp_path):
    from bench.label_efficiency import beside, record_code, report, write_results

    results = tmp_path / "label_efficiency.csv"
    for row, seed, code in (("random", 0, "aaa"), ("random", 1, "aaa"), ("entropy", 0, "aaa"),
                            ("entropy", 1, "bbb"), ("coreset", 0, "aaa")):
        run_dir = tmp_path / "out" / "runs" / "d" / f"{row}-seed{seed}"
        finish_run(run_dir, 0.5)
        record_code(run_dir, code)
    write_results(tmp_path / "out", results)
    assert [r["code"] for r in read_rows(beside(results, "code"))] == ["aaa", "aaa", "bbb", "aaa", "aaa"]
    note = report(results, tmp_path).split("#### Pairs across code versions")[1]
    assert "| d | entropy | 1 |" in note and "coreset" not in note


def test_results_of_campaigns_run_in_another_checkout_survive_and_a_rerun_replaces_its_own(tmp_path):
    from bench.label_efficiency import beside, recorded_campaigns, write_results

    results = tmp_path / "label_efficiency.csv"
    finish_run(tmp_path / "first" / "runs" / "d" / "random-seed0", 0.25)
    finish_run(tmp_path / "first" / "runs" / "d" / "random-seed1", 0.5)
    write_results(tmp_path / "first", results)
    finish_run(tmp_path / "fresh" / "runs" / "d" / "random-seed1", 0.75)  # the first run dirs are gone
    write_results(tmp_path / "fresh", results)

    assert recorded_campaigns(results) == {("d", "random", 0), ("d", "random", 1)}
    assert [r["test_accuracy"] for r in read_rows(results)] == ["0.25", "0.75"]
    queries = read_rows(beside(results, "queries"))
    assert [(q["seed"], q["queried"]) for q in queries] == [("0", "1"), ("1", "1")]


def test_the_report_tells_junk_shares_cold_start_gains_and_albls_arms(tmp_path):
    from bench.label_efficiency import COLD_FRACTIONS, JUNK_KIND_COLUMNS, QUERY_COLUMNS

    results = tmp_path / "label_efficiency.csv"
    with open(results, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for seed in (0, 1, 2):
            for strategy, level in (("random", 0.5), ("entropy", 0.55), ("poal", 0.6),
                                    ("typiclust_start", 0.52), ("albl", 0.58)):
                for fraction in FRACTIONS:
                    writer.writerow(["toy", strategy, seed, int(1000 * fraction), fraction, level,
                                     level + 0.01 * seed + (0.03 if strategy == "typiclust_start" else 0)])
            for method, level in (("random", 0.3), ("typiclust", 0.4), ("typiclust_density", 0.45)):
                for fraction in COLD_FRACTIONS:
                    writer.writerow(["toy", f"cold_{method}_{round(100 * fraction)}pct", seed,
                                     int(1000 * fraction), fraction, level, level + 0.01 * seed])
    with open(results.with_name("label_efficiency_queries.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(QUERY_COLUMNS)
        for seed in (0, 1, 2):
            for strategy, junk in (("random", 20), ("entropy", 40), ("poal", 10)):
                writer.writerow(["toy", strategy, seed, 0, "random", 50, 10])
                writer.writerow(["toy", strategy, seed, 1, strategy, 100, junk + seed])
            writer.writerow(["toy", "albl", seed, 1, "entropy", 75, 0])
            writer.writerow(["toy", "albl", seed, 1, "random", 25, 0])
    with open(results.with_name("label_efficiency_junk_kinds.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(JUNK_KIND_COLUMNS)
        writer.writerows([["toy", "poal", 0, 0, "empty", 9], ["toy", "poal", 0, 1, "fragment", 8],
                          ["toy", "poal", 1, 1, "fragment", 3], ["toy", "poal", 1, 2, "edge", 1]])
    text = report(results, tmp_path)
    main = text.split("####")[0]
    assert "cold_random" not in main and "| poal |" in main  # own-budget rows: their own table
    junk = next(part for part in text.split("####") if "junk in the queries" in part)
    assert "| of it (all seeds): edge / fragment |" in junk  # cycle 0's empty box is no selection
    poal = next(line for line in junk.splitlines() if line.startswith("| poal |"))
    assert "0.110 ± " in poal and "| 0.27× |" in poal  # (10, 11, 12) / 100 vs (40, 41, 42) / 100
    assert "| -0.095 ± 0.012 * |" in poal  # 0.10 - 0.20, 0.11 - 0.205, 0.12 - 0.21: paired by seed
    assert poal.endswith("| 1 / 11 |")
    cold = next(part for part in text.split("####") if "cold start" in part)
    assert "| typiclust (seeds) | typiclust − random (paired) | typiclust_density (seeds) |" in cold
    assert ("| 1% | 0.310 ± 0.025 (3) | 0.410 ± 0.025 (3) | +0.100 ± 0.000 * | 0.460 ± 0.025 (3) "
            "| +0.150 ± 0.000 * |") in cold
    assert "| 5% | 0.310 ± 0.025 (3) | 0.410 ± 0.025 (3) | +0.100 ± 0.000 * | 0.460" in cold
    assert ("| 5%, the campaigns' cycle 0 | 0.510 ± 0.025 (3) | 0.560 ± 0.025 (3) | +0.050 ± 0.000 * |  |  |"
            in cold)
    arms = next(part for part in text.split("####") if "albl chose" in part)
    assert "toy: the base strategies albl chose" in arms
    assert "| 1 | 3 | 0.75 | 0.25 |" in arms


def test_the_recipe_questions_are_answered_by_paired_aubc_differences():
    from bench.label_efficiency import comparisons_table

    by_strategy = {"ema_kl": {s: curve(0.5, 10 * s) for s in range(3)},
                   "ema_kl_reverse": {s: curve(0.53, 10 * s) for s in range(3)},
                   "ema_kl_semi": {0: curve(0.6, 0)}}
    text = comparisons_table("toy", by_strategy)
    reverse = next(line for line in text.splitlines() if "`ema_kl_reverse` − `ema_kl`" in line)
    assert reverse.endswith("| 3 | +0.030 ± 0.000 * |")
    semi = next(line for line in text.splitlines() if "`ema_kl_semi` − `ema_kl`" in line)
    assert semi.endswith("| 1 | +0.100 |")  # one seed: no interval
    assert "ema_kl_selection_only" not in text  # a row not run is left out


def test_albl_rows_are_compared_with_each_arm_run_alone_and_judged_against_the_best():
    from bench.label_efficiency import albl_arms_table

    by_strategy = {"random": {s: curve(0.6, 10 * s) for s in range(3)},
                   "entropy": {s: curve(0.4, 10 * s) for s in range(3)},
                   "albl": {s: curve(0.55, 10 * s) for s in range(3)},
                   "albl_balance": {s: curve(0.6, 10 * s + s) for s in range(3)}}
    text = albl_arms_table("toy", by_strategy)
    albl = next(line for line in text.splitlines() if line.startswith("| albl |"))
    assert albl == "| albl | 3 | -0.050 ± 0.000 * | +0.150 ± 0.000 * | **no** (best: random) |"
    balance = next(line for line in text.splitlines() if line.startswith("| albl_balance |"))
    assert balance.endswith("| yes (best: random) |")
    assert albl_arms_table("toy", {"albl": by_strategy["albl"]}) == ""  # no arm run alone


def test_the_classifier_table_counts_how_often_m_was_kept_and_what_it_was_worth():
    from bench.label_efficiency import classifier_table

    rows = [{"dataset": "toy", "classifier": kept, "test_accuracy_task": t, "test_accuracy_mean": m}
            for kept, t, m in (("task", "0.5", "0.4"), ("mean", "0.5", "0.7"),
                               ("mean", "0.6", "0.8"), ("task", "0.7", "0.7"))]
    line = classifier_table(rows, None).splitlines()[-1]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:3] == ["toy", "4", "50%"]
    assert cells[5].startswith("+0.100")  # chosen − T: (0 + 0.2 + 0.2 + 0) / 4


def test_class_counts_take_each_subtomograms_latest_answer_and_leave_junk_out(tmp_path):
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        f.write("subtomo_id,label\na,0\nb,0\nc,1\nb,2\nd,-1\n")  # b relabelled 0 → 2; d is junk
    assert class_counts(tmp_path) == {0: 1, 1: 1, 2: 1}


def test_balance_is_one_for_equal_classes_and_falls_as_labels_pile_up():
    assert balance({0: 5, 1: 5, 2: 5}, 3) == pytest.approx(1.0)
    assert balance({0: 13, 1: 1, 2: 1}, 3) < balance({0: 7, 1: 4, 2: 4}, 3) < 1.0


def test_the_balance_table_counts_a_class_never_labelled_as_zero_and_ranks_the_balanced_first():
    counts = {"d": {"random": {0: {0: 5, 1: 5}, 1: {0: 4, 1: 6}},
                    "entropy": {0: {0: 10}, 1: {0: 9, 1: 1}}}}
    text = balance_table(counts, None)
    assert text.index("| random | 2 |") < text.index("| entropy | 2 |")
    assert "| entropy | 2 | 0.234 | 0 | 10 |" in text  # seed 0 never labelled class 1


@pytest.mark.slow
def test_a_pool_written_in_a_process_of_its_own_is_the_pool_written_here(tmp_path):
    from bench.common import make_noise_pool, make_noise_pool_elsewhere
    from orchestrator.data.pool import read_volumes

    elsewhere = make_noise_pool_elsewhere(tmp_path / "elsewhere", 12, box=8, seed=3)
    here = make_noise_pool(tmp_path / "here", 12, box=8, seed=3)
    assert elsewhere.n_rows == 12
    np.testing.assert_array_equal(read_volumes(elsewhere.path, range(12)), read_volumes(here.path, range(12)))


def test_the_scale_table_gives_each_stage_as_a_multiple_of_the_smallest_pool():
    from bench.scale import table

    rows = [[10_000, "train", 50.0, 2_000_000_000, 3_000_000_000],
            [100_000, "train", 55.0, 2_100_000_000, 3_300_000_000],
            [10_000, "score", 20.0, 1_000_000_000, 2_000_000_000],
            [100_000, "score", 200.0, 10_000_000_000, 2_100_000_000]]
    text = table(rows)
    assert "| train | 100,000 | 55.0 | 2.10 | 3.30 | 1.10 | 1.05 | 1.10 |" in text
    assert "| score | 100,000 | 200.0 | 10.00 | 2.10 | 10.00 | 10.00 | 1.05 |" in text
    assert "| rest |" not in text  # a stage not measured is left out


def test_the_scale_benchmark_answers_cycle_zeros_queries_with_the_pools_truth_in_their_order(shape_pool, tmp_path):
    from bench.scale import answer_first_queries
    from orchestrator.data.pool import read_index

    index = read_index(shape_pool.path, ["subtomo_id", "label"])
    ids, labels = index.column("subtomo_id").to_pylist(), index.column("label").to_pylist()
    asked = [5, 0, 3]
    folder = tmp_path / "cycles" / "c00" / "queries"
    folder.mkdir(parents=True)
    (folder / "queries.csv").write_text("subtomo_id\n" + "".join(f"{ids[r]}\n" for r in asked))
    answer_first_queries(tmp_path, shape_pool)
    with open(folder / "labels.csv", newline="") as f:
        written = [(r["subtomo_id"], int(r["label"])) for r in csv.DictReader(f)]
    assert written == [(ids[r], labels[r]) for r in asked]


def test_the_scale_benchmark_uses_a_pool_written_ahead_and_rewrites_one_of_another_size(tmp_path, monkeypatch):
    import bench.scale
    from bench.common import make_noise_pool

    path = tmp_path / "pool-12"
    make_noise_pool(path, 12, box=8)
    written = []
    monkeypatch.setattr(bench.scale, "make_noise_pool_elsewhere",
                        lambda where, rows, box: written.append((rows, box)) or make_noise_pool(where, rows, box))
    info, written_here = bench.scale.pool_of(path, 12, 8)
    assert (info.n_rows, written_here, written) == (12, False, [])
    info, written_here = bench.scale.pool_of(path, 15, 8)
    assert (info.n_rows, written_here, written) == (15, True, [(15, 8)])
    (path / "pool.json").unlink()  # a pool cut off while being written
    info, written_here = bench.scale.pool_of(path, 15, 8)
    assert (info.n_rows, written_here, written) == (15, True, [(15, 8), (15, 8)])


def test_a_cold_rest_empties_the_page_cache_once_as_the_cycle_leaves_scoring(monkeypatch):
    import bench.scale
    from orchestrator.campaign.loop import Campaign

    emptied = []
    monkeypatch.setattr(Campaign, "_stability", lambda campaign, cycle: f"stability of {cycle}")
    monkeypatch.setattr(bench.scale, "drop_page_cache", lambda: emptied.append(1) or True)
    with bench.scale.cold_after_scoring(True) as spent:
        assert Campaign._stability(None, 0) == "stability of 0"
        assert Campaign._stability(None, 1) == "stability of 1"
    assert emptied == [1] and len(spent) == 1  # once: the measured cycle's pass
    assert Campaign._stability(None, 2) == "stability of 2"  # put back after the cycle
    with bench.scale.cold_after_scoring(False) as spent:
        Campaign._stability(None, 0)
    assert emptied == [1] and spent == []


def test_time_between_the_campaigns_stages_is_counted_apart_from_them():
    from bench.scale import add_time

    seconds = add_time(add_time(add_time({}, "select", 0.2), None, 0.4), "select", 0.2)
    assert seconds == pytest.approx({"select": 0.4, "between stages": 0.4})


def test_a_stages_peak_memory_is_split_by_process_name_the_driver_named_as_such():
    import os
    import subprocess

    from bench.scale import by_name

    child = subprocess.Popen([sys.executable, "-c", "import time; print(); time.sleep(30)"],
                             stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # running its own program, no longer a fork of this one
        named = by_name({os.getpid(): 100, child.pid: 7, 2**22 + 12345: 0})
    finally:
        child.kill()
        child.communicate()
    assert named["driver"] == (1, 100)
    assert named[Path(sys.executable).name] == (1, 7)
    assert named["gone"] == (1, 0)  # a process that ended between the poll and the naming


BURNER = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"cryoal-burner", 0, 0, 0)  # PR_SET_NAME: its comm, unlike any other
print(flush=True)
sys.stdin.readline()
while time.process_time() < 0.6:  # a fixed amount of CPU, however loaded the machine
    pass
print(flush=True)
time.sleep(60)
"""


def test_the_sampler_charges_cpu_seconds_to_the_process_that_spent_them_and_to_the_machine(tmp_path):
    import os
    import subprocess

    from bench.scale import StageSampler

    status = tmp_path / "progress.json"
    status.write_text('{"state": "running", "stage": "select"}')
    burner = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        burner.stdout.readline()  # named
        sampler = StageSampler(status, interval=0.1)
        sampler._count_cpu("rest", {os.getpid()})  # the first poll only sets where counting starts
        burner.stdin.write("\n")
        burner.stdin.flush()
        burner.stdout.readline()  # 0.6 s of CPU spent, still running
        sampler._count_cpu("rest", {os.getpid()})
    finally:
        burner.kill()
        burner.communicate()
    spent = sampler.cpu["rest"]
    assert spent["cryoal-burner"] >= 0.4  # not ours: named by its comm (its start-up came before)
    assert sampler.machine["rest"]["user"] + sampler.machine["rest"]["system"] >= spent["cryoal-burner"] - 0.05
    assert set(sampler.machine["rest"]) == {"user", "system", "iowait", "steal", "idle"}


def test_the_wait_for_queries_runs_from_a_cycles_last_label_to_the_next_selection(tmp_path):
    import json
    import os
    from datetime import datetime, timezone

    from bench.startup import cycle_rows, table

    run = tmp_path / "run"
    (run / "cycles" / "c00").mkdir(parents=True)
    (run / "cycles" / "c01").mkdir()
    (run / "state.json").write_text(json.dumps({"cycles": [
        {"labelled": 48, "seconds_train": 30.0, "seconds_score": 10.0, "seconds_select": 0.1},
        {"labelled": 96, "seconds_train": 40.0, "seconds_score": 5.0, "seconds_select": 0.5}]}))
    (run / "cycles" / "c00" / "progress.jsonl").write_text('{"seconds": 8.0}\n{"seconds": 12.0}\n')
    (run / "labels.csv").write_text("subtomo_id,label,cycle,source,annotator,time\n"
                                    "a,1,0,initial,simulation,2026-11-26T08:00:00.000Z\n"
                                    "b,2,0,initial,simulation,2026-11-26T08:00:02.000Z\n"
                                    "c,2,1,initial,simulation,2026-11-26T08:01:00.000Z\n")
    selection = run / "cycles" / "c01" / "selection.csv"
    selection.write_text("")
    written = datetime(2026, 11, 26, 8, 0, 0, tzinfo=timezone.utc).timestamp() + 50  # 48 s after b
    os.utime(selection, (written, written))
    rows = cycle_rows("after", run)
    assert rows == [["after", 0, 48, 30.0, 10.0, 10.0, 0.5, 48.0]]  # one row: the last cycle predicts
    assert "| after | 0 | 30.0 | 10.0 | 10.0 | 0.5 | 48.0 |" in table(rows)


def test_the_readback_benchmark_writes_a_pass_as_scoring_does_and_times_both_reads(tmp_path):
    from bench.score_readback import measure, write_pass
    from orchestrator.distributed.score import read_scores

    assert write_pass(tmp_path / "pass", rows=1000, file_rows=300, seed=0) == 4
    assert read_scores(tmp_path / "pass", ["row"]).column("row").to_pylist() == list(range(1000))
    batch, bundled = measure(3000, "batch", tmp_path), measure(3000, "bundled", tmp_path)
    assert (batch["files"], bundled["files"]) == (47, 47)  # 64 rows a file; 3,000 // 50 < 64
    assert batch["best_scored_s"] > 0 and bundled["stability_s"] > 0
    assert not list(tmp_path.glob("before")) and not list(tmp_path.glob("now"))  # cleaned up


def test_the_pool_index_benchmark_times_both_sources_and_deletes_its_pool(tmp_path):
    from bench.pool_index import measure

    results = measure(40, tmp_path)
    assert [r["source"] for r in results] == ["index.parquet", "shards"]
    assert all(r["rows"] == 40 and r["read_index_s"] >= 0 and r["pool_view_s"] >= 0 for r in results)  # rounded to ms
    assert not list(tmp_path.iterdir())


def test_the_driver_memory_results_merge_by_pass_so_a_rerun_replaces_only_its_own_rows(tmp_path):
    from bench.driver_memory import write_results

    def result(rows, block_rows, peak):
        return {"rows": rows, "block_rows": block_rows, "blocks": rows // block_rows, "trace": 0,
                "seconds": 1.0, "driver_before_mb": 200.0, "driver_peak_mb": peak,
                "driver_after_mb": peak, "sources": []}

    path = tmp_path / "driver_memory.csv"
    write_results(path, [result(1000, 100, 210.0), result(2000, 100, 220.0)])
    write_results(path, [result(2000, 100, 225.0), result(1000, 500, 205.0)])
    with path.open() as f:
        rows = [(int(r["rows"]), int(r["block_rows"]), float(r["driver_peak_mb"])) for r in csv.DictReader(f)]
    assert rows == [(1000, 100, 210.0), (1000, 500, 205.0), (2000, 100, 225.0)]


def test_rows_past_forty_percent_run_to_eighty_and_say_where_they_reach_full_supervision():
    from bench.label_efficiency import BEYOND_FRACTIONS, RUNS, beyond_table, campaign_sets

    runs = {run[0]: run for run in RUNS}
    assert "budget.counts=[50, 100, 150, 200, 300, 400, 600, 800]" in campaign_sets(runs["random_to80"], 0, 1000)
    rising = [0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.75, 0.85]
    by_strategy = {"random_to80": {s: (list(BEYOND_FRACTIONS), rising, rising) for s in range(2)}}
    text = beyond_table("toy", by_strategy, (0.8, 0.01))
    row = [line for line in text.splitlines() if line.startswith("| random_to80")][0]
    assert row.endswith("| 62% | 67% |")  # 0.76 and 0.784 between 0.75 at 60% and 0.85 at 80%
    assert beyond_table("toy", {"random": by_strategy["random_to80"]}, (0.8, 0.01)) == ""


def test_a_crowded_plot_colours_random_the_papers_method_and_the_best_and_worst_rows():
    from bench.label_efficiency import highlighted

    summaries = {f"s{i:02d}": {"aubc": (i / 100, 0.0)} for i in range(20)}
    summaries |= {"random": {"aubc": (0.05, 0.0)}, "ema_kl": {"aubc": (0.04, 0.0)}}
    assert highlighted(summaries) == ["random", "ema_kl", "s19", "s18", "s17", "s01", "s00"]
    few = {k: summaries[k] for k in ("random", "s03", "s07")}
    assert highlighted(few) == ["random", "s03", "s07"]


def test_the_scattered_reads_table_gives_the_median_per_read_ahead_and_a_dash_where_cold_was_not_measured():
    from bench.scattered_reads import table

    rows = [{"read_ahead": 1, "cache": "cold", "seconds": s} for s in (1.0, 3.0, 2.0)]
    rows += [{"read_ahead": 1, "cache": "warm", "seconds": 0.5}, {"read_ahead": 8, "cache": "warm", "seconds": 0.25}]
    assert table(rows).splitlines()[2:] == ["| 1 | 2.00 | 0.50 |", "| 8 | – | 0.25 |"]


def test_the_rest_profile_counts_the_measured_threads_functions_once_a_stack_leaving_training_and_scoring_out():
    from bench.scale import rest_profile

    raw = [
        "one_cycle (scale.py:9);run (loop.py:10);_train (loop.py:20);run_training (train.py:5);wait (ray.py:1) 40",
        "one_cycle (scale.py:9);run (loop.py:10);_score_model (loop.py:30);score_pool (score.py:7);get (ray.py:2) 30",
        "one_cycle (scale.py:9);run (loop.py:10);_report (loop.py:40);plot (report.py:3);plot (report.py:9) 4",
        "one_cycle (scale.py:9);run (loop.py:11);_label_up_to (loop.py:50);read_volumes (pool.py:600) 6",
        "Thread.run (threading.py:1);wait (ray.py:1) 80",  # a thread of Ray's, waiting throughout
    ]
    seconds = dict(rest_profile(raw, hz=2))
    assert seconds["run (loop.py)"] == 5.0  # both of its lines; not the 35 s in train and score
    assert seconds["plot (report.py)"] == 2.0  # recursive: once a stack
    assert seconds["read_volumes (pool.py)"] == 3.0
    assert seconds["one_cycle (scale.py)"] == 5.0
    assert not any(name.startswith(("run_training", "score_pool", "wait", "get", "Thread")) for name in seconds)


# --- bench/junk_detection.py --------------------------------------------------------------------


def test_auroc_is_one_when_every_positive_scores_above_every_negative_and_counts_ties_half():
    positive = [True, True, False, False]
    assert auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array(positive)) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array(positive)) == 0.0
    assert auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array(positive)) == 0.5
    assert auroc(np.array([0.9, 0.5, 0.5, 0.1]), np.array(positive)) == 0.875  # one tie of four pairs


def test_junk_kinds_come_from_the_simulators_ids():
    assert kinds_of(["junk-off_centre-000012", "1bxn-000003", "junk-empty-000001"]).tolist() == [
        "off_centre", "particle", "empty"]


def test_across_data_sets_each_row_is_judged_by_its_worst_gap_to_the_best_arm():
    from bench.label_efficiency import across_sets_table

    def rows(**levels):
        return {row: {s: curve(level, 10 * s) for s in range(3)} for row, level in levels.items()}

    curves = {"balanced": rows(random=0.6, entropy=0.4, ema_kl=0.55, coreset=0.58, albl_balance=0.59),
              "tailed": rows(random=0.4, entropy=0.3, ema_kl=0.45, coreset=0.5, albl_balance=0.49),
              "no_albl": rows(random=0.6, entropy=0.4, ema_kl=0.55, coreset=0.58)}
    text = across_sets_table(curves)
    assert "| balanced | random | best | -0.200 ± 0.000 * | -0.050 ± 0.000 * | -0.020 ± 0.000 * | -0.010 ± 0.000 * |" in text
    assert "| tailed | coreset | -0.100 ± 0.000 * |" in text
    assert "no_albl" not in text  # a set the automatic row did not run on is left out
    assert "| **worst** | | -0.100 | -0.200 | -0.050 | -0.020 | -0.010 |" in text
    assert across_sets_table({"no_albl": curves["no_albl"]}) == ""


def test_a_rerun_replaces_only_the_seeds_it_ran_again():
    from bench.label_efficiency import with_reruns

    curves = {"d": {"random": {0: curve(0.5, 0), 1: curve(0.5, 10)}, "entropy": {0: curve(0.4, 0)}}}
    merged = with_reruns(curves, {"d": {"random": {1: curve(0.6, 0)}, "coreset": {0: curve(0.7, 0)}}})
    assert merged["d"]["random"][0] == curve(0.5, 0) and merged["d"]["random"][1] == curve(0.6, 0)
    assert merged["d"]["coreset"][0] == curve(0.7, 0) and merged["d"]["entropy"] == curves["d"]["entropy"]
    assert curves["d"]["random"][1] == curve(0.5, 10)  # the first results are left as they were


def test_the_read_buffers_bench_scans_every_row_of_a_shard_under_each_setting(tmp_path):
    from bench.common import make_noise_pool
    from bench.read_buffers import SETTINGS, scan
    from orchestrator.data.pool import shard_locations

    info = make_noise_pool(tmp_path / "pool", 40, box=8)
    shard = shard_locations(info)[1][0]
    for pre_buffer, readahead in SETTINGS:
        result = scan(shard, pre_buffer, readahead)
        assert result["rows"] == 40 and result["pre_buffer"] == pre_buffer
        assert result["arrow_peak_mb"] >= 0 and result["peak_rss_mb"] > 0


def test_the_read_buffers_table_has_a_row_per_setting_saying_on_or_off():
    from bench.read_buffers import table

    rows = table([{"pre_buffer": True, "batch_readahead": 8, "rows": 4096, "arrow_peak_mb": 406, "peak_rss_mb": 566},
                  {"pre_buffer": False, "batch_readahead": 2, "rows": 4096, "arrow_peak_mb": 61, "peak_rss_mb": 356}])
    assert rows.splitlines()[2:] == ["| on | 8 | 4,096 | 406 | 566 |", "| off | 2 | 4,096 | 61 | 356 |"]
