"""A node's shared cache of pool rows' volumes: the training workers of one node read a set of
rows from the pool once and map the same file, and a later cycle asking for the same rows (the
validation and test splits) maps it again instead of reading the pool.

An entry is a ``.npy`` file of the rows' volumes, in that order and in the pool's dtype, named
by a hash of the pool (its path, manifest, and each shard's size and modification time: a pool
rewritten in place is another pool) and of the rows. A lock file serialises the writers of a
cache directory: a worker asking for an entry that another is writing waits for it rather than
reading the pool a second time. The directory keeps the ``keep`` entries used last. Evicting
an entry a worker still maps is safe (its blocks are freed with the last map); an entry evicted
before a worker opened it is read from the pool again. A worker killed while writing leaves a
``.partial-PID`` file, removed by the next writer once that process is gone.

Where: ``$CRYOAL_VOLUME_CACHE``, else ``cryoal-volumes`` in the temporary directory (``TMPDIR``,
else /tmp): a local disk of each node, with room for a few labelled sets.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs

from orchestrator.data.pool import (
    PoolInfo,
    check_rows,
    open_pool,
    read_volumes,
    reserve_disk,
    shard_locations,
)

__all__ = ["CACHE_ENV", "KEEP_ENTRIES", "cache_directory", "pool_stamp", "shared_volumes"]

CACHE_ENV = "CRYOAL_VOLUME_CACHE"
# A cycle uses up to three entries (labelled, validation, test); six keep the splits of two
# campaigns sharing a node across their cycles, while older labelled sets are let go
KEEP_ENTRIES = 6


def cache_directory() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "cryoal-volumes")


def shared_volumes(pool: str | Path, rows: Sequence[int], directory: str | Path | None = None,
                   keep: int = KEEP_ENTRIES) -> np.ndarray:
    """The volumes of the given pool rows, in that order and in the pool's dtype, as a read-only
    memory-mapped array of this node's cache entry for them, read from the pool first if no
    process of the node has (see the module's docstring)."""
    info = open_pool(pool)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if not len(rows):
        return np.empty((0, *info.box), dtype=info.dtype)
    directory = Path(directory or cache_directory())
    directory.mkdir(parents=True, exist_ok=True)
    entry = directory / f"{_entry_name(info, rows)}.npy"
    with _locked(directory):
        if entry.exists():
            os.utime(entry)  # used last: kept longest
        else:
            _write_entry(info, rows, entry)
            _evict(directory, keep, entry)
        return np.load(entry, mmap_mode="r")


def pool_stamp(info: PoolInfo) -> str:
    """A hash of what the pool's rows hold: manifest, and each shard's size and mtime."""
    filesystem, shards = shard_locations(info)
    files = (filesystem or pafs.LocalFileSystem()).get_file_info(shards)
    described = {"pool": asdict(info), "shards": [[f.path, f.size, f.mtime_ns] for f in files]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _entry_name(info: PoolInfo, rows: np.ndarray) -> str:
    digest = hashlib.sha256(pool_stamp(info).encode())
    digest.update(rows.astype("<i8").tobytes())
    return digest.hexdigest()[:32]


def _write_entry(info: PoolInfo, rows: np.ndarray, entry: Path) -> None:
    """Read the rows into ``entry`` by way of a partial file, so an entry is whole or absent."""
    check_rows(info, rows)  # before the partial file, so a refusal's traceback maps none
    _remove_abandoned(entry.parent)
    partial = entry.with_name(f"{entry.stem}.partial-{os.getpid()}")
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=info.dtype,
                                        shape=(len(rows), *info.box))
        with open(partial, "r+b") as file:  # blocks allocated now: a full disk is an error here
            reserve_disk(file.fileno(), os.fstat(file.fileno()).st_size, str(entry.parent))
        read_volumes(info.path, rows, out=out)
        out.flush()
        del out
        os.replace(partial, entry)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _evict(directory: Path, keep: int, written: Path) -> None:
    """Keep the `keep` entries used last (the one just written always)."""
    entries = sorted(directory.glob("*.npy"), key=_mtime, reverse=True)
    for old in [e for e in entries if e != written][max(0, keep - 1):]:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove_abandoned(directory: Path) -> None:
    """Partial entries of processes that no longer run (killed while writing)."""
    for partial in directory.glob("*.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            partial.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
