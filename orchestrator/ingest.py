"""Ingest subtomograms into a pool, losing nothing: every bad item is named and set aside.

    python -m orchestrator.ingest SOURCE --out POOL_DIR [--box N] [--labels labels.npy]
        [--star-labels] [--class-names a,b,c | --class-names-file F] [--voxel-size A]
        [--dtype float16|float32] [--shard-mb 256] [--overwrite]

SOURCE is a folder of .mrc/.map/.mrcs files (searched recursively, in sorted order), a RELION
.star particle file, or a .npy array [N, D, H, W]. Each bad item (unreadable file, 2-D image,
wrong box, NaN/Inf, constant, duplicate id, missing stack or section, label outside the class
range) is logged with its file and position, written to POOL_DIR/rejects.csv, and skipped; the
rest goes on. Counts go to POOL_DIR/ingest_report.json. Exit status: 0 when at least one
subtomogram was accepted, 1 when none was, 2 when the source or the options are unusable.

Subtomogram ids: `<relative path>` for a single volume, `<relative path>@<section>` (1-based)
for a section of a stack (.mrcs files and MRC volume stacks), `<file name>[<index>]` (0-based,
as numpy counts) for a row of a .npy array. A STAR row's id is its image name with the path made
relative to the STAR file's folder, so a folder ingest and a STAR ingest of the same files agree.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import mmap
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from orchestrator.pool import (
    MANIFEST,
    SHARD_DIR,
    VOLUME_DTYPES,
    PoolError,
    PoolInfo,
    PoolWriter,
    as_box,
    atomic_write_text,
    pool_summary,
)
from orchestrator.volumes import MrcContents, VolumeError, read_sections

log = logging.getLogger("cryoal.ingest")

FOLDER_SUFFIXES = (".mrc", ".map", ".mrcs")
REJECTS_FILE = "rejects.csv"
REPORT_FILE = "ingest_report.json"
RESIZED_FILE = "resized.csv"
REJECT_COLUMNS = ("source", "item", "reason_code", "reason")
MAX_LOGGED_REJECTS = 50  # after this many, rejects go to rejects.csv only (a million bad lines help nobody)

# Reason codes in rejects.csv: one per way an item can be bad.
REASONS = {
    "unreadable": "truncated, damaged or non-MRC file",
    "not_a_volume": "a 2-D image where a 3-D volume is expected",
    "stack_without_section": "a STAR row names a stack without a section number",
    "box_mismatch": "box differs from the pool's",
    "nonfinite": "NaN or Inf voxels",
    "constant": "a constant volume (cannot be normalised)",
    "duplicate_id": "the same subtomogram id was met before",
    "missing_file": "a STAR row names a file that does not exist",
    "missing_section": "a STAR row names a section the stack does not have",
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
    accepted: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    pool_info: PoolInfo | None = None
    voxel_size_unknown: int = 0  # accepted volumes whose header said 0 (recorded null or --voxel-size)
    voxel_sizes_A: dict[str, int] = field(default_factory=dict)  # "10.0" / "null" -> accepted count
    cropped: int = 0
    padded: int = 0
    ignored_files: int = 0  # files in a source folder without an MRC suffix
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "out": self.out,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejected_by_reason": dict(sorted(self.rejected_by_reason.items())),
            "voxel_size_unknown": self.voxel_size_unknown,
            "voxel_sizes_A": dict(sorted(self.voxel_sizes_A.items())),
            "resized": {"cropped": self.cropped, "padded": self.padded},
            "ignored_files": self.ignored_files,
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
    """One would-be subtomogram. `load` reads its voxels only after the cheap checks pass."""

    subtomo_id: str
    source: str  # the file, for rejects.csv
    item: str  # where in the file ("section 3", "row 5 (line 31)", "index 7"; "" = whole file)
    where: str  # the same, for messages: file plus position
    load: Callable[[], tuple[np.ndarray, float | None]] | None = None
    label: int | None = None
    tomogram: str | None = None
    xyz: tuple[float, float, float] | None = None
    pool_source: str = ""  # the `source` column of the pool
    error: _Reject | None = None


# ---------------------------------------------------------------------------------------------
# Public API


def ingest(
    source: str | Path,
    out: str | Path,
    *,
    box: int | Sequence[int] | None = None,
    labels: str | Path | np.ndarray | None = None,
    star_labels: bool = False,
    class_names: Sequence[str] | None = None,
    voxel_size: float | None = None,
    dtype: str = "float16",
    shard_mb: float = 256.0,
    overwrite: bool = False,
    progress_every: int = 1000,
    progress_seconds: float = 5.0,
) -> IngestReport:
    """Ingest SOURCE (folder, .star or .npy) into a new pool at OUT; see the module docstring.

    Raises IngestError when the source or options are unusable (an empty folder among them);
    nothing is written then. Bad items never raise: they are counted in the
    report and listed in OUT/rejects.csv. When nothing is accepted no pool manifest is written.
    """
    started = time.monotonic()
    source = Path(source)
    out = Path(out)
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
    kind = _source_kind(source)
    if labels is not None and kind != "npy":
        raise IngestError("--labels goes with a .npy source (STAR files carry labels: --star-labels)")
    if star_labels and kind != "star":
        raise IngestError("--star-labels goes with a .star source")
    if (out / MANIFEST).exists() and not overwrite:
        raise IngestError(f"{out}: a pool already exists there (pass --overwrite to replace it)")
    names = None if class_names is None else _check_class_names(class_names)

    report = IngestReport(source=str(source), out=str(out))
    if kind == "folder":
        files, report.ignored_files = _list_folder(source, exclude=out)
        candidates, total = _folder_candidates(source, files), len(files)
        if not files:
            raise IngestError(
                f"{source}: no {'/'.join(FOLDER_SUFFIXES)} files found (searched recursively"
                + (f"; {report.ignored_files} other files ignored)" if report.ignored_files else ")")
            )
    elif kind == "star":
        table = _read_star_table(source)
        if star_labels and "rlnClassNumber" not in table.columns:
            raise IngestError(f"{source}: --star-labels given but the particle table has no rlnClassNumber")
        if star_labels and names is None:
            names = _default_names(_max_star_class(table), first=1)
        candidates, total = _star_candidates(source, table, star_labels, names), len(table.rows)
    else:
        array, label_array = _open_npy(source, labels)
        if label_array is not None and names is None:
            names = _default_names(int(label_array.max(initial=0)), first=0)
        candidates, total = _npy_candidates(source, array, label_array), len(array)

    _prepare_out(out, overwrite)
    run = _Run(out, report, pool_box, names or (), voxel_size, dtype, shard_mb, kind)
    try:
        run.consume(candidates, total, progress_every, progress_seconds)
    except BaseException:
        run.abandon()
        raise
    run.finish()
    _write_report(out, report, started)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cryoal-ingest", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="folder of .mrc/.map/.mrcs, a RELION .star file, or a .npy [N, D, H, W]")
    parser.add_argument("--out", required=True, help="pool folder to create")
    parser.add_argument("--box", type=int, help="pool box; other sizes are centre-cropped or mean-padded")
    parser.add_argument("--labels", help="labels.npy of N ints for a .npy source")
    parser.add_argument("--star-labels", action="store_true", help="rlnClassNumber (1-based) becomes the label")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--class-names", help="comma-separated class names, index 0 first")
    names.add_argument("--class-names-file", help="file with one class name per line")
    parser.add_argument("--voxel-size", type=float, help="Å per voxel for volumes whose header says 0 (unknown)")
    parser.add_argument("--dtype", default="float16", choices=VOLUME_DTYPES)
    parser.add_argument("--shard-mb", type=float, default=256.0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pool at --out")
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
        report = ingest(
            args.source, args.out, box=args.box, labels=args.labels, star_labels=args.star_labels,
            class_names=class_names, voxel_size=args.voxel_size, dtype=args.dtype,
            shard_mb=args.shard_mb, overwrite=args.overwrite,
        )
    except (IngestError, PoolError, OSError) as err:
        print(f"cryoal-ingest: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0 if report.accepted else 1


def format_summary(report: IngestReport) -> str:
    lines = [f"ingest of {report.source}: {report.accepted} accepted, {report.rejected} rejected"]
    if report.pool_info is not None:
        info = report.pool_info
        lines.append(
            f"  pool {info.path}: box {'x'.join(map(str, info.box))}, {info.dtype}, "
            f"{len(info.shards)} shard(s), {info.num_classes} class(es)"
        )
    else:
        lines.append(f"  no pool written at {report.out}: nothing was accepted")
    for code, count in sorted(report.rejected_by_reason.items()):
        lines.append(f"  rejected {code:<22} {count}")
    if report.rejected:
        lines.append(f"  every rejected item, with its reason: {Path(report.out) / REJECTS_FILE}")
    if report.voxel_size_unknown:
        lines.append(f"  voxel size unknown (header 0) for {report.voxel_size_unknown} accepted volume(s)")
    if report.ignored_files:
        lines.append(f"  ignored {report.ignored_files} file(s) without a {'/'.join(FOLDER_SUFFIXES)} suffix")
    if report.cropped or report.padded:
        lines.append(
            f"  resized to the box: {report.cropped} cropped, {report.padded} padded "
            f"(see {Path(report.out) / RESIZED_FILE})"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run: checks each candidate, writes accepted ones, records rejects


class _Run:
    def __init__(self, out, report, box, class_names, voxel_size, dtype, shard_mb, kind):
        self.out = out
        self.report = report
        self.box = box
        # Only a box asked for is cropped or padded to; without --box a mismatch is rejected.
        self.box_given = box is not None
        self.class_names = tuple(class_names)
        self.voxel_size = voxel_size
        self.dtype = dtype
        self.shard_mb = shard_mb
        self.kind = kind
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
                log.info(
                    "%d items (%d accepted, %d rejected) from %d %s, %.0f items/s",
                    done, self.report.accepted, sum(self.reasons.values()), total,
                    {"folder": "files", "star": "rows", "npy": "array rows"}[self.kind], rate,
                )

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
        volume, voxel = cand.load()
        if volume.ndim != 3 or min(volume.shape) == 1:
            raise _Reject(
                "not_a_volume", f"{cand.where}: a 2-D image (shape {volume.shape}) where a 3-D volume is expected"
            )
        if not np.isfinite(volume).all():
            bad = int(np.size(volume) - np.isfinite(volume).sum())
            raise _Reject("nonfinite", f"{cand.where}: {bad} NaN or Inf voxel(s)")
        original_shape = volume.shape
        box = self.box or tuple(volume.shape)  # set by the first *accepted* volume, below
        if volume.shape != box:
            if not self.box_given:
                raise _Reject(
                    "box_mismatch",
                    f"{cand.where}: box {_shape(volume.shape)} differs from the pool's {_shape(box)}"
                    " (pass --box to centre-crop or pad)",
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
        if original_shape != self.box:
            self._record_resize(cand, original_shape)

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
        if self.kind == "npy":
            what = "a .npy array carries no voxel size"
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
                overwrite=True,  # _prepare_out has already refused an existing pool without --overwrite
            )
        return self.writer

    def _reject(self, cand: _Candidate, rej: _Reject) -> None:
        self.reasons[rej.code] += 1
        self.rejects.writerow((cand.source, cand.item, rej.code, rej.reason))
        if self.logged_rejects < MAX_LOGGED_REJECTS:
            log.warning("rejected [%s] %s", rej.code, rej.reason)
        elif self.logged_rejects == MAX_LOGGED_REJECTS:
            log.warning("further rejects go to %s only", self.out / REJECTS_FILE)
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
            self.report.pool_info = self.writer.close()
        self.report.rejected_by_reason = dict(self.reasons)
        self.report.voxel_sizes_A = dict(self.voxel_sizes)

    def abandon(self) -> None:
        """An interrupted ingest leaves no manifest, so open_pool refuses the half-written pool."""
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


def _source_kind(source: Path) -> str:
    if source.is_dir():
        return "folder"
    suffix = source.suffix.lower()
    if suffix == ".star":
        return "star"
    if suffix == ".npy":
        return "npy"
    raise IngestError(f"{source}: expected a folder, a .star file or a .npy file")


def _prepare_out(out: Path, overwrite: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        # Remove the old pool first, so an ingest that accepts nothing leaves no stale pool behind
        # next to a fresh rejects.csv.
        (out / MANIFEST).unlink(missing_ok=True)
        for shard in (out / SHARD_DIR).glob("*.parquet"):
            shard.unlink()
        (out / RESIZED_FILE).unlink(missing_ok=True)


def _write_report(out: Path, report: IngestReport, started: float) -> None:
    report.seconds = time.monotonic() - started
    atomic_write_text(out / REPORT_FILE, json.dumps(report.to_json(), indent=2) + "\n")


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


# -- folder


def _list_folder(root: Path, exclude: Path) -> tuple[list[Path], int]:
    """MRC files under root in sorted order, skipping hidden files/folders and the output folder."""
    exclude = exclude.resolve()
    found, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and (here / d).resolve() != exclude]
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(FOLDER_SUFFIXES):
                found.append(here / name)
            else:
                ignored += 1
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found, ignored


def _folder_candidates(root: Path, files: list[Path]) -> Iterator[_Candidate]:
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            contents = read_sections(path)
        except VolumeError as err:
            yield _Candidate(rel, str(path), "", str(path), error=_Reject(_volume_error_code(err), str(err)))
            continue
        sections = contents.sections
        stack = path.suffix.lower() == ".mrcs" or len(sections) > 1
        for k in range(len(sections)):
            sid = f"{rel}@{k + 1}" if stack else rel
            item = f"section {k + 1}" if stack else ""
            yield _Candidate(
                sid, str(path), item, f"{path} {item}".strip(),
                load=_loaded(sections[k], contents.voxel_size_A),
                pool_source=f"{path}@{k + 1}" if stack else str(path),
            )


def _loaded(volume: np.ndarray, voxel: float | None):
    return lambda: (volume, voxel)


def _volume_error_code(err: VolumeError) -> str:
    return "not_a_volume" if "2-D image" in str(err) else "unreadable"


# -- STAR


@dataclass
class StarTable:
    """One loop of a STAR file: column names without the leading underscore, and the rows with
    their 1-based line numbers."""

    block: str
    columns: list[str]
    rows: list[tuple[int, list[str]]]


_STAR_TOKEN = re.compile(r"""'([^']*)'|"([^"]*)"|(\S+)""")


