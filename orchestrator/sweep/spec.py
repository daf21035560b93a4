"""Sweep files and their grid points: read and checked before anything runs. No Ray.

A sweep file (tune_configs/sweep_*.yaml) names a base campaign config, overrides for it and a
grid; every grid point becomes one campaign config (:func:`trial_config`), checked here so that
a bad point fails before hours of training (:func:`check_trial_config`). The resources a
trial asks of the cluster are sized here too.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import yaml

from orchestrator.al.budget import budget_schedule
from orchestrator.al.strategies import make_strategy
from orchestrator.config import CampaignConfig, ConfigError, load_config, resolve_config_path
from orchestrator.nn.auxiliary import make_auxiliary

SPEC_KEYS = ("name", "base", "set", "grid", "scheduler", "max_concurrent_trials")
SCHEDULER_KEYS = ("type", "metric", "mode", "grace_period", "reduction_factor", "max_t")
METRICS = ("labelled_fraction", "val_accuracy", "test_accuracy", "aubc", "val_aubc")
FRACTIONS_KEY = "budget.fractions"  # sweep-only: cumulative fractions → budget.counts of the pool
SEED_KEY = "seed"


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
    if cfg.train.num_workers < 1:  # Ray Train's local mode runs in the trial's own process,
        # where Tune's session makes every ray.train call raise (ray issue #49454)
        raise ConfigError(f"grid point {point['name']}: train.num_workers=0 (training in the "
                          f"calling process) cannot run inside a Tune trial; use 1 or more")
    try:
        training = make_strategy(cfg.strategy.name, **cfg.strategy.options).training
        make_auxiliary(training.auxiliary, training.auxiliary_options)
        cycles = len(budget_schedule(cfg.budget, n_train))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"grid point {point['name']}: {err}") from None
    unused = sorted(set(point.get("overrides", {})) & MEAN_MODEL_KEYS)
    if unused and not training.mean_model and cfg.train.trainer == "per_strategy":
        # the baselines train on plain cross-entropy (as published): such a grid would train
        # every point the same and report noise as the effect of λ
        raise ConfigError(f"grid point {point['name']}: {', '.join(unused)} has no effect on "
                          f"strategy {cfg.strategy.name!r}, which trains without the mean model; "
                          "set strategy.name=ema_kl (or another of the EMA-KL family) or "
                          "train.trainer=shared")
    return cycles


# what only a strategy that trains with the mean model M (the EMA-KL family) uses
MEAN_MODEL_KEYS = {"train.lam", "train.regulariser", "train.ema_alpha"}


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
