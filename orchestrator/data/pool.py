"""The subtomogram pool: sharded Parquet, one row per subtomogram, plus a small manifest.

A million small MRC files is a filesystem problem, so a pool is ingested once into Parquet
shards that Ray Data (and the plain readers here) stream shard by shard. Layout:

    POOL/pool.json              manifest: box, dtype, normalisation, class names, shards, counts
    POOL/row_groups.json        which rows each row group of each shard holds (see RowGroupIndex)
    POOL/index.parquet          every row's metadata (INDEX_COLUMNS), read in one go (read_index)
    POOL/shards/part-00000.parquet

Columns: `row` (position in the pool), `subtomo_id` (unique), `volume` (fixed-size binary of
box voxels in [z, y, x] order, `dtype`), `source` (file and section it came from),
`voxel_size_A` (null = unknown), `label` (ground truth where known: a class index, or
JUNK = -1 for a non-particle, as the ledger spells it), `split`, `tomogram`, `x`, `y`, `z`.
Nothing here loads the whole pool into memory, except the small index (every column but
`volume`). Reading some rows' volumes (`read_volumes`, `iter_rows`) opens only the row groups
that hold them, found in `row_groups.json` (or, for a pool written before it existed, in the
shards' Parquet footers), so its cost follows the rows read, not the pool's size.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import tempfile
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.storage import filesystem_for, is_file, is_uri, join, read_text

MANIFEST = "pool.json"
ROW_GROUPS = "row_groups.json"  # written before the manifest; derived from the shards' footers
# Every row's metadata, written before the manifest: read from the shards' 1 MB row groups it
# took 1.5 s at 100,000 rows (a column chunk per 16 rows), and a cycle reads it several times.
INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
VOLUME_DTYPES = ("float16", "float32")
# Volumes per Parquet row group, at most: bounds writer and reader memory, and what reading a
# few scattered rows costs. A row is read with its whole row group, so a cycle's labelled rows,
# scattered over a large pool, read (rows × group size) bytes: 1 MB (16 subtomograms of 32³
# float16) keeps that near the rows' own size, where 16 MB read a 100,000-row pool twice over
# to train on 2,000 labels (docs/BENCHMARKS.md, "One cycle against the pool's size"). Full
# scans decode ~1.6× slower from 1 MB groups, still ~100× what scoring consumes.
ROW_GROUP_MB = 1
# Row groups read at once when fetching scattered rows: a cold disk or an object store answers
# them faster side by side (500 rows of a 40,000-row pool from a cold page cache: 1.05 s one at
# a time, 0.50 s eight at a time; docs/BENCHMARKS.md). Memory holds this many row groups.
READ_AHEAD = 8
# A row whose ground truth is "not a particle" (empty noise, a carbon edge, a fragment, ...):
# the ledger's junk answer (orchestrator/al/labels.py imports it from here). Not a class, so it
# never counts in num_classes and never in an accuracy.
JUNK = -1
INDEX_COLUMNS = (
    "row", "subtomo_id", "source", "voxel_size_A", "label", "split", "tomogram", "x", "y", "z",
)


class PoolError(ValueError):
    """A pool that cannot be written or read as asked; the message says which and why."""


class DuplicateIdError(PoolError):
    pass


@dataclass(frozen=True)
class PoolInfo:
    path: str
    box: tuple[int, int, int]
    dtype: str
    normalisation: str
    class_names: tuple[str, ...]
    n_rows: int
    shards: tuple[str, ...]  # relative to path
    description: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def shard_paths(self) -> list[str]:
        return [join(self.path, shard) for shard in self.shards]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.box))


def _schema(voxel_bytes: int) -> pa.Schema:
    return pa.schema([
        ("row", pa.int64()),
        ("subtomo_id", pa.string()),
        ("volume", pa.binary(voxel_bytes)),
        ("source", pa.string()),
        ("voxel_size_A", pa.float32()),
        ("label", pa.int32()),
        ("split", pa.string()),
        ("tomogram", pa.string()),
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("z", pa.float32()),
    ])


def as_box(box: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(box, (int, np.integer)):
        return (int(box),) * 3
    box = tuple(int(b) for b in box)
    if len(box) != 3:
        raise PoolError(f"box must be an int or three ints [z, y, x], got {box}")
    return box


def zscore(volume: np.ndarray) -> np.ndarray:
    """Zero mean, unit std per subtomogram. Refuses volumes that cannot be normalised."""
    volume = np.asarray(volume, dtype=np.float32)
    if not np.isfinite(volume).all():
        raise PoolError("volume has NaN or Inf voxels")
    mean = volume.mean(dtype=np.float64)
    std = volume.std(dtype=np.float64)
    if std <= 1e-12 * max(1.0, abs(mean)):
        raise PoolError("volume is constant (zero variance)")
    return ((volume - mean) / std).astype(np.float32)


class PoolWriter:
    """Append subtomograms to a new pool; the manifest is written (atomically) on close.

    Volumes are z-scored here, so every source (simulator, MRC folders, STAR files, arrays)
    gets the same normalisation; invalid volumes raise PoolError and are not written.
    """

    def __init__(
        self,
        path: str | Path,
        box: int | Sequence[int],
        *,
        dtype: str = "float16",
        shard_mb: float = 256.0,
        rows_per_group: int = 1024,
        class_names: Sequence[str] = (),
        normalisation: str = "zscore",
        description: str = "",
        overwrite: bool = False,
    ):
        if dtype not in VOLUME_DTYPES:
            raise PoolError(f"dtype must be one of {VOLUME_DTYPES}, got {dtype!r}")
        if normalisation not in ("zscore", "none"):
            raise PoolError(f"normalisation must be 'zscore' or 'none', got {normalisation!r}")
        if is_uri(path):  # shards are written with local files and renames
            raise PoolError(f"{path}: pools are written to a local path; copy the folder to "
                            "object storage afterwards (pools are read from URIs)")
        self.path = Path(path)
        if (self.path / MANIFEST).exists() and not overwrite:
            raise PoolError(f"{self.path}: a pool already exists there (pass overwrite to replace)")
        if overwrite and (self.path / SHARD_DIR).exists():
            for old in (self.path / SHARD_DIR).glob("*.parquet"):
                old.unlink()
            (self.path / MANIFEST).unlink(missing_ok=True)
            (self.path / ROW_GROUPS).unlink(missing_ok=True)
            (self.path / INDEX_FILE).unlink(missing_ok=True)
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.box = as_box(box)
        self.dtype = dtype
        self.normalisation = normalisation
        self.class_names = tuple(class_names)
        self.description = description
        voxel_bytes = int(np.prod(self.box)) * np.dtype(dtype).itemsize
        self._schema = _schema(voxel_bytes)
        self._rows_per_shard = max(1, int(shard_mb * 2**20 // voxel_bytes))
        # A row group is what writers buffer and readers decode at once: bound it in bytes too.
        rows_per_group_mb = max(1, int(ROW_GROUP_MB * 2**20 // voxel_bytes))
        self._rows_per_group = max(1, min(rows_per_group, rows_per_group_mb, self._rows_per_shard))
        self._ids: set[str] = set()
        self._buffer: list[dict] = []
        self._shards: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        self.n_rows = 0
        self._closed = False

    def __contains__(self, subtomo_id: str) -> bool:
        return subtomo_id in self._ids

    def add(
        self,
        subtomo_id: str,
        volume: np.ndarray,
        *,
        source: str,
        voxel_size_A: float | None = None,
        label: int | None = None,
        split: str | None = None,
        tomogram: str | None = None,
        xyz: Sequence[float] | None = None,
    ) -> None:
        subtomo_id = str(subtomo_id)
        if not subtomo_id:
            raise PoolError("empty subtomo_id")
        if subtomo_id in self._ids:
            raise DuplicateIdError(f"duplicate subtomo_id {subtomo_id!r}")
        volume = np.asarray(volume)
        if volume.shape != self.box:
            raise PoolError(f"volume shape {volume.shape} differs from the pool's box {self.box}")
        if (label is not None and self.class_names and int(label) != JUNK
                and not 0 <= int(label) < len(self.class_names)):
            raise PoolError(f"label {label} outside 0..{len(self.class_names) - 1} (or {JUNK}: junk)")
        if self.normalisation == "zscore":
            volume = zscore(volume)
        elif not np.isfinite(volume).all():
            raise PoolError("volume has NaN or Inf voxels")
        x, y, z = (None, None, None) if xyz is None else (float(v) for v in xyz)
        self._ids.add(subtomo_id)
        self._buffer.append({
            "row": self.n_rows,
            "subtomo_id": subtomo_id,
            "volume": np.ascontiguousarray(volume, dtype=self.dtype).tobytes(),
            "source": source,
            "voxel_size_A": voxel_size_A,
            "label": None if label is None else int(label),
            "split": split,
            "tomogram": tomogram,
            "x": x, "y": y, "z": z,
        })
        self.n_rows += 1
        if len(self._buffer) >= self._rows_per_group:
            self._flush()

    def _flush(self) -> None:
        while self._buffer:
            if self._writer is None:
                name = f"{SHARD_DIR}/part-{len(self._shards):05d}.parquet"
                self._shards.append(name)
                self._writer = pq.ParquetWriter(
                    self.path / name, self._schema,
                    # Dictionary encoding and statistics are for the small columns only: on the
                    # volume column (every value unique) a dictionary page holds the whole row
                    # group, which readers then load at once.
                    use_dictionary=[c for c in self._schema.names if c != "volume"],
                    write_statistics=[c for c in self._schema.names if c != "volume"],
                )
                self._rows_in_shard = 0
            take = min(len(self._buffer), self._rows_per_shard - self._rows_in_shard)
            rows, self._buffer = self._buffer[:take], self._buffer[take:]
            self._writer.write_table(pa.Table.from_pylist(rows, schema=self._schema))
            self._rows_in_shard += take
            if self._rows_in_shard >= self._rows_per_shard:
                self._writer.close()
                self._writer = None

    def close(self) -> PoolInfo:
        if self._closed:
            return open_pool(self.path)
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        info = PoolInfo(
            path=str(self.path),
            box=self.box,
            dtype=self.dtype,
            normalisation=self.normalisation,
            class_names=self.class_names,
            n_rows=self.n_rows,
            shards=tuple(self._shards),
            description=self.description,
        )
        # The indexes before the manifest: a pool with a manifest always has them.
        save_row_group_index(info, build_row_group_index(info))
        save_index(info, _index_from_shards(info, INDEX_COLUMNS))
        manifest = {k: v for k, v in asdict(info).items() if k != "path"}
        atomic_write_text(self.path / MANIFEST, json.dumps(manifest, indent=2))
        self._closed = True
        return info

    def __enter__(self) -> "PoolWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # leave no manifest: an interrupted pool is not a pool
            self._writer.close()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # read-only or full disk: say which file, leave the old one as it was
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, err) from err
    fsync_dir(path.parent)


def write_error(path: Path, err: OSError) -> OSError:
    """`err` (same errno, so the same OSError subclass) with a message naming the file and
    saying that its previous content, if any, is intact."""
    return OSError(err.errno, f"cannot write {path}: {err.strerror or err} "
                              f"(nothing was changed: the previous {path.name}, if any, is intact)")


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_pool(path: str | Path) -> PoolInfo:
    """The pool at a local path or a URI (s3://, gs://, file://…; see orchestrator/data/storage.py)."""
    # absolute: the path travels to Ray workers, whose working directory is not the driver's
    path = path if is_uri(path) else Path(path).resolve()
    manifest_path = join(path, MANIFEST)
    if not is_file(manifest_path):
        raise PoolError(f"{path}: not a pool (no {MANIFEST}; an ingest may have been interrupted)")
    try:
        manifest = json.loads(read_text(manifest_path))
    except json.JSONDecodeError as err:
        raise PoolError(f"{manifest_path}: unreadable manifest ({err})") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PoolError(f"{manifest_path}: unsupported pool format {manifest.get('format_version')}")
    return PoolInfo(
        path=str(path),
        box=tuple(manifest["box"]),
        dtype=manifest["dtype"],
        normalisation=manifest["normalisation"],
        class_names=tuple(manifest["class_names"]),
        n_rows=int(manifest["n_rows"]),
        shards=tuple(manifest["shards"]),
        description=manifest.get("description", ""),
    )


def shard_locations(info: PoolInfo) -> tuple[pafs.FileSystem | None, list[str]]:
    """The shards as pyarrow and Ray Data readers take them: (filesystem, paths on it) for a
    pool at a URI, opened once for all its shards; (None, the plain paths) for a local pool,
    which is then read exactly as before."""
    if not is_uri(info.path):
        return None, info.shard_paths
    filesystem, root = filesystem_for(info.path)
    return filesystem, [f"{root.rstrip('/')}/{shard}" for shard in info.shards]


# -- where each row is: the row-group index ----------------------------------------------------

@dataclass(frozen=True)
class RowGroupIndex:
    """Where the pool's rows are: disjoint ranges of rows [first, last], each inside one row
    group (`group`) of one shard (`shard`, a position in PoolInfo.shards), sorted by first row.
    PoolWriter writes rows in order, so its pools have one range per row group: a few numbers
    per MB of volumes."""
    shard: np.ndarray
    group: np.ndarray
    first: np.ndarray
    last: np.ndarray

    def locate(self, rows: np.ndarray, pool: str) -> np.ndarray:
        """The range of each row (positions into the arrays); a row in none is an error naming it."""
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(self.first, rows, side="right") - 1
        inside = (at >= 0) & (rows <= self.last[at.clip(min=0)]) if len(self.first) else at >= 0
        if not inside.all():
            missing = rows[~inside]
            held = f"rows {self.first[0]}..{self.last[-1]}" if len(self.first) else "no rows"
            raise PoolError(f"row {missing[0]} is not in the pool {pool} (it holds {held}; "
                            f"{len(missing)} of the {len(rows)} asked rows are not in it)")
        return at

    def rows(self) -> np.ndarray:
        """Every row of the pool, in order."""
        if not len(self.first):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b + 1) for a, b in zip(self.first, self.last)])


