"""Ingest subtomograms into a pool, losing nothing: every bad item is named and set aside.

    python -m orchestrator.data.ingest SOURCE --out POOL_DIR [--box N] [--labels labels.npy]
        [--star-labels] [--project-dir DIR] [--class-names a,b,c | --class-names-file F]
        [--voxel-size A] [--dtype float16|float32] [--shard-mb 256] [--overwrite]
        [--copick-tomo-type T] [--copick-voxel-size A] [--copick-user U] [--copick-session S]

SOURCE is a folder of .mrc/.map/.mrcs/.em files (searched recursively, in sorted order), a
RELION/Warp .star particle file, a .npy array [N, D, H, W], or a copick project's config .json
(subtomograms are cut from its tomograms at its picks; the pick's object is the label). Each bad
item is logged with its file and position, written to POOL_DIR/rejects.csv, and skipped; the
rest goes on. docs/INGEST.md lists every reason with its fix. Counts go to
POOL_DIR/ingest_report.json. Exit status: 0 when at least one subtomogram was accepted, 1 when
none was, 2 when the source or the options are unusable, 130 when interrupted.

The pool is built in a new folder beside POOL_DIR and moved into place only when the ingest
has finished: an interrupted ingest, or one that accepts nothing, leaves a previous pool at
POOL_DIR exactly as it was.

The box: --box (other sizes are centre-cropped or mean-padded), else the most common box of the
source (read from the headers first); volumes of another box are rejected as box_mismatch.

Subtomogram ids: `<relative path>` for a single volume, `<relative path>@<section>` (1-based)
for a section of a stack (.mrcs files and MRC volume stacks), `<file name>[<index>]` (0-based,
as numpy counts) for a row of a .npy array, `<run>/<user>_<session>_<object>/<index>` for a
copick pick. A STAR row's id is its image name as written (section@path → path@section), so a
folder ingest and a STAR ingest of the same files agree.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import mmap
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from orchestrator.data import copick_io
from orchestrator.data.copick_io import CopickError, CopickSelection
from orchestrator.data.pool import (
    INDEX_FILE,
    MANIFEST,
    ROW_GROUPS,
    SHARD_DIR,
    VOLUME_DTYPES,
    PoolError,
    PoolInfo,
    PoolWriter,
    as_box,
    atomic_write_text,
    open_pool,
    pool_summary,
)
from orchestrator.data.star import (
    TWO_D_HELP,
    StarError,
    StarFile,
    StarTable,
    find_project_dir,
    parse_star,  # noqa: F401  (part of this module's API: tests and scripts import it from here)
    particle_table,
    read_star,
    two_d_groups,
)
from orchestrator.data.volumes import VOLUME_SUFFIXES, MrcContents, VolumeError, peek_sections, read_sections

log = logging.getLogger("cryoal.ingest")

FOLDER_SUFFIXES = (".mrc", ".map", ".mrcs", ".em")
REJECTS_FILE = "rejects.csv"
REPORT_FILE = "ingest_report.json"
RESIZED_FILE = "resized.csv"
POOL_FILES = {MANIFEST, ROW_GROUPS, INDEX_FILE, SHARD_DIR, REJECTS_FILE, REPORT_FILE, RESIZED_FILE}  # what an ingest writes
REJECT_COLUMNS = ("source", "item", "reason_code", "reason")
MAX_LOGGED_REJECTS = 50  # after this many, rejects go to rejects.csv only (a million bad lines help nobody)

# Reason codes in rejects.csv: one per way an item can be bad (docs/INGEST.md gives each fix).
REASONS = {
    "unreadable": "truncated, damaged or non-MRC/.em file",
    "not_a_volume": "a 2-D image or a stack of 2-D images where a 3-D volume is expected",
    "two_d_stack": "a STAR row of a 2-D tilt-image stack (RELION 5 / Warp pseudo-subtomogram)",
    "complex": "complex-valued voxels (a Fourier transform)",
    "stack_without_section": "a STAR row names a stack without a section number",
    "box_mismatch": "box differs from the pool's",
    "nonfinite": "NaN or Inf voxels",
    "constant": "a constant volume (cannot be normalised)",
    "duplicate_id": "the same subtomogram id was met before",
    "missing_file": "a STAR row names a file that does not exist; a copick run without the tomogram",
    "missing_section": "a STAR row names a section the stack does not have",
    "outside_tomogram": "a copick pick whose box reaches outside the tomogram",
    "bad_row": "a STAR row that cannot be parsed",
    "bad_label": "a label that is not an integer",
    "label_out_of_range": "a label outside the class range",
    "invalid_volume": "refused by the pool writer",
}


class IngestError(ValueError):
    """The whole ingest cannot go on (unusable source or options); nothing item-level."""


@dataclass
class IngestReport:
    source: str
    out: str
    kind: str = ""  # folder, star, npy, copick
    accepted: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    pool_info: PoolInfo | None = None
    box_from: str = ""  # "--box", "most common", "first accepted"
    box_mismatches: dict[str, int] = field(default_factory=dict)  # "64x64x64" -> rejected count
    box_census: dict[str, int] = field(default_factory=dict)  # boxes the headers announced
    voxel_size_unknown: int = 0  # accepted volumes whose header said 0 (recorded null or --voxel-size)
    voxel_sizes_A: dict[str, int] = field(default_factory=dict)  # "10.0" / "null" -> accepted count
    header_faults: dict[str, int] = field(default_factory=dict)  # forgiven header fault -> files
    empty_classes: list[str] = field(default_factory=list)  # class names with no accepted subtomogram
    cropped: int = 0
    padded: int = 0
    ignored_files: int = 0  # files in a source folder without a volume suffix
    ignored_suffixes: dict[str, int] = field(default_factory=dict)
    previous_pool_kept: bool = False  # nothing accepted: the pool already at `out` stays
    rejects_dir: str = ""  # where rejects.csv is (`out`, or beside it when a previous pool was kept)
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "out": self.out,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "box_from": self.box_from,
            "box_census": self.box_census,
            "box_mismatches": self.box_mismatches,
            "voxel_size_unknown": self.voxel_size_unknown,
            "voxel_sizes_A": dict(sorted(self.voxel_sizes_A.items())),
            "header_faults": self.header_faults,
            "empty_classes": self.empty_classes,
            "resized": {"cropped": self.cropped, "padded": self.padded},
            "ignored_files": self.ignored_files,
            "ignored_suffixes": self.ignored_suffixes,
            "pool": None if self.pool_info is None else pool_summary(self.pool_info),
            "class_names": None if self.pool_info is None else list(self.pool_info.class_names),
            "seconds": round(self.seconds, 3),
        }


class _Reject(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class _Candidate:
    """One would-be subtomogram. `load` reads its voxels only after the cheap checks pass, and
    gives (volume, voxel size or None, header faults forgiven)."""

    subtomo_id: str
    source: str  # the file, for rejects.csv
    item: str  # where in the file ("section 3", "row 5 (line 31)", "index 7"; "" = whole file)
    where: str  # the same, for messages: file plus position
    load: Callable[[], tuple[np.ndarray, float | None, tuple[str, ...]]] | None = None
    label: int | None = None
    tomogram: str | None = None
    xyz: tuple[float, float, float] | None = None
    pool_source: str = ""  # the `source` column of the pool
    error: _Reject | None = None


@dataclass
class _Source:
    """What a source gives before any voxel is read: candidates, their count, the boxes the
    headers announce (volumes per box), and the class names."""

    candidates: Iterator[_Candidate]
    total: int
    census: Counter
    names: tuple[str, ...] | None
    unit: str  # what `total` counts, for progress lines


# ---------------------------------------------------------------------------------------------
# Public API


def ingest(
    source: str | Path,
    out: str | Path,
    *,
    box: int | Sequence[int] | None = None,
    labels: str | Path | np.ndarray | None = None,
    star_labels: bool = False,
    project_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    voxel_size: float | None = None,
    dtype: str = "float16",
    shard_mb: float = 256.0,
    overwrite: bool = False,
    copick: CopickSelection | None = None,
    progress_every: int = 1000,
    progress_seconds: float = 5.0,
) -> IngestReport:
    """Ingest SOURCE (folder, .star, .npy or copick config) into a pool at OUT; see the module
    docstring.

    Raises IngestError when the source or options are unusable (an empty folder among them);
    nothing is written then. Bad items never raise: they are counted in the report and listed in
    rejects.csv. When nothing is accepted no pool manifest is written, and a pool already at OUT
    is kept (the rejects then go to OUT.rejected/).
    """
    started = time.monotonic()
    source, out = Path(source), Path(out)
    pool_box = _check_options(source, dtype, shard_mb, voxel_size, box)
    kind = _source_kind(source)
    _check_option_fit(kind, labels, star_labels, project_dir, copick, pool_box)
    _check_out(out, overwrite)
    names = None if class_names is None else _check_class_names(class_names)

    report = IngestReport(source=str(source), out=str(out), kind=kind)
    src = _open_source(kind, source, out, report, names, labels, star_labels, project_dir,
                       copick or CopickSelection(), pool_box)
    pool_box = _choose_box(pool_box, src.census, report)
    stage = _new_stage(out)
    run = _Run(stage, report, pool_box, box is not None, src.names or (), voxel_size, dtype, shard_mb, src.unit)
    try:
        run.consume(src.candidates, src.total, progress_every, progress_seconds)
        run.finish()
        report.seconds = time.monotonic() - started
        atomic_write_text(stage / REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")
        _install(stage, out, report)
    except BaseException:
        run.abandon()
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage message
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        class_names = None
        if args.class_names is not None:
            class_names = [name.strip() for name in args.class_names.split(",")]
        elif args.class_names_file is not None:
            class_names = _read_class_names_file(Path(args.class_names_file))
        copick = CopickSelection(args.copick_tomo_type, args.copick_voxel_size, args.copick_user,
                                 args.copick_session)
        report = ingest(
            args.source, args.out, box=args.box, labels=args.labels, star_labels=args.star_labels,
            project_dir=args.project_dir, class_names=class_names, voxel_size=args.voxel_size,
            dtype=args.dtype, shard_mb=args.shard_mb, overwrite=args.overwrite, copick=copick,
        )
    except KeyboardInterrupt:
        print(f"cryoal-ingest: interrupted; nothing changed at {args.out} (a pool there is as it was)",
              file=sys.stderr)
        return 130
    except (IngestError, PoolError, OSError) as err:
        print(f"cryoal-ingest: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0 if report.accepted else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoal-ingest", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="folder of .mrc/.map/.mrcs/.em, a RELION/Warp .star file, "
                                       "a .npy [N, D, H, W], or a copick config .json")
    parser.add_argument("--out", required=True, help="pool folder to create")
    parser.add_argument("--box", type=int, help="pool box; other sizes are centre-cropped or mean-padded "
                                                "(default: the most common box; required for copick)")
    parser.add_argument("--labels", help="labels.npy of N ints for a .npy source")
    parser.add_argument("--star-labels", action="store_true", help="rlnClassNumber (1-based) becomes the label")
    parser.add_argument("--project-dir", help="RELION project folder that the STAR file's paths are "
                                              "relative to (default: found from default_pipeline.star)")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--class-names", help="comma-separated class names, index 0 first")
    names.add_argument("--class-names-file", help="file with one class name per line")
    parser.add_argument("--voxel-size", type=float, help="Å per voxel for volumes whose header says 0 (unknown)")
    parser.add_argument("--dtype", default="float16", choices=VOLUME_DTYPES)
    parser.add_argument("--shard-mb", type=float, default=256.0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pool at --out "
                                                                 "(only once the new one is complete)")
    parser.add_argument("--copick-tomo-type", help="copick: which tomogram type (default: the only one)")
    parser.add_argument("--copick-voxel-size", type=float, help="copick: which voxel spacing (default: the only one)")
    parser.add_argument("--copick-user", help="copick: only picks by this user id")
    parser.add_argument("--copick-session", help="copick: only picks of this session id")
    return parser


def format_summary(report: IngestReport) -> str:
    lines = [f"ingest of {report.source}: {report.accepted} accepted, {report.rejected} rejected"]
    if report.pool_info is not None:
        info = report.pool_info
        lines.append(
            f"  pool {info.path}: box {_shape(info.box)} ({report.box_from}), {info.dtype}, "
            f"{len(info.shards)} shard(s), {info.num_classes} class(es)"
        )
    elif report.previous_pool_kept:
        lines.append(f"  nothing was accepted: the pool already at {report.out} is kept as it was")
    else:
        lines.append(f"  no pool written at {report.out}: nothing was accepted")
    for code, count in sorted(report.rejected_by_reason.items()):
        lines.append(f"  rejected {code:<22} {count}")
    if report.box_mismatches:
        boxes = ", ".join(f"{box} ×{n}" for box, n in sorted(report.box_mismatches.items(), key=lambda kv: -kv[1]))
        lines.append(f"  box mismatches (rejected): {boxes}; pass --box N to crop or pad them instead")
    if report.rejected:
        lines.append(f"  every rejected item, with its reason: {Path(report.rejects_dir) / REJECTS_FILE}")
    for fault, count in sorted(report.header_faults.items()):
        lines.append(f"  read despite a header fault ({fault}): {count} file(s)")
    if report.voxel_size_unknown:
        lines.append(f"  voxel size unknown (header 0) for {report.voxel_size_unknown} accepted volume(s)")
    if report.empty_classes:
        lines.append(f"  warning: {len(report.empty_classes)} class(es) without any subtomogram: "
                     f"{', '.join(report.empty_classes)} (the classifier still gets an output for each;"
                     " renumber the labels or pass --class-names)")
    if report.ignored_files:
        kinds = ", ".join(f"{s or 'no suffix'} ×{n}" for s, n in sorted(report.ignored_suffixes.items()))
        lines.append(f"  ignored {report.ignored_files} file(s) without a {'/'.join(FOLDER_SUFFIXES)} "
                     f"suffix ({kinds})")
    if report.cropped or report.padded:
        lines.append(
            f"  resized to the box: {report.cropped} cropped, {report.padded} padded "
            f"(see {Path(report.out) / RESIZED_FILE})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Options and the output folder


def _check_options(source: Path, dtype: str, shard_mb: float, voxel_size, box) -> tuple[int, int, int] | None:
    if dtype not in VOLUME_DTYPES:
        raise IngestError(f"--dtype must be one of {VOLUME_DTYPES}, got {dtype!r}")
    if shard_mb <= 0:
        raise IngestError(f"--shard-mb must be positive, got {shard_mb}")
    if voxel_size is not None and not (math.isfinite(voxel_size) and voxel_size > 0):
        raise IngestError(f"--voxel-size must be a positive number of Å, got {voxel_size}")
    pool_box = None if box is None else as_box(box)
    if pool_box is not None and min(pool_box) < 2:
        raise IngestError(f"--box must be at least 2, got {pool_box}")
    if not source.exists():
        raise IngestError(f"{source}: no such file or folder")
    return pool_box


def _check_option_fit(kind: str, labels, star_labels: bool, project_dir, copick, box) -> None:
    if labels is not None and kind != "npy":
        raise IngestError("--labels goes with a .npy source (STAR files carry labels: --star-labels)")
    if star_labels and kind != "star":
        raise IngestError("--star-labels goes with a .star source")
    if project_dir is not None and kind != "star":
        raise IngestError("--project-dir goes with a .star source")
    if project_dir is not None and not Path(project_dir).is_dir():
        raise IngestError(f"--project-dir {project_dir}: no such folder")
    if copick is not None and copick != CopickSelection() and kind != "copick":
        raise IngestError("the --copick-* options go with a copick config .json source")
    if kind == "copick" and box is None:
        raise IngestError("--box is required for a copick project: the edge of the subtomograms to cut")


def _source_kind(source: Path) -> str:
    if source.is_dir():
        return "folder"
    suffix = source.suffix.lower()
    if suffix == ".star":
        return "star"
    if suffix == ".npy":
        return "npy"
    if copick_io.is_copick_config(source):
        return "copick"
    if suffix in VOLUME_SUFFIXES:
        raise IngestError(f"{source}: a single volume file; put it (and the others) in a folder and ingest the folder")
    raise IngestError(f"{source}: expected a folder, a .star file, a .npy file or a copick config .json")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that holds a pool (without --overwrite) or anything an ingest did not write:
    the new pool replaces the whole folder."""
    _recover_swap(out)
    if out.exists() and not out.is_dir():
        raise IngestError(f"{out}: exists and is not a folder")
    if (out / MANIFEST).exists() and not overwrite:
        raise IngestError(f"{out}: a pool already exists there (pass --overwrite to replace it)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in POOL_FILES) if out.is_dir() else []
    if foreign:
        raise IngestError(f"{out}: holds files that are not part of a pool ({', '.join(foreign[:5])}"
                          f"{', …' if len(foreign) > 5 else ''}); an ingest replaces the whole folder, "
                          "so choose a new or empty --out")


def _new_stage(out: Path) -> Path:
    """A fresh folder beside OUT (same filesystem, so the final move is a rename); hidden, so a
    folder ingest of OUT's parent skips it. Leftovers of killed ingests are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f".{out.name}.ingest-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    stage = out.parent / f".{out.name}.ingest-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(stage: Path, out: Path, report: IngestReport) -> None:
    """Move the finished ingest into place. Nothing accepted and a pool already at OUT: that pool
    stays and the rejects go to OUT.rejected/ instead."""
    if not report.accepted and (out / MANIFEST).exists():
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        stage.rename(rejected)
        report.previous_pool_kept, report.rejects_dir = True, str(rejected)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    with _signals_deferred():  # the two renames go together: Ctrl-C waits until both are done
        if out.exists():
            out.rename(old)
        stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    report.rejects_dir = str(out)
    if report.accepted:
        report.pool_info = open_pool(out)


def _recover_swap(out: Path) -> None:
    """A crash between the two renames of _install leaves OUT missing and the previous pool
    under its hidden name: put it back. With OUT in place, such a folder is a replaced pool
    whose removal was cut off."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*")) if out.parent.is_dir() else []
    if olds and not out.exists():
        olds.pop().rename(out)
        log.warning("%s: restored the previous pool (an ingest was cut off while replacing it)", out)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _choose_box(box, census: Counter, report: IngestReport) -> tuple[int, int, int] | None:
    report.box_census = {_shape(b): n for b, n in census.most_common()}
    if box is not None:
        report.box_from = "--box"
        return box
    if census:
        best, count = census.most_common(1)[0]  # ties: the box met first
        report.box_from = f"the most common box: {count} of {sum(census.values())} volumes"
        return best
    report.box_from = "the first accepted volume"
    return None


