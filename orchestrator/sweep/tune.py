"""Sweeps: many simulated campaigns on Ray Tune, one trial per grid point, summarised over seeds.

    python orchestrator/run.py sweep --config tune_configs/sweep_lambda.yaml
    python orchestrator/run.py sweep --config sweep_lambda --set train.epochs=2 --sweep-dir runs/lam
    python orchestrator/run.py sweep --resume runs/sweeps/lambda-20261122-101500
    python orchestrator/run.py sweep --summarise runs/sweeps/lambda-20261122-101500   # tables only

A sweep file (see tune_configs/sweep_*.yaml) names a base campaign config, overrides for it and
a grid; every grid point is one campaign with the simulated oracle, run by a function trainable
that reports after each cycle. The module is the one that imports ray.tune; the sweep file and
its grid are `spec.py`, the results and their files `results.py`.

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
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from orchestrator.config import CampaignConfig, ConfigError, config_to_dict, load_config, save_config
from orchestrator.data.pool import atomic_write_text, open_pool
from orchestrator.data.storage import absolute
from orchestrator.faults import set_scope
from orchestrator.sweep.results import RUNS, cycle_metrics, results_markdown, write_results
from orchestrator.sweep.spec import (
    base_config,
    check_spec,
    check_trial_config,
    concurrent_trials,
    expand_grid,
    load_sweep,
    set_strings,
    trial_config,
    trial_needs,
    unplaceable,
)

TUNE = "tune"  # in a sweep directory: Ray Tune's experiment
# The trial function only drives its campaign, whose Train workers and scoring actors ask for
# the CPUs. Even 0.01 CPU here starves a 2-worker × 1-CPU trainer on 2 CPUs (2.01 > 2: the worker
# group never starts); a CPU-less bundle must hold something, so it holds memory.
TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
# Tune restores a trial whose process died from its last report, this many times in all (each
# restore costs little: the campaign resumes from its run directory). A trial that keeps failing
# (a real error) then ends errored; `sweep --resume` restarts it once more.
TRIAL_MAX_FAILURES = 3



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
        from orchestrator.campaign.labelled import PoolView  # the campaign's imports: torch, Ray
        from orchestrator.campaign.prepare import prepare_pool

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

    from orchestrator.campaign.loop import Campaign

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
    from orchestrator.distributed.connect import connect

    with connect(args.address, log_level="WARNING"):
        try:
            return run_sweep(sweep, resume=bool(args.resume))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
