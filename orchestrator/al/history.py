"""A campaign's history as a strategy may read it: plain data, rebuilt from the run directory.

A strategy that learns across cycles (``albl``) declares ``needs_history``; the loop then reads
its past from the files that are the campaign's source of truth: each cycle's
``cycles/cNN/selection.csv`` (the queries, which base strategy chose each, the model's
prediction when it was asked), the ledger's current answers (``labels.csv``) and each cycle's
validation accuracy (``state.json``). The strategy keeps no memory of its own, so a resumed
campaign makes the same choices as one never interrupted.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["UNANSWERED", "CycleSelection", "CampaignHistory", "read_history"]

UNANSWERED = -2  # a query with no answer in the ledger (JUNK, -1, is an answer)


@dataclass(frozen=True, eq=False)
class CycleSelection:
    """One cycle's queries, in the order they were chosen, and what came of them."""

    cycle: int
    rows: np.ndarray  # int64 pool rows
    chosen_by: tuple[str, ...]  # the (base) strategy that chose each query
    pred: np.ndarray  # int64: the model's class for each query when it was chosen (-1: none)
    answers: np.ndarray  # int64: the ledger's current answer (class, JUNK or UNANSWERED)
    val_accuracy: float  # of the model trained once this cycle's labels were in (NaN: not yet)

    def __post_init__(self):
        n = len(self.rows)
        if not (len(self.chosen_by) == len(self.pred) == len(self.answers) == n):
            raise ValueError(f"cycle {self.cycle}: rows, chosen_by, pred and answers differ in length")


@dataclass(frozen=True)
class CampaignHistory:
    """Cycles 0 … c−1 of a campaign selecting for cycle c, in cycle order."""

    cycles: tuple[CycleSelection, ...] = ()


def read_history(run_dir: str | Path, state: Mapping, answers: Mapping[str, int],
                 before_cycle: int) -> CampaignHistory:
    """The history a strategy selecting for ``before_cycle`` sees: cycles 0 … before_cycle−1
    from their selection.csv (a cycle without one is skipped), ``answers`` the ledger's current
    labels by subtomogram id, validation accuracies from ``state``'s cycle records."""
    records = list(state.get("cycles", []))
    cycles = []
    for cycle in range(before_cycle):
        path = Path(run_dir) / "cycles" / f"c{cycle:02d}" / "selection.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        record = records[cycle] if cycle < len(records) else {}
        val = record.get("val_accuracy")
        cycles.append(CycleSelection(
            cycle=cycle,
            rows=np.asarray([int(r["row"]) for r in rows], dtype=np.int64),
            chosen_by=tuple(r.get("chosen_by") or "" for r in rows),
            pred=np.asarray([int(r.get("pred") or -1) for r in rows], dtype=np.int64),
            answers=np.asarray([answers.get(r["subtomo_id"], UNANSWERED) for r in rows],
                               dtype=np.int64),
            val_accuracy=math.nan if val is None else float(val),
        ))
    return CampaignHistory(tuple(cycles))
