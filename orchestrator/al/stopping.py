"""When to stop labelling: do the model's predictions on the unlabelled pool still change?

Stabilising predictions (Bloodgood & Vijay-Shanker, CoNLL 2009): once two consecutive models
agree on almost every unlabelled subtomogram, more labels of the same kind change little, and
the campaign can end. The agreement is Cohen's kappa (chance-corrected), between the
predictions of model c−1 and model c on the train-split rows still unlabelled after cycle c's
labels (both models scored exactly those rows: `loop.Campaign._score_model`).

Pure functions over arrays; the campaign reads the scores and calls them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def cohens_kappa(a: Sequence[int], b: Sequence[int], num_classes: int | None = None) -> float:
    """Cohen's kappa between two prediction vectors of class indices (same rows, same order).

    (p_o − p_e) / (1 − p_e), p_o the share of rows on which they agree, p_e the agreement
    expected by chance from each vector's class frequencies. Two identical constant vectors
    give p_e = 1: they agree completely, so 1.0 (as small-text does), not 0/0. No rows: NaN.
    """
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"kappa needs predictions of the same rows: {a.shape} vs {b.shape}")
    if a.size == 0:
        return float("nan")
    k = int(max(a.max(), b.max()) + 1) if num_classes is None else int(num_classes)
    observed = float(np.mean(a == b))
    expected = float(np.dot(np.bincount(a, minlength=k), np.bincount(b, minlength=k))) / a.size**2
    if expected >= 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


def mean_uncertainty(entropy: np.ndarray, num_classes: int) -> float:
    """Mean of the rows' prediction entropies (natural log, the scorer's `entropy` column) over
    log(classes): 0 when every row is certain, 1 when every row is uniform. NaN without rows."""
    entropy = np.asarray(entropy)
    if len(entropy) == 0:
        return float("nan")
    if num_classes < 2:
        return 0.0
    return float(np.mean(entropy, dtype=np.float64) / math.log(num_classes))


def is_stable(kappas: Sequence[float], threshold: float, cycles: int) -> bool:
    """True when each of the last `cycles` agreements is at least `threshold` (a NaN, e.g.
    cycle 0's, which has no previous model, never counts as stable)."""
    recent = list(kappas)[-cycles:] if cycles > 0 else []
    return cycles > 0 and len(recent) == cycles and all(k >= threshold for k in recent)  # NaN >= x: False
