"""What a person in the loop waits for: labels submitted → next queries ready, per cycle of the
embedded default (`python orchestrator/run.py`, its Ray Train workers and Ray Data scoring), with
the scoring workers started afresh for every pass (an actor pool, `score.warm_workers=false`,
the "before") and kept warm between passes (the default, the "after").

Per cycle, from the run's own files: training seconds and the part spent outside the epochs
(the sum of the epochs' training times in `progress.jsonl`, subtracted: starting the Ray
Train worker group, reading the cycle's volumes, the validations, the last evaluation, stopping), scoring seconds, and the
wait from the last label of the cycle (the ledger's time) to the next cycle's queries
(`selection.csv` written). The simulated oracle answers at once, so the wait is the machine's.

    python bench/startup.py                 # both modes, ≈ 11 min on 2 cores
    python bench/startup.py --modes after   # one; a mode already in the results is skipped

Raw rows: docs/results/startup.csv; the table is printed (medians over cycles 1…, and cycle 0
apart: the first pass of a campaign starts its workers in either mode).
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "startup.csv"
MODES = {"before": ["--set", "score.warm_workers=false"], "after": []}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench" / "startup")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
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
