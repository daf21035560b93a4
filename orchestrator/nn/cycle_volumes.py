"""A cycle's volumes by position, whatever holds them: the one way training, validation, the
test split, BatchNorm calibration, the unlabelled stream and an auxiliary's fit get volumes.

A :class:`Volumes` wraps an array of volumes [n, z, y, x] (float16 or float32): in memory, the
memory-mapped cache of a cycle's rows on the worker's disk (:func:`cached_volumes`,
``orchestrator.data.pool.cache_volumes``), or the node's shared cache entry for them
(:func:`shared_cached_volumes`, ``orchestrator.data.volume_cache``). Only the batches asked for become float32 tensors,
so a worker's memory follows its batch size, not the labelled set.
"""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.data.pool import cache_volumes
from orchestrator.data.volume_cache import shared_volumes

__all__ = ["Volumes", "cached_volumes", "shared_cached_volumes"]


class Volumes:
    """``len`` and ``gather(indices)``: float32 ``[len(indices), z, y, x]``, a new tensor each
    time (never a view of the array, so closing cannot invalidate a batch in use). ``x[i]`` is
    ``gather`` too, for a slice as well, so code written for tensors reads from it unchanged.
    As a context manager, or with ``close()``, the array is let go (a cache's disk freed)."""

    def __init__(self, array: np.ndarray):
        self._array = array
        self._length = len(array)

    def __len__(self) -> int:
        return self._length

    def gather(self, indices) -> torch.Tensor:
        if self._array is None:
            raise ValueError("these volumes were closed")
        picked = self._array[np.asarray(indices, dtype=np.int64)]  # a copy: fancy indexing
        return torch.from_numpy(picked.astype(np.float32, copy=False))

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(self._length)[index]
        return self.gather(index)

    def close(self) -> None:
        self._array = None  # the last reference to a cache: its mapping and blocks go with it

    def __enter__(self) -> "Volumes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cached_volumes(pool: str, rows) -> Volumes:
    """The rows' volumes, in that order, read once from the pool into a memory-mapped cache on
    this node's disk (len(rows) × voxels × 2 bytes for a float16 pool)."""
    return Volumes(cache_volumes(pool, rows))


def shared_cached_volumes(pool: str, rows) -> Volumes:
    """The rows' volumes, in that order, from this node's shared cache: read from the pool by
    the first worker of the node to ask, mapped by the others and by later cycles asking for
    the same rows. For the sets every worker reads whole (labelled, validation, test)."""
    return Volumes(shared_volumes(pool, rows))