def row_group_index(info: PoolInfo) -> RowGroupIndex:
    """The pool's row-group index: its `row_groups.json`, or, for a pool written before that
    file existed (or whose file does not match its shards), one built from the shards' Parquet
    footers, metadata only, once per process."""
    return _load_row_group_index(info) or _built_index(info.path, info.shards)


@functools.lru_cache(maxsize=16)
def _built_index(path: str, shards: tuple[str, ...]) -> RowGroupIndex:
    return build_row_group_index(open_pool(path))


def build_row_group_index(info: PoolInfo) -> RowGroupIndex:
    """The index from each shard's footer: a row group's min and max `row` when they span
    exactly its row count (any pool PoolWriter wrote), else its `row` column (8 bytes a row;
    never the volumes)."""
    filesystem, shards = shard_locations(info)
    found: list[tuple[int, int, int, int]] = []
    for s, shard in enumerate(shards):
        parquet = pq.ParquetFile(shard, filesystem=filesystem)
        for group in range(parquet.metadata.num_row_groups):
            found += [(s, group, first, last) for first, last in _row_ranges(parquet, group)]
    found.sort(key=lambda r: r[2])
    shard, group, first, last = (np.asarray([r[i] for r in found], dtype=np.int64) for i in range(4))
    overlap = np.flatnonzero(first[1:] <= last[:-1])
    if len(overlap):
        i = overlap[0]
        raise PoolError(f"{info.path}: row {first[i + 1]} is in two row groups ({info.shards[shard[i]]} "
                        f"group {group[i]} and {info.shards[shard[i + 1]]} group {group[i + 1]})")
    return RowGroupIndex(shard, group, first, last)


