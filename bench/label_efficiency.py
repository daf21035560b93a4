"""Label efficiency: every strategy against full supervision, the same model, data and epochs.

For each data set (the 13 SHREC'21 structures at SNR 0.05, 0.03 and noise-free, and the
built-in 50-class set) one pool is simulated; on it every strategy runs a simulated-oracle
campaign per seed, and "full supervision" trains once on the whole train split. Campaigns run
in-process (`train.num_workers=0`, `score.actors=0`: on 2 cores Ray's per-cycle start-up would
cost more than the training), `--jobs` at a time, one torch thread each.

Prints, per data set, test accuracy at each budget (mean ± std over seeds), AUBC, accuracy at
20% labels as a % of full supervision and the labelled fraction needed to reach 95% of it, and
plots accuracy against labelled fraction (one line per strategy). Run directories are kept
under --out; running again skips finished campaigns, so an interrupted benchmark resumes.

    python bench/label_efficiency.py                        # everything: ~1 h on 2 cores
    python bench/label_efficiency.py --datasets shrec13_snr0.05 --seeds 0 --strategies random ema_kl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.sweep import mean_std, plot_sweep, summarise  # noqa: E402

SHREC_MAPS = ROOT.parent / "shared" / "data" / "structures_10A"

# 13 maps at 12.5 Å in a 32³ box (400 Å: the largest SHREC'21 structures exceed 320 Å, i.e. a
# 32³ box at 10 Å), 40 per class: 28 train, 4 validation, 8 test.
SHREC = {"structures": str(SHREC_MAPS), "box": 32, "voxel_size_A": 12.5, "per_class": 40,
         "val_fraction": 0.1, "test_fraction": 0.2, "seed": 0}
DATASETS = {
    "shrec13_snr0.05": {**SHREC, "snr": 0.05},
    "shrec13_snr0.03": {**SHREC, "snr": 0.03},
    "shrec13_noise_free": {**SHREC, "snr": float("inf")},
    "builtin50_snr0.05": {"structures": "builtin:50", "box": 32, "voxel_size_A": 10.0,
                          "per_class": 14, "val_fraction": 0.1, "test_fraction": 0.2,
                          "snr": 0.05, "seed": 0},
}

# Labelled fractions of the train split, one per cycle.
FRACTIONS = (0.05, 0.1, 0.2, 0.4)

# The same CPU-sized model and schedule for every run; dropout for the MC-dropout strategies.
CAMPAIGN = [
    "model.name=resnet10", "model.width=16", "model.stem=full", "model.dropout=0.2",
    "train.epochs=8", "train.batch_size=16", "train.num_workers=0",
    "score.actors=0", "score.batch_size=64",
]

# (row name, strategy, options): the baselines of issue 7 with CPU-sized auxiliaries.
RUNS = [
    ("random", "random", {}),
    ("entropy", "entropy", {}),
    ("bald", "bald", {"mc_passes": 8}),
    ("coreset", "coreset", {}),
    ("badge", "badge", {}),
    ("ll4al", "ll4al", {}),
    ("vaal", "vaal", {"epochs": 8}),
    ("hal", "hal", {"epochs": 8}),
    ("noise_stability", "noise_stability", {"passes": 8}),
    ("two_stream", "two_stream", {"epochs": 8}),
    ("ema_kl", "ema_kl", {}),
    ("ema_kl_semi", "ema_kl_semi", {}),
]
FULL = "full supervision"


def simulate(name: str, out: Path):
    """The data set's pool, simulated once and reused by every run."""
    from orchestrator.pool import open_pool
    from orchestrator.simulate import SimulationConfig, simulate_pool

    path = out / "pools" / name
    if (path / "pool.json").exists():
        return open_pool(path)
    if not SHREC_MAPS.is_dir() and DATASETS[name]["structures"] == str(SHREC_MAPS):
        raise SystemExit(f"{name}: needs the SHREC'21 maps in {SHREC_MAPS} (../shared/data)")
    started = time.perf_counter()
    info = simulate_pool(None, SimulationConfig(**DATASETS[name]), path, workers=2, progress=False)
    print(f"{name}: pool of {info.n_rows} simulated in {time.perf_counter() - started:.0f} s",
          flush=True)
    return info


