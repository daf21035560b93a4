"""Run an active-learning campaign.

    python orchestrator/run.py                              # embedded default: simulate, then EMA-KL
    python orchestrator/run.py --config paper --set train.epochs=50
    python orchestrator/run.py --resume runs/demo-20261122-101500
    python orchestrator/run.py export runs/demo-20261122-101500 --star classes.star
    python orchestrator/run.py report runs/demo-20261122-101500     # rebuild its report.html
    python orchestrator/run.py --run-dir s3://bucket/runs/demo --set data.pool=s3://bucket/pools/p
    ray job submit --working-dir . -- python orchestrator/run.py --set train.num_workers=4

Connects to the Ray of `ray job submit` (RAY_ADDRESS) or `--address`; otherwise starts a local
Ray for the duration of the run. Pools and run directories may be URIs (s3://, gs://, file://):
see orchestrator/storage.py. A campaign holds its run directory's lock while it runs
(orchestrator/rundir_lock.py): a second campaign, resume or labelling page on it is refused.

The terminal shows each stage's progress and one line per cycle; Ray's own output goes to
RUN_DIR/logs/ (orchestrator/raylogs.py), or to the terminal as well with -v.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import CampaignConfig, ConfigError, load_config, save_config  # noqa: E402
from orchestrator.storage import RunMirror, StorageError, join, open_run_dir  # noqa: E402
from orchestrator.rundir_lock import RunDirLockError, lock_run_dir  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Ray Train's defaults poll slowly and watch for preemption; on one machine both only add
# seconds to every cycle's start and stop.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orchestrator/run.py", description="Deep active learning campaign for cryo-ET subtomograms."
    )
    parser.add_argument("--config", help="a YAML file or a name in tune_configs/ (default: built-in CPU demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="finish an interrupted or waiting campaign (a path or a URI)")
    parser.add_argument("--run-dir", help="where to write the run, a path or a URI such as "
                                          "s3://bucket/runs/x (default: RUN_ROOT/NAME-TIMESTAMP)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's own output (workers, Train, Data) as well, "
                             "not only in RUN_DIR/logs/")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["annotate"]:  # the labelling page: `run.py annotate RUN_DIR` (no Ray)
        from orchestrator.annotate import main as annotate_main

        return annotate_main(argv[1:])
    if argv[:1] == ["export"]:  # a finished campaign's predictions as RELION STAR / copick picks
        from orchestrator.export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["report"]:  # rebuild a run directory's report.html (no Ray)
        from orchestrator.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["sweep"]:  # many simulated campaigns on Ray Tune: `run.py sweep --config …`
        from orchestrator.sweep import main as sweep_main

        return sweep_main(argv[1:])
    args = parse_args(argv)
    lock = None
    try:  # one writer per run directory; a resume locks before it reads or downloads anything
        lock = lock_run_dir(open_run_dir(args.resume)[0]) if args.resume else None
        cfg, run_dir, mirror = prepare_run(args)
        lock = lock or lock_run_dir(run_dir)
    except (ConfigError, StorageError, RunDirLockError) as err:
        if lock is not None:
            lock.release()
        print(f"error: {err}", file=sys.stderr)
        return 2
    from orchestrator.pool import PoolError
    from orchestrator.progress import STATUS, Display

    display = Display(live=False if args.verbose else None, status_path=run_dir / STATUS)
    started = time.perf_counter()
    try:  # before Ray starts: a bad pool is said at once, and simulating has every CPU
        info = prepare_pool(cfg, run_dir, display)
    except PoolError as err:
        lock.release()
        print(f"error: {err}", file=sys.stderr)
        return 1
    import ray

    from orchestrator.loop import Campaign, accuracy_table
    from orchestrator.oracle import AwaitingLabels
    from orchestrator.raylogs import RayOutput

    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    output = RayOutput(run_dir / "logs", verbose=args.verbose)
    try:
        with output:
            ray.init(address=args.address, **output.init_kwargs(), runtime_env={
                "env_vars": {**RAY_ENV_DEFAULTS, "PYTHONPATH": _pythonpath()}} if local else None)
            output.started(local)
            try:
                state = Campaign(cfg, run_dir, info, mirror=mirror, display=display).run()
            finally:
                ray.shutdown()
    except AwaitingLabels as waiting:
        print(str(waiting))
        if mirror is not None:
            print(f"  (the run directory is {mirror.uri}, staged in {run_dir}: put the labels "
                  f"file there or in the staging copy, then --resume {mirror.uri})")
        if (run_dir / "report.html").is_file():  # from cycle 1 on
            print(f"report so far: {run_dir / 'report.html'}")
        return 0
    finally:
        lock.release()
    print(f"\n{accuracy_table(state['cycles'])}\n")
    where = mirror.uri if mirror is not None else run_dir
    print(f"finished in {time.perf_counter() - started:.0f} s; run directory: {where}")
    logs = "" if args.verbose else f"; Ray's logs: {run_dir / 'logs'}"
    print(f"report: {run_dir / 'report.html'}{logs}")
    return 0


def prepare_run(args) -> tuple[CampaignConfig, Path, RunMirror | None]:
    """The config, the local directory the campaign works in, and, for a run directory at a
    URI, the mirror that uploads that directory (its staging copy) after every step."""
    if args.resume:
        run_dir, mirror = open_run_dir(args.resume)
        if mirror is not None:
            mirror.download()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        return load_config(run_dir / "config.yaml", args.set), run_dir, mirror
    cfg = load_config(args.config, args.set)
    where = args.run_dir or join(cfg.run_root, f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir, mirror = open_run_dir(where)
    if mirror.remote_has("config.yaml") if mirror else (run_dir / "config.yaml").exists():
        raise ConfigError(f"{where} already holds a run; use --resume {where}")
    if mirror is not None:
        mirror.reset()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if mirror is not None:
        mirror.upload()
    print(f"run directory: {where}")
    return cfg, run_dir, mirror


def prepare_pool(cfg: CampaignConfig, run_dir: Path, display):
    """The configured pool, or one simulated into the run directory (kept across resumes)."""
    from orchestrator.pool import PoolError, open_pool

    if cfg.data.pool:
        return open_pool(cfg.data.pool)
    pool_dir = run_dir / "pool"
    try:
        return open_pool(pool_dir)
    except PoolError:
        pass
    from orchestrator.simulate import load_simulation_config, simulate_pool

    sim_cfg = load_simulation_config(cfg.data.simulate, {"seed": cfg.seed, **cfg.data.simulate_overrides})
    with display.stage("simulate", unit="subtomograms",
                       start=f"a pool from preset {cfg.data.simulate!r} into {pool_dir}") as stage:
        info = simulate_pool(None, sim_cfg, pool_dir, workers=2, overwrite=True,
                             progress=lambda done, total, _: stage.update(done=done, total=total))
        stage.result = f"{info.n_rows:,} subtomograms, {info.num_classes} classes"
    return info


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return f"{PROJECT_ROOT}{os.pathsep}{existing}" if existing else str(PROJECT_ROOT)


if __name__ == "__main__":
    sys.exit(main())
