"""One cycle's cost against the pool's size: train on a fixed number of labels, score the rest,
select the next queries, on pools of 10,000 to 1,000,000 subtomograms (32³, noise: cost does not
depend on what the volumes hold).

Each size runs the product's path on a local Ray (`Campaign`, Ray Train workers, Ray Data
scoring actors) as a person in the loop would drive it: the campaign asks for the first labels
and stops (the file oracle), the labels are filled in from the pool's truth, and the resumed
campaign trains, scores the unlabelled rows, selects the next `--select` and stops again. That
resumed run is what is measured: labels submitted → next queries ready, split into training,
scoring and the rest (importing the labels, selecting, writing the queries and their images). A sampler polls every 0.2 s the driver and every process of
its local Ray and attributes to the stage running (the campaign's `progress.json`): the peak
PSS of all processes together (shared pages counted once) and the bytes they read (`rchar` of
/proc/PID/io: read calls, from disk or page cache, including the libraries a starting Ray worker
imports, a constant; a process that starts and ends between two polls is missed). Stage seconds come from the campaign's own record.

    python bench/scale.py                                 # 10,000 100,000 300,000 (≈ 20 GB of disk)
    python bench/scale.py --rows 1000000 --dir /big      # if the disk holds 65 GB more

The network is resnet10 of width 4 for 2 epochs: the pipeline's cost, not the network's, is what
grows with the pool. Pools are deleted after their run; finished sizes are skipped (resumable).
Raw rows: docs/results/scale.csv; the table is printed. Per size, DIR/nROWS/processes.csv splits
each stage's peak by process, and DIR/nROWS/stages.csv gives the wall seconds of each stage as the
campaign names it (select, …, and "between stages": start-up, κ, writing), which is what "rest" was.
DIR/nROWS/cpu.csv gives the CPU seconds each process on the machine used during each stage
(the kernel's threads too) and the machine's time by kind (user, system, iowait, steal, idle):
what the measured driver shared the CPUs with.
With --py-spy, py-spy samples the driver during the measured cycle (20 a second, never pausing
it) and DIR/nROWS/rest_profile.csv gives the driver's wall seconds per function outside training
and scoring: what "rest" was spent on, function by function.
With --cold-rest (root only), the kernel's page cache is emptied as the cycle leaves scoring, so
that "rest" reads from disk at every size: at 10⁶ rows the scoring pass (67 GB) has evicted the
pool and the pass's first files from a 24 GB machine's cache anyway, where at 10,000 rows all
is still cached. That isolates what grows with the pool from what the cache holds; the
emptying's own seconds (with the `sync` before it) are left out of "rest".
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_noise_pool_elsewhere  # noqa: E402
from bench.scattered_reads import drop_page_cache  # noqa: E402
from bench.scoring_memory import _descendants, _pss, proc_stats  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "scale.csv"
COLUMNS = ["rows", "stage", "seconds", "bytes_read", "peak_pss"]
PROCESS_COLUMNS = ["rows", "stage", "process", "count", "pss"]  # DIR/nROWS/processes.csv
# DIR/nROWS/cpu.csv: CPU seconds per stage, per process (every process on the machine) and, as
# "machine:KIND", the machine's (user, system, iowait, steal, idle; summed over its CPUs)
CPU_COLUMNS = ["rows", "stage", "process", "cpu_seconds"]
# DIR/nROWS/stages.csv: wall seconds per stage as the campaign's progress names it
# train, score: the campaign's own stages; rest: everything else of the resumed run (importing
# the labels, selecting, writing the queries); total: labels submitted → next queries written
STAGES = ("train", "score", "rest", "total")
GB = 1e9
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's CPU times are in these a second
SPY_HZ = 20  # py-spy's samples a second of the driver (--py-spy)
# a sampled stack through one of these is the train or score stage's (or the sampler's own start), not "rest"'s
MEASURED_STAGES = re.compile(r"^(run_training|score_pool|driver_samples) \(")


@contextlib.contextmanager
def driver_samples(raw_file: Path | None):
    """py-spy sampling this process (the driver: its Python threads, not Ray's workers) while
    the block runs, its stacks written to `raw_file` in py-spy's raw (collapsed) format.
    Idle stacks too (a thread waiting for the disk or for Ray is sampled where it waits), so a
    function's samples are its wall time. Non-blocking: the driver is never paused. Nothing
    when `raw_file` is None."""
    if raw_file is None:
        yield
        return
    beside = Path(sys.executable).with_name("py-spy")  # a virtual environment's, unactivated
    spy = subprocess.Popen([str(beside) if beside.exists() else "py-spy", "record", "--pid", str(os.getpid()),
                            "--rate", str(SPY_HZ), "--nonblocking", "--idle", "--format", "raw",
                            "--output", str(raw_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached before the measured work starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled and ends
        spy.wait(timeout=60)


def rest_profile(raw_lines, hz: float = SPY_HZ, within: str = "one_cycle (scale.py)") -> list[tuple[str, float]]:
    """Wall seconds of the driver per function (inclusive, line numbers dropped), over the
    sampled stacks of the thread running `within` (the measured cycle's, not Ray's or the
    sampler's threads, which wait throughout) that pass through neither training nor scoring:
    what "rest" was spent on. Largest first."""
    seconds: collections.Counter = collections.Counter()
    for line in raw_lines:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if within not in frames or any(MEASURED_STAGES.match(frame) for frame in frames):
            continue
        for frame in dict.fromkeys(frames):  # a recursive function counted once a stack
            seconds[frame] += int(count) / hz
    return seconds.most_common()


class StageSampler(threading.Thread):
    """Per stage named in `status_file`: the peak PSS sum over this process and its
    descendants, and the bytes they read while it ran (rchar increments per process)."""

    def __init__(self, status_file: Path, interval: float = 0.2):
        super().__init__(daemon=True)
        self.status_file, self.interval = status_file, interval
        self.stopped = threading.Event()
        self.peak: dict[str, int] = {}
        self.read: dict[str, int] = {}
        # per stage, at its peak: {process name: (processes, PSS summed)}, to say what grew
        self.peak_processes: dict[str, dict[str, tuple[int, int]]] = {}
        # wall seconds per stage as the campaign names it (select, predict, …; "between stages"
        # when none runs): what "rest" was spent on
        self.seconds: dict[str, float] = {}
        self._last: dict[int, int] = {}
        # per stage: CPU seconds of every process on the machine (ours by name as in
        # processes.csv, the kernel's threads and others by their comm), and the machine's
        # CPU seconds by kind (/proc/stat: user, system, iowait, steal, idle): what the
        # measured driver competed with, and whether it waited on the disk or the host
        self.cpu: dict[str, collections.Counter] = {}
        self.machine: dict[str, collections.Counter] = {}
        self._ticks: dict[int, int] = {}
        self._machine_ticks: dict[str, int] = {}

    def run(self) -> None:
        tick, before = 0, time.perf_counter()
        while not self.stopped.wait(self.interval):
            tick += 1
            named = self._stage()
            now = time.perf_counter()
            self.seconds = add_time(self.seconds, named, now - before)
            before = now
            stage = named if named in ("train", "score") else "rest"
            processes = [os.getpid(), *_descendants(os.getpid())]
            read = 0
            for pid, rchar in ((pid, _rchar(pid)) for pid in processes):
                if rchar is not None:
                    read += max(0, rchar - self._last.get(pid, rchar))
                    self._last[pid] = rchar
            self.read[stage] = self.read.get(stage, 0) + read
            if tick % 5 == 0 or stage not in self.peak:  # PSS walks every page table: not every tick
                each = {pid: _pss(pid) or 0 for pid in processes}
                pss = sum(each.values())
                if pss > self.peak.get(stage, 0):
                    self.peak_processes[stage] = by_name(each)
                self.peak[stage] = max(self.peak.get(stage, 0), pss)
                self.peak["total"] = max(self.peak.get("total", 0), pss)
            self.read["total"] = self.read.get("total", 0) + read
            self._count_cpu(stage, set(processes))

    def _count_cpu(self, stage: str, ours: set[int]) -> None:
        """Add each process's and the machine's CPU seconds since the last poll to `stage`."""
        ticks = process_ticks()
        spent = self.cpu.setdefault(stage, collections.Counter())
        for pid, (comm, used) in ticks.items():
            if pid in self._ticks and used > self._ticks[pid]:
                name = ("driver" if pid == os.getpid() else _process_name(pid)) if pid in ours else comm
                spent[name] += (used - self._ticks[pid]) / CLOCK_TICKS
        self._ticks = {pid: used for pid, (_, used) in ticks.items()}
        machine = machine_ticks()
        kinds = self.machine.setdefault(stage, collections.Counter())
        for kind, used in machine.items():
            if kind in self._machine_ticks:
                kinds[kind] += (used - self._machine_ticks[kind]) / CLOCK_TICKS
        self._machine_ticks = machine

    def _stage(self) -> str | None:
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return status["stage"] if status.get("state") == "running" else None

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def add_time(seconds: dict[str, float], stage: str | None, elapsed: float) -> dict[str, float]:
    """`seconds` with `elapsed` added to `stage` (None: "between stages")."""
    name = stage or "between stages"
    return {**seconds, name: seconds.get(name, 0.0) + elapsed}


def by_name(pss: dict[int, int]) -> dict[str, tuple[int, int]]:
    """{process name: (how many, PSS summed)}: the driver, Ray's daemons by executable, Ray
    workers by their title (``ray::IDLE``, ``ray::MapWorker(...)``)."""
    named: dict[str, tuple[int, int]] = {}
    for pid, size in pss.items():
        name = "driver" if pid == os.getpid() else _process_name(pid)
        count, total = named.get(name, (0, 0))
        named[name] = (count + 1, total + size)
    return named


def _process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    first = argv[0].decode(errors="replace").strip()
    if first.startswith("ray::"):
        return first.split(" ")[0]
    return Path(first).name or "?"


def process_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (comm, user + system clock ticks)} of every process on the machine (Linux /proc)."""
    return {pid: (comm, int(fields[11]) + int(fields[12])) for pid, comm, fields in proc_stats()}  # utime, stime


def machine_ticks() -> dict[str, int]:
    """The machine's clock ticks since boot by kind, summed over CPUs (/proc/stat's cpu line)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return {"user": user + nice, "system": system + irq + softirq, "iowait": iowait, "steal": steal, "idle": idle}


def _rchar(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def answer_first_queries(run_dir: Path, info) -> None:
    """labels.csv for cycle 0's queries, from the pool's truth (what a person would fill in).
    Only the asked rows become Python objects: this runs in the measured driver, and a dict of
    every id (10⁶ at the largest pool) would count as the campaign's growth with the pool."""
    import pyarrow.compute as pc

    from orchestrator.data.pool import read_index

    folder = run_dir / "cycles" / "c00" / "queries"
    with open(folder / "queries.csv", newline="") as f:
        asked = [r["subtomo_id"] for r in csv.DictReader(f)]
    index = read_index(info.path, ["subtomo_id", "label"])
    index = index.filter(pc.is_in(index.column("subtomo_id"), value_set=pa.array(asked)))
    truth = dict(zip(index.column("subtomo_id").to_pylist(), index.column("label").to_pylist()))
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["subtomo_id", "label"])
        writer.writerows([sid, truth[sid]] for sid in asked)


def pool_of(path: Path, rows: int, box: int):
    """The noise pool of `rows` at `path`, and whether it was written now: one written earlier (a
    complete one of that size, as `make_noise_pool` writes it, kept after), or written now in a
    process of its own (deleted after)."""
    from orchestrator.data.pool import PoolError, open_pool

    try:
        info = open_pool(path)
        if info.n_rows == rows and info.box == (box,) * 3:
            print(f"pool of {rows:,} found at {path}", flush=True)
            return info, False
    except (PoolError, OSError):
        pass
    shutil.rmtree(path, ignore_errors=True)  # an interrupted or other pool
    started = time.perf_counter()
    info = make_noise_pool_elsewhere(path, rows, box)  # the driver's memory is measured
    print(f"pool of {rows:,} written in {time.perf_counter() - started:.0f} s", flush=True)
    return info, True


@contextlib.contextmanager
def cold_after_scoring(enabled: bool):
    """With `enabled`, the page cache is emptied when the campaign leaves scoring (its first
    call of `Campaign._stability`, the first step after a pass). Yields a list that receives
    the seconds the emptying took, to take out of "rest"."""
    from orchestrator.campaign.loop import Campaign

    spent: list[float] = []
    if not enabled:
        yield spent
        return
    original = Campaign._stability

    def stability_from_disk(campaign, *args, **kwargs):
        if not spent:
            started = time.perf_counter()
            if not drop_page_cache():
                raise SystemExit("--cold-rest: only root may empty the page cache (/proc/sys/vm/drop_caches)")
            spent.append(time.perf_counter() - started)
        return original(campaign, *args, **kwargs)

    Campaign._stability = stability_from_disk
    try:
        yield spent
    finally:
        Campaign._stability = original


def one_cycle(rows: int, labels: int, select: int, work: Path, spy: bool = False, box: int = 32,
              pools: Path | None = None, cold_rest: bool = False) -> list[list]:
    """The measured rows (one per stage) of a pool of `rows` (deleted after if written here)."""
    from orchestrator.al.oracle import AwaitingLabels
    from orchestrator.campaign.loop import Campaign
    from orchestrator.campaign.progress import Display
    from orchestrator.config import load_config
    from orchestrator.distributed.connect import connect

    info, written_here = pool_of((pools or work) / f"pool-{rows}", rows, box)
    cfg = load_config(None, [
        f"data.pool={info.path}", "oracle=file", f"budget.counts=[{labels}, {labels + select}]",
        "strategy.name=ema_kl", "model.width=4", "train.epochs=2", "train.min_steps=0",
        "train.num_workers=2", "score.actors=2", "score.batch_size=256",
    ])
    run_dir = work / f"run-{rows}"
    status = run_dir / "progress.json"
    with open(work / f"run-{rows}.log", "a") as log, connect(num_cpus=os.cpu_count(), log_to_driver=False):
        display = Display(log, live=False, status_path=status)
        try:  # the first labels asked for
            Campaign(cfg, run_dir, info, display=display).run()
        except AwaitingLabels:
            pass
        answer_first_queries(run_dir, info)
        sampler = StageSampler(status)
        sampler.start()
        raw_samples = work / "driver_samples.txt" if spy else None
        with driver_samples(raw_samples), cold_after_scoring(cold_rest) as emptying:
            started = time.perf_counter()
            try:  # the measured cycle: labels in, next queries out
                Campaign(cfg, run_dir, info, display=display).run()
            except AwaitingLabels:
                pass
            finally:
                total = time.perf_counter() - started
                sampler.stop()
    cycle = json.loads((run_dir / "state.json").read_text())["cycles"][0]
    seconds = {"train": cycle["seconds_train"], "score": cycle["seconds_score"], "total": total,
               "rest": total - cycle["seconds_train"] - cycle["seconds_score"] - sum(emptying)}
    if emptying:
        print(f"{rows:,} rows: page cache emptied after scoring in {emptying[0]:.2f} s (not in rest)", flush=True)
    if written_here:
        shutil.rmtree(info.path)
    with open(work / "processes.csv", "w", newline="") as f:  # what each stage's peak was made of
        csv.writer(f).writerows([PROCESS_COLUMNS] + [
            [rows, stage, name, count, pss]
            for stage, named in sorted(sampler.peak_processes.items())
            for name, (count, pss) in sorted(named.items(), key=lambda item: -item[1][1])])
    if raw_samples is not None and raw_samples.exists():  # what "rest" was spent on, by function
        with open(raw_samples) as f, open(work / "rest_profile.csv", "w", newline="") as out:
            csv.writer(out).writerows([["rows", "function", "seconds"]] + [
                [rows, name, round(spent, 2)] for name, spent in rest_profile(f) if spent >= 0.1])
    with open(work / "cpu.csv", "w", newline="") as f:  # what ran beside each stage
        csv.writer(f).writerows([CPU_COLUMNS] + [
            [rows, stage, name, round(spent, 2)]
            for stage, by_process in sorted(sampler.cpu.items())
            for name, spent in [*(("machine:" + kind, s) for kind, s in sampler.machine.get(stage, {}).items()),
                                *by_process.most_common()] if spent >= 0.01])
    with open(work / "stages.csv", "w", newline="") as f:  # what "rest" was spent on
        csv.writer(f).writerows([["rows", "stage", "seconds"]] + [
            [rows, stage, round(spent, 2)] for stage, spent in sorted(sampler.seconds.items())])
    return [[rows, stage, round(seconds[stage], 2), sampler.read.get(stage, 0), sampler.peak.get(stage, 0)]
            for stage in STAGES]


def read_rows(path: Path) -> list[list]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [[int(r["rows"]), r["stage"], float(r["seconds"]), int(r["bytes_read"]), int(r["peak_pss"])]
                for r in csv.DictReader(f)]


def table(rows: list[list]) -> str:
    """Per stage and pool size: seconds, GB read, peak PSS, and each as a multiple of the
    smallest pool's."""
    sizes = sorted({r[0] for r in rows})
    by = {(r[0], r[1]): r for r in rows}
    lines = ["| stage | pool | seconds | GB read | peak PSS GB | × seconds | × read | × PSS |",
             "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        base = by.get((sizes[0], stage)) if sizes else None
        for size in sizes:
            r = by.get((size, stage))
            if r is None or base is None:
                continue
            lines.append(f"| {stage} | {size:,} | {r[2]:.1f} | {r[3] / GB:.2f} | {r[4] / GB:.2f} | "
                         f"{_ratio(r[2], base[2])} | {_ratio(r[3], base[3])} | {_ratio(r[4], base[4])} |")
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000, 300_000])
    parser.add_argument("--labels", type=int, default=2000, help="labels the cycle trains on")
    parser.add_argument("--select", type=int, default=500, help="queries it selects")
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench" / "scale")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--py-spy", action="store_true",
                        help="sample the driver with py-spy (pip install py-spy) during the measured "
                             "cycle: DIR/nROWS/rest_profile.csv, seconds per function outside train and score")
    parser.add_argument("--box", type=int, default=32,
                        help="volume edge; 8 gives a quick look at what the driver holds for a pool of "
                             "10⁶ rows (a 1 GB pool, scored in minutes), not the benchmark's figures")
    parser.add_argument("--pools", type=Path, default=None,
                        help="where the pools are written (default: each size's work folder); a "
                             "complete one of the size found there is used, e.g. one written ahead "
                             "with bench.common.make_noise_pool while other work runs")
    parser.add_argument("--cold-rest", action="store_true",
                        help="empty the page cache as the cycle leaves scoring (root only), so that "
                             "\"rest\" reads from disk at every pool size (use another --results)")
    args = parser.parse_args()
    rows = read_rows(args.results)
    for size in args.rows:
        if any(r[0] == size for r in rows):
            continue
        work = args.dir / f"n{size}"
        shutil.rmtree(work, ignore_errors=True)  # an interrupted size starts again
        work.mkdir(parents=True)
        rows = [r for r in rows if r[0] != size] + one_cycle(size, args.labels, args.select, work, args.py_spy,
                                                                args.box, args.pools, args.cold_rest)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "w", newline="") as f:
            csv.writer(f).writerows([COLUMNS, *sorted(rows)])
        print(table(rows), flush=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