def _check_class_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(str(n).strip() for n in names)
    if not names or any(not n for n in names):
        raise IngestError(f"class names must be non-empty, got {list(names)}")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise IngestError(f"class names repeat: {dupes}")
    return names


def _read_class_names_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise IngestError(f"{path}: cannot read class names ({err})") from err
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _default_names(max_label: int, first: int) -> tuple[str, ...]:
    # STAR class numbers are 1-based, so class 1 is "class_1"; .npy labels are 0-based.
    return tuple(f"class_{k + first}" for k in range(max(max_label, 0) + 1))


# ---------------------------------------------------------------------------------------------
# The run: checks each candidate, writes accepted ones, records rejects


class _Run:
    def __init__(self, out, report, box, box_given, class_names, voxel_size, dtype, shard_mb, unit):
        self.out = out  # the staging folder
        self.report = report
        self.box = box
        # Only a box asked for is cropped or padded to; without --box a mismatch is rejected.
        self.box_given = box_given
        self.class_names = tuple(class_names)
        self.voxel_size = voxel_size
        self.dtype = dtype
        self.shard_mb = shard_mb
        self.unit = unit
        self.writer: PoolWriter | None = None  # made at the first accepted volume: no empty pools
        self.first_seen: dict[str, str] = {}  # id -> position it was first met at (short: a million of these)
        self.rejects_file = open(out / REJECTS_FILE, "w", newline="")
        self.rejects = csv.writer(self.rejects_file)
        self.rejects.writerow(REJECT_COLUMNS)
        self.resized_file = None
        self.resized = None
        self.warned: set[str] = set()
        self.logged_rejects = 0
        self.reasons: Counter[str] = Counter()
        self.voxel_sizes: Counter[str] = Counter()
        self.mismatches: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.labels: Counter[int] = Counter()

    # -- main loop

    def consume(self, candidates: Iterator[_Candidate], total: int, every: int, seconds: float) -> None:
        done = 0
        last = started = time.monotonic()
        for cand in candidates:
            self.take(cand)
            done += 1
            now = time.monotonic()
            if done % max(1, every) == 0 or now - last >= seconds:
                last = now
                rate = done / max(now - started, 1e-9)
                log.info("%d items (%d accepted, %d rejected) from %d %s, %.0f items/s",
                         done, self.report.accepted, sum(self.reasons.values()), total, self.unit, rate)

    def take(self, cand: _Candidate) -> None:
        try:
            self._accept(cand)
        except _Reject as rej:
            self._reject(cand, rej)

    def _accept(self, cand: _Candidate) -> None:
        if cand.error is not None:
            raise cand.error
        first = self.first_seen.get(cand.subtomo_id)
        if first is not None:
            raise _Reject(
                "duplicate_id", f"{cand.where}: duplicate subtomo id {cand.subtomo_id!r} (first met at {first})"
            )
        self.first_seen[cand.subtomo_id] = cand.item or "the whole file"
        if cand.label is not None and not 0 <= cand.label < len(self.class_names):
            raise _Reject(
                "label_out_of_range",
                f"{cand.where}: label {cand.label} outside the class range 0..{len(self.class_names) - 1}"
                f" ({len(self.class_names)} classes)",
            )
        volume, voxel, faults = cand.load()
        if volume.ndim != 3 or min(volume.shape) == 1:
            raise _Reject(
                "not_a_volume", f"{cand.where}: a 2-D image (shape {volume.shape}) where a 3-D volume is expected"
            )
        if not np.isfinite(volume).all():
            bad = int(np.size(volume) - np.isfinite(volume).sum())
            raise _Reject("nonfinite", f"{cand.where}: {bad} NaN or Inf voxel(s)")
        original_shape = volume.shape
        box = self.box or tuple(volume.shape)  # no census (nothing readable ahead): the first accepted
        if volume.shape != box:
            if not self.box_given:
                self.mismatches[_shape(volume.shape)] += 1
                raise _Reject(
                    "box_mismatch",
                    f"{cand.where}: box {_shape(volume.shape)} differs from the pool's {_shape(box)}"
                    f" ({self.report.box_from}; pass --box to centre-crop or pad)",
                )
            volume = _fit_box(volume, box)
        mean = volume.mean(dtype=np.float64)
        std = volume.std(dtype=np.float64)
        if std <= 1e-12 * max(1.0, abs(mean)):  # the pool's zscore threshold, checked here to name it
            raise _Reject("constant", f"{cand.where}: a constant volume (every voxel {mean:.6g})")
        self.box = box
        voxel = self._voxel_size(cand, voxel)
        writer = self._writer()
        try:
            writer.add(
                cand.subtomo_id, volume, source=cand.pool_source, voxel_size_A=voxel, label=cand.label,
                tomogram=cand.tomogram, xyz=cand.xyz,
            )
        except PoolError as err:
            raise _Reject("invalid_volume", f"{cand.where}: {err}") from err
        self.report.accepted += 1
        self.voxel_sizes["null" if voxel is None else f"{voxel:g}"] += 1
        if cand.label is not None:
            self.labels[cand.label] += 1
        for fault in faults:
            self._header_fault(cand, fault)
        if original_shape != self.box:
            self._record_resize(cand, original_shape)

    def _header_fault(self, cand: _Candidate, fault: str) -> None:
        kind = fault.split(":")[0].split(" - ")[0]  # "Unrecognised machine stamp: 0x00…" → its kind
        self.faults[kind] += 1
        self._warn_once(f"fault:{kind}", f"{cand.source}: read despite a header fault ({fault}); "
                                         f"the voxels are intact (warned once; counts in {REPORT_FILE})")

    def _voxel_size(self, cand: _Candidate, voxel: float | None) -> float | None:
        if voxel is not None:
            if self.voxel_size is not None and not math.isclose(voxel, self.voxel_size, rel_tol=1e-3):
                self._warn_once(
                    "voxel_differs",
                    f"{cand.where}: header voxel size {voxel:g} Å differs from --voxel-size "
                    f"{self.voxel_size:g} Å; the header's is kept (--voxel-size only fills unknown sizes)"
                    " (warned once)",
                )
            return voxel
        self.report.voxel_size_unknown += 1
        if self.report.kind == "npy":
            what = "a .npy array carries no voxel size"
        elif cand.source.lower().endswith(".em"):
            what = f"{cand.source}: an .em header carries no voxel size"
        else:
            what = f"{cand.source}: header voxel size is 0 (unknown)"
        fill = "null" if self.voxel_size is None else f"--voxel-size {self.voxel_size:g} Å"
        self._warn_once(
            "voxel_unknown",
            f"{what}; recording {fill} for every such volume (warned once; the count is in {REPORT_FILE})",
        )
        return self.voxel_size

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning(message)

    def _writer(self) -> PoolWriter:
        if self.writer is None:
            self.writer = PoolWriter(
                self.out, self.box, dtype=self.dtype, shard_mb=self.shard_mb,
                class_names=self.class_names, description=f"ingested from {self.report.source}",
            )
        return self.writer

    def _reject(self, cand: _Candidate, rej: _Reject) -> None:
        self.reasons[rej.code] += 1
        self.rejects.writerow((cand.source, cand.item, rej.code, rej.reason))
        if self.logged_rejects < MAX_LOGGED_REJECTS:
            log.warning("rejected [%s] %s", rej.code, rej.reason)
        elif self.logged_rejects == MAX_LOGGED_REJECTS:
            log.warning("further rejects go to %s only", Path(self.report.out) / REJECTS_FILE)
        self.logged_rejects += 1

    def _record_resize(self, cand: _Candidate, original_shape: tuple[int, ...]) -> None:
        cropped = any(o > b for o, b in zip(original_shape, self.box))
        padded = any(o < b for o, b in zip(original_shape, self.box))
        self.report.cropped += cropped
        self.report.padded += padded
        if self.resized is None:
            self.resized_file = open(self.out / RESIZED_FILE, "w", newline="")
            self.resized = csv.writer(self.resized_file)
            self.resized.writerow(("subtomo_id", "source", "original_shape", "box", "action"))
        action = "+".join(a for a, on in (("crop", cropped), ("pad_with_mean", padded)) if on)
        self.resized.writerow(
            (cand.subtomo_id, cand.pool_source, _shape(original_shape), _shape(self.box), action)
        )

    # -- ending

    def finish(self) -> None:
        self._close_files()
        if self.writer is not None:
            self.writer.close()
        report = self.report
        report.rejected_by_reason = dict(self.reasons)
        report.voxel_sizes_A = dict(self.voxel_sizes)
        report.box_mismatches = dict(self.mismatches)
        report.header_faults = dict(self.faults)
        if self.labels:
            report.empty_classes = [n for i, n in enumerate(self.class_names) if not self.labels[i]]

    def abandon(self) -> None:
        """An interrupted ingest leaves no manifest (and its staging folder is removed)."""
        self._close_files()
        if self.writer is not None:
            self.writer.__exit__(RuntimeError, RuntimeError("ingest interrupted"), None)

    def _close_files(self) -> None:
        self.rejects_file.close()
        if self.resized_file is not None:
            self.resized_file.close()


