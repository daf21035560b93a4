"""Reading scattered rows' volumes (a cycle's queries, its labelled set) against how many row
groups are read at once (`orchestrator.data.pool.READ_AHEAD`), with the page cache cold (as
after a pass over a pool larger than memory) and warm.

    python bench/scattered_reads.py                    # 500 of 40,000 rows (2.6 GB of disk)
    sudo python bench/scattered_reads.py               # the same; "cold" needs root to drop caches

Each scattered row costs its whole 1 MB row group, so the read is many small random reads,
which a disk (or an object store) answers faster side by side. Cold reads drop the kernel's
page cache first (`/proc/sys/vm/drop_caches`, root only; without it only warm reads are
measured). The pool is noise, deleted after. Raw rows: docs/results/scattered_reads.csv.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_noise_pool  # noqa: E402
from orchestrator.data import pool as pool_module  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "scattered_reads.csv"
COLUMNS = ["pool_rows", "rows_read", "row_groups", "read_ahead", "cache", "repeat", "seconds"]


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only); False where this process may not."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def measure(path: str, rows: np.ndarray, read_ahead: int, cold: bool) -> float | None:
    if cold and not drop_page_cache():
        return None
    pool_module.READ_AHEAD = read_ahead
    started = time.perf_counter()
    pool_module.read_volumes(path, rows)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-rows", type=int, default=40_000)
    parser.add_argument("--read", type=int, default=500, help="rows read, drawn at random")
    parser.add_argument("--read-ahead", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the pool goes (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="scattered-reads-", dir=args.dir) as scratch:
        info = make_noise_pool(Path(scratch) / "pool", args.pool_rows)
        rng = np.random.default_rng(0)
        index = pool_module.row_group_index(info)
        for repeat in range(args.repeats):  # settings interleaved, so drift hits them alike
            rows = np.sort(rng.choice(info.n_rows, args.read, replace=False))
            groups = len(np.unique(index.locate(rows, info.path)))
            for read_ahead in args.read_ahead:
                for cache in ("cold", "warm"):
                    seconds = measure(info.path, rows, read_ahead, cache == "cold")
                    if seconds is None:
                        continue
                    results.append({"pool_rows": info.n_rows, "rows_read": len(rows), "row_groups": groups,
                                    "read_ahead": read_ahead, "cache": cache, "repeat": repeat,
                                    "seconds": round(seconds, 3)})
                    print(results[-1], flush=True)
        shutil.rmtree(info.path)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(results)
    print(table(results))


def table(results: list[dict]) -> str:
    """Median seconds per read-ahead, cold and warm."""
    lines = ["| row groups at once | cold (s) | warm (s) |", "|---|---|---|"]
    for read_ahead in sorted({r["read_ahead"] for r in results}):
        cells = []
        for cache in ("cold", "warm"):
            times = [r["seconds"] for r in results if r["read_ahead"] == read_ahead and r["cache"] == cache]
            cells.append(f"{np.median(times):.2f}" if times else "–")
        lines.append(f"| {read_ahead} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("not root: cold reads are skipped (the page cache cannot be dropped)", file=sys.stderr)
    main()
