"""Cold start: cycle 0's labels chosen instead of drawn at random (``strategy.initial``).

At tiny budgets, labelling typical and diverse examples beats a random draw, TypiClust's authors
report (Hacohen et al., ICML 2022: cluster the pool in an embedding space that needs no labels,
label the most typical member of each of the largest clusters); on the benchmark's data it is
measured in docs/BENCHMARKS.md, "Cold start". Cycle 0 has no trained model, so the
embedding here is a rotation-invariant description of each volume, computed from the pool in
the driver (every train volume read once, in batches):

- the mean density and the mean squared density in spherical shells about the box centre
  (radius 0 … box/2 − 1 voxels): a particle's size and radial layout whatever its orientation;
- the log of the mean Fourier power in shells of |k| (0 … box/2 − 1): its texture and size in
  frequency, the same CTF and wedge for every volume.

Each of the 3·(box/2) features is z-scored over the candidates, then ``typiclust`` selects.
Why not a random network's features (the other embedding TypiClust's authors suggest): on 300
built-in subtomograms at SNR 0.05 (10 classes), k-means on a random ResNet-10's embeddings
(BatchNorm statistics set on 256 of them) found clusters with a normalised mutual information
with the classes of 0.06–0.08, what random vectors give (0.06); these radial features gave
0.33 (`python bench/cold_start_embeddings.py`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from orchestrator.al.strategies import Candidates, make_strategy, select
from orchestrator.data.pool import decode_volumes, iter_batches, open_pool

__all__ = ["INITIAL", "radial_features", "pool_features", "typiclust_initial"]

INITIAL = ("random", "typiclust")  # what strategy.initial may name
BATCH_ROWS = 256


@lru_cache(maxsize=4)
def _shells(box: tuple[int, int, int]):
    """(real-space shell averaging [V, S], Fourier half-grid shell averaging [V', S]) for a box:
    one matrix product per batch instead of a loop over volumes."""
    shells = min(box) // 2
    centre = [(n - 1) / 2 for n in box]
    grid = np.indices(box, dtype=np.float64)
    radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))).astype(np.int64).ravel()
    real = _averaging(radius, shells, np.ones(radius.size))
    k = [np.fft.fftfreq(n) * n for n in box[:2]] + [np.fft.rfftfreq(box[2]) * box[2]]
    kz, ky, kx = np.meshgrid(*k, indexing="ij")
    k_radius = np.sqrt(kz**2 + ky**2 + kx**2).astype(np.int64).ravel()
    # the rfft half grid: inner x-frequencies stand for themselves and their mirror image
    weight = np.full(kx.shape, 2.0)
    weight[..., 0] = 1.0
    if box[2] % 2 == 0:
        weight[..., -1] = 1.0
    fourier = _averaging(k_radius, shells, weight.ravel())
    return real, fourier


def _averaging(shell: np.ndarray, shells: int, weight: np.ndarray) -> np.ndarray:
    """[V, shells] float32: column s averages the voxels of shell s (with their weights)."""
    matrix = np.zeros((shell.size, shells), dtype=np.float32)
    inside = shell < shells
    matrix[np.flatnonzero(inside), shell[inside]] = weight[inside]
    return matrix / np.maximum(matrix.sum(axis=0), 1e-12)


def radial_features(volumes: np.ndarray) -> np.ndarray:
    """[n, 3·(box/2)] float64 per volume [n, z, y, x]: shell means of the density and of its
    square, then the log mean Fourier power per |k| shell. Invariant to rotations about the
    box centre (up to the voxel grid)."""
    volumes = np.asarray(volumes, dtype=np.float32)
    real, fourier = _shells(tuple(volumes.shape[1:]))
    flat = volumes.reshape(len(volumes), -1)
    power = np.abs(np.fft.rfftn(volumes, axes=(1, 2, 3))).astype(np.float32) ** 2
    spectrum = power.reshape(len(volumes), -1) @ fourier
    return np.concatenate([flat @ real, (flat * flat) @ real,
                           np.log(spectrum + 1e-12)], axis=1).astype(np.float64)


def pool_features(pool_path: str, rows: np.ndarray, batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """:func:`radial_features` of the pool rows ``rows`` (sorted, unique), in that order."""
    rows = np.asarray(rows, dtype=np.int64)
    info = open_pool(pool_path)
    out = np.full((len(rows), 3 * (min(info.box) // 2)), np.nan)
    for batch in iter_batches(pool_path, columns=["row", "volume"], batch_rows=batch_rows):
        batch_rows_ = batch.column(0).to_numpy()
        position = np.searchsorted(rows, batch_rows_).clip(max=max(len(rows) - 1, 0))
        keep = np.flatnonzero((len(rows) > 0) & (rows[position] == batch_rows_))
        if keep.size:
            volumes = decode_volumes(batch.column(1).take(keep), info)
            out[position[keep]] = radial_features(volumes)
    return out


def typiclust_initial(pool_path: str, candidates: np.ndarray, k: int, seed: int,
                      options: dict | None = None) -> np.ndarray:
    """The k pool rows of cycle 0 (in the order chosen): ``typiclust`` over the candidates'
    z-scored radial features, no labelled rows, randomness from (seed, cycle 0)."""
    rows = np.unique(np.asarray(candidates, dtype=np.int64))
    features = pool_features(pool_path, rows)
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    strategy = make_strategy("typiclust", **(options or {}))
    chosen = select(strategy, Candidates(rows, {"embeddings": features},
                                         {"embeddings": features[:0]}),
                    k, np.random.default_rng([seed, 0, 0x7C]))
    return rows[chosen]
