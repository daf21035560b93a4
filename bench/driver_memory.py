"""What a Ray Data pass costs the driver per block: is the scoring driver's growth with the
pool (docs/BENCHMARKS.md, "At 300,000 rows") Ray Data's per-block bookkeeping?

A pass shaped like scoring (`orchestrator/distributed/score.py`: read, streaming repartition
into blocks of `--block-rows`, an actor pool's `map_batches` that returns a row id and 13
probabilities a row, `write_parquet` bundling files) runs over `ray.data.range` rows, so that
it takes seconds and nothing but Ray Data's bookkeeping grows with the rows. Each pass runs in
a fresh local Ray, in a subprocess of its own; the driver's RSS is sampled every 0.1 s, and
with `--trace` Python's allocations are traced in the driver (slower) and the largest sources
by file are kept.

    python bench/driver_memory.py                      # rows 10,000 100,000 300,000; blocks 256, 2,048
    python bench/driver_memory.py --trace --rows 100000 --block-rows 256
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


class DriverSampler(threading.Thread):
    """Peak resident memory of this process, polled."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        self.interval, self.peak, self.finished = interval, 0, threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.finished.set()
        self.join()
        return max(self.peak, rss_bytes())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class FakeScorer:
    """Returns what a scoring actor returns for a batch: its rows and 13 probabilities each."""

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        rows = batch["id"]
        probs = np.full((len(rows), 13), 1 / 13, dtype=np.float32)
        return {"row": rows, "probs": probs, "score": probs[:, 0].copy()}


def one_pass(rows: int, block_rows: int, trace: bool, out: Path) -> dict:
    import ray
    import ray.data

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    if trace:
        tracemalloc.start(1)
    before = rss_bytes()
    sampler = DriverSampler()
    sampler.start()
    started = time.perf_counter()
    dataset = ray.data.range(rows, override_num_blocks=4).repartition(target_num_rows_per_block=block_rows)
    scored = dataset.map_batches(FakeScorer, batch_size=block_rows, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    scored.write_parquet(str(out), min_rows_per_file=max(block_rows, rows // 50),
                         ray_remote_args={"num_cpus": 0})
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    after = rss_bytes()
    sources = []
    if trace:
        stats = tracemalloc.take_snapshot().statistics("filename")[:8]
        sources = [(s.traceback[0].filename.split("site-packages/")[-1], s.size) for s in stats]
    ray.shutdown()
    return {"rows": rows, "block_rows": block_rows, "blocks": -(-rows // block_rows),
            "trace": int(trace), "seconds": round(seconds, 1), "driver_before_mb": before / MB,
            "driver_peak_mb": peak / MB, "driver_after_mb": after / MB, "sources": sources}


def run_in_subprocess(rows: int, block_rows: int, trace: bool) -> dict:
    """A fresh interpreter and a fresh local Ray per pass: nothing carries over."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, __file__, "--one", str(rows), str(block_rows), str(int(trace)),
                   str(Path(tmp) / "out")]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(f"pass of {rows} rows, {block_rows} a block failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--block-rows", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--trace", action="store_true", help="trace the driver's Python allocations")
    parser.add_argument("--results", type=Path, default=ROOT / "docs/results/driver_memory.csv")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        rows, block_rows, trace, out = args.one
        print(json.dumps(one_pass(int(rows), int(block_rows), bool(int(trace)), Path(out))))
        return
    print("| rows | rows a block | blocks | seconds | driver before MB | peak MB | after MB | "
          "(peak − before) / block kB |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for block_rows in args.block_rows:
        for rows in args.rows:
            r = run_in_subprocess(rows, block_rows, args.trace)
            results.append(r)
            per_block = (r["driver_peak_mb"] - r["driver_before_mb"]) * 1024 / r["blocks"]
            print(f"| {rows:,} | {block_rows:,} | {r['blocks']:,} | {r['seconds']} | "
                  f"{r['driver_before_mb']:.0f} | {r['driver_peak_mb']:.0f} | "
                  f"{r['driver_after_mb']:.0f} | {per_block:.1f} |", flush=True)
            for source, size in r["sources"]:
                print(f"    {size / MB:8.1f} MB  {source}")
    write_results(args.results, results)


def write_results(path: Path, results: list[dict]) -> None:
    """Rows merged by (rows, rows a block, trace): a rerun replaces its own rows only."""
    fields = ["rows", "block_rows", "blocks", "trace", "seconds", "driver_before_mb",
              "driver_peak_mb", "driver_after_mb"]
    key = lambda r: (int(r["rows"]), int(r["block_rows"]), int(r["trace"]))  # noqa: E731
    kept = {}
    if path.exists():
        with path.open() as f:
            kept = {key(r): r for r in csv.DictReader(f)}
    for r in results:
        kept[key(r)] = {f: (round(r[f], 1) if isinstance(r[f], float) else r[f]) for f in fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept[k] for k in sorted(kept))


if __name__ == "__main__":
    main()