def _fit_box(volume: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """Centre-crop or pad each axis to the box. Pads with the volume's mean, not 0: the pool
    z-scores afterwards, and zero padding of a volume with a large offset would become a bright
    frame that the network learns instead of the particle."""
    fill = float(volume.mean(dtype=np.float64))
    crops, pads = [], []
    for n, b in zip(volume.shape, box):
        if n >= b:
            start = (n - b) // 2
            crops.append(slice(start, start + b))
            pads.append((0, 0))
        else:
            crops.append(slice(None))
            before = (b - n) // 2
            pads.append((before, b - n - before))
    volume = volume[tuple(crops)]
    if any(p != (0, 0) for p in pads):
        volume = np.pad(volume, pads, mode="constant", constant_values=fill)
    return volume


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


# ---------------------------------------------------------------------------------------------
# Sources


def _open_source(kind, source, out, report, names, labels, star_labels, project_dir, copick, box) -> _Source:
    if kind == "folder":
        return _folder_source(source, out, report, names)
    if kind == "star":
        return _star_source(source, names, star_labels, project_dir)
    if kind == "copick":
        return _copick_source(source, names, copick, box[0])
    return _npy_source(source, names, labels)


def _census(paths: Counter) -> Counter:
    """Volumes per box, from the headers alone. `paths[file]` is how many STAR rows name the
    file; 0 (a folder's file) counts every volume the file holds."""
    census: Counter = Counter()
    for path, uses in paths.items():
        try:
            count, box = peek_sections(path)
        except VolumeError:
            continue  # rejected with its reason when its turn comes
        census[box] += uses if uses else count
    return census


# -- folder


def _folder_source(root: Path, out: Path, report: IngestReport, names) -> _Source:
    files, ignored = _list_folder(root, exclude=out)
    report.ignored_files, report.ignored_suffixes = sum(ignored.values()), dict(ignored)
    if not files:
        raise IngestError(
            f"{root}: no {'/'.join(FOLDER_SUFFIXES)} files found (searched recursively"
            + (f"; {report.ignored_files} other files ignored)" if report.ignored_files else ")")
        )
    census = _census(Counter({path: 0 for path in files}))
    return _Source(_folder_candidates(root, files), len(files), census, names, "files")


def _list_folder(root: Path, exclude: Path) -> tuple[list[Path], Counter]:
    """Volume files under root in sorted order, skipping hidden files/folders and the output
    folder; and the other files, counted by suffix."""
    exclude = exclude.resolve()
    found, ignored = [], Counter()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (here / d).resolve() != exclude]
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(FOLDER_SUFFIXES):
                found.append(here / name)
            else:
                ignored[Path(name).suffix.lower()] += 1
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found, ignored


