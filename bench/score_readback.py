"""What the driver spends reading a scoring pass back, against the pool's size and how the pass
was cut into files: the row-wise selection (`best_scored`: the top 500 of a running merge) and
the cycle's agreement κ and mean uncertainty (`stability`: this pass against the previous one).

    python bench/score_readback.py                          # 10,000 100,000 300,000 1,000,000 rows
    python bench/score_readback.py --rows 100000 --layouts batch

Each pass is synthetic (13 classes, Dirichlet probabilities, 2,000 labelled rows), written twice
as the scoring pass writes it: a file per 64-row batch (`batch`, what a pass wrote before
`score.rows_per_file`), and files of `rows_per_file(rows, ScoreConfig())` rows (`bundled`, what
it writes now). Reading costs ~1 ms a file whatever its size, so the file count, not the rows,
is what grew with the pool. Raw rows: docs/results/score_readback.csv; the table is printed.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.campaign.labelled import LabelledSet  # noqa: E402
from orchestrator.campaign.loop import best_scored, stability  # noqa: E402
from orchestrator.config import ScoreConfig  # noqa: E402
from orchestrator.distributed.score import rows_per_file  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "score_readback.csv"
COLUMNS = ["rows", "layout", "files", "best_scored_s", "stability_s"]
CLASSES, LABELLED, K = 13, 2000, 500
BATCH = ScoreConfig().batch_size  # a file per batch: what a pass wrote before


def write_pass(folder: Path, rows: int, file_rows: int, seed: int) -> int:
    """A pass's score files over `rows` rows, `file_rows` a file; returns the number of files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    starts = range(0, rows, file_rows)
    for i, start in enumerate(starts):
        n = min(file_rows, rows - start)
        probs = rng.dirichlet(np.ones(CLASSES), n).astype(np.float32)
        pq.write_table(pa.table({
            "row": np.arange(start, start + n), "score": rng.random(n, dtype=np.float32),
            "pred": probs.argmax(1), "pred_prob": probs.max(1),
            "entropy": -(probs * np.log(probs)).sum(1),
            "probs": pa.FixedShapeTensorArray.from_numpy_ndarray(probs),
        }), folder / f"part-{i:05d}.parquet")
    return len(starts)


def measure(rows: int, layout: str, scratch: Path) -> dict:
    file_rows = BATCH if layout == "batch" else rows_per_file(rows, ScoreConfig())
    before, now = scratch / "before", scratch / "now"
    files = write_pass(before, rows, file_rows, seed=1)
    write_pass(now, rows, file_rows, seed=2)
    labelled_rows = np.random.default_rng(0).choice(rows, LABELLED, replace=False)
    labelled = LabelledSet(np.sort(labelled_rows), np.zeros(LABELLED, np.int64), np.arange(rows))
    unlabelled = np.setdiff1d(np.arange(rows), labelled_rows)
    started = time.perf_counter()
    best_scored(now, labelled, K, np.random.default_rng(3))
    selected = time.perf_counter()
    stability(now, before, unlabelled, CLASSES)
    done = time.perf_counter()
    shutil.rmtree(before), shutil.rmtree(now)
    return {"rows": rows, "layout": layout, "files": files,
            "best_scored_s": round(selected - started, 3), "stability_s": round(done - selected, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    parser.add_argument("--layouts", nargs="+", default=["batch", "bundled"], choices=["batch", "bundled"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="readback-") as scratch:
        for rows in args.rows:
            for layout in args.layouts:
                results.append(measure(rows, layout, Path(scratch)))
                print(results[-1], flush=True)
    _save(args.results, results)
    print("\n| rows | layout | files | best_scored (s) | κ + uncertainty (s) |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['layout']} | {r['files']:,} | {r['best_scored_s']:.2f} | {r['stability_s']:.2f} |")


def _save(path: Path, results: list[dict]) -> None:
    """The new rows, and the earlier ones of the sizes and layouts not measured this time."""
    measured = {(r["rows"], r["layout"]) for r in results}
    kept = []
    if path.exists():
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if (int(r["rows"]), r["layout"]) not in measured]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(sorted(kept + results, key=lambda r: (int(r["rows"]), r["layout"])))


if __name__ == "__main__":
    main()
