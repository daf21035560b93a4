"""What a person in the loop waits for: labels submitted → next queries ready, per cycle of the
embedded default (`python orchestrator/run.py`, its Ray Train workers and Ray Data scoring), with
the scoring workers started afresh for every pass (an actor pool, `score.warm_below_rows=0`,
the "before") and kept warm between passes (the default for passes below 4,000 rows, the
"after").

Per cycle, from the run's own files: training seconds and the part spent outside the epochs
(the sum of the epochs' training times in `progress.jsonl`, subtracted: starting the Ray
Train worker group, reading the cycle's volumes, the validations, the last evaluation, stopping), scoring seconds, and the
wait from the last label of the cycle (the ledger's time) to the next cycle's queries
(`selection.csv` written). The simulated oracle answers at once, so the wait is the machine's.

    python bench/startup.py                 # both modes, ≈ 11 min on 2 cores
    python bench/startup.py --modes after   # one; a mode already in the results is skipped
    python bench/startup.py --passes 10000  # large passes: actor pool vs warm workers, ≈ 4 min

Raw rows: docs/results/startup.csv; the table is printed (medians over cycles 1…, and cycle 0
apart: the first pass of a campaign starts its workers in either mode).

`--passes N`: what a large pass costs each way, on one local Ray, alternating: a noise pool of
N rows (10% excluded as labelled), resnet10 width 4, 256-row batches, each mode twice (the
second pass of the warm workers finds them warm). Raw rows: docs/results/startup_passes.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "startup.csv"
PASSES = ROOT / "docs" / "results" / "startup_passes.csv"
MODES = {"before": ["--set", "score.warm_below_rows=0"], "after": []}
COLUMNS = ["mode", "cycle", "labelled", "train_s", "train_outside_epochs_s", "score_s", "select_s",
           "labels_to_queries_s"]
MEASURED = COLUMNS[3:]


def run_campaign(mode: str, run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
    command = [sys.executable, str(ROOT / "orchestrator" / "run.py"), "--run-dir", str(run_dir),
               *MODES[mode]]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def cycle_rows(mode: str, run_dir: Path) -> list[list]:
    """One row per cycle that selected queries after it (the last one predicts instead)."""
    cycles = json.loads((run_dir / "state.json").read_text())["cycles"]
    with open(run_dir / "labels.csv", newline="") as f:
        answered: dict[int, datetime] = {}
        for r in csv.DictReader(f):
            at = datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
            answered[int(r["cycle"])] = max(answered.get(int(r["cycle"]), at), at)
    rows = []
    for c, record in enumerate(cycles[:-1]):
        epochs = [json.loads(line)["seconds"]
                  for line in (run_dir / "cycles" / f"c{c:02d}" / "progress.jsonl").read_text().splitlines()]
        queries = os.stat(run_dir / "cycles" / f"c{c + 1:02d}" / "selection.csv").st_mtime
        rows.append([mode, c, record["labelled"], record["seconds_train"],
                     record["seconds_train"] - sum(epochs), record["seconds_score"],
                     cycles[c + 1]["seconds_select"], queries - answered[c].timestamp()])
    return [[*r[:3], *(round(v, 2) for v in r[3:])] for r in rows]


def read_rows(path: Path) -> list[list]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [[r["mode"], int(r["cycle"]), int(r["labelled"]), *(float(r[k]) for k in MEASURED)]
                for r in csv.DictReader(f)]


def table(rows: list[list]) -> str:
    """Per mode: cycle 0 (its workers start in either mode) and the median of the later cycles."""
    lines = ["| mode | cycles | " + " | ".join(MEASURED) + " |", "|---" * (len(MEASURED) + 2) + "|"]
    for mode in MODES:
        mine = [r for r in rows if r[0] == mode]
        for name, part in (("0", [r for r in mine if r[1] == 0]), ("1… (median)", [r for r in mine if r[1] > 0])):
            if part:
                values = [statistics.median(r[3 + i] for r in part) for i in range(len(MEASURED))]
                lines.append(f"| {mode} | {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def pass_rates(rows: int, work: Path) -> list[list]:
    """[mode, pass, measure, value] rows: each pass's rows, seconds and rows/s, 2 passes of each
    mode, alternating; then the warm workers left between passes (processes, their PSS)."""
    sys.path.insert(0, str(ROOT))
    import ray.data

    from bench.common import make_noise_pool, save_models
    from orchestrator.config import ScoreConfig
    from orchestrator.distributed.connect import connect
    from orchestrator.distributed.score import score_pool

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    info = make_noise_pool(work / "pool", rows)
    save_models(work / "model.pt", "resnet10", 4, "full")
    excluded = range(0, rows, 10)
    results = []
    with connect("local", log_level="ERROR", num_cpus=os.cpu_count(), include_dashboard=False):
        ray.data.DataContext.get_current().enable_progress_bars = False
        for repeat in (1, 2):
            for mode, below in (("actor pool", 0), ("warm workers", rows + 1)):
                started = time.perf_counter()
                score_pool(info.path, str(work / "model.pt"), work / f"scores-{below}-{repeat}",
                           strategy="ema_kl", strategy_options={}, exclude_rows=excluded,
                           cfg=ScoreConfig(batch_size=256, warm_below_rows=below))
                seconds = time.perf_counter() - started
                scored = rows - len(excluded)
                results += [[mode, repeat, "rows", scored], [mode, repeat, "seconds", round(seconds, 2)],
                            [mode, repeat, "rows_per_s", round(scored / seconds, 1)]]
                print(f"{mode}, pass {repeat}: {seconds:.1f} s, {scored / seconds:.0f} rows/s", flush=True)
        kept = warm_worker_pss()
        print(f"warm workers kept between passes: {len(kept)}, PSS {sum(kept) / 1e6:.0f} MB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return results + [["warm workers", "after", "processes_kept", len(kept)],
                      ["warm workers", "after", "pss_mb_kept", round(sum(kept) / 1e6, 1)]]


def warm_worker_pss() -> list[int]:
    """The PSS of each process of this driver's local Ray that is a warm scoring worker."""
    from bench.scoring_memory import _descendants, _pss
    from orchestrator.distributed.score import SCORING_WORKER_ENV

    found = []
    for pid in _descendants(os.getpid()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{SCORING_WORKER_ENV}=1".encode() in environ and (pss := _pss(pid)):
            found.append(pss)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench" / "startup")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--passes", type=int, metavar="N", help="large passes of N rows instead")
    args = parser.parse_args()
    if args.passes:
        rates = pass_rates(args.passes, args.dir / "passes")
        with open(PASSES, "w", newline="") as f:
            csv.writer(f).writerows([["mode", "pass", "measure", "value"], *rates])
        return
    rows = read_rows(args.results)
    for mode in args.modes:
        if any(r[0] == mode for r in rows):
            continue
        run_campaign(mode, args.dir / mode)
        rows += cycle_rows(mode, args.dir / mode)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "w", newline="") as f:
            csv.writer(f).writerows([COLUMNS, *rows])
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