def run_one(pool: str, run_dir: str, sets: list[str]) -> dict:
    """One campaign in this (worker) process; returns its state (a finished one is not rerun)."""
    import torch

    torch.set_num_threads(1)
    from orchestrator.config import load_config
    from orchestrator.loop import Campaign
    from orchestrator.pool import open_pool

    info = open_pool(pool)
    cfg = load_config(None, CAMPAIGN + [f"data.pool={pool}"] + sets)
    started = time.perf_counter()
    with open(Path(run_dir).with_suffix(".log"), "a") as log:
        stdout = sys.stdout
        sys.stdout = log  # one campaign's progress lines in its own log, not interleaved
        try:
            state = Campaign(cfg, Path(run_dir), info).run()
        finally:
            sys.stdout = stdout
    state["seconds"] = time.perf_counter() - started
    return state


def campaign_sets(run: tuple, seed: int, n_train: int) -> list[str]:
    _, strategy, options = run
    counts = [max(1, round(f * n_train)) for f in FRACTIONS]
    return [f"seed={seed}", f"strategy.name={strategy}", f"strategy.options={json.dumps(options)}",
            f"budget.counts={counts}"]


def full_supervision_sets(seed: int, n_train: int) -> list[str]:
    return [f"seed={seed}", "strategy.name=random", f"budget.counts=[{n_train}]"]