def _star_tokens(line: str) -> list[str]:
    tokens = []
    for match in _STAR_TOKEN.finditer(line):
        single, double, bare = match.groups()
        if bare is not None and bare.startswith("#"):
            break  # a comment runs to the end of the line
        tokens.append(bare if bare is not None else single if single is not None else double)
    return tokens


def parse_star(path: str | Path) -> list[StarTable]:
    """Every loop_ in a STAR file (data_ blocks with plain key-value pairs are skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise IngestError(f"{path}: cannot read STAR file ({err})") from err
    tables: list[StarTable] = []
    block = ""
    current: StarTable | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = _star_tokens(line)
        if not tokens:
            continue
        head = tokens[0]
        if head.startswith("data_"):
            block, current = head[len("data_"):], None
        elif head == "loop_":
            current = StarTable(block, [], [])
            tables.append(current)
        elif head.startswith("_"):
            if current is not None and not current.rows:
                current.columns.append(head[1:])
            else:
                current = None  # a key-value pair after a loop ends the loop
        elif head == "stop_":
            current = None
        elif current is not None:
            current.rows.append((number, tokens))
        else:
            raise IngestError(f"{path} line {number}: a value outside any loop_ ({line.strip()[:60]!r})")
    return tables


def _read_star_table(path: Path) -> StarTable:
    tables = [t for t in parse_star(path) if t.columns]
    if not tables:
        raise IngestError(f"{path}: no loop_ table found (is this a RELION STAR file?)")
    with_images = [t for t in tables if "rlnImageName" in t.columns]
    particles = [t for t in with_images if t.block == "particles"]
    if not with_images:
        raise IngestError(
            f"{path}: no table has an rlnImageName column (blocks: {sorted({t.block for t in tables})})"
        )
    return (particles or with_images)[0]


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

    def get(self, path: Path) -> MrcContents:
        if path != self.path:
            self.path = path
            try:
                self.value = read_sections(path)
            except VolumeError as err:
                self.value = err
        if isinstance(self.value, VolumeError):
            raise _Reject(_volume_error_code(self.value), str(self.value))
        return self.value


def _star_candidates(star: Path, table: StarTable, star_labels: bool, names) -> Iterator[_Candidate]:
    folder = star.parent
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
            path = file if file.is_absolute() else folder / file
            rel = Path(os.path.normpath(file)).as_posix()
            cand.subtomo_id = rel if section is None else f"{rel}@{section}"
            cand.pool_source = str(path) if section is None else f"{path}@{section}"
            cand.tomogram = _star_value(values, col, "rlnTomoName") or _star_value(values, col, "rlnMicrographName")
            cand.xyz = _star_xyz(values, col, where)
            if star_labels:
                number = _as_int(values[col["rlnClassNumber"]])
                if number is None:
                    raw = values[col["rlnClassNumber"]]
                    raise _Reject("bad_label", f"{where}: rlnClassNumber {raw!r} is not an integer")
                cand.label = number - 1
                if not 0 <= cand.label < len(names):
                    raise _Reject(
                        "label_out_of_range",
                        f"{where}: rlnClassNumber {number} outside 1..{len(names)} (classes {', '.join(names)})",
                    )
            cand.load = _star_loader(cache, path, section, where)
        except _Reject as rej:
            cand.error = rej
        yield cand


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


def _star_loader(cache: _StackCache, path: Path, section: int | None, where: str):
    def load() -> tuple[np.ndarray, float | None]:
        if not path.is_file():
            raise _Reject("missing_file", f"{where}: {path} does not exist")
        contents = cache.get(path)
        count = len(contents.sections)
        if section is None:
            if count != 1:
                raise _Reject(
                    "stack_without_section",
                    f"{where}: {path} holds {count} volumes but the row gives no section (expected 'n@{path.name}')",
                )
            return contents.sections[0], contents.voxel_size_A
        if section > count:
            raise _Reject(
                "missing_section",
                f"{where}: section {section} requested but {path} holds {count} "
                f"volume(s) of {_shape(contents.sections.shape[1:])}",
            )
        return contents.sections[section - 1], contents.voxel_size_A

    return load


# -- .npy


def _open_npy(path: Path, labels) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        array = np.load(path, mmap_mode="r")  # rows are read one at a time; the array never is whole
    except (OSError, ValueError) as err:
        raise IngestError(f"{path}: cannot read as a .npy array ({err})") from err
    if array.ndim != 4:
        raise IngestError(f"{path}: expected an array [N, D, H, W], got shape {array.shape}")
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
            load=lambda i=i: (np.asarray(array[i], dtype=np.float32), None),
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
