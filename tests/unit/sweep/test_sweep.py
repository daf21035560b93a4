"""Sweeps: the pure parts (AUBC, summaries over seeds, grids, sizing) and, on a local Ray, a
2-configuration × 2-cycle sweep, an ASHA stop between cycles, and a SIGKILLed sweep resumed."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.campaign.metrics import aubc
from orchestrator.config import CONFIG_DIR, PROJECT_ROOT, ConfigError, config_to_dict
from orchestrator.sweep.results import (
    cycle_metrics,
    mean_std,
    results_csv,
    results_markdown,
    summarise,
)
from orchestrator.sweep.spec import (
    base_config,
    check_spec,
    check_trial_config,
    concurrent_trials,
    expand_grid,
    load_sweep,
    set_strings,
    trial_config,
)
from orchestrator.sweep.tune import Sweep, make_scheduler

ROOT = PROJECT_ROOT


# -- AUBC and summaries ------------------------------------------------------------------------
def test_a_flat_curve_has_its_accuracy_as_aubc():
    assert aubc([0.1, 0.2, 0.4], [0.7, 0.7, 0.7]) == pytest.approx(0.7)


def test_aubc_is_the_trapezoid_area_over_the_fraction_range():
    # from 0.5 to 1.0 over [0.1, 0.3], then flat at 1.0 over [0.3, 0.4]: (0.15 + 0.1) / 0.3
    assert aubc([0.1, 0.3, 0.4], [0.5, 1.0, 1.0]) == pytest.approx(0.25 / 0.3)


def test_aubc_of_a_single_cycle_is_its_accuracy_and_a_missing_accuracy_gives_nan():
    assert aubc([0.1], [0.42]) == pytest.approx(0.42)
    assert math.isnan(aubc([0.1, 0.2], [0.5, float("nan")]))


def test_each_cycle_reports_the_running_aubc_of_the_cycles_so_far():
    records = [
        {"cycle": 0, "labelled": 10, "labelled_fraction": 0.1, "val_accuracy": 0.4, "test_accuracy": 0.5},
        {"cycle": 1, "labelled": 20, "labelled_fraction": 0.2, "val_accuracy": 0.6, "test_accuracy": 0.7},
    ]
    assert cycle_metrics(records[:1])["aubc"] == pytest.approx(0.5)
    metrics = cycle_metrics(records)
    assert (metrics["cycle"], metrics["aubc"], metrics["val_aubc"]) == (1, pytest.approx(0.6), pytest.approx(0.5))


def test_mean_std_uses_the_sample_std_and_has_no_std_for_one_value():
    assert mean_std([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    mean, std = mean_std([0.5])
    assert (mean, math.isnan(std)) == (0.5, True)


def _trial(configuration, seed, accuracies, n_cycles=2):
    cycles = [{"cycle": i, "labelled_fraction": 0.1 * (i + 1), "test_accuracy": a}
              for i, a in enumerate(accuracies)]
    return {"configuration": configuration, "values": {"lam": configuration}, "seed": seed,
            "n_cycles": n_cycles, "cycles": cycles}


def test_summaries_are_one_row_per_configuration_with_mean_and_std_over_seeds():
    rows = summarise([_trial("a", 0, [0.4, 0.6]), _trial("b", 0, [0.5, 0.5]),
                      _trial("a", 1, [0.6, 0.8])])
    assert [r["configuration"] for r in rows] == ["a", "b"]
    a = rows[0]
    assert (a["n_trials"], a["n_complete"]) == (2, 2)
    assert a["accuracy_mean"] == [pytest.approx(0.5), pytest.approx(0.7)]
    assert a["accuracy_std"] == [pytest.approx(math.sqrt(0.02)), pytest.approx(math.sqrt(0.02))]
    assert a["aubc_mean"] == pytest.approx(0.6)  # AUBCs 0.5 and 0.7


def test_a_trial_stopped_early_counts_at_the_budgets_it_reached_but_not_in_aubc():
    rows = summarise([_trial("a", 0, [0.4, 0.6]), _trial("a", 1, [0.2])])
    assert (rows[0]["n_complete"], rows[0]["n_at"]) == (1, [2, 1])
    assert rows[0]["accuracy_mean"][0] == pytest.approx(0.3)
    assert rows[0]["aubc_mean"] == pytest.approx(0.5)


def test_the_tables_have_a_column_per_budget_and_a_row_per_configuration():
    rows = summarise([_trial("a", 0, [0.4, 0.6]), _trial("a", 1, [0.6, 0.8]), _trial("b", 0, [0.5, 0.5])])
    table = list(csv.DictReader(results_csv(rows).splitlines()))
    assert [r["configuration"] for r in table] == ["a", "b"]
    assert (table[0]["acc@20.0%_mean"], table[0]["aubc_mean"]) == ("0.7000", "0.6000")
    markdown = results_markdown(rows)
    assert "| a | 2/2 | 0.500 ± 0.141 | 0.700 ± 0.141 | 0.600 ± 0.141 |" in markdown
    assert "| b | 1/1 | 0.500 | 0.500 | 0.500 |" in markdown


def test_the_results_are_rebuilt_from_the_trials_run_directories_without_ray(tmp_path):
    spec = {"name": "lam", "base": "smoke", "grid": {"train.lam": [0, 0.1], "seed": [0, 1]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    for name, accuracy in (("lam=0,seed=0", 0.5), ("lam=0,seed=1", 0.7), ("lam=0.1,seed=0", 0.6)):
        cycles = [{"cycle": i, "labelled": 6 + 3 * i, "labelled_fraction": 0.2 + 0.1 * i,
                   "test_accuracy": accuracy, "trained": True} for i in range(2)]
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "state.json").write_text(json.dumps({"schedule": [6, 9], "cycles": cycles}))
    Sweep.open(tmp_path).write_results()
    rows = read_csv(tmp_path / "results.csv")
    assert [(r["configuration"], r["n_trials"], r["n_complete"], r["aubc_mean"]) for r in rows] == [
        ("lam=0", "2", "2", "0.6000"), ("lam=0.1", "2", "1", "0.6000")]  # lam=0.1,seed=1 never ran
    assert len(read_csv(tmp_path / "trials.csv")) == 6
    assert "| lam=0 | 2/2 | 0.600 ± 0.141 | 0.600 ± 0.141 | 0.600 ± 0.141 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "sweep.png").stat().st_size > 0


# -- grids and sweep files ---------------------------------------------------------------------
def test_grid_points_are_named_by_their_values_and_grouped_without_the_seed():
    points = expand_grid({"train.lam": [0, 0.01], "seed": [0, 1]})
    assert [p["name"] for p in points] == ["lam=0,seed=0", "lam=0,seed=1", "lam=0.01,seed=0", "lam=0.01,seed=1"]
    assert [p["configuration"] for p in points] == ["lam=0", "lam=0", "lam=0.01", "lam=0.01"]
    assert points[2]["overrides"] == {"train.lam": 0.01, "seed": 0}


def test_a_named_axis_sets_several_keys_and_shared_key_tails_stay_distinct():
    points = expand_grid({"schedule": {"fast": {"budget.step": 0.2, "budget.final": 0.5}},
                          "train.regulariser": ["kl"], "strategy.options.regulariser": ["x"]})
    assert points[0]["name"] == "schedule=fast,train.regulariser=kl,strategy.options.regulariser=x"
    assert points[0]["overrides"]["budget.final"] == 0.5


def test_budget_fractions_become_counts_of_the_train_split():
    assert set_strings({"budget.fractions": [0.1, 0.141, 0.4]}, 480) == ["budget.counts=[48, 68, 192]"]


@pytest.mark.parametrize("spec, message", [
    ({"grid": {"seed": [0]}, "typo": 1}, "unknown key"),
    ({"grid": {"data.simulate": ["a", "b"]}}, "shares one pool"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"seed": [0]}, "scheduler": {"type": "asha", "patience": 3}}, "unknown key"),
    ({"grid": {"seed": [0]}, "scheduler": {"type": "asha", "metric": "test"}}, "metric"),
])
def test_malformed_sweep_files_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        check_spec(spec)


def test_an_unknown_config_key_in_the_grid_is_refused_before_anything_runs(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "smoke", "grid": {"train.lamda": [0, 1]}}))
    with pytest.raises(ConfigError, match="lamda"):
        Sweep.create(path, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_training_in_the_trials_own_process_is_refused_before_anything_runs(tmp_path):
    """Ray Train's local mode (num_workers=0) inside a Tune trial: every ray.train call raises."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config_to_dict(base_config({"base": "smoke"}, [], 60))))
    point = {"name": "lam=0", "set": ["train.num_workers=0"]}
    with pytest.raises(ConfigError, match="num_workers=0.*Tune trial"):
        check_trial_config(trial_config(base, point), point, 60)


