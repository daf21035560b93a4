"""Peak memory of a Ray Data scoring pass over a 10,000 and a 100,000 subtomogram pool (32³):
it must not grow with the pool (target: the larger within 10% of the smaller).

Each pass runs in a fresh local Ray; a sampler polls every 0.2 s the resident memory (RSS) of
the driver and of every process of its local Ray (the scoring actors, the read and write
tasks, the raylet and GCS), and reports the peaks: of the driver, of the largest of the others,
and of all of them together. The total is given twice: as the sum of RSS, which counts a
shared page (the object store's, torch's libraries) once per process mapping it, and as the
sum of PSS (proportional set size), which counts it once in all: the memory the machine really
gives the pass. The object store's own use is reported too (from `ray.available_resources`);
the pass caps it with `score.buffer_mb` (`--buffer-mb`). The model is small (resnet10 width 4): memory is the
pipeline's, not the network's, and the 100,000 pass stays within minutes. Also prints the
measured rate and the time 1,000,000 subtomograms would take at it.

    python bench/scoring_memory.py                  # ~10 min on 2 cores, 7 GB of disk
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import make_noise_pool_elsewhere, save_models, start_local_ray  # noqa: E402
from orchestrator.config import ScoreConfig  # noqa: E402

MB = 1024 * 1024


class PeakSampler(threading.Thread):
    """Polls the RSS of this process and of its descendants (the local Ray's raylet, GCS and
    workers) until stopped."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.driver = self.largest_worker = self.total = self.total_pss = 0
        self.object_store = 0.0

    def run(self) -> None:
        import ray

        me = os.getpid()
        capacity = ray.cluster_resources().get("object_store_memory", 0.0)
        tick = 0
        while not self.stopped.wait(self.interval):
            tick += 1
            processes = [me, *_descendants(me)]
            workers = [rss for rss in map(_rss, processes[1:]) if rss]
            driver = _rss(me) or 0
            self.driver = max(self.driver, driver)
            self.largest_worker = max(self.largest_worker, max(workers, default=0))
            self.total = max(self.total, driver + sum(workers))
            if tick % 5 == 0:  # reading PSS walks every page table: once a second is enough
                self.total_pss = max(self.total_pss, sum(_pss(pid) or 0 for pid in processes))
            free = ray.available_resources().get("object_store_memory", capacity)
            self.object_store = max(self.object_store, capacity - free)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def proc_stats():
    """(pid, comm, the fields of /proc/PID/stat after comm) of every process on the machine."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            yield int(entry.name), stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()


def _descendants(root: int) -> list[int]:
    """Process ids below `root` (Linux /proc): a local Ray started by this driver runs its
    raylet, and so every worker, as our descendants; other Ray sessions on the machine are not."""
    children: dict[int, list[int]] = {}
    for pid, _, fields in proc_stats():
        children.setdefault(int(fields[1]), []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _rss(pid: int) -> int | None:
    """Resident bytes of a process, None if it has gone."""
    return _proc_kib(pid, "status", "VmRSS:")


def _pss(pid: int) -> int | None:
    """Proportional set size in bytes (shared pages divided among their processes)."""
    return _proc_kib(pid, "smaps_rollup", "Pss:")


def _proc_kib(pid: int, name: str, key: str) -> int | None:
    """A `key: N kB` line of /proc/PID/NAME, in bytes; None if the process has gone."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure(rows: int, work: Path, buffer_mb: int) -> dict:
    import ray

    from orchestrator.distributed.score import score_pool

    started = time.perf_counter()
    pool = make_noise_pool_elsewhere(work / f"pool-{rows}", rows)  # the driver is measured
    print(f"pool of {rows:,} written in {time.perf_counter() - started:.0f} s", flush=True)
    model = work / "model.pt"
    save_models(model, "resnet10", 4, "full")
    start_local_ray(num_cpus=2)
    sampler = PeakSampler()
    sampler.start()
    try:
        started = time.perf_counter()
        score_pool(pool.path, str(model), work / f"scores-{rows}", strategy="ema_kl",
                   strategy_options={}, exclude_rows=np.arange(0, rows, 10),  # 10% labelled
                   cfg=ScoreConfig(actors=2, cpus_per_actor=0.5, batch_size=256,
                                   buffer_mb=buffer_mb))
        seconds = time.perf_counter() - started
    finally:
        sampler.stop()
        ray.shutdown()
    return {"rows": rows, "seconds": seconds, "driver": sampler.driver,
            "largest": sampler.largest_worker, "total": sampler.total,
            "total_pss": sampler.total_pss,
            "object_store": sampler.object_store}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dir", type=Path, default=None, help="where the pools go (temporary)")
    parser.add_argument("--buffer-mb", type=int, default=ScoreConfig().buffer_mb,
                        help="score.buffer_mb: Ray Data's object-store cap for the pass")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for rows in args.rows:
            results.append(measure(rows, Path(tmp), args.buffer_mb))
            print(results[-1], flush=True)
    print(f"\nresnet10 w4 full stem, EMA-KL pass (T+M), 2 actors × 0.5 CPU, 256 rows a batch, "
          f"score.buffer_mb={args.buffer_mb}\n")
    print("| pool | seconds | subtomograms/s | driver peak MB | largest other process MB | "
          "all processes, RSS sum MB | all processes, PSS sum MB | object store peak MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['rows']:,} | {r['seconds']:.0f} | {r['rows'] / r['seconds']:.0f} | "
              f"{r['driver'] / MB:.0f} | {r['largest'] / MB:.0f} | {r['total'] / MB:.0f} | "
              f"{r['total_pss'] / MB:.0f} | {r['object_store'] / MB:.0f} |")
    small, large = results[0], results[-1]
    print(f"\nall processes: PSS {large['total_pss'] / small['total_pss']:.2f}×, RSS sum "
          f"{large['total'] / small['total']:.2f}× from {small['rows']:,} to "
          f"{large['rows']:,} rows; 1,000,000 rows at the larger pass's rate: "
          f"{1e6 / (large['rows'] / large['seconds']) / 60:.0f} min")


if __name__ == "__main__":
    main()
