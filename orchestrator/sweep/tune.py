"""Sweeps: many simulated campaigns on Ray Tune, one trial per grid point, summarised over seeds.

    python orchestrator/run.py sweep --config tune_configs/sweep_lambda.yaml
    python orchestrator/run.py sweep --config sweep_lambda --set train.epochs=2 --sweep-dir runs/lam
    python orchestrator/run.py sweep --resume runs/sweeps/lambda-20261122-101500
    python orchestrator/sweep.py --summarise runs/sweeps/lambda-20261122-101500   # tables only

A sweep file (see tune_configs/sweep_*.yaml) names a base campaign config, overrides for it and
a grid; every grid point is one campaign with the simulated oracle, run by a function trainable
that reports after each cycle. The module is the one that imports ray.tune.

Sweep directory:
    sweep.yaml    the sweep file as given (+ the command line's --set), what --resume reads
    base.yaml     the base campaign config, resolved, with data.pool pointing at pool/
    pool/         the one simulated pool every trial shares (absent when data.pool is given)
    runs/NAME/    each trial's campaign run directory (NAME from its grid values: lam=0.01,seed=0)
    tune/         Ray Tune's experiment (trial states, per-cycle results, tiny checkpoints)
    results.csv, results.md, sweep.png, trials.csv    written when the sweep ends

Why it is safe to stop and resume: a campaign is resumable from its run directory, and a trial
reports only between cycles (after a cycle's TorchTrainer has returned, before the next
scoring pass starts), so neither a SIGKILL nor an ASHA stop can leave a half-started worker
group behind that Tune knows about. A restored trial re-enters `Campaign.run()` on the same run
directory: finished cycles are skipped and only cycles after its checkpoint are reported again.
A trial whose process dies (a preempted node, an OOM kill) is restored that way by Tune itself,
up to TRIAL_MAX_FAILURES times, with no `--resume` needed; past that it ends errored, and
`--resume` restores it again.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from orchestrator.config import (  # noqa: E402
    CampaignConfig,
    ConfigError,
    config_to_dict,
    load_config,
    resolve_config_path,
    save_config,
)
from orchestrator.pool import atomic_write_text  # noqa: E402
from orchestrator.storage import absolute  # noqa: E402

SPEC_KEYS = ("name", "base", "set", "grid", "scheduler", "max_concurrent_trials")
SCHEDULER_KEYS = ("type", "metric", "mode", "grace_period", "reduction_factor", "max_t")
METRICS = ("labelled_fraction", "val_accuracy", "test_accuracy", "aubc", "val_aubc")
FRACTIONS_KEY = "budget.fractions"  # sweep-only: cumulative fractions → budget.counts of the pool
SEED_KEY = "seed"
RUNS, TUNE = "runs", "tune"
# The trial function only drives its campaign, whose Train workers and scoring actors ask for
# the CPUs. Even 0.01 CPU here starves a 2-worker × 1-CPU trainer on 2 CPUs (2.01 > 2: the worker
# group never starts); a CPU-less bundle must hold something, so it holds memory.
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
# Tune restores a trial whose process died from its last report, this many times in all (each
# restore costs little: the campaign resumes from its run directory). A trial that keeps failing
# (a real error) then ends errored; `sweep --resume` restarts it once more.
TRIAL_MAX_FAILURES = 3


# -- sweep files -------------------------------------------------------------------------------
def load_sweep(path: str | Path) -> dict:
    """Read and check a sweep file's structure (config keys are checked later, per grid point)."""
    path = resolve_sweep_path(path)
    spec = yaml.safe_load(path.read_text()) or {}
    return check_spec(spec, str(path))


def resolve_sweep_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    try:
        return resolve_config_path(name_or_path)
    except ConfigError:
        raise ConfigError(f"sweep {name_or_path!r}: no such file") from None


