"""Cycle cost per strategy, relative to random (the paper's Table 1 analogue), and the cost of
training with the EMA regulariser against plain cross-entropy.

Part 1: for each strategy, the same 2-cycle campaign on the same pool (the embedded default's
data and model, fewer epochs); the cost of cycle 1 = scoring the pool + selecting + training
on the grown labelled set, timed by the campaign itself (state.json). Campaigns run in this
process (`train.num_workers=0`, `score.actors=0`), so the figures are the strategies' compute,
not Ray's start-up (the same for all, measured by bench/workers.py). Medians over --repeats.

Part 2: one epoch of T on CE + λ·MSE(T, M) with M's EMA update (`learning.train_epoch`)
against a plain PyTorch CE epoch (T's forward, backward, SGD step: nothing else), the same
batches and model, alternated, median of --epochs each.

    python bench/cycle_cost.py               # ~10 min on 2 quiet cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.nn.ema import init_mean_model  # noqa: E402
from orchestrator.nn.learning import make_optimizer, train_epoch  # noqa: E402
from orchestrator.campaign.loop import Campaign  # noqa: E402
from orchestrator.nn.model import build_model  # noqa: E402
from orchestrator.data.pool import read_volumes  # noqa: E402
from orchestrator.data.simulate import load_simulation_config, simulate_pool  # noqa: E402

STRATEGIES = [  # (name, CPU-sized options: as bench/label_efficiency.py)
    ("random", {}), ("entropy", {}), ("ema_kl", {}), ("ema_kl_semi", {}),
    ("bald", {"mc_passes": 8}), ("coreset", {}), ("badge", {}), ("ll4al", {}),
    ("noise_stability", {"passes": 8}), ("vaal", {"epochs": 8}), ("hal", {"epochs": 8}),
    ("two_stream", {"epochs": 8}),
]
# The paper's Table 1 (hours per AL run on its GPU): the ratios there, for comparison.
PAPER_HOURS = {"ema_kl": 1.6, "ll4al": 1.18, "coreset": 2.57, "bald": 3.98, "vaal": 16.06}
CAMPAIGN = ["model.dropout=0.2", "train.epochs=4", "train.num_workers=0", "score.actors=0",
            "budget.counts=[48, 96]"]


def cycle_seconds(pool, strategy: str, options: dict, run_dir: Path) -> dict:
    cfg = load_config(None, CAMPAIGN + [
        f"data.pool={pool.path}", f"strategy.name={strategy}", f"strategy.options={json.dumps(options)}",
    ])
    state = Campaign(cfg, run_dir, pool).run()
    cycle = state["cycles"][1]
    parts = {k: cycle.get(f"seconds_{k}", 0.0) for k in ("score", "select", "train")}
    return {**parts, "total": sum(parts.values())}


def strategy_table(pool, strategies: list[tuple[str, dict]], repeats: int, work: Path) -> list[str]:
    timings = {}
    for repeat in range(repeats):  # strategies interleaved, so drift on the machine hits all
        for name, options in strategies:
            run = cycle_seconds(pool, name, options, work / f"{name}-{repeat}")
            timings.setdefault(name, []).append(run)
            print(f"  {name} repeat {repeat}: {run['total']:.1f} s", flush=True)
    median = {n: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
              for n, runs in timings.items()}
    base = median["random"]["total"]
    lines = ["| strategy | score s | select s | train s | cycle s | vs random | paper (vs EMA-KL) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in median.items():
        paper = f"{PAPER_HOURS[name] / PAPER_HOURS['ema_kl']:.2f}" if name in PAPER_HOURS else ""
        lines.append(f"| {name} | {m['score']:.1f} | {m['select']:.2f} | {m['train']:.1f} | "
                     f"{m['total']:.1f} | {m['total'] / base:.2f} | {paper} |")
    return lines


def plain_ce_epoch(model, batches, optimizer) -> None:
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def regulariser_table(pool, epochs: int, batch: int) -> list[str]:
    x = torch.from_numpy(read_volumes(pool.path, list(range(256))))[:, None]  # [N, 1, z, y, x]
    y = torch.randint(0, pool.num_classes, (len(x),))
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    torch.manual_seed(0)
    model = build_model("resnet10", num_classes=pool.num_classes, width=16, stem="full")
    mean = init_mean_model(model)
    optimizer = make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    times = {"plain CE": [], "CE + λ·MSE(T, M) + EMA": []}
    for _ in range(epochs + 1):  # the first of each is a warm-up, dropped
        started = time.perf_counter()
        plain_ce_epoch(model, batches, optimizer)
        times["plain CE"].append(time.perf_counter() - started)
        started = time.perf_counter()
        train_epoch(model, mean, batches, optimizer, lam=0.03, alpha=0.99)
        times["CE + λ·MSE(T, M) + EMA"].append(time.perf_counter() - started)
    base = statistics.median(times["plain CE"][1:])
    lines = ["| training epoch (256 × 32³, resnet10 w16) | median s | subtomograms/s | vs plain CE |",
             "| --- | --- | --- | --- |"]
    for name, values in times.items():
        m = statistics.median(values[1:])
        lines.append(f"| {name} | {m:.2f} | {len(x) / m:.0f} | {m / base:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per variant, part 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=[s for s, _ in STRATEGIES])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    strategies = [s for s in STRATEGIES if s[0] in args.strategies or s[0] == "random"]  # the unit
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pool = simulate_pool(None, load_simulation_config("data_default"), work / "pool",
                             workers=2, progress=False)
        part2 = regulariser_table(pool, args.epochs, batch=32)
        print("\n".join(part2), flush=True)
        part1 = strategy_table(pool, strategies, args.repeats, work)
    print(f"\nCycle 1 of a 2-cycle campaign (48 → 96 labelled; pool of {pool.n_rows}, 80% train; "
          f"resnet10 w16, 4 epochs; {args.threads} torch threads; medians of {args.repeats}):\n")
    print("\n".join(part1))
    print("\nTraining cost of the EMA regulariser (T's step + M's forward + EMA update):\n")
    print("\n".join(part2))


if __name__ == "__main__":
    main()
