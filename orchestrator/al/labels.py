"""The label ledger: an append-only, human-readable record of every label ever given.

One CSV file (`labels.csv` in a run directory), one line per label event:

    subtomo_id,label,cycle,source,annotator,time

`label` is a class index (0..num_classes-1) or JUNK (-1: "not a particle", a real answer that
keeps the item out of training and out of future queries). The latest entry for an id is its
current label; with `override` an earlier answer can be corrected, and both stay in the history.

Writes are all-or-nothing: a batch is validated whole, then old and new lines go to a temp file
that replaces the ledger atomically, so a crash leaves the previous ledger intact. A damaged
ledger is an error naming the line, never silently shortened. One writer at a time is assumed;
a ledger changed on disk by someone else is re-read before the next append.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Collection, Iterable, Sequence

from orchestrator.data.pool import JUNK, fsync_dir, write_error
from orchestrator.faults import maybe_fault

LEDGER_FILE = "labels.csv"
FIELDS = ("subtomo_id", "label", "cycle", "source", "annotator", "time")
SOURCES = ("simulated_oracle", "person", "import", "initial")
JUNK_NAMES = ("junk",)
MAX_LISTED_PROBLEMS = 20  # the message lists this many; `.problems` keeps them all


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LedgerError(ValueError):
    """A label batch, import file or ledger file that cannot be accepted; every problem found
    is in `.problems` (one line each, naming the row), and the message lists them."""

    def __init__(self, summary: str, problems: Sequence[str] = ()):
        self.problems = list(problems)
        listed = "".join(f"\n  - {p}" for p in self.problems[:MAX_LISTED_PROBLEMS])
        more = len(self.problems) - MAX_LISTED_PROBLEMS
        if more > 0:
            listed += f"\n  ... and {more} more"
        super().__init__(summary + listed)


@dataclass(frozen=True)
class LabelRecord:
    subtomo_id: str
    label: int
    cycle: int
    source: str
    annotator: str = ""
    time: str = ""  # filled with now (UTC) when empty

    def __post_init__(self):
        for name in ("label", "cycle"):
            value = getattr(self, name)
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise TypeError(f"LabelRecord.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy ints become plain ints
        if not self.time:
            object.__setattr__(self, "time", utc_now())


class LabelLedger:
    def __init__(self, path: str | Path, *, known_ids: Collection[str] | None, num_classes: int):
        """Open the ledger at `path` (a labels.csv file, or a run directory to hold one).

        known_ids: the pool's subtomogram ids (None: any id is accepted).
        num_classes: labels are 0..num_classes-1, or JUNK.
        The file is not created until the first append.
        """
        path = Path(path)
        self.path = path / LEDGER_FILE if path.is_dir() else path
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.known_ids = known_ids
        self._history: list[LabelRecord] = []
        self._current: dict[str, int] = {}
        self._stamp: tuple[int, int] | None = None
        self._load()

    # -- reading

    def history(self) -> list[LabelRecord]:
        """Every entry, in the order written."""
        self._refresh()
        return list(self._history)

    def current(self) -> dict[str, int]:
        """The latest label of each labelled id."""
        self._refresh()
        return dict(self._current)

    def labelled_ids(self) -> set[str]:
        """Ids with a label, JUNK included (they are answered, and never asked again)."""
        self._refresh()
        return set(self._current)

    def __len__(self) -> int:
        self._refresh()
        return len(self._history)

    # -- writing

    def append(self, records: Iterable[LabelRecord], *, override: bool = False) -> int:
        """Validate every record, then write the new ones atomically; returns how many were new.

        Refused (LedgerError, nothing written) if any record has an unknown id, a label out of
        range, a bad source/cycle/time, gives an already-labelled id a different label (unless
        override), or gives one id two different labels in this batch. Re-stating an id's current
        label is a no-op.
        """
        records = list(records)
        return self._append(records, [f"record {i + 1}" for i in range(len(records))], override,
                            f"refused {len(records)} label record(s); nothing was written")

    def import_labels(
        self,
        csv_path: str | Path,
        *,
        cycle: int,
        source: str = "person",
        annotator: str = "",
        override: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> int:
        """Append the labels of a `subtomo_id,label` CSV file, all or nothing; returns how many
        were new. A label is a class index, "junk"/-1, or (given class_names) a class name.
        Every problem (malformed row, unknown id, conflict...) is reported with its line number."""
        csv_path = Path(csv_path)
        records, where, problems = _parse_import(csv_path, cycle, source, annotator, class_names)
        summary = f"cannot import labels from {csv_path}; nothing was written"
        return self._append(records, where, override, summary, problems)

    def check(self, records: Iterable[LabelRecord], *, override: bool = False) -> list[str]:
        """The problems for which `append` would refuse these records (none: it would accept
        them); nothing is written. For callers that must report a refusal before writing."""
        records = list(records)
        return self._sort(records, [f"record {i + 1}" for i in range(len(records))], override)[1]

    def _append(self, records, where, override, summary, problems=()) -> int:
        new, problems = self._sort(records, where, override, problems)
        if problems:
            raise LedgerError(f"{summary} ({len(problems)} problem(s)):", problems)
        if new:
            self._write(self._history + new)
            self._history.extend(new)
            self._current.update((r.subtomo_id, r.label) for r in new)
        return len(new)

    def _sort(self, records, where, override, problems=()) -> tuple[list[LabelRecord], list[str]]:
        """The records that would be new, and every reason to refuse the batch."""
        self._refresh()
        problems = list(problems)
        new: list[LabelRecord] = []
        in_batch: dict[str, tuple[int, str]] = {}  # id -> (label, where) given earlier in this batch
        for record, here in zip(records, where):
            bad = self._check(record)
            if bad:
                problems.extend(f"{here}: {reason}" for reason in bad)
                continue
            sid = record.subtomo_id
            earlier = in_batch.get(sid)
            if earlier is not None:
                if earlier[0] != record.label:
                    problems.append(
                        f"{here}: {sid!r} labelled {record.label} but {earlier[1]} labels it {earlier[0]}"
                    )
                continue  # the same label twice in one batch is one label
            in_batch[sid] = (record.label, here)
            old = self._current.get(sid)
            if old == record.label:
                continue  # re-stating a label changes nothing
            if old is not None and not override:
                problems.append(
                    f"{here}: {sid!r} is already labelled {old}; refusing {record.label} "
                    "(pass override to correct it)"
                )
                continue
            new.append(record)
        return new, problems

    def _check(self, record: LabelRecord) -> list[str]:
        bad = []
        sid = record.subtomo_id
        if not isinstance(sid, str) or not sid.strip():
            bad.append("blank subtomo_id")
        elif sid != sid.strip() or any(c in sid for c in "\r\n"):
            bad.append(f"subtomo_id {sid!r} has surrounding spaces or line breaks")
        elif self.known_ids is not None and sid not in self.known_ids:
            bad.append(f"unknown subtomo_id {sid!r} (not in the pool)")
        if record.label != JUNK and not 0 <= record.label < self.num_classes:
            bad.append(f"label {record.label} outside 0..{self.num_classes - 1} (or {JUNK} for junk)")
        if record.cycle < 0:
            bad.append(f"cycle {record.cycle} is negative")
        if record.source not in SOURCES:
            bad.append(f"source {record.source!r} is not one of {SOURCES}")
        if not isinstance(record.annotator, str) or any(c in record.annotator for c in "\r\n"):
            bad.append(f"annotator {record.annotator!r} must be one line of text")
        if not _is_utc_time(record.time):
            bad.append(f"time {record.time!r} is not an ISO-8601 UTC time")
        return bad

    def _write(self, records: list[LabelRecord]) -> None:
        # Old and new lines to a temp file, then one atomic rename: a crash at any point leaves
        # either the old ledger or the new one. Stale temp files (a crash before the rename) are
        # never read: only `labels.csv` is.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as err:  # read-only run directory
            raise write_error(self.path, err) from err
        try:
            with os.fdopen(fd, "w", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(FIELDS)
                for r in records:
                    writer.writerow((r.subtomo_id, r.label, r.cycle, r.source, r.annotator, r.time))
                f.flush()
                os.fsync(f.fileno())
            maybe_fault("ledger-temp-written")
            os.replace(tmp, self.path)
        except BaseException as err:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(err, OSError):  # e.g. a full disk: name the ledger, say it is intact
                raise write_error(self.path, err) from err
            raise
        fsync_dir(self.path.parent)
        self._stamp = _stamp(self.path)

    # -- loading

    def _refresh(self) -> None:
        if _stamp(self.path) != self._stamp:
            self._load()

    def _load(self) -> None:
        stamp = _stamp(self.path)
        history: list[LabelRecord] = []
        if stamp is not None and stamp[1] > 0:
            history = self._read(self.path)
        self._history = history
        self._current = {}
        for r in history:
            self._current[r.subtomo_id] = r.label
        self._stamp = stamp

    def _read(self, path: Path) -> list[LabelRecord]:
        problems: list[str] = []
        records: list[LabelRecord] = []
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"{path}: cannot read the label ledger ({err})") from err
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
            if header is None or tuple(header) != FIELDS:
                raise LedgerError(f"{path} line 1: header {header} is not {','.join(FIELDS)}")
            for row in reader:
                here = f"{path} line {reader.line_num}"
                if len(row) != len(FIELDS):
                    problems.append(f"{here}: {len(row)} fields, expected {len(FIELDS)}")
                    continue
                sid, label, cycle, source, annotator, time = row
                label_i, cycle_i = _int_or_none(label), _int_or_none(cycle)
                if label_i is None or cycle_i is None:
                    problems.append(f"{here}: label {label!r} and cycle {cycle!r} must be integers")
                    continue
                if not time:
                    problems.append(f"{here}: missing time")
                    continue
                record = LabelRecord(sid, label_i, cycle_i, source, annotator, time)
                problems.extend(f"{here}: {reason}" for reason in self._check(record))
                records.append(record)
        except csv.Error as err:
            problems.append(f"{path} line {reader.line_num}: {err}")
        if problems:
            raise LedgerError(f"{path}: the label ledger is damaged or does not fit this pool "
                              f"({len(problems)} problem(s)):", problems)
        return records


# ---------------------------------------------------------------------------------------------


def _parse_import(csv_path: Path, cycle, source, annotator, class_names):
    """Rows of an import file as records, with their line numbers and any malformed-row problems."""
    names = _name_index(class_names)
    records, where, problems = [], [], []
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often add a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise LedgerError(f"cannot import labels from {csv_path}: {err}") from err
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    columns = [h.strip() for h in header] if header else []
    missing = [c for c in ("subtomo_id", "label") if c not in columns]
    if missing:
        raise LedgerError(
            f"cannot import labels from {csv_path}; nothing was written:",
            [f"{csv_path} line 1: header {header} lacks column(s) {', '.join(missing)}"],
        )
    id_col, label_col = columns.index("subtomo_id"), columns.index("label")
    try:
        for row in reader:
            here = f"{csv_path} line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue  # blank lines (a trailing one is common)
            if len(row) != len(columns):
                kind = "extra fields" if len(row) > len(columns) else "missing fields"
                problems.append(f"{here}: {kind}: {len(row)} fields for {len(columns)} columns")
                continue
            sid, raw = row[id_col].strip(), row[label_col].strip()
            if not sid:
                problems.append(f"{here}: blank subtomo_id")
                continue
            label = _label_value(raw, names)
            if label is None:
                allowed = "a class index, -1 or 'junk'"
                if names:
                    allowed += f", or a class name ({', '.join(map(str, class_names))})"
                problems.append(f"{here}: label {raw!r} is not {allowed}")
                continue
            try:
                records.append(LabelRecord(sid, label, cycle, source, annotator))
            except TypeError as err:
                raise LedgerError(f"cannot import labels from {csv_path}: {err}") from err
            where.append(here)
    except csv.Error as err:
        problems.append(f"{csv_path} line {reader.line_num}: {err}")
    return records, where, problems


def parse_label(text: str, class_names: Sequence[str] | None = None) -> int | None:
    """The label an import file's cell states (class index, -1/"junk", or a class name), as
    `import_labels` reads it; None if it states none of these."""
    return _label_value(text.strip(), _name_index(class_names))


def _name_index(class_names: Sequence[str] | None) -> dict[str, int]:
    return {} if class_names is None else {str(n).strip().lower(): i for i, n in enumerate(class_names)}


def _label_value(raw: str, names: dict[str, int]) -> int | None:
    key = raw.lower()
    if key in JUNK_NAMES:
        return JUNK
    if key in names:
        return names[key]
    return _int_or_none(raw)


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    if not text.isascii() or not text.lstrip("+-").isdigit() or text.count("-") + text.count("+") > 1:
        return None
    return int(text)


def _is_utc_time(text: str) -> bool:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return False
    return when.utcoffset() == timedelta(0)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size