def _row_ranges(parquet: pq.ParquetFile, group: int) -> list[tuple[int, int]]:
    """The rows of one row group as ranges of consecutive rows."""
    meta = parquet.metadata.row_group(group)
    if meta.num_rows == 0:
        return []
    column = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "row")
    stats = column.statistics
    if stats is not None and stats.has_min_max and stats.max - stats.min + 1 == meta.num_rows:
        return [(int(stats.min), int(stats.max))]
    rows = np.sort(parquet.read_row_group(group, columns=["row"]).column(0).to_numpy())
    return consecutive_runs(rows)


def consecutive_runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6, 9] → [(0, 2), (5, 6), (9, 9)]; a repeated row starts a new run."""
    if not len(sorted_rows):
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts, ends = np.r_[0, breaks], np.r_[breaks, len(sorted_rows)] - 1
    return [(int(sorted_rows[a]), int(sorted_rows[b])) for a, b in zip(starts, ends)]


def save_row_group_index(info: PoolInfo, index: RowGroupIndex) -> None:
    saved = {"format_version": FORMAT_VERSION, "shards": list(info.shards),
             **{name: getattr(index, name).tolist() for name in ("shard", "group", "first", "last")}}
    atomic_write_text(Path(info.path) / ROW_GROUPS, json.dumps(saved, separators=(",", ":")))


def _load_row_group_index(info: PoolInfo) -> RowGroupIndex | None:
    """The saved index, or None when there is none or it does not describe these shards (it is
    derived data: the shards' footers rebuild it)."""
    where = join(info.path, ROW_GROUPS)
    if not is_file(where):
        return None
    try:
        saved = json.loads(read_text(where))
        if saved.get("format_version") != FORMAT_VERSION or saved["shards"] != list(info.shards):
            return None
        arrays = [np.asarray(saved[name], dtype=np.int64) for name in ("shard", "group", "first", "last")]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    # a pool rewritten in place by a writer that left the old file behind: counts differ
    if len({len(a) for a in arrays}) != 1 or int((arrays[3] - arrays[2] + 1).sum()) != info.n_rows:
        return None
    return RowGroupIndex(*arrays)


def _rows_by_row_group(
    info: PoolInfo, rows: np.ndarray, columns: Sequence[str]
) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """(positions in `rows`, a table of those rows' `columns` in that order), one row group at
    a time, reading only the row groups that hold the asked rows. Shards and row groups are
    visited in order; READ_AHEAD of them are read at once, so memory holds that many."""
    if not len(rows):
        return
    index = row_group_index(info)
    at = index.locate(rows, info.path)
    place = index.shard[at] * (2**31) + index.group[at]  # one number per (shard, row group)
    order = np.lexsort((rows, place))
    runs = np.split(order, np.flatnonzero(np.diff(place[order])) + 1)
    read_columns = list(dict.fromkeys(["row", *columns]))
    footers = _Footers(info)

    def read(run: np.ndarray) -> tuple[np.ndarray, pa.Table]:
        shard, group = int(index.shard[at[run[0]]]), int(index.group[at[run[0]]])
        table = footers.open(shard).read_row_group(group, columns=read_columns)
        positions = _positions_in(table.column("row").to_numpy(), rows[run], info, shard, group)
        return run, table.take(positions).select(list(columns))

    for run, table in _in_order(read, runs, READ_AHEAD):
        footers.forget_before(int(index.shard[at[run[0]]]))
        yield run, table


class _Footers:
    """Each shard's Parquet footer, read once by whichever reading thread needs it first and
    shared by the others (a ParquetFile per read, since one is not safe to share between
    threads; a footer is ~0.2 MB and takes ~2 ms to parse)."""

    def __init__(self, info: PoolInfo):
        self.filesystem, self.paths = shard_locations(info)
        self._lock = threading.Lock()
        self._footers: dict[int, tuple[threading.Lock, list]] = {}

    def open(self, shard: int) -> pq.ParquetFile:
        with self._lock:
            lock, footer = self._footers.setdefault(shard, (threading.Lock(), []))
        with lock:  # the others reading this shard wait for its footer instead of parsing it too
            if not footer:
                footer.append(pq.read_metadata(self.paths[shard], filesystem=self.filesystem))
        return pq.ParquetFile(self.paths[shard], filesystem=self.filesystem, metadata=footer[0])

    def forget_before(self, shard: int) -> None:
        """Reads go in shard order: no later read opens a shard before `shard`."""
        with self._lock:
            for done in [s for s in self._footers if s < shard]:
                del self._footers[done]


def _in_order(function, items: Sequence, ahead: int) -> Iterator:
    """function(item) for each item, in order, with up to `ahead` calls running in threads."""
    with ThreadPoolExecutor(max_workers=ahead) as threads:
        pending: deque = deque()
        for item in items:
            pending.append(threads.submit(function, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _positions_in(group_rows: np.ndarray, wanted: np.ndarray, info: PoolInfo, shard: int,
                  group: int) -> np.ndarray:
    """Where each wanted row is in a row group's `row` column; the index named this row group,
    so a row missing here means the index no longer describes the shards."""
    order = np.argsort(group_rows, kind="stable")
    found = order[np.searchsorted(group_rows[order], wanted).clip(max=len(order) - 1)]
    missing = group_rows[found] != wanted
    if missing.any():
        raise PoolError(f"row {wanted[missing][0]} is not in {info.shards[shard]} row group {group}, "
                        f"where {ROW_GROUPS} places it: the shards changed after the index was "
                        f"written (delete {join(info.path, ROW_GROUPS)}; it is rebuilt)")
    return found


def decode_volumes(column, info: PoolInfo, dtype=np.float32) -> np.ndarray:
    """The `volume` column (Arrow fixed-size binary, or numpy array of bytes) → `dtype` (float32
    unless asked otherwise) [n, z, y, x]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.FixedSizeBinaryArray):
        width = column.type.byte_width
        if width != info.voxels * np.dtype(info.dtype).itemsize:
            raise PoolError(f"volume column holds {width} bytes a row; the pool's box needs "
                            f"{info.voxels} x {info.dtype}")
        if column.null_count:
            raise PoolError(f"volume column has {column.null_count} null rows")
        # A sliced array (offset > 0) shares its parent's buffer: start at the slice's first byte.
        raw = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column) * width,
                            offset=column.offset * width).view(info.dtype)
    else:  # numpy object array of bytes, as Ray Data hands binary columns to numpy batches
        raw = np.frombuffer(b"".join(column), dtype=info.dtype)
    return raw.reshape(len(column), *info.box).astype(dtype)


def iter_batches(
    path: str | Path, columns: Sequence[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Stream the pool shard by shard; memory holds one row group at a time."""
    filesystem, shards = shard_locations(open_pool(path))
    for shard in shards:
        parquet = pq.ParquetFile(shard, filesystem=filesystem)
        # Row group by row group: iter_batches over a whole file reads ahead many row groups
        # (measured: ~10x the memory for 32^3 volumes).
        for group in range(parquet.num_row_groups):
            yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


def iter_volumes(
    path: str | Path, batch_rows: int = 256
) -> Iterator[tuple[np.ndarray, np.ndarray, pa.Table]]:
    """Yield (ids, volumes float32 [n, z, y, x], index columns) batch by batch.

    Every batch has batch_rows rows except the last (`in_batches_of`).
    """
    info = open_pool(path)
    for table in in_batches_of(iter_batches(path, batch_rows=batch_rows), batch_rows):
        yield _volume_batch(table, info)


def _volume_batch(table: pa.Table, info: PoolInfo) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    volumes = decode_volumes(table.column("volume"), info)
    index = table.drop_columns(["volume"])
    return np.asarray(index.column("subtomo_id").to_pylist()), volumes, index


def read_index(path: str | Path, columns: Sequence[str] = INDEX_COLUMNS) -> pa.Table:
    """Every row's metadata (no volumes): about 100 bytes a row. From `index.parquet`, or, for a
    pool written before it existed (or whose file does not match its shards), from the shards."""
    info = open_pool(path)
    return _load_index(info, columns) or _index_from_shards(info, columns)


def _index_from_shards(info: PoolInfo, columns: Sequence[str]) -> pa.Table:
    filesystem, shards = shard_locations(info)
    tables = [pq.read_table(shard, columns=list(columns), filesystem=filesystem) for shard in shards]
    if not tables:
        return _schema(1).empty_table().select(list(columns))
    return pa.concat_tables(tables)


def save_index(info: PoolInfo, index: pa.Table) -> None:
    """`index.parquet`: the index's columns, with the shards it was read from (to tell a stale one)."""
    stamped = index.replace_schema_metadata({b"cryoal_shards": json.dumps(list(info.shards)).encode()})
    where = Path(info.path) / INDEX_FILE
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    pq.write_table(stamped, tmp)
    os.replace(tmp, where)


def _load_index(info: PoolInfo, columns: Sequence[str]) -> pa.Table | None:
    """The saved index's `columns`, or None when there is none or it does not describe these
    shards and rows (it is derived data: the shards rebuild it)."""
    where = join(info.path, INDEX_FILE)
    if not is_file(where):
        return None
    filesystem, location = filesystem_for(where) if is_uri(where) else (None, where)
    try:
        parquet = pq.ParquetFile(location, filesystem=filesystem)
        shards = json.loads((parquet.schema_arrow.metadata or {}).get(b"cryoal_shards", b"null"))
        if shards != list(info.shards) or parquet.metadata.num_rows != info.n_rows:
            return None
        return parquet.read(columns=list(columns)).replace_schema_metadata(None)
    except (OSError, ValueError, KeyError, pa.ArrowInvalid):
        return None


def read_volumes(path: str | Path, rows: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """The volumes of the given pool rows, in that order (the labelled set, a page of queries),
    float32. Only the row groups holding them are read: the cost follows len(rows), not the pool.

    ``out`` (``len(rows)`` volumes of the pool's box, e.g. a memory-mapped file, see
    `cache_volumes`) receives them in its own dtype instead, one row group's rows at a time, so
    memory holds no more than READ_AHEAD row groups however many rows are read."""
    info = open_pool(path)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    _refuse_repeated(rows)
    if out is None:
        out = np.empty((len(rows), *info.box), dtype=np.float32)
    elif out.shape != (len(rows), *info.box):
        raise PoolError(f"read_volumes: out has shape {out.shape}, the rows need {(len(rows), *info.box)}")
    for positions, table in _rows_by_row_group(info, rows, ["volume"]):
        out[positions] = decode_volumes(table.column("volume"), info, out.dtype)
    return out


def cache_volumes(path: str | Path, rows: Sequence[int], directory: str | None = None) -> np.ndarray:
    """The volumes of the given rows, in that order, in the pool's dtype, in a memory-mapped file
    on this node's disk: ``directory``, or the temporary directory (``TMPDIR``, else /tmp).
    Converted to float32 they are exactly what `read_volumes` returns, but the process holds
    only the pages it touches (the kernel's page cache, dropped under pressure), so a set larger
    than memory can be read. It needs len(rows) × voxels × itemsize bytes of disk (2 for
    float16 pools). The file has no name (unlinked at once): its blocks are freed when the
    array is garbage collected, or when the process ends, killed or not."""
    info = open_pool(path)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    shape = (len(rows), *info.box)
    if not len(rows):
        return np.empty(shape, dtype=info.dtype)
    check_rows(info, rows)  # before any disk is taken, so a refusal's traceback holds no cache
    directory = directory or tempfile.gettempdir()
    with tempfile.TemporaryFile(prefix="cryoal-volumes-", dir=directory) as file:
        reserve_disk(file.fileno(), int(np.prod(shape)) * np.dtype(info.dtype).itemsize, directory)
        cache = np.memmap(file, dtype=info.dtype, mode="r+", shape=shape)  # the map keeps the file
    return read_volumes(path, rows, out=cache)


def check_rows(info: PoolInfo, rows: np.ndarray) -> None:
    """A PoolError naming a row asked twice or not in the pool, if there is one."""
    _refuse_repeated(rows)
    row_group_index(info).locate(rows, info.path)


def reserve_disk(fd: int, size: int, directory: str) -> None:
    """Allocate the cache's blocks before writing: a full disk is then an error naming the
    size, not a SIGBUS at the first page written into a hole. A filesystem that cannot
    allocate ahead gets a sparse file."""
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as err:  # AttributeError: no posix_fallocate (macOS)
        if getattr(err, "errno", errno.EOPNOTSUPP) not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise OSError(err.errno, f"cannot reserve {size:,} bytes for the volume cache in "
                          f"{directory}: {err.strerror} (set TMPDIR to a local disk with room)"
                          ) from err
        os.ftruncate(fd, size)


def iter_rows(
    path: str | Path, rows: Sequence[int], columns: Sequence[str], batch_rows: int = 1024
) -> Iterator[pa.Table]:
    """The given rows' columns (and `row`) in pool order, in tables of batch_rows rows (the last
    shorter), reading only the row groups that hold them: a scoring pass over the candidates
    never reads, let alone decodes, a row group of labelled or held-out rows only."""
    info = open_pool(path)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    columns = list(dict.fromkeys(["row", *columns]))
    pieces = (table for _, table in _rows_by_row_group(info, rows, columns))
    yield from in_batches_of(pieces, batch_rows)


def in_batches_of(pieces: Iterable[pa.Table | pa.RecordBatch], batch_rows: int) -> Iterator[pa.Table]:
    """The rows of `pieces` again, in tables of batch_rows rows (the last shorter): pieces end
    at shard or row-group boundaries, so short ones are carried over and joined (memory still
    holds about one batch)."""
    pending: list[pa.RecordBatch] = []
    n_pending = 0
    for piece in pieces:
        pending += piece.to_batches() if isinstance(piece, pa.Table) else [piece]
        n_pending += piece.num_rows
        while n_pending >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, batch_rows)
            rest = table.slice(batch_rows)
            pending, n_pending = rest.to_batches(), rest.num_rows
    if n_pending:
        yield pa.Table.from_batches(pending)


def _refuse_repeated(rows: np.ndarray) -> None:
    """An error naming a row that appears twice in `rows`, if one does."""
    ordered = np.sort(rows)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(twice):
        raise PoolError(f"read_volumes: row {int(twice[0])} asked twice")


def pool_summary(info: PoolInfo) -> dict:
    return {
        "path": info.path,
        "rows": info.n_rows,
        "box": list(info.box),
        "dtype": info.dtype,
        "classes": len(info.class_names),
        "shards": len(info.shards),
    }
