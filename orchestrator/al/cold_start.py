"""Cold start: cycle 0's labels chosen instead of drawn at random (``strategy.initial``).

At tiny budgets, labelling typical and diverse examples beats a random draw, TypiClust's authors
report (Hacohen et al., ICML 2022: cluster the pool in an embedding space that needs no labels,
label the most typical member of each of the largest clusters); on the benchmark's data it is
measured in docs/BENCHMARKS.md, "Cold start". Cycle 0 has no trained model, so the
embedding is a label-free description of each volume, the same however the particle is turned,
computed over Ray Data like a scoring pass (`actors/describer.py`): each candidate volume read
once, on the cluster's CPUs, only the features reaching the driver. Two are
offered (``strategy.initial_options.embedding``):

- ``density`` (the default): the particle's tail of the low-passed density (Gaussian, σ = 1.5, 2
  and 3 voxels; each volume's mean removed) as quantiles, 0.5 … 0.999: how much of the box is
  how dense, i.e. the particle's mass and how compact it is, wherever it sits in the box. Both
  tails are computed; the one reaching farther out over the candidates is the particles' (dark
  protein in most tomograms, bright where the contrast was inverted) and is the one kept.
- ``radial``: the mean density and the mean squared density in spherical shells about the box
  centre, and the log mean Fourier power in shells of |k| (3·(box/2) numbers).

Each feature is z-scored over the candidates, then ``typiclust`` selects. How well k-means on
each finds the classes (normalised mutual information with them; 0 is chance) on the
benchmark's SHREC'21 pool at SNR 0.05 (1,950 train volumes, 13 classes): ``density`` 0.53,
``radial`` 0.40 (``python bench/cold_start_embeddings.py --pool …``). A random network's
features, the other embedding TypiClust's authors suggest, gave 0.06–0.08 on 300 built-in
subtomograms at SNR 0.05 (10 classes), what random vectors give (0.06; the radial features 0.33).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np

from orchestrator.al.strategies import Candidates, make_strategy, select
from orchestrator.data.pool import decode_volumes, iter_rows, open_pool

__all__ = ["INITIAL", "EMBEDDINGS", "density_features", "radial_features", "particle_tail",
           "embedding_of", "pool_features", "typiclust_initial"]

INITIAL = ("random", "typiclust")  # what strategy.initial may name
BATCH_ROWS = 64  # volumes described at once: 1.1 ms a 32³ volume at 64, 1.3-1.4 at 256 (caches)
SIGMAS = (1.5, 2.0, 3.0)  # voxels: low-pass filters that leave a particle and average the noise
TAIL = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001)  # fractions of the box beyond a density


@lru_cache(maxsize=4)
def _gaussians(box: tuple[int, int, int]) -> np.ndarray:
    """[σ, rfft half grid] float32: the Fourier transfer of a Gaussian of each σ in SIGMAS."""
    k = [np.fft.fftfreq(n) for n in box[:2]] + [np.fft.rfftfreq(box[2])]
    kz, ky, kx = np.meshgrid(*k, indexing="ij")
    k2 = kz**2 + ky**2 + kx**2
    return np.stack([np.exp(-2 * np.pi**2 * s**2 * k2) for s in SIGMAS]).astype(np.float32)


def density_features(volumes: np.ndarray) -> np.ndarray:
    """[n, 2·|SIGMAS|·|TAIL|] float64 per volume [n, z, y, x]: for each low-pass σ, the density
    that a fraction t of the box lies beyond (t in TAIL), first of the dark tail (as minus the
    density), then of the bright tail. Invariant to rotations and shifts of the particle."""
    volumes = np.asarray(volumes, dtype=np.float32)
    box = tuple(volumes.shape[1:])
    spectrum = np.fft.rfftn(volumes, axes=(1, 2, 3))
    dark, bright = [], []
    for gaussian in _gaussians(box):
        low = np.fft.irfftn(spectrum * gaussian, s=box, axes=(1, 2, 3)).reshape(len(volumes), math.prod(box))
        ordered = np.sort(low - low.mean(axis=1, keepdims=True), axis=1)
        dark.append(-_quantiles(ordered, np.array(TAIL)))
        bright.append(_quantiles(ordered, 1.0 - np.array(TAIL)))
    return np.concatenate(dark + bright, axis=1).astype(np.float64)


def _quantiles(ordered: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """[n, fractions] of rows already sorted: ``np.quantile(…, axis=1).T`` with its linear
    interpolation, without sorting again for every call (6× faster for the two tails)."""
    position = fractions * (ordered.shape[1] - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, ordered.shape[1] - 1)
    weight = position - below
    return ordered[:, below] * (1.0 - weight) + ordered[:, above] * weight


def particle_tail(features: np.ndarray) -> np.ndarray:
    """The half of :func:`density_features` that describes the particles: the tail whose most
    extreme quantile lies farther out on average over these volumes (noise is symmetric, a
    particle is not)."""
    half = features.shape[1] // 2
    dark, bright = features[:, :half], features[:, half:]
    extreme = slice(len(TAIL) - 1, None, len(TAIL))
    return dark if np.nanmean(dark[:, extreme]) >= np.nanmean(bright[:, extreme]) else bright


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
    flat = volumes.reshape(len(volumes), real.shape[0])
    power = np.abs(np.fft.rfftn(volumes, axes=(1, 2, 3))).astype(np.float32) ** 2
    spectrum = power.reshape(len(volumes), fourier.shape[0]) @ fourier
    return np.concatenate([flat @ real, (flat * flat) @ real,
                           np.log(spectrum + 1e-12)], axis=1).astype(np.float64)


EMBEDDINGS = {"density": density_features, "radial": radial_features}


def pool_features(pool_path: str, rows: np.ndarray, batch_rows: int = BATCH_ROWS,
                  embedding: str = "density") -> np.ndarray:
    """The ``embedding`` (a name in EMBEDDINGS) of the pool rows ``rows`` (sorted, unique), in
    that order, computed in this process from the row groups that hold them. A campaign
    describes its pool over Ray Data instead (`describe_pool`): the same features, spread over
    the cluster's CPUs."""
    features_of = embedding_of(embedding)
    rows = np.asarray(rows, dtype=np.int64)
    info = open_pool(pool_path)
    parts = [features_of(decode_volumes(batch.column("volume"), info))
             for batch in iter_rows(pool_path, rows, ["volume"], batch_rows=batch_rows)]
    return np.concatenate(parts) if parts else features_of(np.zeros((0, *info.box), np.float32))