def _folder_candidates(root: Path, files: list[Path]) -> Iterator[_Candidate]:
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            contents = read_sections(path)
        except VolumeError as err:
            yield _Candidate(rel, str(path), "", str(path), error=_Reject(err.code, str(err)))
            continue
        sections = contents.sections
        stack = path.suffix.lower() == ".mrcs" or len(sections) > 1
        for k in range(len(sections)):
            sid = f"{rel}@{k + 1}" if stack else rel
            item = f"section {k + 1}" if stack else ""
            yield _Candidate(
                sid, str(path), item, f"{path} {item}".strip(),
                load=_loaded(contents, k),
                pool_source=f"{path}@{k + 1}" if stack else str(path),
            )


def _loaded(contents: MrcContents, k: int):
    return lambda: (contents.sections[k], contents.voxel_size_A, contents.header_faults)


# -- STAR


def _star_source(star_path: Path, names, star_labels: bool, project_dir) -> _Source:
    try:
        star = read_star(star_path)
        table = particle_table(star)
    except StarError as err:
        raise IngestError(str(err)) from err
    if star_labels and "rlnClassNumber" not in table.columns:
        raise IngestError(f"{star_path}: --star-labels given but the particle table has no rlnClassNumber")
    if star_labels and names is None:
        names = _default_names(_max_star_class(table), first=1)
    two_d = _two_d_groups(star, table)
    resolver = _PathResolver(star_path, Path(project_dir) if project_dir else find_project_dir(star_path))
    census = _census(_star_files(table, resolver))
    candidates = _star_candidates(star_path, table, star_labels, names, resolver, two_d)
    return _Source(candidates, len(table.rows), census, names, "rows")


