"""The cold start's description of the pool (`strategy.initial=typiclust`): in the driver against
over Ray Data, against the pool's size.

    python bench/cold_start_describe.py              # 2,000 and 20,000 rows of 32³ (1.3 GB of disk)

Cycle 0 describes every train volume before TypiClust picks (`orchestrator/al/cold_start.py`).
`pool_features` does it in the calling process; a campaign calls `describe_pool`
(`orchestrator/distributed/score.py`), which reads the same row groups over Ray Data and maps
them in `score.actors` task workers (`actors/describer.py`), below DESCRIBE_IN_PROCESS_BELOW rows
in-process. Timed here: each way once on a fresh local Ray of 2 CPUs, 2 workers of 0.5 CPU (a
campaign's defaults; the Ray Data pass pays for starting its workers, as a campaign's first pass
does), then the Ray Data pass again (workers warm). Pools are noise (the cost does not depend on what the volumes hold), deleted after. Raw
rows: docs/results/cold_start_describe.csv.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_noise_pool, start_local_ray, write_results  # noqa: E402
from orchestrator.al.cold_start import BATCH_ROWS, pool_features  # noqa: E402
from orchestrator.config import ScoreConfig  # noqa: E402
from orchestrator.distributed import score as scoring  # noqa: E402
from orchestrator.distributed.connect import set_env_defaults  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "cold_start_describe.csv"
COLUMNS = ["rows", "ray_cpus", "batch_size", "way", "seconds", "ms_per_row"]


def seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure(rows: int, scratch: Path, actors: int, batch_size: int, cpus: int) -> list[dict]:
    info = make_noise_pool(scratch / f"pool-{rows}", rows)
    every = np.arange(rows)
    cfg = ScoreConfig(actors=actors)  # 0.5 CPU a worker, as a campaign's
    scoring.DESCRIBE_IN_PROCESS_BELOW = 0  # always over Ray Data here
    ways = {
        "driver (pool_features)": lambda: pool_features(info.path, every, batch_rows=batch_size),
        "Ray Data, workers starting": lambda: scoring.describe_pool(
            info.path, every, scratch / f"first-{rows}-{batch_size}", embedding="density", cfg=cfg, batch_rows=batch_size),
        "Ray Data, workers warm": lambda: scoring.describe_pool(
            info.path, every, scratch / f"again-{rows}-{batch_size}", embedding="density", cfg=cfg, batch_rows=batch_size),
    }
    results = []
    for way, call in ways.items():
        spent = seconds(call)
        results.append({"rows": rows, "ray_cpus": cpus, "batch_size": batch_size, "way": way, "seconds": round(spent, 2),
                        "ms_per_row": round(1000 * spent / rows, 3)})
        print(results[-1], flush=True)
    shutil.rmtree(info.path)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--actors", type=int, default=2, help="Ray Data task workers (score.actors)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (more than the cores: "
                        "Ray Data's CPU budget per operator)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[BATCH_ROWS],
                        help="rows a task")
    parser.add_argument("--dir", type=Path, default=None, help="where the pools go (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    import ray

    set_env_defaults()  # as a campaign's connect(): one Parquet footer reader
    results = []
    with tempfile.TemporaryDirectory(prefix="describe-", dir=args.dir) as scratch:
        for rows in args.rows:  # a fresh Ray each: the first pass pays for its workers
            for batch_size in args.batch_size:
                start_local_ray(num_cpus=args.cpus)
                results += measure(rows, Path(scratch), args.actors, batch_size, args.cpus)
                ray.shutdown()
    write_results(args.results, COLUMNS, results)
    print("\n| rows | Ray's CPUs | batch | way | seconds | ms a row |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['ray_cpus']} | {r['batch_size']} | {r['way']} | {r['seconds']:.1f} | "
              f"{r['ms_per_row']:.2f} |")


if __name__ == "__main__":
    main()
