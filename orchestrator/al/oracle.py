"""Who answers the queries: the pool's ground truth (simulation) or a person (via files).

Both return label records; the campaign writes them through the ledger, whose validation is
the one gate every label passes.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.al.labels import LabelLedger, LabelRecord
from orchestrator.data.images import slices_png
from orchestrator.data.pool import PoolInfo, atomic_write_text, decode_volumes, iter_rows


class AwaitingLabels(RuntimeError):
    """The person in the loop has queries to answer; the message says what to do."""


@dataclass(frozen=True)
class Query:
    """One subtomogram to label, with what the person needs to see about it."""

    row: int
    subtomo_id: str
    source: str
    pred: int = -1
    pred_prob: float = float("nan")
    chosen_by: str = ""  # the strategy that chose it (for albl, its base strategy)


class SimulatedOracle:
    """Answers from the pool's ground-truth `label` column."""

    source = "simulated_oracle"

    def __init__(self, truth: dict[str, int]):
        self.truth = truth

    def answer(self, queries: list[Query], cycle: int, ledger: LabelLedger, run_dir: Path) -> int:
        missing = [q.subtomo_id for q in queries if self.truth.get(q.subtomo_id) is None]
        if missing:
            raise ValueError(
                f"the simulated oracle needs ground-truth labels; {len(missing)} queried "
                f"subtomograms have none (first: {missing[0]!r}). Use oracle: file for real data."
            )
        source = "initial" if cycle == 0 else self.source
        records = [
            LabelRecord(q.subtomo_id, int(self.truth[q.subtomo_id]), cycle, source, "simulation")
            for q in queries
        ]
        return ledger.append(records)


class FileOracle:
    """The person in the loop: writes the cycle's queries (CSV, RELION STAR, one PNG each) and
    stops; `run.py --resume RUN_DIR` then imports the filled labels file through the ledger."""

    source = "person"

    def __init__(self, info: PoolInfo):
        self.info = info

    def answer(self, queries: list[Query], cycle: int, ledger: LabelLedger, run_dir: Path) -> int:
        folder = run_dir / "cycles" / f"c{cycle:02d}" / "queries"
        labels_file = folder / "labels.csv"
        if not (folder / "queries.csv").exists():
            write_queries(queries, folder, self.info)
        if not labels_file.exists():
            raise AwaitingLabels(
                f"cycle {cycle}: {len(queries)} subtomograms to label.\n"
                f"  queries:   {folder / 'queries.csv'} (and queries.star, png/)\n"
                f"  fill in:   {labels_file}  (columns subtomo_id,label; label = class index, "
                f"class name or 'junk')\n"
                f"  classes:   {', '.join(f'{i}={n}' for i, n in enumerate(self.info.class_names))}\n"
                f"  then run:  python orchestrator/run.py --resume {run_dir}"
            )
        added = ledger.import_labels(
            labels_file, cycle=cycle, source="initial" if cycle == 0 else self.source,
            class_names=list(self.info.class_names),
        )
        asked = {q.subtomo_id for q in queries}
        unanswered = asked - ledger.labelled_ids()
        if unanswered:
            raise AwaitingLabels(
                f"cycle {cycle}: {labels_file} answers {len(asked) - len(unanswered)} of "
                f"{len(asked)} queries; still missing e.g. {sorted(unanswered)[:3]}"
            )
        return added


def write_queries(queries: list[Query], folder: Path, info: PoolInfo) -> None:
    """queries.csv, queries.star and png/<n>.png (central XY/XZ/YZ slices) for a person."""
    folder.mkdir(parents=True, exist_ok=True)
    names = info.class_names
    rows = [
        {
            "subtomo_id": q.subtomo_id, "source": q.source,
            "predicted": names[q.pred] if 0 <= q.pred < len(names) else "",
            "predicted_prob": f"{q.pred_prob:.3f}", "png": f"png/{n:05d}.png",
        }
        for n, q in enumerate(queries)
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["subtomo_id"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "queries.csv", buffer.getvalue())
    atomic_write_text(folder / "queries.star", _star(queries, names))
    _write_slice_pngs(queries, folder / "png", info)


def _star(queries: list[Query], names) -> str:
    lines = ["", "data_particles", "", "loop_", "_rlnImageName #1", "_cryoalSubtomoId #2",
             "_rlnClassNumber #3", "_cryoalPredictedProbability #4"]
    for q in queries:
        image = q.source.replace(" ", "_") or "."
        lines.append(f"{image}\t{q.subtomo_id}\t{q.pred + 1}\t{q.pred_prob:.4f}")
    return "\n".join(lines) + "\n"


def _write_slice_pngs(queries: list[Query], folder: Path, info: PoolInfo) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if not queries:
        return
    # In pool order, row group by row group: a picture is drawn while the next row groups are
    # read (the reads wait on the disk, the drawing on the CPU; a large pool's queries each
    # sit in a row group of their own, no longer in the page cache after the scoring pass).
    number = {q.row: n for n, q in enumerate(queries)}
    for table in iter_rows(info.path, list(number), ["volume"], batch_rows=1):
        row = int(table.column("row")[0].as_py())
        volume = decode_volumes(table.column("volume"), info)[0]
        (folder / f"{number[row]:05d}.png").write_bytes(slices_png(volume))


def pick_initial(candidate_rows: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The random initial labelled set, drawn from the train split with the campaign's seed."""
    rng = np.random.default_rng([seed, 0xC0FFEE])
    count = min(count, len(candidate_rows))
    return np.sort(rng.choice(candidate_rows, size=count, replace=False))