def check_spec(spec: dict, where: str = "sweep") -> dict:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {list(SPEC_KEYS)}")
    if not isinstance(spec.get("base", "default"), (str, dict)):
        raise ConfigError(f"{where}: base must be a config name/path or a mapping")
    if not isinstance(spec.get("set") or {}, dict):
        raise ConfigError(f"{where}: set must map dotted keys to values")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{where}: grid must map keys to lists of values (or named options)")
    for key, values in grid.items():
        if isinstance(values, dict):
            if key == SEED_KEY or not values:
                raise ConfigError(f"{where}: grid.{key}: a named axis needs options (not 'seed')")
            for option, overrides in values.items():
                if not isinstance(overrides, dict) or not overrides:
                    raise ConfigError(f"{where}: grid.{key}.{option}: expected a mapping of "
                                      f"dotted keys to values")
                _check_keys(overrides, f"{where}: grid.{key}.{option}")
        elif isinstance(values, list) and values:
            _check_keys({key: None}, f"{where}: grid")
        else:
            raise ConfigError(f"{where}: grid.{key}: expected a non-empty list or named options")
    _check_keys(spec.get("set") or {}, f"{where}: set", allow_data=True)
    concurrent = spec.get("max_concurrent_trials")
    if concurrent not in (None, "auto") and not (isinstance(concurrent, int) and concurrent > 0):
        raise ConfigError(f"{where}: max_concurrent_trials must be a positive integer or auto")
    scheduler = spec.get("scheduler")
    if scheduler not in (None, "none"):
        if not isinstance(scheduler, dict) or scheduler.get("type") != "asha":
            raise ConfigError(f"{where}: scheduler: expected {{type: asha, …}} or none")
        unknown = sorted(set(scheduler) - set(SCHEDULER_KEYS))
        if unknown:
            raise ConfigError(f"{where}: scheduler: unknown key(s) {unknown}; "
                              f"valid: {list(SCHEDULER_KEYS)}")
        if scheduler.get("metric", "val_aubc") not in METRICS:
            raise ConfigError(f"{where}: scheduler.metric: valid are {list(METRICS)}")
        if scheduler.get("mode", "max") not in ("max", "min"):
            raise ConfigError(f"{where}: scheduler.mode: max or min")
    return spec


def _check_keys(overrides: dict, where: str, allow_data: bool = False) -> None:
    for key in overrides:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a string")
        if key in ("name", "run_root", "oracle"):
            raise ConfigError(f"{where}: {key} is set by the sweep, not a sweep axis")
        if key.startswith("data.") and not allow_data:
            raise ConfigError(f"{where}: {key}: every trial shares one pool; set data.* in "
                              f"`set`, or sweep pools as separate sweeps")


# -- grid points -------------------------------------------------------------------------------
def expand_grid(grid: dict) -> list[dict]:
    """Every grid point, in file order (the last axis varies fastest).

    A point: name (its run directory, unique), configuration (the name without the seed: the
    rows of the results table), seed, values (axis label → value or option name), overrides
    (dotted key → value).
    """
    labels = _axis_labels(list(grid))
    axes = []
    for key, values in grid.items():
        if isinstance(values, dict):  # named options, each a set of overrides
            axes.append([(labels[key], str(name), dict(over)) for name, over in values.items()])
        else:
            axes.append([(labels[key], v, {key: v}) for v in values])
    points = []
    for combo in itertools.product(*axes):
        values = {label: value for label, value, _ in combo}
        overrides = {k: v for _, _, over in combo for k, v in over.items()}
        seedless = [f"{label}={format_value(v)}" for label, v, _ in combo if label != SEED_KEY]
        seed = values.get(SEED_KEY)
        every = seedless + ([f"{SEED_KEY}={format_value(seed)}"] if SEED_KEY in values else [])
        points.append({
            "name": safe_name(",".join(every)),
            "configuration": safe_name(",".join(seedless)) or "base",
            "seed": seed,
            "values": {k: v for k, v in values.items() if k != SEED_KEY},
            "overrides": overrides,
        })
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid: two points get the same name: {sorted(names)}")
    return points


def _axis_labels(keys: list[str]) -> dict[str, str]:
    """The last part of a dotted key (lam for train.lam) unless two axes share it."""
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    return str(value)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.,=_+-]", "-", text)


