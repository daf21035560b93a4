"""A browser page for the person in the loop: label the waiting cycle's queries.

    python orchestrator/run.py annotate RUN_DIR [--port 8765] [--host 127.0.0.1] [--continue]

Serves the cycle that FileOracle left waiting (`cycles/cNN/queries/queries.csv` whose ids the
ledger does not all hold) on 127.0.0.1 and prints the URL; it opens nothing by itself. The page
shows each query's central XY/XZ/YZ slices (or a few-slice average), the model's top-3 classes,
class buttons with keyboard shortcuts, "junk" and "unsure", undo and progress; similar queries sit
together (by predicted class, or for cycle 0 by a cheap look-alike clustering of the slices).

Where labels go: every answer rewrites the cycle's draft `cycles/cNN/queries/labels.csv`, the very
file `run.py --resume RUN_DIR` imports through the ledger, so the ledger's history gets one entry
per final answer, written by the same import as the file-based flow (a mis-click undone here never
reaches it). Each answer is first checked with the ledger's own rules (`LabelLedger.check`), so a
refusal shows on the page at once, not at resume. Writes are atomic and serialised by one lock:
two tabs take turns, and a tab that relabels a query another tab changed since it looked is
refused (409) instead of overwriting it. "unsure" is never written to the draft; it is kept in
`annotate_unsure.json` beside it so that a reload still counts it.

Safe by default: loopback binding, a Host/Origin check against DNS rebinding and cross-site posts,
JSON-only POST bodies of at most 64 KiB, images addressed by query index (no request ever names a
file), and a page that builds its DOM with textContent under a hash-pinned Content-Security-Policy.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.al.labels import JUNK, LabelLedger, LabelRecord, LedgerError, parse_label
from orchestrator.al.selection_math import kmeans, nearest
from orchestrator.campaign.progress import STATUS, duration_text
from orchestrator.campaign.rundir_lock import RunDirLock, RunDirLockError
from orchestrator.config import PROJECT_ROOT, load_config
from orchestrator.data.ids import IdRows, strings_of
from orchestrator.data.images import VIEWS, slice_views, to_png
from orchestrator.data.pool import (
    PoolError, PoolInfo, atomic_write_text, decode_volumes, iter_rows, open_pool, read_index,
)

PAGE_FILE = Path(__file__).with_name("page.html")
DEFAULT_PORT = 8765
MAX_BODY = 64 * 1024  # a label is ~100 bytes; anything bigger is not one
DRAIN_LIMIT = 1024 * 1024  # an oversized body up to this is read and dropped, so the 413 arrives
UNSURE_FILE = "annotate_unsure.json"
RESUME_LOG = "resume.log"
REFERENCE_PER_CLASS = 200  # earlier labels per class in the reference average (bounds start-up)
SLICE_BATCH_ROWS = 64  # volumes decoded at a time when reading slices (8 MB at 32³ float32)
CONTROL_KEYS = "jruz"  # junk, reference, unsure, undo: never a class shortcut
CLASS_KEYS = "123456789" + "".join(c for c in "abcdefghijklmnopqrstuvwxyz" if c not in CONTROL_KEYS)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AnnotateError(RuntimeError):
    """The run directory cannot be served as asked; the message says why and what to do."""


class ApiError(Exception):
    """A refused request: HTTP status, a message the page shows, and the ledger's problems."""

    def __init__(self, status: int, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.status = status
        self.problems = list(problems)


# -- one cycle's queries, loaded once ---------------------------------------------------------


@dataclass
class Item:
    n: int  # position in queries.csv (the png/ file number too): what URLs name
    subtomo_id: str
    source: str
    row: int
    top3: list[tuple[int, float]]
    group: str = ""
    slices: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


@dataclass
class Cycle:
    number: int
    folder: Path
    items: list[Item]  # in display order: look-alikes together
    reference: dict[int, dict[str, np.ndarray]]  # class -> view -> sum of earlier labels' slices
    reference_counts: dict[int, int]

    def __post_init__(self):
        self.by_id = {item.subtomo_id: item for item in self.items}
        self.by_n = {item.n: item for item in self.items}

    @property
    def draft_path(self) -> Path:
        return self.folder / "labels.csv"


def cycle_folder(run_dir: Path, cycle: int) -> Path:
    return Path(run_dir) / "cycles" / f"c{cycle:02d}" / "queries"


def read_query_ids(folder: Path) -> list[dict]:
    with open(folder / "queries.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def pending_cycle(run_dir: Path, labelled: set[str]) -> int | None:
    """The first cycle whose queries.csv holds an id without a label (`labelled`: the ledger's)."""
    numbers = sorted(
        int(m.group(1)) for p in (Path(run_dir) / "cycles").glob("c*/queries/queries.csv")
        if (m := re.fullmatch(r"c(\d+)", p.parent.parent.name))
    )
    for number in numbers:
        if any(r["subtomo_id"] not in labelled for r in read_query_ids(cycle_folder(run_dir, number))):
            return number
    return None


def load_cycle(run_dir: Path, number: int, info: PoolInfo, row_of: Mapping[str, int],
               labels: dict[str, int]) -> Cycle:
    """Cycle `number`'s queries with their slices and top-3; `labels`: the ledger's current."""
    folder = cycle_folder(run_dir, number)
    rows = read_query_ids(folder)
    unknown = [r["subtomo_id"] for r in rows if r["subtomo_id"] not in row_of]
    if unknown:
        raise AnnotateError(f"{folder / 'queries.csv'}: {len(unknown)} ids are not in the pool "
                            f"{info.path} (first: {unknown[0]!r})")
    items = [Item(n, r["subtomo_id"], r.get("source", ""), row_of[r["subtomo_id"]], [])
             for n, r in enumerate(rows)]
    top3 = read_top3(Path(run_dir) / "cycles" / f"c{number - 1:02d}" / "scores",
                     [it.row for it in items]) if number > 0 else {}
    names = list(info.class_names)
    for item, r in zip(items, rows):
        item.top3 = top3.get(item.row) or _predicted_only(r, names)

    asked = set(row_of[it.subtomo_id] for it in items)
    per_class: dict[int, list[int]] = {}
    for sid, label in labels.items():
        row = row_of.get(sid)
        if label != JUNK and row is not None and row not in asked:
            chosen = per_class.setdefault(label, [])
            if len(chosen) < REFERENCE_PER_CLASS:
                chosen.append(row)
    wanted = sorted(asked | {r for rows_ in per_class.values() for r in rows_})
    slices = read_slices(info, wanted)
    for item in items:
        item.slices = slices[item.row]
    reference = {c: _sum_slices([slices[r] for r in rs]) for c, rs in per_class.items()}
    counts = {c: len(rs) for c, rs in per_class.items()}
    return Cycle(number, folder, order_items(items, names), reference, counts)


def _predicted_only(row: dict, names: list[str]) -> list[tuple[int, float]]:
    name = row.get("predicted") or ""
    if name not in names:
        return []
    try:
        prob = float(row.get("predicted_prob", "nan"))
    except ValueError:
        prob = float("nan")
    return [(names.index(name), prob)]


def read_top3(scores_dir: Path, rows: Sequence[int]) -> dict[int, list[tuple[int, float]]]:
    """The three most probable classes of each asked row, from the scoring pass that chose them."""
    found: dict[int, list[tuple[int, float]]] = {}
    wanted = np.asarray(sorted(set(rows)), dtype=np.int64)
    for part in sorted(Path(scores_dir).glob("*.parquet")):
        if "probs" not in pq.read_schema(part).names:
            continue
        table = pq.read_table(part, columns=["row", "probs"])
        table_rows = table.column("row").to_numpy()
        hit = np.isin(table_rows, wanted)
        if not hit.any():
            continue
        probs = probability_matrix(table.column("probs").filter(pa.array(hit)))
        for row, p in zip(table_rows[hit], probs):
            best = np.argsort(-p, kind="stable")[:3]
            found[int(row)] = [(int(c), float(p[c])) for c in best]
    return found


def probability_matrix(column) -> np.ndarray:
    """A probs column as float [N, C], whether Ray's tensor extension type is registered in this
    process (importing ray would cost seconds here) or Parquet hands back its list storage."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)):
        raise AnnotateError(f"scores column probs has type {array.type}, expected a tensor column")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), -1).astype(np.float64) if len(array) else np.zeros((0, 0))


def read_slices(info: PoolInfo, rows: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """Slice views of the given pool rows, read as the campaign reads volumes (`pool.iter_rows`:
    only the row groups that hold them, several at once), a batch of volumes in memory at a time."""
    wanted = np.unique(np.asarray(list(rows), dtype=np.int64))
    out: dict[int, dict[str, np.ndarray]] = {}
    try:
        for table in iter_rows(info.path, wanted, ["volume"], batch_rows=SLICE_BATCH_ROWS):
            volumes = decode_volumes(table.column("volume"), info)
            for row, volume in zip(table.column("row").to_numpy(), volumes):
                out[int(row)] = slice_views(volume)
    except PoolError as err:
        raise AnnotateError(f"the queried or labelled subtomograms' volumes: {err}") from err
    return out


def _sum_slices(stack: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.sum([s[key] for s in stack], axis=0) for key in stack[0]} if stack else {}


def order_items(items: list[Item], names: list[str]) -> list[Item]:
    """Look-alikes together, as the connectomics study found faster to label: by predicted class
    (surest first) when the model predicted, else by clusters of the slices themselves."""
    if items and all(it.top3 for it in items):
        for it in items:
            it.group = f"predicted {names[it.top3[0][0]]}"
        return sorted(items, key=lambda it: (it.top3[0][0], -_finite(it.top3[0][1]), it.n))
    features = np.stack([_features(it.slices) for it in items]) if items else np.zeros((0, 1))
    cluster, centres = kmeans(features, max(1, len(names)), rng=None, iterations=25)
    distance = np.sqrt(nearest(features, centres)[1]) if len(items) else np.zeros(0)
    first = {}
    for c in cluster:  # groups in the order their first member was asked
        first.setdefault(int(c), len(first))
    for c, it in zip(cluster, items):
        it.group = f"look-alike group {first[int(c)] + 1}"
    order = sorted(range(len(items)), key=lambda i: (first[int(cluster[i])], distance[i], items[i].n))
    return [items[i] for i in order]


def _finite(value: float) -> float:
    return value if np.isfinite(value) else -1.0


def _features(slices: dict[str, np.ndarray], side: int = 8) -> np.ndarray:
    """The few-slice averages shrunk to side×side block means (blocks, not single pixels: a
    shift of a voxel or two must not make two copies of a particle look different)."""
    parts = []
    for view in VIEWS:
        image = slices[view + "_avg"].astype(np.float64)
        ys = np.linspace(0, image.shape[0], min(side, image.shape[0]) + 1).astype(int)
        xs = np.linspace(0, image.shape[1], min(side, image.shape[1]) + 1).astype(int)
        sums = np.add.reduceat(np.add.reduceat(image, ys[:-1], axis=0), xs[:-1], axis=1)
        parts.append((sums / np.outer(np.diff(ys), np.diff(xs))).ravel())
    vector = np.concatenate(parts)
    return (vector - vector.mean()) / (vector.std() + 1e-9)


# -- the application: state, answers, finishing -----------------------------------------------


def resume_command(run_dir: Path) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "orchestrator" / "run.py"), "--resume", str(run_dir)]


def pool_path(run_dir: Path) -> str:
    """The campaign's pool: as state.json records it, else as configured, else the simulated one."""
    state = run_dir / "state.json"
    if state.is_file():
        recorded = json.loads(state.read_text()).get("pool")
        if recorded:
            return str(recorded)
    if (run_dir / "config.yaml").is_file():
        configured = load_config(run_dir / "config.yaml").data.pool
        if configured:
            return str(configured)
    return str(run_dir / "pool")


class Annotator:
    """Everything the pages ask, answered under one lock (requests arrive on many threads)."""

    def __init__(self, run_dir: str | Path, *, info: PoolInfo | None = None,
                 continue_campaign: bool = False, command: Sequence[str] | None = None):
        self.run_dir = Path(run_dir)
        no_cycles = AnnotateError(f"{self.run_dir}: not a run directory with cycles (no cycles/)")
        if not self.run_dir.is_dir():
            raise no_cycles
        try:  # one writer per run directory: not beside a campaign (even one still starting) or another page
            self._lockfile = RunDirLock(self.run_dir, "the labelling page").acquire()
        except RunDirLockError as err:
            raise AnnotateError(str(err)) from None
        self.continue_campaign = continue_campaign
        self.command = list(command) if command else resume_command(self.run_dir)
        self._lock = threading.RLock()
        try:
            if not (self.run_dir / "cycles").is_dir():
                raise no_cycles
            try:
                self.info = info or open_pool(pool_path(self.run_dir))
            except PoolError as err:
                raise AnnotateError(f"{self.run_dir}: cannot open the campaign's pool: {err}") from err
            index = read_index(self.info.path, ["row", "subtomo_id"])
            self.row_of = IdRows(strings_of(index.column("subtomo_id")), index.column("row").to_numpy())
            self.ledger = LabelLedger(self.run_dir / "labels.csv", known_ids=self.row_of,
                                      num_classes=self.info.num_classes)
            self.names = list(self.info.class_names)
            self.label_text = [_label_text(i, self.names) for i in range(len(self.names))]
            self.cycle: Cycle | None = None
            self.draft: dict[str, int] = {}
            self.unsure: set[str] = set()
            self.resume = {"state": "idle", "log": "", "message": ""}
            self.checked = False
            self.epoch = 0  # changes with the cycle: pages start over
            number = pending_cycle(self.run_dir, self.ledger.labelled_ids())
            if number is not None:
                self._open(number, self.ledger.current())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lockfile is not None:
            self._lockfile.release()
            self._lockfile = None

    # -- loading

    def _open(self, number: int, labels: dict[str, int]) -> None:
        cycle = load_cycle(self.run_dir, number, self.info, self.row_of, labels)
        draft = self._read_draft(cycle)
        unsure = self._read_unsure(cycle)
        with self._lock:
            self.cycle, self.draft, self.unsure = cycle, draft, unsure
            self.checked = False
            self.epoch += 1

    def _read_draft(self, cycle: Cycle) -> dict[str, int]:
        path = cycle.draft_path
        if not path.exists():
            return {}
        problems, draft = [], {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"subtomo_id", "label"} <= set(reader.fieldnames):
                raise AnnotateError(f"{path}: needs columns subtomo_id,label; fix or remove it")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                sid, raw = (row.get("subtomo_id") or "").strip(), row.get("label") or ""
                if not sid and not raw.strip():
                    continue
                label = parse_label(raw, self.names)
                if sid not in cycle.by_id:
                    problems.append(f"{where}: {sid!r} is not a query of cycle {cycle.number}")
                elif label is None or not (label == JUNK or 0 <= label < len(self.names)):
                    problems.append(f"{where}: label {raw!r} is not a class, index or 'junk'")
                elif draft.get(sid, label) != label:
                    problems.append(f"{where}: {sid!r} is labelled twice, differently")
                else:
                    draft[sid] = label
        if problems:
            raise AnnotateError(f"{path} cannot be continued; fix or remove it:\n  - "
                                + "\n  - ".join(problems[:20]))
        return draft

    def _read_unsure(self, cycle: Cycle) -> set[str]:
        path = cycle.folder / UNSURE_FILE
        try:
            ids = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        except (OSError, ValueError):
            ids = []  # only a counter for the page: a damaged one is not worth refusing to start
        return {i for i in ids if isinstance(i, str) and i in cycle.by_id} if isinstance(ids, list) else set()

    # -- what the page shows

    def _answer(self, sid: str, in_ledger: dict[str, int] | None = None) -> int | str | None:
        """An id's current answer: its class index, JUNK, "unsure" or None."""
        ledger_label = (self.ledger.current() if in_ledger is None else in_ledger).get(sid)
        if ledger_label is not None:
            return ledger_label
        if sid in self.draft:
            return self.draft[sid]
        return "unsure" if sid in self.unsure else None

    def state(self) -> dict:
        with self._lock:
            cycle = self.cycle
            base = {
                "run": self.run_dir.name, "epoch": self.epoch,
                "classes": [{"index": i, "name": n, "key": CLASS_KEYS[i] if i < len(CLASS_KEYS) else ""}
                            for i, n in enumerate(self.names)],
                "continue": self.continue_campaign,
                "resume_command": f"python orchestrator/run.py --resume {shlex.quote(str(self.run_dir))}",
                "resume": self._resume_status(), "checked": self.checked,
            }
            if cycle is None:
                return {**base, "cycle": None, "queries": [], "labelled": 0, "unsure": 0, "total": 0,
                        "complete": False, "references": []}
            in_ledger = self.ledger.current()
            queries, labelled, unsure = [], 0, 0
            for it in cycle.items:
                answer = self._answer(it.subtomo_id, in_ledger)
                labelled += isinstance(answer, int)
                unsure += answer == "unsure"
                queries.append({
                    "n": it.n, "subtomo_id": it.subtomo_id, "source": it.source, "group": it.group,
                    "top3": [{"class": c, "prob": p if np.isfinite(p) else None} for c, p in it.top3],
                    "label": _api_label(answer), "locked": it.subtomo_id in in_ledger,
                })
            return {**base, "cycle": cycle.number, "queries": queries, "labelled": labelled,
                    "unsure": unsure, "total": len(queries), "complete": labelled == len(queries),
                    "references": [{"class": c, "count": n}
                                   for c, n in enumerate(self._reference_counts(in_ledger)) if n]}

    def _resume_status(self) -> dict:
        status = dict(self.resume)
        if status["state"] == "running" and self.cycle is not None:  # its output so far
            try:
                status["log"] = (self.cycle.folder / RESUME_LOG).read_text(errors="replace")[-4000:]
            except OSError:
                pass
            status["waited"] = round(time.time() - status["started"], 1)
            status["progress"] = self._campaign_progress(status["started"])
        return status

    def _campaign_progress(self, since: float) -> dict | None:
        """The resumed campaign's current stage (its progress.json), once it has written one."""
        try:
            progress = json.loads((self.run_dir / STATUS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return progress if isinstance(progress, dict) and progress.get("updated", 0) >= since else None

    def _reference_counts(self, in_ledger: dict[str, int]) -> list[int]:
        counts = [self.cycle.reference_counts.get(c, 0) for c in range(len(self.names))]
        for it in self.cycle.items:
            answer = self._answer(it.subtomo_id, in_ledger)
            if isinstance(answer, int) and answer != JUNK:
                counts[answer] += 1
        return counts

    def slice_png(self, n: int, view: str, average: bool, cycle: int | None) -> bytes:
        with self._lock:
            current = self._current_cycle(cycle)
            item = current.by_n.get(n)
            if item is None:
                raise ApiError(404, f"no query {n} in cycle {current.number}")
            image = item.slices[view + ("_avg" if average else "")]
        return to_png(image)

    def reference_png(self, label: int, view: str, average: bool, cycle: int | None) -> bytes:
        with self._lock:
            current = self._current_cycle(cycle)
            if not 0 <= label < len(self.names):
                raise ApiError(404, f"no class {label}")
            key = view + ("_avg" if average else "")
            total = current.reference.get(label, {}).get(key)
            count = current.reference_counts.get(label, 0)
            in_ledger = self.ledger.current()
            for it in current.items:
                if self._answer(it.subtomo_id, in_ledger) == label:
                    total = it.slices[key] if total is None else total + it.slices[key]
                    count += 1
            if total is None:
                raise ApiError(404, f"no subtomogram is labelled {self.names[label]!r} yet")
        return to_png(total / count)

    def _current_cycle(self, cycle: int | None) -> Cycle:
        if self.cycle is None:
            raise ApiError(404, "no cycle is waiting for labels")
        if cycle is not None and cycle != self.cycle.number:
            raise ApiError(404, f"cycle {cycle} is not the one being labelled ({self.cycle.number})")
        return self.cycle

    # -- answering

    def answer(self, body: dict) -> dict:
        """Record one answer: {subtomo_id, label: class index | "junk" | "unsure" | null (clear),
        expect: the answer the page last saw, cycle}. Refusals raise ApiError; nothing changes."""
        sid = body.get("subtomo_id")
        if not isinstance(sid, str):
            raise ApiError(400, "subtomo_id must be a string")
        new = _parse_api_label(body.get("label"), "label")
        expect = _parse_api_label(body.get("expect"), "expect")
        with self._lock:
            if self.resume["state"] == "running":
                raise ApiError(409, "the campaign is resuming; labels are closed until it waits again")
            cycle = self._current_cycle(None)
            if "cycle" in body and body["cycle"] != cycle.number:
                raise ApiError(409, f"this page shows cycle {body['cycle']}, but cycle {cycle.number} "
                                    "is being labelled now; reload the page")
            if sid not in cycle.by_id:
                raise ApiError(422, f"unknown subtomo_id {sid!r}: not a query of cycle {cycle.number}")
            if isinstance(new, int) and new != JUNK and not 0 <= new < len(self.names):
                raise ApiError(422, f"label {new} is not a class: valid are 0..{len(self.names) - 1} "
                                    f"({', '.join(self.names)}), 'junk' or 'unsure'")
            current = self._answer(sid)
            if new == current:
                return self.state()  # already so (e.g. two tabs gave the same answer)
            in_ledger = self.ledger.current().get(sid)
            if in_ledger is not None and new != in_ledger:
                raise ApiError(422, f"{sid!r} is already labelled {self._describe(in_ledger)} in the "
                                    "ledger; a correction goes through the ledger's override, not this page")
            if current != expect:
                raise ApiError(409, f"{sid!r} is now {self._describe(current)} (changed elsewhere, e.g. "
                                    "in another tab); the page has been refreshed, answer again if needed")
            if isinstance(new, int):
                record = LabelRecord(sid, new, cycle.number, self._source(cycle))
                problems = self.ledger.check([record])
                if problems:
                    raise ApiError(422, f"the ledger refuses {sid!r} = {self._describe(new)}", problems)
            draft, unsure = dict(self.draft), set(self.unsure)
            draft.pop(sid, None)
            unsure.discard(sid)
            if isinstance(new, int) and in_ledger is None:
                draft[sid] = new
            elif new == "unsure":
                unsure.add(sid)
            if draft != self.draft:
                self._write_draft(cycle, draft)
            if unsure != self.unsure:
                atomic_write_text(cycle.folder / UNSURE_FILE, json.dumps(sorted(unsure), indent=0))
            self.draft, self.unsure, self.checked = draft, unsure, False
            return self.state()

    def _write_draft(self, cycle: Cycle, draft: dict[str, int]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["subtomo_id", "label"])
        for it in sorted(cycle.items, key=lambda it: it.n):
            if it.subtomo_id in draft:
                label = draft[it.subtomo_id]
                writer.writerow([it.subtomo_id, "junk" if label == JUNK else self.label_text[label]])
        atomic_write_text(cycle.draft_path, buffer.getvalue())

    def finish(self) -> dict:
        """Check the draft exactly as `--resume` will import it (on a copy of the ledger); then
        either say how to continue, or (--continue) run the resume in the background."""
        with self._lock:
            cycle = self._current_cycle(None)
            if self.resume["state"] == "running":
                raise ApiError(409, "the campaign is already resuming")
            state = self.state()
            if not state["complete"]:
                raise ApiError(409, f"{state['total'] - state['labelled']} of {state['total']} queries "
                                    f"are still unanswered ({state['unsure']} marked unsure)")
            self._dry_run(cycle)
            self.checked = True
            if self.continue_campaign:
                self.resume = {"state": "running", "log": "", "message": "resuming the campaign…",
                               "started": time.time()}
                threading.Thread(target=self._resume, args=(cycle,), daemon=True).start()
            return self.state()

    def _dry_run(self, cycle: Cycle) -> None:
        if not cycle.draft_path.exists():
            return  # every query was already in the ledger
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "labels.csv"
            if self.ledger.path.exists():
                shutil.copyfile(self.ledger.path, copy)
            trial = LabelLedger(copy, known_ids=self.ledger.known_ids, num_classes=len(self.names))
            try:
                trial.import_labels(cycle.draft_path, cycle=cycle.number, source=self._source(cycle),
                                    class_names=self.names)
            except LedgerError as err:
                raise ApiError(422, "the ledger would refuse this cycle's labels",
                               err.problems or [str(err)]) from None
            got, in_ledger = trial.current(), self.ledger.current()
            wrong = [it.subtomo_id for it in cycle.items
                     if got.get(it.subtomo_id) != self._answer(it.subtomo_id, in_ledger)]
            if wrong:
                raise ApiError(422, f"the labels file would be read differently for {len(wrong)} queries "
                                    f"(first: {wrong[0]!r}); is a class name ambiguous?")

    def _resume(self, cycle: Cycle) -> None:
        log_path = cycle.folder / RESUME_LOG
        try:
            env, fds = self._lockfile.handoff()  # the resume writes in this page's stead
            with open(log_path, "wb") as log:
                # in the server's working directory, like a --resume typed where it was started
                code = subprocess.run(self.command, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, pass_fds=fds).returncode
            self._lockfile.write_holder()
            tail = log_path.read_text(errors="replace")[-4000:]
            waited = time.time() - self.resume["started"]
        except OSError as err:
            code, tail = -1, str(err)
        if code != 0:
            with self._lock:
                self.resume = {"state": "failed", "log": tail,
                               "message": f"the resume exited with status {code}; see {log_path}"}
            return
        try:
            # A ledger of its own: the request threads keep using theirs meanwhile.
            labels = LabelLedger(self.ledger.path, known_ids=self.ledger.known_ids,
                                 num_classes=len(self.names)).current()
            number = pending_cycle(self.run_dir, set(labels))
            if number is not None and number != cycle.number:
                self._open(number, labels)
                waited = time.time() - self.resume["started"]  # until the page can show them
                message = (f"the campaign trained on your labels and now waits for cycle {number}: "
                           f"its queries were ready {duration_text(waited)} after you pressed Finish")
            elif number is None:
                with self._lock:
                    self.cycle = None
                    self.epoch += 1
                message = "the campaign has no more queries: it finished or needs no person now"
            else:
                message = f"the resume ended but cycle {number} still waits; see {log_path}"
        except (AnnotateError, PoolError, OSError, ValueError) as err:
            message = f"the resume ran, but the next cycle cannot be shown: {err}"
        with self._lock:
            self.resume = {"state": "done", "log": tail, "message": message, "waited": round(waited, 1)}

    def _source(self, cycle: Cycle) -> str:
        return "initial" if cycle.number == 0 else "person"  # as FileOracle imports it

    def _describe(self, answer) -> str:
        if answer is None:
            return "unanswered"
        if answer == "unsure":
            return "unsure"
        if answer == JUNK:
            return "junk"
        return repr(self.names[answer])


def _label_text(index: int, names: list[str]) -> str:
    """How the draft file states a class so that the import reads it back as the same class:
    its name where unambiguous (readable), else its index."""
    for text in (names[index], str(index)):
        if parse_label(text, names) == index and "\n" not in text and text == text.strip():
            return text
    return str(index)  # no unambiguous spelling: the dry run at finish reports it


def _api_label(answer) -> int | str | None:
    return "junk" if answer == JUNK else answer


def _parse_api_label(value, what: str) -> int | str | None:
    if value is None or value in ("junk", "unsure"):
        return JUNK if value == "junk" else value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{what} must be a class index, 'junk', 'unsure' or null")
    return value


# -- HTTP -------------------------------------------------------------------------------------


def load_page() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that allows exactly its inline script and style."""
    text = PAGE_FILE.read_text(encoding="utf-8")
    hashes = {}
    for tag in ("script", "style"):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
        hashes[tag] = " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies
        )
    policy = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
              "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    return text.encode("utf-8"), policy


class AnnotateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, annotator: Annotator, host: str = "127.0.0.1", port: int = DEFAULT_PORT):
        self.annotator = annotator
        self.page, self.policy = load_page()
        super().__init__((host, port), _Handler)
        self.port = self.server_address[1]
        # A page on another site may not use this server through a DNS name that points here.
        self.loopback = host in LOOPBACK
        self.hosts = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    @property
    def url(self) -> str:
        host = self.server_address[0]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.port}/"


class _Handler(BaseHTTPRequestHandler):
    server: AnnotateServer
    server_version = "cryoal-annotate"
    sys_version = ""
    timeout = 30  # a client that stops sending mid-request frees its thread

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # a request log would bury the URL and the messages that matter

    # -- routing

    def do_GET(self):
        self._serve(self._get)

    def do_HEAD(self):
        self._send(405, b"", "text/plain")

    def do_POST(self):
        self._serve(self._post)

    def _serve(self, route) -> None:
        try:
            self._check_host()
            route(urlsplit(self.path))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the browser went away (a reload): nothing to answer
        except ApiError as err:
            self._json(err.status, {"error": str(err), "problems": err.problems})
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            self._json(500, {"error": f"internal error: {type(err).__name__}: {err}", "problems": []})

    def _check_host(self) -> None:
        host = self.headers.get("Host", "")
        if self.server.loopback and host not in self.server.hosts:
            raise ApiError(403, "this server answers only to its loopback address")
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and origin != f"http://{host}":
            raise ApiError(403, "cross-origin request refused")

    def _get(self, url) -> None:
        app = self.server.annotator
        if url.path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": self.server.policy})
            return
        if url.path == "/api/state":
            self._json(200, app.state())
            return
        match = re.fullmatch(r"/api/(slices|reference)/(\d{1,9})\.png", url.path)
        if match is None:
            raise ApiError(404, "not found")
        view, average, cycle = _image_query(url.query)
        index = int(match.group(2))
        if match.group(1) == "slices":
            self._send(200, app.slice_png(index, view, average, cycle), "image/png")
        else:
            self._send(200, app.reference_png(index, view, average, cycle), "image/png")

    def _post(self, url) -> None:
        app = self.server.annotator
        if url.path not in ("/api/label", "/api/finish"):
            raise ApiError(404, "not found")
        body = self._read_json()
        self._json(200, app.answer(body) if url.path == "/api/label" else app.finish())

    def _read_json(self) -> dict:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "send a Content-Length, not a chunked body")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None or not raw_length.isdigit():
            self.close_connection = True
            raise ApiError(411, "a Content-Length is required")
        length = int(raw_length)
        if length > MAX_BODY:
            self.close_connection = True
            if length <= DRAIN_LIMIT:
                self.rfile.read(length)
            raise ApiError(413, f"request body of {length} bytes refused (at most {MAX_BODY})")
        data = self.rfile.read(length)
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "send application/json")
        try:
            body = json.loads(data.decode("utf-8")) if data else {}
        except (UnicodeDecodeError, ValueError) as err:
            raise ApiError(400, f"malformed JSON: {err}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    # -- responses

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _send(self, status: int, body: bytes, kind: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")
        headers = {"Cache-Control": "no-store", **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _image_query(query: str) -> tuple[str, bool, int | None]:
    try:
        params = parse_qs(query, strict_parsing=bool(query), max_num_fields=8)
    except ValueError:
        raise ApiError(400, "malformed query string") from None
    view = params.get("view", ["xy"])[-1]
    if view not in VIEWS:
        raise ApiError(400, f"view must be one of {', '.join(VIEWS)}")
    average = params.get("avg", ["0"])[-1]
    if average not in ("0", "1"):
        raise ApiError(400, "avg must be 0 or 1")
    cycle = params.get("cycle", [None])[-1]
    if cycle is not None and not cycle.isdigit():
        raise ApiError(400, "cycle must be a number")
    return view, average == "1", None if cycle is None else int(cycle)


# -- command line -----------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="orchestrator/run.py annotate",
        description="Serve the waiting cycle's queries as a labelling page in the browser.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the campaign's run directory")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"default {DEFAULT_PORT}; 0 = any free port")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only). Another "
                             "address lets anyone who reaches it read and write the labels.")
    parser.add_argument("--continue", dest="continue_campaign", action="store_true",
                        help="when every query is labelled and Finish is pressed, run "
                             "`run.py --resume RUN_DIR` and show the next cycle's queries")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        annotator = Annotator(args.run_dir, continue_campaign=args.continue_campaign)
    except (AnnotateError, LedgerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = annotator.state()
    if state["cycle"] is None:
        annotator.close()
        print(f"{args.run_dir}: no cycle is waiting for labels (the ledger answers every query "
              f"under cycles/). If the campaign has not finished, continue it with:\n"
              f"  {state['resume_command']}")
        return 1
    try:
        server = AnnotateServer(annotator, args.host, args.port)
    except OSError as err:
        annotator.close()
        print(f"error: cannot listen on {args.host}:{args.port}: {err} (try --port)", file=sys.stderr)
        return 2
    print(f"cycle {state['cycle']}: {state['labelled']} of {state['total']} queries labelled")
    if args.host not in LOOPBACK:
        print(f"warning: listening on {args.host}: anyone who can reach it can read and change the labels")
    print(f"open {server.url} in a browser; Ctrl-C stops the server", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        annotator.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
