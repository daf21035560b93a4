"""Reading a pool's index (every row's metadata, no volumes) against the pool's size: from
`index.parquet` (pools written since it exists) or from the shards (older pools), whose 1 MB
row groups hold 16 subtomograms of 32³ each, so the index columns come in 16-row chunks.

    python bench/pool_index.py                       # 10,000 and 100,000 rows of 32³ (6.5 GB of disk)

A cycle reads the index several times (the campaign's view of the pool, the report, the
labelling page). Pools are noise, deleted after. Raw rows: docs/results/pool_index.csv.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_noise_pool, write_results  # noqa: E402
from orchestrator.campaign.labelled import PoolView  # noqa: E402
from orchestrator.data.pool import INDEX_FILE, read_index  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "pool_index.csv"
COLUMNS = ["rows", "source", "read_index_s", "pool_view_s"]


def timed(call, repeats: int = 3) -> float:
    """The fastest of `repeats` calls, in seconds (the page cache warm after the first)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def measure(rows: int, scratch: Path) -> list[dict]:
    info = make_noise_pool(scratch / f"pool-{rows}", rows)
    results = []
    for source in ("index.parquet", "shards"):
        if source == "shards":
            (Path(info.path) / INDEX_FILE).unlink()  # as a pool written before the file existed
        results.append({"rows": rows, "source": source,
                        "read_index_s": round(timed(lambda: read_index(info.path)), 3),
                        "pool_view_s": round(timed(lambda: PoolView.load(info)), 3)})
        print(results[-1], flush=True)
    shutil.rmtree(info.path)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dir", type=Path, default=None, help="where the pools go (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pool-index-", dir=args.dir) as scratch:
        results = [r for rows in args.rows for r in measure(rows, Path(scratch))]
    write_results(args.results, COLUMNS, results)
    print("\n| rows | index read from | read_index (s) | PoolView.load (s) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['source']} | {r['read_index_s']:.3f} | {r['pool_view_s']:.3f} |")


if __name__ == "__main__":
    main()
