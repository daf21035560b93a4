"""What several benchmarks share: a noise pool, saved T+M weights, the machine's matmul rate,
a model's forward FLOPs, a quiet local Ray and the raw results' CSV."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import torch

from orchestrator.data.pool import PoolInfo, PoolWriter, open_pool
from orchestrator.nn.ema import init_mean_model
from orchestrator.nn.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def write_results(path: Path, columns: list[str], results: list[dict]) -> None:
    """A benchmark's raw rows, `columns` in that order, as CSV at `path` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(results)


def make_noise_pool(path: Path, rows: int, box: int = 32, seed: int = 0) -> PoolInfo:
    """`rows` Gaussian-noise subtomograms in 10 classes, all in the train split: speed and
    memory do not depend on what the volumes hold."""
    rng = np.random.default_rng(seed)
    with PoolWriter(path, box, class_names=[f"c{i}" for i in range(10)]) as writer:
        for i in range(rows):
            writer.add(f"s{i:07d}", rng.standard_normal((box,) * 3, dtype=np.float32),
                       source="bench", label=i % 10, split="train")
    return writer.close()


def make_noise_pool_elsewhere(path: Path, rows: int, box: int = 32, seed: int = 0) -> PoolInfo:
    """`make_noise_pool` in a process of its own, for benchmarks that measure this one's memory:
    writing GBs leaves the writer's heap at its high-water mark (60 MB more after 60,000 rows
    than after 5,000), which would count as the measured driver's growth with the pool."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as writer:
        writer.submit(make_noise_pool, path, rows, box, seed).result()
    return open_pool(path)


def save_models(path: Path, name: str, width: int, stem: str) -> torch.nn.Module:
    """A model.pt as training writes it (T and M); M a little off T, as after training."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width=width, stem=stem)
    mean = init_mean_model(model)
    with torch.no_grad():
        for p in mean.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "mean": mean.state_dict(), "num_classes": 10,
                "model_config": {"name": name, "width": width, "stem": stem, "dropout": 0.0}}, path)
    return model


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 5, dtype=torch.float32,
                  rounds: int = 3) -> float:
    """The machine's dense matmul rate with `threads` torch threads: the compute ceiling, so
    the best of `rounds` (one round of a fraction of a second swings ±30% on a shared VM)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def forward_gflop(model: torch.nn.Module, box: int) -> float:
    """GFLOP of one volume's forward pass (2 per multiply-add), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, box, box, box))
    return counter.get_total_flops() / 1e9


def start_local_ray(num_cpus: int = 2) -> None:
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=num_cpus, include_dashboard=False,
             logging_config=ray.LoggingConfig(log_level="ERROR"),
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    DataContext.get_current().enable_progress_bars = False
