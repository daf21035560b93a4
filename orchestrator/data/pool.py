"""The subtomogram pool: sharded Parquet, one row per subtomogram, plus a small manifest.

A million small MRC files is a filesystem problem, so a pool is ingested once into Parquet
shards that Ray Data (and the plain readers here) stream shard by shard. Layout:

    POOL/pool.json              manifest: box, dtype, normalisation, class names, shards, counts
    POOL/shards/part-00000.parquet

Columns: `row` (position in the pool), `subtomo_id` (unique), `volume` (fixed-size binary of
box voxels in [z, y, x] order, `dtype`), `source` (file and section it came from),
`voxel_size_A` (null = unknown), `label` (ground truth where known: a class index, or
JUNK = -1 for a non-particle, as the ledger spells it), `split`, `tomogram`, `x`, `y`, `z`.
Nothing here loads the whole pool into memory, except the small index (every column but
`volume`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.data.storage import filesystem_for, is_file, is_uri, join, read_text

MANIFEST = "pool.json"
SHARD_DIR = "shards"
FORMAT_VERSION = 1
VOLUME_DTYPES = ("float16", "float32")
ROW_GROUP_MB = 16  # volumes per Parquet row group, at most: bounds writer and reader memory
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


def decode_volumes(column, info: PoolInfo) -> np.ndarray:
    """The `volume` column (Arrow fixed-size binary, or numpy array of bytes) → float32 [n, z, y, x]."""
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
    return raw.reshape(len(column), *info.box).astype(np.float32)


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

    Every batch has batch_rows rows except the last: Parquet batches end at shard boundaries,
    so short pieces are carried over and joined (memory still holds about one batch).
    """
    info = open_pool(path)
    pending: list[pa.RecordBatch] = []
    n_pending = 0
    for batch in iter_batches(path, batch_rows=batch_rows):
        pending.append(batch)
        n_pending += batch.num_rows
        while n_pending >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield _volume_batch(table.slice(0, batch_rows), info)
            rest = table.slice(batch_rows)
            pending, n_pending = rest.to_batches(), rest.num_rows
    if n_pending:
        yield _volume_batch(pa.Table.from_batches(pending), info)


def _volume_batch(table: pa.Table, info: PoolInfo) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    volumes = decode_volumes(table.column("volume"), info)
    index = table.drop_columns(["volume"])
    return np.asarray(index.column("subtomo_id").to_pylist()), volumes, index


def read_index(path: str | Path, columns: Sequence[str] = INDEX_COLUMNS) -> pa.Table:
    """Every row's metadata (no volumes): about 100 bytes a row."""
    filesystem, shards = shard_locations(open_pool(path))
    tables = [pq.read_table(shard, columns=list(columns), filesystem=filesystem) for shard in shards]
    if not tables:
        return _schema(1).empty_table().select(list(columns))
    return pa.concat_tables(tables)


def read_volumes(path: str | Path, rows: Sequence[int]) -> np.ndarray:
    """The volumes of the given pool rows, in that order (for the labelled set; streams shards)."""
    info = open_pool(path)
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *info.box), dtype=np.float32)
    wanted = {int(r): i for i, r in enumerate(rows)}
    if len(wanted) != len(rows):
        raise PoolError("read_volumes: repeated rows")
    found = 0
    for batch in iter_batches(path, columns=["row", "volume"]):
        batch_rows = batch.column(0).to_numpy()
        hit = np.fromiter((r in wanted for r in batch_rows), dtype=bool, count=len(batch_rows))
        if not hit.any():
            continue
        volumes = decode_volumes(batch.column(1).filter(pa.array(hit)), info)
        for r, vol in zip(batch_rows[hit], volumes):
            out[wanted[int(r)]] = vol
        found += int(hit.sum())
    if found != len(rows):
        raise PoolError(f"read_volumes: {len(rows) - found} of the requested rows are not in {path}")
    return out


def pool_summary(info: PoolInfo) -> dict:
    return {
        "path": info.path,
        "rows": info.n_rows,
        "box": list(info.box),
        "dtype": info.dtype,
        "classes": len(info.class_names),
        "shards": len(info.shards),
    }