def set_strings(overrides: dict, n_train: int | None) -> list[str]:
    """Dotted overrides as `--set` strings for load_config; budget.fractions → budget.counts
    (as budget_schedule rounds them). Without n_train (checking keys only) counts are dummies."""
    out = []
    for key, value in overrides.items():
        if key == FRACTIONS_KEY:
            fractions = [float(f) for f in value]
            value = ([max(1, round(f * n_train)) for f in fractions] if n_train
                     else list(range(1, len(fractions) + 1)))
            key = "budget.counts"
        out.append(f"{key}={json.dumps(value)}")
    return out


def base_config(spec: dict, cli_sets: list[str], n_train: int | None = None) -> CampaignConfig:
    base = spec.get("base", "default")
    sets = set_strings(spec.get("set") or {}, n_train) + list(cli_sets)
    if isinstance(base, dict):
        return load_config(None, set_strings(flatten(base), n_train) + sets)
    return load_config(base, sets)


def flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trial_config(base_path: Path, point: dict) -> CampaignConfig:
    """A grid point's campaign config: the base with the point's `set` strings (see prepare)."""
    return load_config(base_path, point["set"] + [f"name={json.dumps(point['name'])}"])


def check_trial_config(cfg: CampaignConfig, point: dict, n_train: int) -> int:
    """Fail before hours of training on what would only fail at a later cycle; returns the
    number of cycles of the point's budget schedule."""
    from orchestrator.loop import CampaignError, budget_schedule
    from orchestrator.strategies import make_strategy

    if cfg.train.num_workers < 1:  # Ray Train's local mode runs in the trial's own process,
        # where Tune's session makes every ray.train call raise (ray issue #49454)
        raise ConfigError(f"grid point {point['name']}: train.num_workers=0 (training in the "
                          f"calling process) cannot run inside a Tune trial; use 1 or more")
    try:
        make_strategy(cfg.strategy.name, **cfg.strategy.options)
        return len(budget_schedule(cfg.budget, n_train))
    except (TypeError, ValueError, CampaignError) as err:
        raise ConfigError(f"grid point {point['name']}: {err}") from None


# -- resources ---------------------------------------------------------------------------------
def trial_needs(cfg: CampaignConfig) -> dict[str, float]:
    """What one trial's campaign asks of the cluster: its Train workers plus its scoring actors
    (they take turns, but counting both leaves Ray Data's read tasks room when trials overlap)."""
    t, s = cfg.train, cfg.score
    return {
        "CPU": t.num_workers * t.cpus_per_worker + s.actors * s.cpus_per_actor,
        "GPU": (t.num_workers if t.use_gpu else 0) + s.actors * s.gpus_per_actor,
    }


def unplaceable(cluster: dict[str, float], cfg: CampaignConfig) -> str | None:
    """Why the cluster, as it is now, cannot start this campaign's Train worker group, if so
    (Ray Train then waits for an autoscaler, retrying its worker group startup forever)."""
    t = cfg.train
    cpus, gpus = t.num_workers * t.cpus_per_worker, t.num_workers if t.use_gpu else 0
    if cpus > cluster.get("CPU", 0.0) + 1e-9 or gpus > cluster.get("GPU", 0.0) + 1e-9:
        return (f"a trial trains on {t.num_workers} workers × {t.cpus_per_worker} CPU"
                f"{' + 1 GPU' if t.use_gpu else ''} = {cpus:g} CPUs, {gpus} GPUs; the cluster has "
                f"{cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs now")
    return None


def concurrent_trials(cluster: dict[str, float], needs: list[dict[str, float]]) -> int:
    """How many trials fit side by side; at least 1 (one trial alternates Train and Data)."""
    limits = []
    for resource in ("CPU", "GPU"):
        need = max((n.get(resource, 0.0) for n in needs), default=0.0)
        if need > 0:
            limits.append(math.floor(cluster.get(resource, 0.0) / need + 1e-9))
    return max(1, min(limits, default=1))


# -- metrics and summaries ---------------------------------------------------------------------
def aubc(fractions, accuracies) -> float:
    """Area under accuracy vs labelled fraction (trapezoids) over the fraction range: a flat
    curve at accuracy a gives a; a single point gives its accuracy."""
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(accuracies, dtype=float)
    if len(x) == 0 or not np.all(np.isfinite(y)):
        return float("nan")
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / float(x[-1] - x[0])


