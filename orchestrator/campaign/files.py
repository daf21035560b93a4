"""The run directory's campaign files: state.json, each cycle's selection.csv, metrics.csv with
learning_curve.png, and predictions.parquet. Each is written whole or not at all (atomic
replace), so a campaign killed at any point finds either the old file or the new one.

The rest of the run directory has its own writers: labels.csv the ledger
(`orchestrator/al/labels.py`), queries the file oracle (`orchestrator/al/oracle.py`), model.pt
the Train loop (`orchestrator/nn/cycle.py`), scores the scoring pass
(`orchestrator/distributed/score.py`), report.html `report.py`, progress.json `progress.py`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.al.oracle import Query
from orchestrator.data.pool import atomic_write_text

__all__ = ["STATE", "SELECTION", "PREDICTIONS", "METRIC_COLUMNS", "load_state", "save_state",
           "write_selection", "read_selection", "write_metrics", "plot_learning_curve",
           "write_predictions"]

STATE = "state.json"
SELECTION = "selection.csv"  # in a cycle directory
PREDICTIONS = "predictions.parquet"
METRIC_COLUMNS = [
    "cycle", "labelled", "labelled_fraction", "val_accuracy", "test_accuracy",
    "seconds_train", "seconds_score", "seconds_select", "best_epoch", "classifier",
    "agreement", "uncertainty",
]


def load_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.exists() else None


def save_state(run_dir: Path, state: dict) -> None:
    atomic_write_text(Path(run_dir) / STATE, json.dumps(state, indent=2, default=_json))


def write_selection(path: Path, queries: list[Query]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "subtomo_id", "source", "pred", "pred_prob", "chosen_by"])
    for q in queries:
        writer.writerow([q.row, q.subtomo_id, q.source, q.pred, q.pred_prob, q.chosen_by])
    atomic_write_text(path, buffer.getvalue())


def read_selection(path: Path) -> list[Query]:
    with open(path, newline="") as f:
        return [  # chosen_by: absent from runs written before it existed
            Query(int(r["row"]), r["subtomo_id"], r["source"], int(r["pred"]), float(r["pred_prob"]),
                  r.get("chosen_by") or "")
            for r in csv.DictReader(f)
        ]


def write_metrics(run_dir: Path, cycles: list[dict], class_names) -> None:
    """metrics.csv (one row per trained cycle) and learning_curve.png, rebuilt from the state."""
    trained = [c for c in cycles if c.get("trained")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(METRIC_COLUMNS + [f"accuracy_{name}" for name in class_names])
    for c in trained:
        per_class = list(c.get("per_class_accuracy") or []) + [float("nan")] * len(class_names)
        writer.writerow([_fmt(c.get(k, "")) for k in METRIC_COLUMNS]
                        + [_fmt(a) for a in per_class[:len(class_names)]])
    metrics, curve = Path(run_dir) / "metrics.csv", Path(run_dir) / "learning_curve.png"
    if _same_text(metrics, buffer.getvalue()) and (curve.exists() or not trained):
        return  # saved again with no new metric: the plot (~0.5 s with matplotlib's import) stands
    if trained:  # the plot before the numbers: a crash between the two leaves metrics.csv stale, so redrawn
        plot_learning_curve(trained, curve)
    atomic_write_text(metrics, buffer.getvalue())


def _same_text(path: Path, text: str) -> bool:
    """Whether the file holds exactly `text` (csv's \\r\\n line ends kept: newline="")."""
    if not path.exists():
        return False
    with open(path, newline="") as f:
        return f.read() == text


def plot_learning_curve(cycles: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * c["labelled_fraction"] for c in cycles]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for key, label in (("test_accuracy", "test"), ("val_accuracy", "validation")):
        axis.plot(x, [c.get(key, float("nan")) for c in cycles], marker="o", label=label)
    axis.set_xlabel("labelled (% of the train split)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_predictions(run_dir: Path, scores_dir: Path, class_names, labelled) -> Path:
    """predictions.parquet from the final model's scoring pass over every subtomogram: its
    class and probability (and how likely it is junk, from a model with a junk output), and
    the ledger's answer where there is one (``labelled``, a ``LabelledSet``)."""
    out = Path(run_dir) / PREDICTIONS
    tmp = out.with_name(f".{PREDICTIONS}.tmp")
    writer = None
    for part in sorted(Path(scores_dir).glob("*.parquet")):
        junk = ["junk_prob"] if "junk_prob" in pq.read_schema(part).names else []
        table = pq.read_table(part, columns=["row", "subtomo_id", "pred", "pred_prob", "entropy", *junk])
        if not table.num_rows:
            continue
        pred = table.column("pred").to_numpy()
        table = table.append_column("pred_class", pa.array([class_names[p] for p in pred]))
        table = table.append_column(
            "label", pa.array(labelled.label_or_none(table.column("row").to_numpy()), type=pa.int32())
        )
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()
        tmp.replace(out)
    return out


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _json(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
