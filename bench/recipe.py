"""Full supervision with the CPU default recipe: test accuracy against epochs and training-set
size on SHREC'21-13 at SNR 0.05, and the wall time of each run on this machine.

Each run is a one-cycle campaign with every train label (`budget.counts=[n_train]`), in this
process with `--threads` torch threads (`train.num_workers=0`, `score.actors=0`), the recipe of
`tune_configs/default.yaml` and only `train.epochs` changed. The pools are the label-efficiency
benchmark's SHREC'21 set (150 train a class) and larger ones (240 and 480 train a class),
simulated once under --out. Finished runs are skipped, so the benchmark resumes.

    python bench/recipe.py                                   # epochs 10 20 30 45 60, both sizes
    python bench/recipe.py --epochs 30 --sizes 240 --threads 2       # the 15-minute target

Raw results: docs/results/recipe.csv (size, epochs, seed, n_train, val, test, T and M test,
the chosen classifier, seconds); the table is printed and the plot goes to docs/recipe_epochs.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.label_efficiency import SHREC, SHREC_MAPS, _train_count  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "recipe.csv"
COLUMNS = ["train_per_class", "epochs", "seed", "n_train", "val_accuracy", "test_accuracy",
           "test_accuracy_task", "test_accuracy_mean", "classifier", "seconds"]
# train a class → simulator settings; 150 is the label-efficiency set (200 a class, 20 val, 30 test)
SIZES = {150: {**SHREC, "snr": 0.05},
         240: {**SHREC, "snr": 0.05, "per_class": 300, "val_fraction": 0.1, "test_fraction": 0.1},
         480: {**SHREC, "snr": 0.05, "per_class": 600, "val_fraction": 0.1, "test_fraction": 0.1}}


def pool_for(size: int, out: Path):
    from orchestrator.data.pool import open_pool
    from orchestrator.data.simulate import SimulationConfig, simulate_pool

    path = out / "pools" / f"shrec13_snr0.05_train{size}"
    if (path / "pool.json").exists():
        return open_pool(path)
    if not SHREC_MAPS.is_dir():
        raise SystemExit(f"needs the SHREC'21 maps in {SHREC_MAPS} (../shared/data)")
    return simulate_pool(None, SimulationConfig(**SIZES[size]), path, workers=2, progress=False)


def run(info, run_dir: Path, epochs: int, seed: int, threads: int) -> dict:
    """One full-supervision campaign in this process; a finished one is read back."""
    import torch

    from orchestrator.config import load_config
    from orchestrator.campaign.loop import Campaign

    state_file = run_dir / "state.json"
    if state_file.exists() and json.loads(state_file.read_text()).get("done"):
        return json.loads(state_file.read_text())
    torch.set_num_threads(threads)
    cfg = load_config(None, [
        f"data.pool={info.path}", f"seed={seed}", "strategy.name=random",
        f"budget.counts=[{_train_count(info)}]", f"train.epochs={epochs}",
        "train.num_workers=0", f"train.cpus_per_worker={threads}", "score.actors=0",
    ])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".log"), "a") as log:
        stdout, sys.stdout = sys.stdout, log
        try:
            return Campaign(cfg, run_dir, info).run()
        finally:
            sys.stdout = stdout


def row(size: int, epochs: int, seed: int, state: dict) -> list:
    c = state["cycles"][0]
    return [size, epochs, seed, c["labelled"], c.get("val_accuracy"), c.get("test_accuracy"),
            c.get("test_accuracy_task"), c.get("test_accuracy_mean"), c.get("classifier"),
            round(c.get("seconds_train", float("nan")), 1)]


def plot(rows: list[list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for size in sorted({r[0] for r in rows}):
        runs = [r for r in rows if r[0] == size]
        epochs = sorted({r[1] for r in runs})
        means = [statistics.mean(r[5] for r in runs if r[1] == e) for e in epochs]  # over seeds
        line, = axis.plot(epochs, means, marker="o", label=f"{size} train a class ({13 * size})")
        axis.scatter([r[1] for r in runs], [r[5] for r in runs], s=10, color=line.get_color(), alpha=0.5)
    axis.axhline(0.70, color="grey", linestyle="--", label="target 0.70")
    axis.set_xlabel("epochs (one-cycle schedule over all of them)")
    axis.set_ylabel("test accuracy, full supervision\n(line: mean over seeds; dots: seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", nargs="+", type=int, default=[10, 20, 30, 45, 60])
    parser.add_argument("--sizes", nargs="+", type=int, default=[150, 240], choices=list(SIZES),
                        help="train subtomograms a class (480: 7,800 simulated, ~0.5 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "recipe")
    args = parser.parse_args()
    rows = _read(RESULTS)
    for size in args.sizes:
        info = pool_for(size, args.out)
        for epochs in args.epochs:
            started = time.perf_counter()
            state = run(info, args.out / "runs" / f"train{size}-e{epochs}-seed{args.seed}",
                        epochs, args.seed, args.threads)
            new = row(size, epochs, args.seed, state)
            # read again: another seed's process may have written its row meanwhile
            rows = [r for r in _read(RESULTS) if r[:3] != new[:3]] + [new]
            _write(RESULTS, rows)
            print(f"{size} a class, {epochs} epochs: test {new[5]:.3f} (T {new[6]:.3f}, M "
                  f"{new[7]:.3f}, kept {new[8]}), {new[9]:.0f} s training "
                  f"({time.perf_counter() - started:.0f} s here)", flush=True)
    plot(rows, ROOT / "docs" / "recipe_epochs.png")
    print("\n| train a class | epochs | seed | test | T | M | kept | training s |\n|---|---|---|---|---|---|---|---|")
    for r in sorted(rows):
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | {r[8]} | {r[9]:.0f} |")


def _read(path: Path) -> list[list]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [[int(r["train_per_class"]), int(r["epochs"]), int(r["seed"]), int(r["n_train"]),
                 float(r["val_accuracy"]), float(r["test_accuracy"]), float(r["test_accuracy_task"]),
                 float(r["test_accuracy_mean"]), r["classifier"], float(r["seconds"])]
                for r in csv.DictReader(f)]


def _write(path: Path, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(sorted(rows))


if __name__ == "__main__":
    main()