def cycle_metrics(records: list[dict]) -> dict:
    """What a trial reports after a cycle: that cycle's accuracies and the running AUBCs."""
    last = records[-1]
    fractions = [r["labelled_fraction"] for r in records]
    return {
        "cycle": int(last["cycle"]),
        "labelled": int(last["labelled"]),
        "labelled_fraction": float(last["labelled_fraction"]),
        "val_accuracy": float(last.get("val_accuracy", float("nan"))),
        "test_accuracy": float(last.get("test_accuracy", float("nan"))),
        "aubc": aubc(fractions, [r.get("test_accuracy", float("nan")) for r in records]),
        "val_aubc": aubc(fractions, [r.get("val_accuracy", float("nan")) for r in records]),
    }


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite values; std is NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarise(trials: list[dict]) -> list[dict]:
    """One row per configuration (grid point minus seed), in the order first seen.

    trials: {configuration, values, seed, n_cycles (of its schedule), cycles: [trained records]}.
    Accuracy at the i-th budget is over the trials that reached it; AUBC over complete trials
    only (a curve cut short by early stopping has a different range).
    """
    groups: dict[str, list[dict]] = {}
    for trial in trials:
        groups.setdefault(trial["configuration"], []).append(trial)
    rows = []
    for configuration, members in groups.items():
        length = max(t["n_cycles"] for t in members)
        complete = [t for t in members if len(t["cycles"]) >= t["n_cycles"]]
        fractions, acc_mean, acc_std, reached = [], [], [], []
        for i in range(length):
            at = [t["cycles"][i] for t in members if len(t["cycles"]) > i]
            fractions.append(float(np.mean([c["labelled_fraction"] for c in at])) if at else float("nan"))
            m, s = mean_std([c.get("test_accuracy") for c in at])
            acc_mean.append(m)
            acc_std.append(s)
            reached.append(len(at))
        aubcs = [aubc([c["labelled_fraction"] for c in t["cycles"]],
                      [c.get("test_accuracy", float("nan")) for c in t["cycles"]]) for t in complete]
        a_mean, a_std = mean_std(aubcs)
        rows.append({
            "configuration": configuration, "values": dict(members[0]["values"]),
            "n_trials": len(members), "n_complete": len(complete), "fractions": fractions,
            "accuracy_mean": acc_mean, "accuracy_std": acc_std, "n_at": reached,
            "aubc_mean": a_mean, "aubc_std": a_std,
        })
    return rows


