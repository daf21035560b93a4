"""A cycle's query pictures: every volume read and then drawn, against each drawn as its row
group arrives while the next are read (`orchestrator/al/oracle.py`), page cache cold and warm.

    sudo python bench/query_pictures.py          # 500 of 40,000 rows (2.6 GB of disk); cold needs root

The person's wait between "labels submitted" and "next queries ready" ends with the queries'
pictures (a PNG of three central slices each). On a large pool each query sits in a 1 MB row
group of its own, which after the scoring pass is no longer in the page cache: the reads wait
on the disk and the drawing on the CPU, so the two can overlap. Cold reads drop the kernel's page
cache first (root only; without it only warm ones are measured). The pool is noise, deleted
after. Raw rows: docs/results/query_pictures.csv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_noise_pool, write_results  # noqa: E402
from bench.scattered_reads import drop_page_cache  # noqa: E402
from orchestrator.al.oracle import Query, _write_slice_pngs  # noqa: E402
from orchestrator.data.images import slices_png  # noqa: E402
from orchestrator.data.pool import read_volumes  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "query_pictures.csv"
COLUMNS = ["pool_rows", "queries", "way", "cache", "repeat", "seconds"]


def read_then_draw(info, queries: list[Query], folder: Path) -> None:
    """The way before: every volume read into memory, then each drawn."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, volume in enumerate(read_volumes(info.path, [q.row for q in queries])):
        (folder / f"{n:05d}.png").write_bytes(slices_png(volume))


WAYS = {"read, then draw": read_then_draw, "drawn as read": _write_slice_pngs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-rows", type=int, default=40_000)
    parser.add_argument("--queries", type=int, default=500, help="rows drawn at random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the pool goes (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="query-pictures-", dir=args.dir) as scratch:
        info = make_noise_pool(Path(scratch) / "pool", args.pool_rows)
        rng = np.random.default_rng(0)
        for repeat in range(args.repeats):  # ways interleaved, so drift hits them alike
            rows = rng.choice(info.n_rows, args.queries, replace=False)  # in the strategy's order
            queries = [Query(int(r), f"s{r:07d}", "bench") for r in rows]
            for way, write in WAYS.items():
                for cache in ("cold", "warm"):
                    if cache == "cold" and not drop_page_cache():
                        continue
                    folder = Path(scratch) / f"png-{repeat}-{len(results)}"
                    started = time.perf_counter()
                    write(queries, folder, info) if write is _write_slice_pngs else write(info, queries, folder)
                    results.append({"pool_rows": info.n_rows, "queries": len(queries), "way": way,
                                    "cache": cache, "repeat": repeat,
                                    "seconds": round(time.perf_counter() - started, 3)})
                    print(results[-1], flush=True)
                    shutil.rmtree(folder)
        shutil.rmtree(info.path)
    write_results(args.results, COLUMNS, results)
    print("\n| way | cold (s) | warm (s) |\n|---|---|---|")
    for way in WAYS:
        cells = []
        for cache in ("cold", "warm"):
            times = [r["seconds"] for r in results if r["way"] == way and r["cache"] == cache]
            cells.append(f"{np.median(times):.2f}" if times else "–")
        print(f"| {way} | {' | '.join(cells)} |")


if __name__ == "__main__":
    if os.geteuid() != 0:
        print("not root: cold reads are skipped (the page cache cannot be dropped)", file=sys.stderr)
    main()