def test_asha_may_not_stop_every_campaign_before_its_end():
    with pytest.raises(ConfigError, match="short"):
        make_scheduler({"type": "asha", "max_t": 2}, n_cycles=4)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("sweep_*.yaml")))
def test_every_shipped_sweep_file_builds_a_valid_campaign_for_each_point(name, tmp_path):
    spec = load_sweep(name)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config_to_dict(base_config(spec, [], n_train=480))))
    for point in expand_grid(spec["grid"]):
        point["set"] = set_strings(point["overrides"], 480)
        assert check_trial_config(trial_config(base, point), point, 480) >= 2


def test_trials_are_run_side_by_side_only_as_far_as_the_cluster_holds_them():
    cpu_trial = {"CPU": 3.0, "GPU": 0.0}
    assert concurrent_trials({"CPU": 2.0}, [cpu_trial]) == 1  # one trial alternates Train and Data
    assert concurrent_trials({"CPU": 16.0}, [cpu_trial, {"CPU": 5.0}]) == 3
    assert concurrent_trials({"CPU": 96.0, "GPU": 8.0}, [{"CPU": 24.0, "GPU": 5.0}]) == 1


# -- on a local Ray ----------------------------------------------------------------------------
def write_spec(path: Path, pool_path: str | None, **extra) -> Path:
    """2 configurations × 2 cycles of the smoke campaign (tiny model)."""
    spec = {"name": "test", "base": "smoke", "set": {"budget.counts": [6, 9], "train.epochs": 1},
            "grid": {"train.lam": [0, 0.1]}, **extra}
    if pool_path:
        spec["set"]["data.pool"] = pool_path
    path.write_text(yaml.safe_dump(spec))
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.ray
@pytest.mark.slow
def test_an_asha_stop_between_cycles_leaves_nothing_behind_for_the_next_trial(ray_local, shape_pool, tmp_path):
    """max_t=1 makes ASHA stop every trial at its first report: the second trial must still get
    its Train workers (a leaked placement group would starve it), and none may be left."""
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.util import placement_group_table

    from orchestrator.sweep.tune import run_sweep

    sweep = Sweep.create(write_spec(tmp_path / "s.yaml", shape_pool.path), [], tmp_path / "sweep")
    asha = AsyncHyperBandScheduler(time_attr="training_iteration", metric="val_aubc", mode="max",
                                   max_t=1, grace_period=1)
    assert run_sweep(sweep, scheduler=asha, time_budget_s=600) == 0
    trials = read_csv(sweep.dir / "trials.csv")
    assert sorted((r["trial"], r["cycle"]) for r in trials) == [("lam=0", "0"), ("lam=0.1", "0")]
    assert [r["n_complete"] for r in read_csv(sweep.dir / "results.csv")] == ["0", "0"]
    alive = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert alive == []