def labels_to_reach(fractions, accuracies, target: float) -> float:
    """The smallest labelled fraction at which the (linearly interpolated) curve reaches
    `target`; NaN when it never does."""
    x, y = np.asarray(fractions, float), np.asarray(accuracies, float)
    for i in range(len(x)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return float("nan")


def accuracy_at(fractions, accuracies, fraction: float) -> float:
    x, y = np.asarray(fractions, float), np.asarray(accuracies, float)
    if not len(x) or fraction < x[0] or fraction > x[-1]:
        return float("nan")
    return float(np.interp(fraction, x, y))


def table(name: str, rows: list[dict], full: tuple[float, float]) -> str:
    full_mean, full_std = full
    head = ["strategy", "n"] + [f"{100 * f:g}%" for f in FRACTIONS] + [
        "AUBC", "acc@20% / full", "labels to 95% of full"]
    lines = [f"### {name}", "",
             f"Full supervision (all train labels): {_pm(full_mean, full_std)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: -r["aubc_mean"] if np.isfinite(r["aubc_mean"]) else 0):
        at20 = accuracy_at(row["fractions"], row["accuracy_mean"], 0.2)
        reach = labels_to_reach(row["fractions"], row["accuracy_mean"], 0.95 * full_mean)
        cells = [_pm(m, s) for m, s in zip(row["accuracy_mean"], row["accuracy_std"])]
        lines.append("| " + " | ".join([
            row["configuration"], f"{row['n_complete']}/{row['n_trials']}", *cells,
            _pm(row["aubc_mean"], row["aubc_std"]),
            f"{100 * at20 / full_mean:.0f}%" if full_mean > 0 else "",
            "" if not np.isfinite(full_mean) else
            f"{100 * reach:.0f}%" if np.isfinite(reach) else f"> {100 * FRACTIONS[-1]:g}%",
        ]) + " |")
    return "\n".join(lines) + "\n"


def _pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return ""
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def run_dir_of(out: Path, name: str, row: str, seed: int) -> Path:
    return out / "runs" / name / f"{row.replace(' ', '_')}-seed{seed}"


def planned(datasets: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """(data set, seed) in the order they run: the first data set's seeds first (the headline
    comparison), then one seed of every other data set before the next seed of any."""
    first, others = datasets[0], datasets[1:]
    return [(first, s) for s in seeds] + [(d, s) for s in seeds for d in others]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--strategies", nargs="+", default=[r[0] for r in RUNS])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="campaigns at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "label_efficiency")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override every campaign's config, e.g. for a GPU cluster: "
                             "--set model.name=resnet18 --set model.width=64 --set train.epochs=100 "
                             "(use another --out: finished runs are not rerun)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="subtomograms simulated per class (default: 40 SHREC, 14 built-in)")
    parser.add_argument("--report-only", action="store_true",
                        help="summarise the finished campaigns under --out, run nothing")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.per_class:
        for settings in DATASETS.values():
            settings["per_class"] = args.per_class
    runs = [r for r in RUNS if r[0] in args.strategies]
    started = time.perf_counter()
    if not args.report_only:
        run_all(args, runs)
    results = {(name, row, seed): state
               for name in args.datasets for row in [FULL] + [r[0] for r in runs]
               for seed in args.seeds
               if (state := finished_state(run_dir_of(args.out, name, row, seed)))}
    expected = len(args.datasets) * len(args.seeds) * (len(runs) + 1)
    report = [f"Campaigns: {', '.join(CAMPAIGN[:6] + args.set)}, labelled fractions "
              f"{', '.join(f'{100 * f:g}%' for f in FRACTIONS)}; seeds {args.seeds}; "
              f"{len(results)} of {expected} campaigns finished"
              + ("" if args.report_only else f" ({time.perf_counter() - started:.0f} s)") + ".", ""]
    for name in args.datasets:
        report.append(summarise_dataset(name, results, runs, args.seeds, args.out))
    text = "\n".join(report)
    (args.out / "results.md").write_text(text)
    print("\n" + text)


def run_all(args, runs: list) -> None:
    """Every campaign not yet finished, `--jobs` at a time, in the planned order."""
    pools = {name: simulate(name, args.out) for name in args.datasets}
    tasks = {}  # future → (data set, row name, seed)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as executor:
        for name, seed in planned(args.datasets, args.seeds):
            info = pools[name]
            n_train = _train_count(info)
            jobs = [(FULL, full_supervision_sets(seed, n_train))]
            jobs += [(run[0], campaign_sets(run, seed, n_train)) for run in runs]
            for row, sets in jobs:
                sets = sets + args.set
                run_dir = run_dir_of(args.out, name, row, seed)
                if finished_state(run_dir):
                    continue
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                tasks[executor.submit(run_one, info.path, str(run_dir), sets)] = (name, row, seed)
        for done, future in enumerate(as_completed(tasks), 1):
            name, row, seed = tasks[future]
            state = future.result()
            last = state["cycles"][-1]
            print(f"[{done}/{len(tasks)} {time.perf_counter() - started:.0f} s] {name} {row} "
                  f"seed {seed}: test {last.get('test_accuracy', float('nan')):.3f} at "
                  f"{100 * last['labelled_fraction']:.0f}% ({state['seconds']:.0f} s)", flush=True)


def finished_state(run_dir: Path) -> dict | None:
    path = run_dir / "state.json"
    state = json.loads(path.read_text()) if path.exists() else None
    return state if state and state.get("done") else None


def summarise_dataset(name: str, results: dict, runs: list, seeds: list[int], out: Path) -> str:
    full = mean_std([results[(name, FULL, s)]["cycles"][-1]["test_accuracy"]
                     for s in seeds if (name, FULL, s) in results])
    trials = [{
        "configuration": row, "values": {"strategy": row}, "seed": seed, "n_cycles": len(FRACTIONS),
        "cycles": [c for c in results[(name, row, seed)]["cycles"] if c.get("trained")],
    } for row, _, _ in runs for seed in seeds if (name, row, seed) in results]
    if not trials:
        return f"### {name}\n\nNo finished campaigns.\n"
    rows = summarise(trials)
    plot_sweep(rows, out / f"{name}.png", title=f"{name} (full supervision {full[0]:.3f})")
    return table(name, rows, full)


def _train_count(info) -> int:
    from orchestrator.pool import read_index

    split = read_index(info.path, ["split"]).column("split").fill_null("train").to_pylist()
    return split.count("train")


if __name__ == "__main__":
    main()
