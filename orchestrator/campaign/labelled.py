"""The pool's index and the labelled set, as the campaign reads them: pool rows, not ids.

`PoolView` is the pool's index loaded once (ids, splits, ground truth; no volumes).
`LabelledSet` is the ledger's answers turned into pool rows at one moment of the campaign: the
one in-memory view of the labelled set that every step reads, built from the ledger (the
record on disk, `orchestrator/al/labels.py`) whenever a step needs it. Junk is an answer, not
a class: a row answered junk is labelled (never a candidate again, never unlabelled data to
learn from) but is no training pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from orchestrator.al.labels import JUNK
from orchestrator.data.ids import IdRows, strings_of
from orchestrator.data.pool import PoolInfo, read_index

__all__ = ["UNKNOWN", "PoolView", "LabelledSet"]

UNKNOWN = -2  # PoolView.truth of a row with no ground truth (JUNK, -1, is a known answer)


@dataclass
class PoolView:
    """The pool's index, loaded once (no volumes)."""

    info: PoolInfo
    ids: np.ndarray  # str, by row
    split_codes: np.ndarray  # int8, by row: the position of its split in split_names
    split_names: tuple[str, ...]  # the pool's splits ("train" where it has none)
    truth: np.ndarray  # int, by row: a class, JUNK (not a particle) or UNKNOWN
    _by_id: IdRows | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, info: PoolInfo) -> "PoolView":
        index = read_index(info.path, ["row", "subtomo_id", "split", "label"])
        row = index.column("row").to_numpy()
        if not (row[1:] > row[:-1]).all():  # written in row order, as a pool is: no sorted copy
            index = index.sort_by("row")
        split = index.column("split").fill_null("train").combine_chunks().dictionary_encode()
        truth = index.column("label").fill_null(UNKNOWN).to_numpy().astype(np.int64)
        return cls(info, strings_of(index.column("subtomo_id")), split.indices.to_numpy().astype(np.int8),
                   tuple(split.dictionary.to_pylist()), truth)

    def in_split(self, split: str) -> np.ndarray:
        """A mask by row: which rows are in `split` (a code a row, not a string: 1 byte, not 20)."""
        if split not in self.split_names:
            return np.zeros(len(self.split_codes), dtype=bool)
        return self.split_codes == self.split_names.index(split)

    def rows_of(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.in_split(split))

    def scored_rows_of(self, split: str) -> np.ndarray:
        """The split's rows of a real class: accuracy is measured on particles only (a junk
        row has no class to get right)."""
        return np.flatnonzero(self.in_split(split) & (self.truth >= 0))

    def rows_of_ids(self, subtomo_ids) -> np.ndarray:
        """The pool rows of subtomogram ids, aligned with them; -1 for an id not in the pool."""
        return self.id_rows().rows_of(subtomo_ids)

    def row_of(self, subtomo_id: str) -> int:
        """The pool row of a subtomogram id (KeyError if the pool has none)."""
        return self.id_rows()[subtomo_id]

    def known_ids(self) -> IdRows:
        """What the ledger checks an answer's id against (``in``)."""
        return self.id_rows()

    def id_rows(self) -> IdRows:
        """Subtomogram id → row, built on first use (sorted ids: ~40 bytes a row)."""
        if self._by_id is None:
            self._by_id = IdRows(self.ids)
        return self._by_id


@dataclass(frozen=True, eq=False)
class LabelledSet:
    """Every answered subtomogram as a pool row with its answer, and the train split they come
    from: what is labelled, what is not, what training learns from."""

    rows: np.ndarray  # int64, sorted: the pool rows of every answer in the ledger, junk included
    answers: np.ndarray  # int64, aligned with rows: a class or JUNK
    train_rows: np.ndarray  # int64, sorted: the train split, where candidates come from

    @classmethod
    def of(cls, answers: Mapping[str, int], view: PoolView) -> "LabelledSet":
        """From the ledger's current answers (subtomogram id → class or JUNK)."""
        rows = view.rows_of_ids(answers.keys())
        if (rows < 0).any():
            raise KeyError(f"not in the pool: {list(answers)[int(np.argmax(rows < 0))]!r}")
        labels = np.fromiter(answers.values(), dtype=np.int64, count=len(answers))
        order = np.argsort(rows, kind="stable")
        return cls(rows[order], labels[order], view.rows_of("train").astype(np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def contains(self, rows) -> np.ndarray:
        """Which of ``rows`` are labelled (a boolean mask aligned with them)."""
        return np.isin(np.asarray(rows, dtype=np.int64), self.rows)

    def answers_of(self, rows) -> np.ndarray:
        """The answers for labelled ``rows`` (each must be labelled), aligned with them."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.searchsorted(self.rows, rows)
        if len(rows) and (position.max() >= len(self.rows) or (self.rows[position] != rows).any()):
            raise KeyError("answers_of: some rows are not labelled")
        return self.answers[position]

    def label_or_none(self, rows) -> list[int | None]:
        """Each row's answer, or None where it has none (the predictions' label column)."""
        rows = np.asarray(rows, dtype=np.int64)
        position = np.searchsorted(self.rows, rows).clip(max=max(len(self.rows) - 1, 0))
        found = (len(self.rows) > 0) & (self.rows[position] == rows) if len(self.rows) else \
            np.zeros(len(rows), dtype=bool)
        return [int(self.answers[p]) if hit else None for p, hit in zip(position, found)]

    @property
    def unlabelled(self) -> np.ndarray:
        """Train-split rows nobody has answered yet. Junk answers are answered: a volume a
        person called junk is neither a class to learn nor an unlabelled one to learn from."""
        # both sorted and unique: numpy's own check sorts them again, ~0.2 s at 300,000 rows
        return np.setdiff1d(self.train_rows, self.rows, assume_unique=True)

    def training_pairs(self, junk_label: int | None = None) -> list[tuple[int, int]]:
        """(pool row, class) of every labelled subtomogram, by row. Junk answers are left out,
        or, given ``junk_label`` (the model's junk output, after the real classes), learnt as it."""
        if junk_label is not None:
            answers = np.where(self.answers == JUNK, junk_label, self.answers)
            return list(zip(self.rows.tolist(), answers.tolist()))
        keep = self.answers != JUNK
        return list(zip(self.rows[keep].tolist(), self.answers[keep].tolist()))