def sweep_cli(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "orchestrator" / "run.py"), "sweep", *args], cwd=ROOT,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # kill reaches its tree only
        )


def campaign_done(run_dir: Path) -> bool:
    path = run_dir / "state.json"
    return path.exists() and json.loads(path.read_text()).get("done") is True


def tune_status(sweep_dir: Path) -> dict[str, str]:
    """Trial name → status in Tune's latest experiment snapshot (what Tuner.restore reads)."""
    snapshots = sorted((sweep_dir / "tune").glob("experiment_state-*.json"))
    if not snapshots:
        return {}
    try:
        trials = json.loads(snapshots[-1].read_text())["trial_data"]
    except (ValueError, KeyError):  # caught mid-write
        return {}
    return {t["custom_dirname"]: t["status"] for t in (json.loads(data) for data, _ in trials)}


def mtimes(run_dir: Path) -> dict[str, int]:
    watched = [run_dir / "state.json", *sorted(run_dir.glob("cycles/*/model.pt"))]
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in watched}


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_killed_after_its_first_trial_resumes_to_a_full_table_without_rerunning_it(tmp_path):
    """2 configurations × 2 cycles of the smoke campaign through the CLI, on the one pool it
    simulates: SIGKILLed while the second trial runs, then --resume."""
    sweep_dir, log = tmp_path / "sweep", tmp_path / "log.txt"
    spec = write_spec(tmp_path / "s.yaml", None, max_concurrent_trials=1)
    first, second = sweep_dir / "runs" / "lam=0", sweep_dir / "runs" / "lam=0.1"
    driver = sweep_cli(["--config", str(spec), "--sweep-dir", str(sweep_dir)], log)
    deadline = time.monotonic() + 900
    while tune_status(sweep_dir).get("lam=0") != "TERMINATED":
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the first trial"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = mtimes(first)
    assert campaign_done(first) and not campaign_done(second)

    driver = sweep_cli(["--resume", str(sweep_dir)], log)
    assert driver.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert campaign_done(second)
    assert mtimes(first) == finished  # not one cycle of the finished trial was trained again
    rows = read_csv(sweep_dir / "results.csv")
    assert [(r["configuration"], r["n_complete"]) for r in rows] == [("lam=0", "1"), ("lam=0.1", "1")]
    assert "| lam=0.1 | 1/1 |" in (sweep_dir / "results.md").read_text()
    assert (sweep_dir / "sweep.png").stat().st_size > 0
    assert (sweep_dir / "pool" / "pool.json").is_file()  # simulated once, shared
    trained = read_csv(sweep_dir / "trials.csv")
    for name in ("lam=0", "lam=0.1"):  # Tune got each cycle, with the AUBC of the run directory
        reported = read_csv(sweep_dir / "tune" / name / "progress.csv")
        curve = [r for r in trained if r["trial"] == name]
        expected = aubc([float(r["labelled_fraction"]) for r in curve],
                        [float(r["test_accuracy"]) for r in curve])
        assert (reported[-1]["cycle"], float(reported[-1]["aubc"])) == ("1", pytest.approx(expected, abs=1e-4))
    assert [r["cycle"] for r in read_csv(sweep_dir / "tune" / "lam=0" / "progress.csv")] == ["0", "1"]


def test_a_lambda_grid_over_a_strategy_that_trains_without_the_mean_model_is_refused(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config_to_dict(base_config({"base": "smoke", "set": {
        "strategy.name": "random"}}, [], 60))))
    point = {"name": "lam=0.1", "set": ["train.lam=0.1"], "overrides": {"train.lam": 0.1}}
    with pytest.raises(ConfigError, match="train.lam has no effect on strategy 'random'"):
        check_trial_config(trial_config(base, point), point, 60)
    point["set"].append("train.trainer=shared")  # one trainer for all: λ applies to every strategy
    assert check_trial_config(trial_config(base, point), point, 60) >= 1