def _two_d_groups(star: StarFile, table: StarTable) -> set[str]:
    """The optics groups of 2-D stacks; the whole file refused when every particle is one."""
    groups = two_d_groups(star)
    if groups is None:
        raise IngestError(f"{star.path}: data_general says rlnTomoSubTomosAre2DStacks 1: the particles are "
                          + TWO_D_HELP)
    if groups and "rlnOpticsGroup" in table.columns:
        col = table.columns.index("rlnOpticsGroup")
        if all(len(v) > col and v[col] in groups for _, v in table.rows):
            raise IngestError(f"{star.path}: every optics group of the particles has rlnImageDimensionality 2: "
                              "the particles are " + TWO_D_HELP)
    return groups


class _PathResolver:
    """Where a STAR row's relative path points: RELION writes paths relative to its project
    folder (the one holding default_pipeline.star), Warp and hand-made files relative to the
    STAR file's folder; the first place the file exists wins, and a missing file names them all."""

    def __init__(self, star: Path, project_dir: Path | None):
        bases = [project_dir, star.parent, Path.cwd()]
        self.bases = list(dict.fromkeys(b.resolve() for b in bases if b is not None))
        self.project_dir = project_dir
        self.cache: dict[Path, tuple[Path, list[Path], bool]] = {}

    def resolve(self, file: Path) -> tuple[Path, list[Path], bool]:
        """(the path to read, every path tried, whether it exists); the first tried when none
        does. Cached per file: a stack is named by many rows."""
        if file not in self.cache:
            tried = [file] if file.is_absolute() else [base / file for base in self.bases]
            found = next((p for p in tried if p.is_file()), None)
            self.cache[file] = (found or tried[0], tried, found is not None)
        return self.cache[file]

    def missing(self, where: str, file: Path, tried: list[Path]) -> _Reject:
        hint = "" if self.project_dir else (
            " (RELION paths are relative to the project folder: no default_pipeline.star was found "
            "above the STAR file, so pass --project-dir)")
        return _Reject("missing_file", f"{where}: {file} does not exist; tried {', '.join(map(str, tried))}{hint}")


