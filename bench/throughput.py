"""Scoring throughput: the Ray Data path against a plain single-process PyTorch loop.

Both score the same Parquet pool with the same T and M (the EMA-KL pass: two forwards a
volume) using the same number of threads in all. The Ray Data figure is given for the whole
pass (its actors' start included) and in steady state (start-up excluded by difference). The
plain loop runs with PyTorch's default layout and with channels-last 3D, as the scoring actors
do. The machine's fp32 and bf16 matmul rates are measured in the same run, so the achieved
GFLOP/s can be read against them. Prints a Markdown table.

    python bench/throughput.py --rows 20000                # default model: resnet10 w16 full
    python bench/throughput.py --rows 5000 --width 64 --name resnet18
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (forward_gflop, make_noise_pool, matmul_gflops, save_models,  # noqa: E402
                          start_local_ray)
from orchestrator.config import ScoreConfig  # noqa: E402
from orchestrator.nn.outputs import forward_outputs  # noqa: E402
from orchestrator.nn.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from orchestrator.data.pool import iter_volumes  # noqa: E402
from orchestrator.al.strategies import make_strategy  # noqa: E402


def plain_loop(pool: str, model_path: Path, batch: int, threads: int,
               layout: torch.memory_format) -> float:
    """Subtomograms/s of one process reading the pool and running T and M on it."""
    torch.set_num_threads(threads)
    saved = load_checkpoint(model_path)
    nets = [model_from_checkpoint(saved, key, channels_last=layout == torch.channels_last_3d)
            for key in ("model", "mean")]
    strategy = make_strategy("ema_kl")
    started, n = time.perf_counter(), 0
    for ids, volumes, _ in iter_volumes(pool, batch_rows=batch):
        outputs = forward_outputs(nets[0], nets[1], torch.from_numpy(volumes), strategy.needs)
        strategy.score(outputs)
        n += len(ids)
    return n / (time.perf_counter() - started)


def ray_path(pool: str, model_path: Path, out: Path, batch: int, actors: int,
             rows: int) -> tuple[float, float]:
    """The Ray Data pass's rate over the whole pool, the actors' start included (Ray's own
    start not), and its steady-state rate: the whole pass against one over the first quarter
    of the pool (the rest excluded, as labelled rows are), so that start-up cancels out."""
    import numpy as np
    import ray

    from orchestrator.distributed.score import score_pool

    start_local_ray()
    cfg = ScoreConfig(batch_size=batch, actors=actors, cpus_per_actor=0.5)
    seconds = {}
    try:
        for part, exclude in (("quarter", np.arange(rows // 4, rows)), ("whole", [])):
            started = time.perf_counter()
            score_pool(pool, str(model_path), out / f"scores-{part}", strategy="ema_kl",
                       strategy_options={}, exclude_rows=exclude, cfg=cfg)
            seconds[part] = time.perf_counter() - started
    finally:
        ray.shutdown()
    steady = (rows - rows // 4) / (seconds["whole"] - seconds["quarter"])
    return rows / seconds["whole"], steady


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--box", type=int, default=32)
    parser.add_argument("--name", default="resnet10")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--stem", default="full")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        info = make_noise_pool(tmp / "pool", args.rows, args.box)
        print(f"pool of {args.rows} × {args.box}³ written in {time.perf_counter() - t0:.0f} s", flush=True)
        model = save_models(tmp / "model.pt", args.name, args.width, args.stem)
        gflop = 2 * forward_gflop(model, args.box)  # T and M
        matmul = matmul_gflops(threads=args.actors)
        # bf16 is slow on CPUs without native bf16 (AVX2 only): a smaller product suffices
        matmul_bf16 = matmul_gflops(threads=args.actors, n=512, dtype=torch.bfloat16)
        default_layout = plain_loop(info.path, tmp / "model.pt", args.batch, args.actors,
                                    torch.contiguous_format)
        plain = plain_loop(info.path, tmp / "model.pt", args.batch, args.actors,
                           torch.channels_last_3d)  # as the scoring actors hold T and M
        ray_rate, ray_steady = ray_path(info.path, tmp / "model.pt", tmp, args.batch,
                                        args.actors, args.rows)
    print(f"\n{args.name} width {args.width} stem {args.stem}, {args.box}³, batch {args.batch}, "
          f"{args.actors} threads / actors, {os.cpu_count()} cores\n")
    print("| path | subtomograms/s | GFLOP/s (T+M forward) | vs plain | vs fp32 matmul |")
    print("| --- | --- | --- | --- | --- |")
    rows = [("plain PyTorch loop, default layout (NCDHW)", default_layout),
            ("plain PyTorch loop, channels-last 3D (the scorer's)", plain),
            ("Ray Data, channels-last 3D, whole pass (actors' start included)", ray_rate),
            ("Ray Data, channels-last 3D, steady state (start-up excluded)", ray_steady)]
    for path, rate in rows:
        print(f"| {path} | {rate:.0f} | {rate * gflop:.1f} | {rate / plain:.2f} | "
              f"{rate * gflop / matmul:.0%} |")
    print(f"\nfp32 matmul (2048², {args.actors} threads): {matmul:.1f} GFLOP/s; "
          f"bf16 matmul (512²): {matmul_bf16:.1f} GFLOP/s; "
          f"T+M forward: {gflop:.3f} GFLOP per subtomogram; "
          f"driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
