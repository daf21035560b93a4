"""The campaign command: `python orchestrator/run.py [--config …] [--set …] [--resume RUN_DIR]`.

    python orchestrator/run.py                              # embedded default: simulate, then EMA-KL
    python orchestrator/run.py --config paper --set train.epochs=50
    python orchestrator/run.py --resume runs/demo-20261122-101500
    python orchestrator/run.py --run-dir s3://bucket/runs/demo --set data.pool=s3://bucket/pools/p
    ray job submit --working-dir . -- python orchestrator/run.py --set train.num_workers=4

Connects to the Ray of `ray job submit` (RAY_ADDRESS) or `--address`; otherwise starts a local
Ray for the duration of the run (`orchestrator/distributed/connect.py`). Pools and run
directories may be URIs (s3://, gs://, file://): see orchestrator/data/storage.py. A campaign
holds its run directory's lock while it runs (orchestrator/campaign/rundir_lock.py): a second
campaign, resume or labelling page on it is refused.

The terminal shows each stage's progress and one line per cycle; Ray's own output goes to
RUN_DIR/logs/ (orchestrator/distributed/raylogs.py), or to the terminal as well with -v.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from orchestrator.campaign.progress import STATUS, Display
from orchestrator.campaign.rundir_lock import RunDirLockError, lock_run_dir
from orchestrator.config import CampaignConfig, ConfigError, load_config, save_config
from orchestrator.data.storage import RunMirror, StorageError, join, open_run_dir

SUBCOMMANDS = {  # what `run.py NAME …` runs instead of a campaign (orchestrator/run.py)
    "annotate": "the labelling page of a run waiting for a person's labels",
    "export": "a finished campaign's predictions as RELION STAR / copick picks",
    "report": "rebuild a run directory's report.html",
    "sweep": "many simulated campaigns on Ray Tune",
    "ingest": "your subtomograms into a pool",
    "simulate": "a simulated pool",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orchestrator/run.py", description="Deep active learning campaign for cryo-ET subtomograms.",
        epilog="other commands (run.py NAME --help): " + "; ".join(
            f"{name}: {what}" for name, what in SUBCOMMANDS.items()),
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
    from orchestrator.campaign.prepare import prepare_pool
    from orchestrator.data.pool import PoolError

    display = Display(live=False if args.verbose else None, status_path=run_dir / STATUS)
    started = time.perf_counter()
    try:  # before Ray starts: a bad pool is said at once, and simulating has every CPU
        info = prepare_pool(cfg, run_dir, display)
    except PoolError as err:
        lock.release()
        print(f"error: {err}", file=sys.stderr)
        return 1
    from orchestrator.al.oracle import AwaitingLabels
    from orchestrator.campaign.loop import Campaign
    from orchestrator.campaign.metrics import accuracy_table
    from orchestrator.distributed.connect import connect
    from orchestrator.distributed.raylogs import RayOutput

    try:
        with RayOutput(run_dir / "logs", verbose=args.verbose) as output:
            with connect(args.address, output=output):
                state = Campaign(cfg, run_dir, info, mirror=mirror, display=display).run()
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


def checked_strategy(cfg: CampaignConfig) -> CampaignConfig:
    """The config, once its strategy and options build: a misspelt strategy or option is said
    before a run directory is made or a pool simulated."""
    from orchestrator.al.strategies import make_strategy

    try:
        make_strategy(cfg.strategy.name, **cfg.strategy.options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"strategy: {err}") from None
    return cfg


def prepare_run(args) -> tuple[CampaignConfig, Path, RunMirror | None]:
    """The config, the local directory the campaign works in, and, for a run directory at a
    URI, the mirror that uploads that directory (its staging copy) after every step."""
    if args.resume:
        run_dir, mirror = open_run_dir(args.resume)
        if mirror is not None:
            mirror.download()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {args.resume}: not a run directory (no config.yaml)")
        return checked_strategy(load_config(run_dir / "config.yaml", args.set)), run_dir, mirror
    cfg = checked_strategy(load_config(args.config, args.set))
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
