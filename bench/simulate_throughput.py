"""Simulator throughput on this machine, as a table (subtomograms/s).

    python bench/simulate_throughput.py               # ~1 min on 2 idle cores
    python bench/simulate_throughput.py --samples 2000 --structures builtin:50

For box 32 and 40 and workers 1 and 2, the end-to-end rate of `simulate_pool` (simulation, the
pool's z-scoring and float16 Parquet writing, process start-up included) over `--samples`
subtomograms of the built-in classes at SNR 0.05, and the cost of one `simulate_subtomogram` call
in one process, in wall and CPU ms (CPU time depends less on what else the machine runs). The
1-minute load average is printed because the 2 cores here are shared: other work lowers the
wall-clock rates.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from orchestrator.data.simulate import (
    SimulationConfig, load_structures, prepare_structure, sample_rng, simulate_pool,
    simulate_subtomogram,
)


def pool_rate(structures, cfg: SimulationConfig, workers: int, root: Path) -> float:
    out = root / f"pool-{cfg.box}-{workers}"
    start = time.perf_counter()
    info = simulate_pool(structures, cfg, out, workers=workers, progress=False, overwrite=True)
    rate = info.n_rows / (time.perf_counter() - start)
    shutil.rmtree(out)
    return rate


def per_sample_ms(structures, cfg: SimulationConfig, count: int) -> tuple[float, float]:
    names, densities = structures
    prepared = [prepare_structure(d, cfg.box, n) for n, d in zip(names, densities)]
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        simulate_subtomogram(prepared[i % len(prepared)], cfg, sample_rng(cfg.seed, i))
    return (time.perf_counter() - wall) / count * 1e3, (time.process_time() - cpu) / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="subtomograms per pool timing")
    parser.add_argument("--structures", default="builtin:10")
    parser.add_argument("--boxes", type=int, nargs="+", default=[32, 40])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for box in args.boxes:
            structures = load_structures(args.structures)
            per_class = max(1, args.samples // len(structures[0]))
            cfg = SimulationConfig(structures=args.structures, box=box, snr=0.05,
                                   per_class=per_class)
            wall_ms, cpu_ms = per_sample_ms(structures, cfg, 200)
            rates = {w: pool_rate(structures, cfg, w, Path(tmp)) for w in args.workers}
            rows.append((box, per_class * len(structures[0]), wall_ms, cpu_ms, rates))

    pools = " | ".join(f"simulate_pool, {w} worker{'s' * (w > 1)} (/s)" for w in args.workers)
    print()
    print(f"| box | pool size | {pools} | one sample, wall ms | one sample, CPU ms |")
    print("|" + " --- |" * (len(args.workers) + 4))
    for box, n, wall_ms, cpu_ms, rates in rows:
        cells = " | ".join(f"{rates[w]:.0f}" for w in args.workers)
        print(f"| {box}³ | {n} | {cells} | {wall_ms:.1f} | {cpu_ms:.1f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f} "
          "(on shared cores, other work lowers the rates)")


if __name__ == "__main__":
    main()
