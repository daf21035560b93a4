"""Subtomogram id → pool row, for a pool of millions of rows.

A dict of Python strings costs ~150 bytes a row and a set of them ~100 more: 78 MB at 300,000
rows, held by the driver through a campaign and by the labelling page. `IdRows` keeps the ids
sorted in one numpy array with the row of each (~40 bytes a row) and looks ids up by binary
search, one at a time (a `Mapping`, so `in`, `[]` and `get` work as on a dict) or many at once.
`strings_of` turns the index's string columns into such arrays without a Python string per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

__all__ = ["IdRows", "strings_of"]


def strings_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A string column (no nulls) as a fixed-width numpy str array, copied from Arrow's bytes:
    ``to_pylist`` would make a Python string of every row first (~60 MB for 10⁶ ids, which the
    allocator keeps after they are freed: the campaign's driver grew with the pool by that)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.string())
    if column.null_count:
        raise ValueError("strings_of: the column has nulls")
    column = column.cast(pa.large_string())  # 64-bit offsets
    if len(column) == 0:
        return np.zeros(0, dtype=str)
    _, offsets_buffer, data_buffer = column.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int64)[column.offset:column.offset + len(column) + 1]
    data = np.frombuffer(data_buffer, np.uint8)[offsets[0]:offsets[-1]] if data_buffer else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if data.size and data.max() >= 0x80:  # not ASCII: numpy decodes bytes arrays as ASCII only
        return np.asarray(column.to_pylist(), dtype=str)
    width = max(int(lengths.max()), 1)
    if (lengths == width).all():  # ids of one length (s0000001, …): the bytes are the matrix
        chars = data.reshape(len(column), width)
    else:
        chars = np.zeros((len(column), width), np.uint8)
        chars[np.arange(width) < lengths[:, None]] = data  # row by row, each id's bytes then zeros
    # numpy's str is UCS-4: an ASCII byte widened to 32 bits is its character (zeros: padding)
    return np.ascontiguousarray(chars, dtype=np.uint32).view(f"U{width}").ravel()


class IdRows(Mapping):
    """Subtomogram id → pool row."""

    def __init__(self, ids: Iterable[str], rows: Iterable[int] | None = None):
        """``ids`` and their ``rows`` (default: 0, 1, … in the ids' order)."""
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=str)
        rows = (np.arange(len(ids), dtype=np.int64) if rows is None
                else np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=np.int64))
        if rows.shape != ids.shape:
            raise ValueError(f"IdRows: {len(ids)} ids but {len(rows)} rows")
        if len(ids) < 2 or (ids[1:] > ids[:-1]).all():  # already sorted (ids written in order): no copy
            self._ids, self._rows = ids, rows
        else:
            order = np.argsort(ids, kind="stable")
            self._ids, self._rows = ids[order], rows[order]

    def rows_of(self, subtomo_ids: Iterable[str]) -> np.ndarray:
        """The rows of ``subtomo_ids``, aligned with them; -1 for an id not here."""
        wanted = np.asarray(list(subtomo_ids), dtype=str)
        if not len(wanted) or not len(self._ids):
            return np.full(len(wanted), -1, dtype=np.int64)
        at = np.searchsorted(self._ids, wanted).clip(max=len(self._ids) - 1)
        return np.where(self._ids[at] == wanted, self._rows[at], -1)

    def __getitem__(self, subtomo_id: str) -> int:
        row = int(self.rows_of([subtomo_id])[0]) if isinstance(subtomo_id, str) else -1
        if row < 0:
            raise KeyError(subtomo_id)
        return row

    def __contains__(self, subtomo_id: object) -> bool:
        return isinstance(subtomo_id, str) and self.rows_of([subtomo_id])[0] >= 0

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids.tolist())
