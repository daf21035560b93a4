"""A sweep's results: what a trial reports after each cycle, summaries over seeds, and the
results files (results.csv, results.md, trials.csv, sweep.png), rebuilt from the trials' run
directories alone. No Ray."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from orchestrator.campaign.metrics import aubc
from orchestrator.data.pool import atomic_write_text
from orchestrator.sweep.spec import format_value

RUNS = "runs"  # in a sweep directory: each trial's campaign run directory


def cycle_metrics(records: list[dict]) -> dict:
    """What a trial reports after a cycle: that cycle's accuracies and the running AUBCs."""
    last = records[-1]
    fractions = [r["labelled_fraction"] for r in records]
    return {
        "cycle": int(last["cycle"]),
        "labelled": int(last["labelled"]),
        "labelled_fraction": float(last["labelled_fraction"]),
        "val_accuracy": float(last.get("val_accuracy", float("nan"))),
        "test_accuracy": float(last.get("test_accuracy", float("nan"))),
        "aubc": aubc(fractions, [r.get("test_accuracy", float("nan")) for r in records]),
        "val_aubc": aubc(fractions, [r.get("val_accuracy", float("nan")) for r in records]),
    }


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the finite values; std is NaN for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarise(trials: list[dict]) -> list[dict]:
    """One row per configuration (grid point minus seed), in the order first seen.

    trials: {configuration, values, seed, n_cycles (of its schedule), cycles: [trained records]}.
    Accuracy at the i-th budget is over the trials that reached it; AUBC over complete trials
    only (a curve cut short by early stopping has a different range).
    """
    groups: dict[str, list[dict]] = {}
    for trial in trials:
        groups.setdefault(trial["configuration"], []).append(trial)
    rows = []
    for configuration, members in groups.items():
        length = max(t["n_cycles"] for t in members)
        complete = [t for t in members if len(t["cycles"]) >= t["n_cycles"]]
        fractions, acc_mean, acc_std, reached = [], [], [], []
        for i in range(length):
            at = [t["cycles"][i] for t in members if len(t["cycles"]) > i]
            fractions.append(float(np.mean([c["labelled_fraction"] for c in at])) if at else float("nan"))
            m, s = mean_std([c.get("test_accuracy") for c in at])
            acc_mean.append(m)
            acc_std.append(s)
            reached.append(len(at))
        aubcs = [aubc([c["labelled_fraction"] for c in t["cycles"]],
                      [c.get("test_accuracy", float("nan")) for c in t["cycles"]]) for t in complete]
        a_mean, a_std = mean_std(aubcs)
        rows.append({
            "configuration": configuration, "values": dict(members[0]["values"]),
            "n_trials": len(members), "n_complete": len(complete), "fractions": fractions,
            "accuracy_mean": acc_mean, "accuracy_std": acc_std, "n_at": reached,
            "aubc_mean": a_mean, "aubc_std": a_std,
        })
    return rows


def budget_columns(rows: list[dict]) -> list[str]:
    """The labelled fractions of all rows as column labels (10.0%), sorted."""
    found = {_pct(f) for row in rows for f in row["fractions"] if np.isfinite(f)}
    return sorted(found, key=lambda label: float(label.rstrip("%")))


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _pm(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return ""
    return f"{mean:.3f}" if not np.isfinite(std) else f"{mean:.3f} ± {std:.3f}"


def results_csv(rows: list[dict]) -> str:
    columns = budget_columns(rows)
    axes = list(dict.fromkeys(k for row in rows for k in row["values"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["configuration", *axes, "n_trials", "n_complete", "aubc_mean", "aubc_std",
                     *[f"acc@{c}_{stat}" for c in columns for stat in ("mean", "std")]])
    for row in rows:
        at = {_pct(f): (m, s) for f, m, s in
              zip(row["fractions"], row["accuracy_mean"], row["accuracy_std"])}
        cells = []
        for c in columns:
            m, s = at.get(c, (float("nan"), float("nan")))
            cells += [_num(m), _num(s)]
        writer.writerow([row["configuration"], *[format_value(row["values"].get(a, "")) for a in axes],
                         row["n_trials"], row["n_complete"], _num(row["aubc_mean"]),
                         _num(row["aubc_std"]), *cells])
    return buffer.getvalue()


def results_markdown(rows: list[dict], title: str = "") -> str:
    columns = budget_columns(rows)
    lines = [f"### {title}", ""] if title else []
    lines += [
        "Test accuracy at each labelled fraction of the train split and AUBC (area under that "
        "curve over its range, 0–1), mean ± std over seeds; n = complete trials / trials.",
        "",
        "| configuration | n | " + " | ".join(columns) + " | AUBC |",
        "|---|---|" + "---|" * len(columns) + "---|",
    ]
    for row in rows:
        at = {_pct(f): _pm(m, s) for f, m, s in
              zip(row["fractions"], row["accuracy_mean"], row["accuracy_std"])}
        lines.append(
            f"| {row['configuration']} | {row['n_complete']}/{row['n_trials']} | "
            + " | ".join(at.get(c, "") for c in columns)
            + f" | {_pm(row['aubc_mean'], row['aubc_std'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    # the default cycle repeats after 10 colours: more lines get tab20's 20
    colours = plt.cm.tab20.colors if len(rows) > 10 else [None] * len(rows)
    for row, colour in zip(rows, colours):
        x = 100 * np.asarray(row["fractions"])
        m, s = np.asarray(row["accuracy_mean"]), np.asarray(row["accuracy_std"])
        (line,) = axis.plot(x, m, marker="o", markersize=3, label=row["configuration"], color=colour)
        band = np.isfinite(s)
        if band.any():
            axis.fill_between(x[band], (m - s)[band], (m + s)[band], color=line.get_color(), alpha=0.15)
    axis.set_xlabel("labelled (% of the train split)")
    axis.set_ylabel("test accuracy")
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _num(value: float) -> str:
    return f"{value:.4f}" if np.isfinite(value) else ""


# -- the sweep directory -----------------------------------------------------------------------
def collect_trials(sweep_dir: Path, points: list[dict]) -> list[dict]:
    """Each point's trained cycles, read from its campaign's state.json (the ground truth: Tune's
    own records can lag a kill)."""
    trials = []
    for point in points:
        path = Path(sweep_dir) / RUNS / point["name"] / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        trained = [c for c in state.get("cycles", []) if c.get("trained")]
        n_cycles = len(state.get("schedule", [])) or point.get("n_cycles") or 1
        trials.append({**point, "n_cycles": n_cycles, "cycles": trained})
    return trials


def write_results(sweep_dir: Path, points: list[dict], title: str = "") -> list[dict]:
    sweep_dir = Path(sweep_dir)
    trials = collect_trials(sweep_dir, points)
    rows = summarise(trials)
    atomic_write_text(sweep_dir / "results.csv", results_csv(rows))
    atomic_write_text(sweep_dir / "results.md", results_markdown(rows, title))
    atomic_write_text(sweep_dir / "trials.csv", trials_csv(trials))
    plot_sweep(rows, sweep_dir / "sweep.png", title)
    return rows


def trials_csv(trials: list[dict]) -> str:
    keys = ["labelled", "labelled_fraction", "val_accuracy", "test_accuracy", "seconds_train",
            "seconds_score"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "configuration", "seed", "cycle", *keys])
    for t in trials:
        for c in t["cycles"]:
            writer.writerow([t["name"], t["configuration"], "" if t["seed"] is None else t["seed"],
                             c["cycle"], *[_cell(c.get(k)) for k in keys]])
    return buffer.getvalue()


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