def _star_files(table: StarTable, resolver: _PathResolver) -> Counter:
    """Rows per existing file named by the table (unparsable rows skipped)."""
    col = table.columns.index("rlnImageName")
    files: Counter = Counter()
    for _, values in table.rows:
        if len(values) == len(table.columns):
            try:
                _, file = _split_image_name(values[col], "")
            except _Reject:
                continue
            path, _, exists = resolver.resolve(file)
            if exists:
                files[path] += 1
    return files


def _max_star_class(table: StarTable) -> int:
    """The largest 0-based label in the table (for default class names); unparsable ones skipped."""
    col = table.columns.index("rlnClassNumber")
    best = 0
    for _, values in table.rows:
        if len(values) == len(table.columns):
            number = _as_int(values[col])
            if number is not None:
                best = max(best, number - 1)
    return best


def _as_int(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


class _StackCache:
    """The last stack read: STAR rows usually come grouped by stack, and re-reading a stack
    for each of its rows would make ingest quadratic."""

    def __init__(self):
        self.path: Path | None = None
        self.value: MrcContents | VolumeError | None = None

    def get(self, path: Path, where: str) -> MrcContents:
        if path != self.path:
            self.path = path
            try:
                self.value = read_sections(path)
            except VolumeError as err:
                self.value = err
        if isinstance(self.value, VolumeError):
            raise _Reject(self.value.code, f"{where}: {self.value}")
        return self.value


def _star_candidates(star: Path, table: StarTable, star_labels: bool, names, resolver: _PathResolver,
                     two_d: set[str]) -> Iterator[_Candidate]:
    col = {name: i for i, name in enumerate(table.columns)}
    cache = _StackCache()
    for row_number, (line, values) in enumerate(table.rows, start=1):
        item = f"row {row_number} (line {line})"
        where = f"{star} {item}"
        if len(values) != len(table.columns):
            yield _Candidate(
                f"{star.name}:{item}", str(star), item, where,
                error=_Reject("bad_row", f"{where}: {len(values)} values for {len(table.columns)} columns"),
            )
            continue
        image = values[col["rlnImageName"]]
        cand = _Candidate(image, str(star), item, where)
        try:
            section, file = _split_image_name(image, where)
            path, tried, _ = resolver.resolve(file)
            rel = Path(os.path.normpath(file)).as_posix()
            cand.subtomo_id = rel if section is None else f"{rel}@{section}"
            cand.pool_source = str(path) if section is None else f"{path}@{section}"
            cand.tomogram = _star_value(values, col, "rlnTomoName") or _star_value(values, col, "rlnMicrographName")
            cand.xyz = _star_xyz(values, col, where)
            group = _star_value(values, col, "rlnOpticsGroup")
            if group is not None and group in two_d:
                raise _Reject("two_d_stack", f"{where}: optics group {group} has rlnImageDimensionality 2: "
                                             + TWO_D_HELP)
            if star_labels:
                cand.label = _star_label(values[col["rlnClassNumber"]], names, where)
            cand.load = _star_loader(cache, path, section, where, lambda f=file, t=tried: resolver.missing(where, f, t))
        except _Reject as rej:
            cand.error = rej
        yield cand


def _star_label(raw: str, names, where: str) -> int:
    number = _as_int(raw)
    if number is None:
        raise _Reject("bad_label", f"{where}: rlnClassNumber {raw!r} is not an integer")
    if not 1 <= number <= len(names):
        raise _Reject("label_out_of_range",
                      f"{where}: rlnClassNumber {number} outside 1..{len(names)} (classes {', '.join(names)})")
    return number - 1


def _split_image_name(image: str, where: str) -> tuple[int | None, Path]:
    if "@" not in image:
        return None, Path(image)
    index, file = image.split("@", 1)
    if not index.isdigit() or int(index) < 1 or not file:
        raise _Reject("bad_row", f"{where}: rlnImageName {image!r} is not 'section@stack' with section ≥ 1")
    return int(index), Path(file)


def _star_value(values: list[str], col: dict[str, int], name: str) -> str | None:
    return values[col[name]] if name in col else None


def _star_xyz(values, col, where) -> tuple[float, float, float] | None:
    names = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
    if not all(n in col for n in names):
        return None
    xyz = []
    for name in names:
        try:
            xyz.append(float(values[col[name]]))
        except ValueError:
            raise _Reject("bad_row", f"{where}: {name} {values[col[name]]!r} is not a number") from None
    return tuple(xyz)


def _star_loader(cache: _StackCache, path: Path, section: int | None, where: str, missing: Callable[[], _Reject]):
    def load() -> tuple[np.ndarray, float | None, tuple[str, ...]]:
        if not path.is_file():
            raise missing()
        contents = cache.get(path, where)
        count = len(contents.sections)
        if section is None:
            if count != 1:
                raise _Reject(
                    "stack_without_section",
                    f"{where}: {path} holds {count} volumes but the row gives no section (expected 'n@{path.name}')",
                )
            return contents.sections[0], contents.voxel_size_A, contents.header_faults
        if section > count:
            raise _Reject(
                "missing_section",
                f"{where}: section {section} requested but {path} holds {count} "
                f"volume(s) of {_shape(contents.sections.shape[1:])}",
            )
        return contents.sections[section - 1], contents.voxel_size_A, contents.header_faults

    return load


# -- copick


def _copick_source(config: Path, names, selection: CopickSelection, box: int) -> _Source:
    try:
        root = copick_io.open_project(config)
        objects = copick_io.particle_objects(root)
        picks = list(copick_io.iter_picks(root, selection))
    except CopickError as err:
        raise IngestError(str(err)) from err
    if not picks:
        raise IngestError(f"{config}: no picks of particle objects ({', '.join(objects) or 'none'})"
                          + (" for the chosen --copick-user/--copick-session" if selection.user_id
                             or selection.session_id else ""))
    if names is None:  # the objects that were picked, in the config's order
        picked = {p.object_name for p in picks}
        names = tuple(o for o in objects if o in picked)
    cutter = copick_io.TomogramCutter(root, selection)
    try:
        for run in dict.fromkeys(p.run for p in picks):
            cutter.check(run)
    except CopickError as err:
        raise IngestError(f"{config}: {err}") from err
    return _Source(_copick_candidates(config, picks, names, cutter, box), len(picks), Counter(), names, "picks")


def _copick_candidates(config: Path, picks, names, cutter, box: int) -> Iterator[_Candidate]:
    for pick in picks:
        item = f"run {pick.run} picks {pick.picks_name} point {pick.index}"
        cand = _Candidate(copick_io.subtomo_id(pick), str(config), item, f"{config} {item}",
                          tomogram=pick.run, pool_source=copick_io.source_of(config, pick))
        if pick.object_name not in names:
            cand.error = _Reject("label_out_of_range", f"{cand.where}: object {pick.object_name!r} is not "
                                                       f"among the classes ({', '.join(names)})")
        else:
            cand.label = names.index(pick.object_name)
            cand.load = _copick_loader(cutter, pick, box, cand)
        yield cand


def _copick_loader(cutter, pick, box: int, cand: _Candidate):
    def load() -> tuple[np.ndarray, float | None, tuple[str, ...]]:
        try:
            volume, voxel, centre = cutter.cut(pick, box)
        except IndexError as err:  # before LookupError, its base class
            raise _Reject("outside_tomogram", f"{cand.where}: {err}") from None
        except LookupError as err:
            raise _Reject("missing_file", f"{cand.where}: {err}") from None
        cand.xyz = centre  # in voxels of the tomogram; × voxel size = the pick's Å
        return volume, voxel, ()

    return load


# -- .npy


def _npy_source(path: Path, names, labels) -> _Source:
    array, label_array = _open_npy(path, labels)
    if label_array is not None and names is None:
        names = _default_names(int(label_array.max(initial=0)), first=0)
    census = Counter({tuple(array.shape[1:]): len(array)})
    return _Source(_npy_candidates(path, array, label_array), len(array), census, names, "array rows")


def _open_npy(path: Path, labels) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        array = np.load(path, mmap_mode="r")  # rows are read one at a time; the array never is whole
    except (OSError, ValueError) as err:
        raise IngestError(f"{path}: cannot read as a .npy array ({err})") from err
    if array.ndim != 4:
        raise IngestError(f"{path}: expected an array [N, D, H, W], got shape {array.shape}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise IngestError(f"{path}: complex-valued array ({array.dtype}): a Fourier transform, not densities")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise IngestError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    if labels is None:
        return array, None
    where = str(labels) if not isinstance(labels, np.ndarray) else "labels"
    try:
        label_array = labels if isinstance(labels, np.ndarray) else np.load(labels)
    except (OSError, ValueError) as err:
        raise IngestError(f"{where}: cannot read labels ({err})") from err
    label_array = np.asarray(label_array)
    if label_array.shape != (len(array),):
        raise IngestError(
            f"{where}: expected {len(array)} labels (one per row of {path.name}), got shape {label_array.shape}"
        )
    if np.issubdtype(label_array.dtype, np.floating):
        if not (np.isfinite(label_array).all() and (label_array == np.round(label_array)).all()):
            raise IngestError(f"{where}: labels must be integers")
        label_array = label_array.astype(np.int64)
    elif not np.issubdtype(label_array.dtype, np.integer):
        raise IngestError(f"{where}: labels must be integers, got dtype {label_array.dtype}")
    return array, label_array.astype(np.int64)


def _npy_candidates(path: Path, array: np.ndarray, labels: np.ndarray | None) -> Iterator[_Candidate]:
    for i in range(len(array)):
        item = f"index {i}"
        yield _Candidate(
            f"{path.name}[{i}]", str(path), item, f"{path} {item}",
            load=lambda i=i: (np.asarray(array[i], dtype=np.float32), None, ()),
            label=None if labels is None else int(labels[i]),
            pool_source=f"{path}[{i}]",
        )
        if (i + 1) % 256 == 0:  # the consumer has finished with rows 0..i
            _release_pages(array, i + 1)


def _release_pages(array: np.ndarray, rows_done: int) -> None:
    """Let go of the mapped pages of rows already read. Pages of a memory map that were touched
    count in the process's resident memory until unmapped, so without this a .npy ingest would
    look (to RSS-based schedulers and OOM killers) as big as the whole array. The pages stay in
    the page cache; MADV_DONTNEED only drops this process's mapping of them."""
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    end = array.offset % mmap.ALLOCATIONGRANULARITY + rows_done * row_bytes  # np.memmap maps from there
    length = end - end % mmap.PAGESIZE
    if length > 0:
        try:
            mm.madvise(mmap.MADV_DONTNEED, 0, length)
        except (OSError, ValueError):
            pass  # only an optimisation


if __name__ == "__main__":
    sys.exit(main())
