"""What a Ray Data read task holds while it scans one pool shard: Arrow's peak memory for the
scanner settings Ray Data 2.60's Parquet reader uses (`pre_buffer` on, 8 batches read ahead,
one fragment at a time, an 8 MiB buffered stream) and for the same with `pre_buffer` off and
fewer batches ahead.

    python bench/read_buffers.py          # one shard of 4,096 subtomograms of 32³ (269 MB of disk)

At 10⁶ rows the scoring pass reads for its whole length, so the read task's memory is in the
scoring stage's peak, where at 10,000 rows the read has ended before the actors reach theirs
(docs/BENCHMARKS.md, "1,000,000 rows with the CPU of every process"). Each setting is scanned in
a fresh process (peaks are per process), reading `row` and `volume` in batches of 256 rows as
the scoring pass does. The pool is noise, deleted after. Raw rows: docs/results/read_buffers.csv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "docs" / "results" / "read_buffers.csv"
COLUMNS = ["pre_buffer", "batch_readahead", "rows", "arrow_peak_mb", "peak_rss_mb"]
SETTINGS = [(True, 8), (True, 2), (False, 8), (False, 2)]  # Ray Data's first

SCAN = """
import json, resource, sys
import pyarrow as pa, pyarrow.dataset as pds
shard, pre_buffer, readahead = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
options = pds.ParquetFragmentScanOptions(use_buffered_stream=True, buffer_size=8 << 20, pre_buffer=pre_buffer)
scanner = pds.dataset([shard], format="parquet").scanner(
    columns=["row", "volume"], batch_size=256, batch_readahead=readahead, fragment_readahead=1,
    fragment_scan_options=options)
rows = sum(batch.num_rows for batch in scanner.to_batches())
print(json.dumps({"rows": rows, "arrow_peak_mb": round(pa.default_memory_pool().max_memory() / 1e6),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def scan(shard: Path, pre_buffer: bool, readahead: int) -> dict:
    """One scan of `shard` in a process of its own; its row count and peak memory."""
    out = subprocess.run([sys.executable, "-c", SCAN, str(shard), str(int(pre_buffer)), str(readahead)],
                         check=True, capture_output=True, text=True).stdout
    return {"pre_buffer": pre_buffer, "batch_readahead": readahead, **json.loads(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="subtomograms in the pool (4,096: one shard)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from bench.common import make_noise_pool, write_results
    from orchestrator.data.pool import shard_locations

    with tempfile.TemporaryDirectory(prefix="read-buffers-") as scratch:
        info = make_noise_pool(Path(scratch) / "pool", args.rows)
        shard = Path(shard_locations(info)[1][0])
        results = [scan(shard, pre_buffer, readahead) for pre_buffer, readahead in SETTINGS]
    write_results(args.results, COLUMNS, results)
    print(table(results))


def table(results: list[dict]) -> str:
    """The results as the docs show them, a markdown row per setting."""
    return "\n".join(["| pre_buffer | batches read ahead | rows | Arrow's peak (MB) | peak RSS (MB) |",
                      "|---|---|---|---|---|"] + [
        f"| {'on' if r['pre_buffer'] else 'off'} | {r['batch_readahead']} | {r['rows']:,} | "
        f"{r['arrow_peak_mb']} | {r['peak_rss_mb']} |" for r in results])


if __name__ == "__main__":
    main()