def embedding_of(name: str):
    """The function computing the embedding ``name``; a clear error for a name not offered."""
    if name not in EMBEDDINGS:
        raise ValueError(f"strategy.initial_options.embedding: {name!r} is not one of "
                         f"{sorted(EMBEDDINGS)}")
    return EMBEDDINGS[name]


def typiclust_initial(pool_path: str, candidates: np.ndarray, k: int, seed: int,
                      options: dict | None = None,
                      describe: Callable[[np.ndarray, str], np.ndarray] | None = None) -> np.ndarray:
    """The k pool rows of cycle 0 (in the order chosen): ``typiclust`` over the candidates'
    z-scored embedding (``options["embedding"]``, default ``density``; the other options are
    typiclust's), no labelled rows, randomness from (seed, cycle 0). ``describe(rows,
    embedding)`` gives the features of the sorted candidate rows; by default
    :func:`pool_features`, in this process."""
    options = dict(options or {})
    embedding = options.pop("embedding", "density")
    embedding_of(embedding)
    rows = np.unique(np.asarray(candidates, dtype=np.int64))
    if describe is None:
        features = pool_features(pool_path, rows, embedding=embedding)
    else:
        features = np.asarray(describe(rows, embedding), dtype=np.float64)
    if embedding == "density":
        features = particle_tail(features)
    spread = features.std(axis=0)
    features = (features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    strategy = make_strategy("typiclust", **options)
    chosen = select(strategy, Candidates(rows, {"embeddings": features},
                                         {"embeddings": features[:0]}),
                    k, np.random.default_rng([seed, 0, 0x7C]))
    return rows[chosen]
