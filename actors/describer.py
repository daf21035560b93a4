"""The cold start's describing worker: maps pool batches to each volume's label-free features.

Cycle 0 has no model to score with; TypiClust clusters a description of every candidate that
needs none (`orchestrator/al/cold_start.py`). Ray Data runs `describe_batch` in task workers
over the same read as a scoring pass (`orchestrator/distributed/score.py`, `describe_pool`),
so describing a pool of millions is spread over the cluster's CPUs and never holds more than
a few batches of volumes; only row numbers and features come back.
"""

from __future__ import annotations

import numpy as np

from orchestrator.al.cold_start import embedding_of
from orchestrator.data.pool import decode_volumes, open_pool


class PoolDescriber:
    def __init__(self, pool_path: str, embedding: str):
        self.features_of = embedding_of(embedding)
        self.info = open_pool(pool_path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        volumes = decode_volumes(batch["volume"], self.info)
        # float64, as computed: float32 would move k-means++'s draws, and so the picks
        return {"row": rows, "features": self.features_of(volumes)}


# This process's describer, kept for the batches that follow (the pool's metadata read once).
_warm: dict[tuple, PoolDescriber] = {}


def describe_batch(batch: dict[str, np.ndarray], pool_path: str, embedding: str) -> dict[str, np.ndarray]:
    """`PoolDescriber(pool_path, embedding)(batch)`, the describer built once per process."""
    key = (pool_path, embedding)
    if key not in _warm:
        _warm.clear()
        _warm[key] = PoolDescriber(pool_path, embedding)
    return _warm[key](batch)
