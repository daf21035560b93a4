"""Scoring and training throughput with 1 and 2 Ray workers, and what 1,000,000 subtomograms
an hour would need.

Steady-state rates, start-up excluded by difference: scoring is timed on a small and a large
part of the same pool (the rest excluded, as labelled rows are), training for a few and for
more epochs; rate = extra work / extra seconds. Start-up (actors, worker group) is reported
apart: it is paid once per scoring pass and once per cycle.

    python bench/workers.py                 # ~12 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import make_noise_pool, save_models, start_local_ray  # noqa: E402
from orchestrator.config import ModelConfig, ScoreConfig, TrainConfig, config_to_dict  # noqa: E402
from orchestrator.distributed.score import score_pool  # noqa: E402
from orchestrator.distributed.train import run_training  # noqa: E402
from orchestrator.nn.cycle import CycleJob  # noqa: E402


def scoring_seconds(pool, model: Path, out: Path, rows: int, actors: int) -> float:
    """One Ray Data EMA-KL pass over the first `rows` rows; 1 thread per actor."""
    shutil.rmtree(out, ignore_errors=True)
    # 0.5 CPU each for 2 actors: actors holding every CPU starve read_parquet (RAY_NOTES)
    cfg = ScoreConfig(actors=actors, cpus_per_actor=1.0 if actors == 1 else 0.5)
    started = time.perf_counter()
    score_pool(pool.path, str(model), out, strategy="ema_kl", strategy_options={},
               exclude_rows=np.arange(rows, pool.n_rows), cfg=cfg)
    return time.perf_counter() - started


def training_seconds(pool, work: Path, labelled: int, epochs: int, workers: int) -> float:
    """One cycle's fit on Ray Train (start-up included), `workers` DDP workers of 1 CPU."""
    out = work / f"train-w{workers}-e{epochs}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows = list(range(labelled))
    job = CycleJob(
        pool=pool.path, out_dir=str(out), num_classes=10,
        train_rows=rows, train_labels=[r % 10 for r in rows],
        val_rows=list(range(labelled, labelled + 64)), val_labels=[r % 10 for r in range(64)],
        seed=0, model=config_to_dict(ModelConfig()),
        train=config_to_dict(TrainConfig(epochs=epochs, num_workers=workers, max_failures=0)),
    )
    started = time.perf_counter()
    run_training(job, run_name=f"bench-w{workers}-e{epochs}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 7,000 rows between the two passes: 2,400 (the first runs' choice) is ~6 s of scoring,
    # the size of the start-up jitter, and gave 2 actors 1.55× and 0.83× of one in two runs
    parser.add_argument("--rows", type=int, nargs=2, default=[1000, 8000],
                        help="small and large scoring passes")
    parser.add_argument("--labelled", type=int, default=384)
    # 9 epochs between the two fits: with fewer, a few seconds of start-up jitter swamp the rate
    parser.add_argument("--epochs", type=int, nargs=2, default=[1, 10])
    args = parser.parse_args()
    (small, large), (few, many) = args.rows, args.epochs
    start_local_ray(num_cpus=2)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pool = make_noise_pool(work / "pool", max(large, args.labelled + 64))
        model = work / "model.pt"
        save_models(model, "resnet10", 16, "full")  # the CPU default model
        for n in (1, 2):
            t_small = scoring_seconds(pool, model, work / "scores", small, n)
            t_large = scoring_seconds(pool, model, work / "scores", large, n)
            rate = (large - small) / (t_large - t_small)
            table.append(("scoring (T+M forward)", n, rate, t_small - small / rate))
            print(table[-1], flush=True)
        for n in (1, 2):
            t_few = training_seconds(pool, work, args.labelled, few, n)
            t_many = training_seconds(pool, work, args.labelled, many, n)
            rate = args.labelled * (many - few) / (t_many - t_few)
            table.append(("training (epoch + BN recalibration + validation)", n, rate,
                          t_few - args.labelled * few / rate))
            print(table[-1], flush=True)
    print("\nresnet10 w16 full stem, 32³, 1 CPU and 1 torch thread per worker, 2 cores\n")
    print("| work | workers | subtomograms/s | vs 1 worker | start-up s | workers for 10⁶/h |")
    print("| --- | --- | --- | --- | --- | --- |")
    for work_name, n, rate, startup in table:
        one = next(r for w, k, r, _ in table if w == work_name and k == 1)
        # scoring covers the pool; training covers only the labelled set, so no pool rate
        needed = f"{1e6 / 3600 / (rate / n):.2f}" if work_name.startswith("scoring") else "—"
        print(f"| {work_name} | {n} | {rate:.0f} | {rate / one:.2f} | {startup:.0f} | {needed} |")


if __name__ == "__main__":
    main()