def budget_columns(rows: list[dict]) -> list[str]:
    """The labelled fractions of all rows as column labels (10.0%), sorted."""
    found = {_pct(f) for row in rows for f in row["fractions"] if np.isfinite(f)}
    return sorted(found, key=lambda label: float(label.rstrip("%")))


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return ""
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def results_csv(rows: list[dict]) -> str:
    columns = budget_columns(rows)
    axes = list(dict.fromkeys(k for row in rows for k in row["values"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["configuration", *axes, "n_trials", "n_complete", "aubc_mean", "aubc_std",
                     *[f"acc@{c}_{stat}" for c in columns for stat in ("mean", "std")]])
    for row in rows:
        at = {_pct(f): (m, s) for f, m, s in
              zip(row["fractions"], row["accuracy_mean"], row["accuracy_std"])}
        cells = []
        for c in columns:
            m, s = at.get(c, (float("nan"), float("nan")))
            cells += [_num(m), _num(s)]
        writer.writerow([row["configuration"], *[format_value(row["values"].get(a, "")) for a in axes],
                         row["n_trials"], row["n_complete"], _num(row["aubc_mean"]),
                         _num(row["aubc_std"]), *cells])
    return buffer.getvalue()


def results_markdown(rows: list[dict], title: str = "") -> str:
    columns = budget_columns(rows)
    lines = [f"### {title}", ""] if title else []
    lines += [
        "Test accuracy at each labelled fraction of the train split and AUBC (area under that "
        "curve over its range, 0–1), mean ± std over seeds; n = complete trials / trials.",
        "",
        "| configuration | n | " + " | ".join(columns) + " | AUBC |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for row in rows:
        at = {_pct(f): _pm(m, s) for f, m, s in
              zip(row["fractions"], row["accuracy_mean"], row["accuracy_std"])}
        lines.append(
            f"| {row['configuration']} | {row['n_complete']}/{row['n_trials']} | "
            + " | ".join(at.get(c, "") for c in columns)
            + f" | {_pm(row['aubc_mean'], row['aubc_std'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    # the default cycle repeats after 10 colours: more lines get tab20's 20
    colours = plt.cm.tab20.colors if len(rows) > 10 else [None] * len(rows)
    for row, colour in zip(rows, colours):
        x = 100 * np.asarray(row["fractions"])
        m, s = np.asarray(row["accuracy_mean"]), np.asarray(row["accuracy_std"])
        (line,) = axis.plot(x, m, marker="o", markersize=3, label=row["configuration"], color=colour)
        band = np.isfinite(s)
        if band.any():
            axis.fill_between(x[band], (m - s)[band], (m + s)[band], color=line.get_color(), alpha=0.15)
    axis.set_xlabel("labelled (% of the train split)")
    axis.set_ylabel("test accuracy")
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _num(value: float) -> str:
    return f"{value:.4f}" if np.isfinite(value) else ""


# -- the sweep directory -----------------------------------------------------------------------
def collect_trials(sweep_dir: Path, points: list[dict]) -> list[dict]:
    """Each point's trained cycles, read from its campaign's state.json (the ground truth: Tune's
    own records can lag a kill)."""
    trials = []
    for point in points:
        path = Path(sweep_dir) / RUNS / point["name"] / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        trained = [c for c in state.get("cycles", []) if c.get("trained")]
        n_cycles = len(state.get("schedule", [])) or point.get("n_cycles") or 1
        trials.append({**point, "n_cycles": n_cycles, "cycles": trained})
    return trials


def write_results(sweep_dir: Path, points: list[dict], title: str = "") -> list[dict]:
    sweep_dir = Path(sweep_dir)
    trials = collect_trials(sweep_dir, points)
    rows = summarise(trials)
    atomic_write_text(sweep_dir / "results.csv", results_csv(rows))
    atomic_write_text(sweep_dir / "results.md", results_markdown(rows, title))
    atomic_write_text(sweep_dir / "trials.csv", trials_csv(trials))
    plot_sweep(rows, sweep_dir / "sweep.png", title)
    return rows


def trials_csv(trials: list[dict]) -> str:
    keys = ["labelled", "labelled_fraction", "val_accuracy", "test_accuracy", "seconds_train",
            "seconds_score"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "configuration", "seed", "cycle", *keys])
    for t in trials:
        for c in t["cycles"]:
            writer.writerow([t["name"], t["configuration"], "" if t["seed"] is None else t["seed"],
                             c["cycle"], *[_cell(c.get(k)) for k in keys]])
    return buffer.getvalue()


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


class Sweep:
    """A sweep directory: its spec, base config, shared pool and grid points."""

    def __init__(self, sweep_dir: Path, spec: dict, cli_sets: list[str]):
        self.dir = Path(sweep_dir).resolve()
        self.spec = spec
        self.cli_sets = list(cli_sets)
        self.name = str(spec.get("name") or "sweep")
        self.points = expand_grid(spec["grid"])
        self.n_cycles = 0  # the longest schedule, and each trial's needs: set by prepare()
        self.needs: list[dict[str, float]] = []
        self.configs: list[CampaignConfig] = []

    @classmethod
    def create(cls, spec_path: str | Path, cli_sets: list[str], sweep_dir: str | Path | None):
        spec = load_sweep(spec_path)
        base_config(spec, cli_sets)  # unknown keys fail here, before any directory is made
        name = str(spec.get("name") or Path(spec_path).stem)
        sweep_dir = Path(sweep_dir or Path("runs") / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (sweep_dir / "sweep.yaml").exists():
            raise ConfigError(f"{sweep_dir} already holds a sweep; use --resume {sweep_dir}")
        sweep = cls(sweep_dir, {**spec, "name": name}, cli_sets)
        for point in sweep.points:  # every grid key is checked before anything runs
            load_config(None, set_strings(point["overrides"], None))
        sweep.dir.mkdir(parents=True, exist_ok=True)
        saved = {**spec, "name": name, "cli_set": list(cli_sets)}
        atomic_write_text(sweep.dir / "sweep.yaml", yaml.safe_dump(saved, sort_keys=False))
        return sweep

    @classmethod
    def open(cls, sweep_dir: str | Path):
        path = Path(sweep_dir) / "sweep.yaml"
        if not path.is_file():
            raise ConfigError(f"{sweep_dir}: not a sweep directory (no sweep.yaml)")
        saved = yaml.safe_load(path.read_text())
        cli_sets = saved.pop("cli_set", [])
        return cls(sweep_dir, check_spec(saved, str(path)), cli_sets)

    @property
    def base_path(self) -> Path:
        return self.dir / "base.yaml"

    def prepare(self) -> int:
        """The shared pool (simulated once, kept across resumes) and base.yaml; returns n_train."""
        from orchestrator.loop import PoolView
        from orchestrator.pool import open_pool
        from orchestrator.run import prepare_pool

        if self.base_path.exists():  # resumed: the base as it was, whatever tune_configs says now
            info = open_pool(load_config(self.base_path).data.pool)
            n_train = len(PoolView.load(info).rows_of("train"))
        else:
            cfg = base_config(self.spec, self.cli_sets)
            info = prepare_pool(cfg, self.dir)  # data.pool, or simulated into SWEEP_DIR/pool
            n_train = len(PoolView.load(info).rows_of("train"))
            values = config_to_dict(base_config(self.spec, self.cli_sets, n_train))
            values["data"]["pool"] = absolute(info.path)  # a URI stays one
            atomic_write_text(self.base_path, yaml.safe_dump(values, sort_keys=False))
        self.needs, self.configs = [], []
        for point in self.points:
            point["set"] = set_strings(point["overrides"], n_train)
            cfg = trial_config(self.base_path, point)
            point["n_cycles"] = check_trial_config(cfg, point, n_train)
            self.needs.append(trial_needs(cfg))
            self.configs.append(cfg)
        self.n_cycles = max(p["n_cycles"] for p in self.points)
        return n_train

    def write_results(self) -> list[dict]:
        return write_results(self.dir, self.points, self.name)


# -- Ray Tune ----------------------------------------------------------------------------------
def campaign_trial(config: dict) -> None:
    """One Tune trial: one campaign on the sweep's pool, reporting after every cycle."""
    from ray import tune

    from orchestrator.faults import set_scope
    from orchestrator.loop import Campaign
    from orchestrator.pool import open_pool

    sweep_dir, point = Path(config["sweep_dir"]), config["point"]
    set_scope(point["name"])  # tests: CRYOAL_FAULT=…@NAME kills this trial's process only
    cfg = trial_config(sweep_dir / "base.yaml", point)
    run_dir = sweep_dir / RUNS / point["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():  # also makes it a run.py --resume directory
        save_config(cfg, run_dir / "config.yaml")

    reported = -1  # the last cycle Tune has; a restored trial reports only the cycles after it
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            reported = json.loads((Path(directory) / "trial.json").read_text())["cycle"]

    seen: list[dict] = []

    def report() -> None:
        metrics = cycle_metrics(seen)
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "trial.json").write_text(
                json.dumps({"run_dir": str(run_dir), "cycle": metrics["cycle"]}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    def on_cycle(record: dict) -> None:
        seen.append(record)
        if reported < record["cycle"] < last:  # the last cycle waits for the final predictions
            report()

    campaign = Campaign(cfg, run_dir, open_pool(cfg.data.pool), on_cycle=on_cycle)
    last = len(campaign.schedule) - 1
    campaign.run()
    if reported < last:
        report()


def _trial_dirname(trial) -> str:
    return trial.config["point"]["name"]


def make_scheduler(spec: dict | None, n_cycles: int):
    """ASHA on cycles (training_iteration = cycles reported), or None."""
    if spec in (None, "none"):
        return None
    max_t = int(spec.get("max_t", n_cycles))
    if max_t < n_cycles:
        raise ConfigError(f"scheduler.max_t={max_t} would cut every campaign ({n_cycles} cycles) short")
    from ray.tune.schedulers import AsyncHyperBandScheduler

    return AsyncHyperBandScheduler(
        time_attr="training_iteration", metric=spec.get("metric", "val_aubc"),
        mode=spec.get("mode", "max"), max_t=max_t, grace_period=int(spec.get("grace_period", 1)),
        reduction_factor=float(spec.get("reduction_factor", 2)),
    )


def trainable():
    from ray import tune

    return tune.with_resources(campaign_trial, TRIAL_RESOURCES)


def run_sweep(sweep: Sweep, *, resume: bool = False, scheduler=None,
              time_budget_s: float | None = None) -> int:
    """Run (or resume) the sweep on the connected Ray; write the results; 0 if every trial
    finished. `scheduler` replaces the file's; `time_budget_s` ends a new sweep early (tests)."""
    import ray
    from ray import tune

    n_train = sweep.prepare()
    cluster = ray.cluster_resources()
    for reason in dict.fromkeys(filter(None, (unplaceable(cluster, c) for c in sweep.configs))):
        print(f"warning: {reason}: trials will wait for more nodes", file=sys.stderr, flush=True)
    experiment = sweep.dir / TUNE
    if resume and tune.Tuner.can_restore(str(experiment)):
        print(f"resuming sweep {sweep.dir}", flush=True)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable(), resume_errored=True)
    else:
        spec_concurrent = sweep.spec.get("max_concurrent_trials")
        concurrent = (spec_concurrent if isinstance(spec_concurrent, int)
                      else concurrent_trials(cluster, sweep.needs))
        scheduler = scheduler or make_scheduler(sweep.spec.get("scheduler"), sweep.n_cycles)
        print(f"sweep {sweep.name}: {len(sweep.points)} trials on a pool of {n_train} train "
              f"subtomograms, {concurrent} at a time; directory {sweep.dir}", flush=True)
        tuner = tune.Tuner(
            trainable(),
            param_space={"sweep_dir": str(sweep.dir), "point": tune.grid_search(sweep.points)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent, scheduler=scheduler, time_budget_s=time_budget_s,
                trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=TUNE, storage_path=str(sweep.dir),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
                verbose=1,
            ),
        )
    results = tuner.fit()
    rows = sweep.write_results()
    print("\n" + results_markdown(rows, sweep.name))
    print(f"results: {sweep.dir / 'results.md'}, {sweep.dir / 'sweep.png'}")
    errors = [r for r in results if r.error is not None]
    for result in errors:
        print(f"trial {result.config['point']['name']} failed: {result.error}", file=sys.stderr)
    return 1 if errors else 0


# -- command line ------------------------------------------------------------------------------
def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orchestrator/run.py sweep",
        description="Sweep simulated active-learning campaigns on Ray Tune (see docs/SWEEPS.md).",
    )
    parser.add_argument("--config", help="a sweep file, or a name in tune_configs/ (sweep_lambda)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the base campaign config, e.g. --set train.epochs=2")
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="finish an interrupted sweep")
    parser.add_argument("--sweep-dir", help="where to write (default: runs/sweeps/NAME-TIMESTAMP)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--summarise", metavar="SWEEP_DIR",
                        help="rewrite results.* from the trials' run directories (no Ray)")
    args = parser.parse_args(argv)
    chosen = [o for o in ("config", "resume", "summarise") if getattr(args, o)]
    if len(chosen) != 1:
        parser.error("give exactly one of --config, --resume, --summarise")
    if args.set and not args.config:
        parser.error("--set applies to a new sweep (a resumed one keeps its settings)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.summarise:
            sweep = Sweep.open(args.summarise)
            print(results_markdown(sweep.write_results(), sweep.name))
            return 0
        sweep = Sweep.open(args.resume) if args.resume else Sweep.create(args.config, args.set, args.sweep_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import ray

    from orchestrator.run import RAY_ENV_DEFAULTS, _pythonpath

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    ray.init(
        address=args.address,
        runtime_env={"env_vars": {**RAY_ENV_DEFAULTS, "PYTHONPATH": _pythonpath()}} if local else None,
        logging_config=ray.LoggingConfig(log_level="WARNING"),
    )
    try:
        return run_sweep(sweep, resume=bool(args.resume))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()


if __name__ == "__main__":
    from orchestrator.sweep import main as package_main  # the trainable pickles by reference

    sys.exit(package_main())
