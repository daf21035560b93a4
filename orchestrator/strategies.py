"""Query strategies: given the scoring pass's outputs for N unlabelled candidates, choose k.

One direction everywhere: **a higher score means label first**. Every strategy answers
``select(candidates, k, rng) -> positions``: positions ``0..N-1`` into ``candidates.rows``,
unique, most wanted first. The loop calls the module-level :func:`select`, which checks the
inputs, warns when k exceeds N, and checks what the strategy returns.

Two kinds of strategy:

- Row-wise (:class:`RowwiseStrategy`): ``score(outputs) -> [N]`` is pure and row-wise (no RNG,
  a row's score depends only on that row), so Ray Data may score in any batches and the result
  is the same. ``order="lowest"`` (the paper's ablation) is already in the score: subclasses
  write ``utility``, and ``score`` negates it. Ranking is shared: :func:`top_k` puts NaN
  scores last (silently: a NaN row is still returned when k needs it), breaks exact ties by a
  random permutation drawn from the given ``rng``, and finds the top k with a partition
  rather than a full sort.
- Set-wise (``coreset``, ``badge``): greedy over the whole candidate set, O(N·k) time and O(N)
  memory (a vector of minimum distances; candidate distances are computed in row chunks, never
  an N×N matrix). They also put rows with non-finite embeddings last.

All randomness comes from the explicit ``np.random.Generator``; nothing reads global state.

The scoring pass produces only what a strategy declares in ``needs`` (for the candidates) and
``needs_labelled`` (for the labelled set), from :data:`OUTPUT_KEYS`. A strategy that needs a
model besides T and M (LL4AL, VAAL, HAL, two-stream) or T's weights at scoring time (noise
stability) declares ``auxiliary`` (``orchestrator/auxiliary.py``): training builds and fits it
through the same hooks whatever the strategy, the scorer adds the keys it provides, and the
strategy scores or selects from them like any other output. ``semi_supervised = True`` asks
training for the λ·D_reg term on unlabelled batches too (``ema_kl_semi``). The loop never asks
which strategy it runs.
"""

from __future__ import annotations

import inspect
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from scipy.special import log_softmax

__all__ = [
    "OUTPUT_KEYS",
    "Candidates",
    "Strategy",
    "RowwiseStrategy",
    "RandomSampling",
    "Entropy",
    "Margin",
    "LeastConfidence",
    "EmaKL",
    "BALD",
    "MCEntropy",
    "CoreSet",
    "Badge",
    "EmaKLSemi",
    "LearningLoss",
    "NoiseStability",
    "VAAL",
    "HAL",
    "TwoStream",
    "STRATEGIES",
    "make_strategy",
    "select",
    "top_k",
    "unlabelled_positions",
]

# Everything the scoring pass can produce, per subtomogram (float32, first axis = rows):
# probs/mean_probs/logits/mean_logits [N, C] for T and M (M = EMA of T), embeddings [N, E]
# (T's penultimate features), grad_embeddings [N, E*C] (BADGE), mc_probs [N, C, K].
# From strategies' auxiliaries: predicted_loss [N] (LL4AL), labelledness [N] in [0, 1] (VAAL,
# HAL: probability a volume looks labelled), noisy_logits [N, C, K] (T under K weight
# perturbations), ae_embeddings [N, Z] (an autoencoder's code: two-stream).
OUTPUT_KEYS = frozenset(
    {"probs", "mean_probs", "logits", "mean_logits", "embeddings", "grad_embeddings", "mc_probs",
     "predicted_loss", "labelledness", "noisy_logits", "ae_embeddings"}
)

# Probabilities are clipped here before a log, so a zero probability costs nothing.
PROB_FLOOR = 1e-12
# Rows per distance chunk in coreset/BADGE: bounds temporaries whatever N is.
CHUNK_ROWS = 8192
# Centres per distance block when the labelled set seeds coreset: a chunk × block matrix.
CENTRE_BLOCK = 128


@dataclass(frozen=True, eq=False)  # eq on dicts of arrays would be ambiguous
class Candidates:
    """The unlabelled candidates of one cycle and the scoring pass's arrays for them.

    ``outputs[key][i]`` belongs to pool row ``rows[i]``. ``labelled`` holds the same keys for
    the labelled set (core-set needs its embeddings); its arrays share their own row count.
    """

    rows: np.ndarray
    outputs: dict[str, np.ndarray]
    labelled: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = np.asarray(self.rows)
        if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            raise ValueError(f"rows must be a 1-D integer array, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        if np.unique(rows).size != rows.size:
            raise ValueError("rows has duplicates: a candidate could be chosen twice")
        object.__setattr__(self, "rows", rows)
        _check_arrays("outputs", self.outputs, rows.size)
        if self.labelled:
            n_labelled = len(next(iter(self.labelled.values())))
            _check_arrays("labelled", self.labelled, n_labelled)

    def __len__(self) -> int:
        return int(self.rows.size)


def _check_arrays(what: str, arrays: Mapping[str, np.ndarray], n: int) -> None:
    unknown = sorted(set(arrays) - OUTPUT_KEYS)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}; known: {sorted(OUTPUT_KEYS)}")
    for key, array in arrays.items():
        if np.ndim(array) == 0 or len(array) != n:
            raise ValueError(
                f"{what}[{key!r}] has shape {np.shape(array)}; expected {n} rows"
            )


def unlabelled_positions(all_rows: np.ndarray, labelled_rows: np.ndarray) -> np.ndarray:
    """Positions into ``all_rows`` of the rows not in ``labelled_rows``: the candidates."""
    return np.flatnonzero(~np.isin(all_rows, labelled_rows))


# --- the shared selector ----------------------------------------------------------------------


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the k highest scores, highest first; NaN last; ties in a random order.

    Ties (equal scores) are ordered by a permutation drawn from ``rng``, so the same seed gives
    the same answer and no position is favoured. k is clipped to [0, N] silently (the loop's
    :func:`select` warns). Memory O(N); time O(N + k log k) unless many scores tie.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    n = scores.size
    k = min(max(operator.index(k), 0), n)
    tiebreak = rng.permutation(n)  # lower = first among equal scores
    if k == 0:
        return np.empty(0, dtype=np.int64)

    is_nan = np.isnan(scores)
    valid = np.flatnonzero(~is_nan)
    if valid.size <= k:  # every non-NaN row, then the NaN rows that k still needs
        chosen = valid[_rank(scores[valid], tiebreak[valid])]
        nan_rows = np.flatnonzero(is_nan)
        nan_rows = nan_rows[np.argsort(tiebreak[nan_rows], kind="stable")]
        return np.concatenate([chosen, nan_rows[: k - valid.size]]).astype(np.int64)

    values = scores[valid]
    kth = -np.partition(-values, k - 1)[k - 1]  # the k-th highest value
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)
    tied = tied[np.argsort(tiebreak[valid[tied]], kind="stable")[: k - above.size]]
    chosen = valid[np.concatenate([above, tied])]
    return chosen[_rank(scores[chosen], tiebreak[chosen])].astype(np.int64)


def _rank(values: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Order of ``values`` highest first, equal values by ascending ``tiebreak``."""
    return np.lexsort((tiebreak, -values))


def select(
    strategy: Strategy, candidates: Candidates, k: int, rng: np.random.Generator
) -> np.ndarray:
    """What the loop calls: positions (into ``candidates.rows``) of the k to label, best first.

    k <= 0 returns nothing; k > N warns and returns all N in priority order.
    """
    k = operator.index(k)
    n = len(candidates)
    missing = sorted(strategy.needs - set(candidates.outputs))
    if missing:
        raise ValueError(f"{strategy.name} needs outputs {missing} for the candidates")
    missing = sorted(strategy.needs_labelled - set(candidates.labelled))
    if missing:
        raise ValueError(
            f"{strategy.name} needs outputs {missing} for the labelled set (may have 0 rows)"
        )
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k > n:
        warnings.warn(
            f"asked for k={k} but only N={n} candidates are left; selecting all {n}",
            UserWarning,
            stacklevel=2,
        )
        k = n
    positions = np.asarray(strategy.select(candidates, k, rng), dtype=np.int64)
    if (
        positions.shape != (k,)
        or np.unique(positions).size != k
        or (k and (positions.min() < 0 or positions.max() >= n))
    ):
        raise RuntimeError(
            f"{strategy.name} returned positions of shape {positions.shape} for k={k}, N={n}: "
            "they must be k unique positions in [0, N)"
        )
    return positions


# --- base classes -----------------------------------------------------------------------------


class Strategy:
    """A query strategy. Subclasses set ``name`` and ``needs`` and implement ``select``."""

    name: str = ""
    needs: frozenset[str] = frozenset()  # what the scoring pass must produce for candidates
    needs_labelled: frozenset[str] = frozenset()  # ... and for the labelled set
    mc_passes: int = 0  # MC-dropout passes the scoring pass must run for "mc_probs"
    semi_supervised: bool = False  # training adds λ·D_reg on unlabelled batches
    # trained with the λ·D_reg(T, M) term: only the EMA-KL family. The others train on plain
    # cross-entropy as their papers do, unless train.trainer is "shared" (one trainer for all).
    uses_mean_model: bool = False
    auxiliary = None  # an orchestrator.auxiliary.Auxiliary: trained and scored by the same hooks

    def select(self, candidates: Candidates, k: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (0..N-1) into candidates.rows, length min(k, N), unique, best first."""
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{p}={getattr(self, p)!r}" for p in _options(type(self)))
        return f"{type(self).__name__}({options})"


class RowwiseStrategy(Strategy):
    """A strategy that is a per-row score; ranking is :func:`top_k`'s.

    Subclasses implement ``utility`` (the measure itself: entropy, KL, ...). ``score`` is the
    utility with ``order`` applied, so ``top_k(score(outputs), k, rng)`` (e.g. scores written
    by the Ray scoring pass, ranked later on the driver) is exactly ``select``.
    """

    ORDERS = ("highest", "lowest")

    def __init__(self, order: str = "highest"):
        if order not in self.ORDERS:
            raise ValueError(f"order must be one of {list(self.ORDERS)}, got {order!r}")
        self.order = order

    def utility(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """[N] float64, pure and row-wise: the measure, higher = more informative."""
        raise NotImplementedError

    def score(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """[N] float64, pure and row-wise: higher = label first (``order="lowest"`` negates)."""
        utility = np.asarray(self.utility(outputs), dtype=np.float64)
        return -utility if self.order == "lowest" else utility

    def select(self, candidates: Candidates, k: int, rng: np.random.Generator) -> np.ndarray:
        scores = self.score(candidates.outputs)
        if scores.shape != (len(candidates),):
            raise RuntimeError(
                f"{self.name}.score returned shape {scores.shape} for {len(candidates)} rows"
            )
        return top_k(scores, k, rng)


# --- row-wise scores --------------------------------------------------------------------------


def _get(outputs: Mapping[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in outputs:
        raise ValueError(f"outputs has no {key!r} (has {sorted(outputs)})")
    array = np.asarray(outputs[key], dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"outputs[{key!r}] must be {ndim}-D, got shape {array.shape}")
    return array


def _entropy(p: np.ndarray, axis: int = 1) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, PROB_FLOOR, None)), axis=axis)


class Entropy(RowwiseStrategy):
    """Predictive entropy of T: −Σ p log p."""

    name = "entropy"
    needs = frozenset({"probs"})

    def utility(self, outputs):
        return _entropy(_get(outputs, "probs", 2))


class Margin(RowwiseStrategy):
    """−(p1 − p2), the top two class probabilities of T: a small margin is labelled first."""

    name = "margin"
    needs = frozenset({"probs"})

    def utility(self, outputs):
        p = _get(outputs, "probs", 2)
        if p.shape[1] < 2:
            raise ValueError("margin needs at least 2 classes")
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        return top2[:, 0] - top2[:, 1]


class LeastConfidence(RowwiseStrategy):
    """1 − max p of T."""

    name = "least_confidence"
    needs = frozenset({"probs"})

    def utility(self, outputs):
        return 1.0 - np.max(_get(outputs, "probs", 2), axis=1)


class EmaKL(RowwiseStrategy):
    """The paper's Eq. 3: disagreement between T and its mean model M (EMA of T).

    distance: "kl" = KL(T‖M) = Σ p_T (log p_T − log p_M); "reverse_kl" = KL(M‖T);
    "js" = Jensen–Shannon; "mse_logits" = mean over classes of (logit_T − logit_M)².
    Log-probabilities come from log-softmax of the logits (declared in ``needs``); an outputs
    dict with only "probs"/"mean_probs" is also scored, from the probabilities clipped at
    1e-12. Divergences are clipped at 0 (rounding can make KL(p‖p) a hair negative).
    """

    name = "ema_kl"
    needs = frozenset({"logits", "mean_logits"})
    uses_mean_model = True
    DISTANCES = ("kl", "reverse_kl", "js", "mse_logits")

    def __init__(self, distance: str = "kl", order: str = "highest"):
        super().__init__(order=order)
        if distance not in self.DISTANCES:
            raise ValueError(f"distance must be one of {list(self.DISTANCES)}, got {distance!r}")
        self.distance = distance

    def utility(self, outputs):
        if self.distance == "mse_logits":
            diff = _get(outputs, "logits", 2) - _get(outputs, "mean_logits", 2)
            return np.mean(diff * diff, axis=1)
        log_t = _log_probs(outputs, "logits", "probs")
        log_m = _log_probs(outputs, "mean_logits", "mean_probs")
        if self.distance == "kl":
            d = _kl(log_t, log_m)
        elif self.distance == "reverse_kl":
            d = _kl(log_m, log_t)
        else:
            log_mix = np.logaddexp(log_t, log_m) - math.log(2.0)
            d = 0.5 * _kl(log_t, log_mix) + 0.5 * _kl(log_m, log_mix)
        return np.maximum(d, 0.0)


def _log_probs(outputs: Mapping[str, np.ndarray], logits_key: str, probs_key: str) -> np.ndarray:
    if logits_key in outputs:
        return log_softmax(_get(outputs, logits_key, 2), axis=1)
    return np.log(np.clip(_get(outputs, probs_key, 2), PROB_FLOOR, None))


def _kl(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=1)


class _MCStrategy(RowwiseStrategy):
    """Base for scores over K MC-dropout passes, "mc_probs" [N, C, K]."""

    needs = frozenset({"mc_probs"})
    min_passes = 1

    def __init__(self, mc_passes: int = 10, order: str = "highest"):
        super().__init__(order=order)
        if operator.index(mc_passes) < self.min_passes:
            raise ValueError(f"{self.name} needs mc_passes >= {self.min_passes}, got {mc_passes}")
        self.mc_passes = int(mc_passes)


class BALD(_MCStrategy):
    """Mutual information between prediction and weights: H(mean p) − mean H(p)."""

    name = "bald"
    min_passes = 2  # with one pass the mutual information is 0 for every row

    def utility(self, outputs):
        p = _get(outputs, "mc_probs", 3)
        mi = _entropy(p.mean(axis=2)) - _entropy(p, axis=1).mean(axis=1)
        return np.maximum(mi, 0.0)


class MCEntropy(_MCStrategy):
    """Entropy of the mean prediction over MC-dropout passes: H(mean p)."""

    name = "mc_entropy"

    def utility(self, outputs):
        return _entropy(_get(outputs, "mc_probs", 3).mean(axis=2))


# --- set-wise strategies ----------------------------------------------------------------------


class RandomSampling(Strategy):
    """k candidates uniformly at random, without replacement."""

    name = "random"

    def select(self, candidates, k, rng):
        n = len(candidates)
        return rng.choice(n, size=min(k, n), replace=False).astype(np.int64)


def _positive_int(name: str, value: int) -> int:
    if operator.index(value) < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


class _Geometric(Strategy):
    """Shared machinery of coreset and BADGE: squared distances in row chunks."""

    def __init__(self, chunk_rows: int = CHUNK_ROWS):
        self.chunk_rows = _positive_int("chunk_rows", chunk_rows)

    def _prepare(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x as float, its squared row norms as float64; NaN/inf norm = non-finite row)."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{self.name} needs 2-D embeddings, got shape {x.shape}")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)
        sq = np.empty(len(x), dtype=np.float64)
        for start in range(0, len(x), self.chunk_rows):
            chunk = x[start : start + self.chunk_rows]
            with np.errstate(over="ignore", invalid="ignore"):  # huge rows: inf, non-finite
                sq[start : start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)
        sq[~np.isfinite(sq)] = np.nan
        return x, sq

    def _fold_in(
        self, min_dist: np.ndarray, x: np.ndarray, x_sq: np.ndarray, centres: np.ndarray
    ) -> None:
        """min_dist ← min(min_dist, squared distance to each centre); NaN distances ignored.

        ||x − c||² = ||x||² − 2 x·c + ||c||², one row chunk at a time: temporaries are
        chunk_rows × len(centres), independent of N.
        """
        centres = np.asarray(centres, dtype=x.dtype)
        c_sq = np.einsum("ij,ij->i", centres, centres)
        for start in range(0, len(x), self.chunk_rows):
            stop = min(start + self.chunk_rows, len(x))
            with np.errstate(invalid="ignore", over="ignore"):
                # In place, in x's dtype: one chunk × centres temporary. float32 rounding
                # here is the dot product's own; it only reorders near-ties.
                d = x[start:stop] @ centres.T
                d *= -2.0
                d += x_sq[start:stop, None]
                d += c_sq
                d = np.maximum(np.fmin.reduce(d, axis=1), 0.0)  # rounding can go below 0
            np.fmin(min_dist[start:stop], d, out=min_dist[start:stop])


def _argmax_tiebreak(values: np.ndarray, tiebreak: np.ndarray) -> int:
    """Position of the largest value (no NaN); equal values by ascending tiebreak."""
    ties = np.flatnonzero(values == values.max())
    return int(ties[np.argmin(tiebreak[ties])])


class CoreSet(_Geometric):
    """k-center greedy on T's embeddings (Sener & Savarese): each pick is the candidate farthest
    from every labelled item and every earlier pick.

    The labelled embeddings are the initial centres; with none, the first pick is a random
    candidate (from ``rng``). Ties go by a random permutation from ``rng``. Rows with
    non-finite embeddings come last. O(N·k·E) time, O(N) memory.
    """

    name = "coreset"
    needs = frozenset({"embeddings"})
    needs_labelled = frozenset({"embeddings"})  # 0 rows is fine (the first cycle)

    def select(self, candidates, k, rng):
        x, x_sq = self._prepare(candidates.outputs["embeddings"])
        n = len(x)
        k = min(k, n)
        tiebreak = rng.permutation(n)
        # +inf: not yet near anything; -1: non-finite row (after every finite one);
        # -inf: chosen. Distances are >= 0.
        min_dist = np.where(np.isnan(x_sq), -1.0, np.inf)
        labelled = np.asarray(candidates.labelled["embeddings"])
        if labelled.size and labelled.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"labelled embeddings have shape {labelled.shape}, candidates {x.shape}"
            )
        for start in range(0, len(labelled), CENTRE_BLOCK):
            self._fold_in(min_dist, x, x_sq, labelled[start : start + CENTRE_BLOCK])
        chosen = np.empty(k, dtype=np.int64)
        for i in range(k):
            pick = _argmax_tiebreak(min_dist, tiebreak)
            chosen[i] = pick
            min_dist[pick] = -np.inf
            if i + 1 < k:
                self._fold_in(min_dist, x, x_sq, x[pick : pick + 1])
        return chosen


class Badge(_Geometric):
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings.

    The first pick is the largest gradient embedding (as in the authors' code); each next pick
    is drawn with probability ∝ squared distance to the nearest pick (D² sampling, ``rng``).
    When every remaining candidate sits on a pick (all distances 0) the rest come in a random
    order. Rows with non-finite embeddings come last. O(N·k·E) time, O(N) memory.
    """

    name = "badge"
    needs = frozenset({"grad_embeddings"})

    def select(self, candidates, k, rng):
        x, x_sq = self._prepare(candidates.outputs["grad_embeddings"])
        n = len(x)
        k = min(k, n)
        tiebreak = rng.permutation(n)
        finite = ~np.isnan(x_sq)
        # Sampling weights: 0 for chosen and non-finite rows (np.fmin keeps them at 0).
        min_dist = np.where(finite, np.inf, 0.0)
        chosen = np.empty(k, dtype=np.int64)
        if k == 0:
            return chosen
        pick = _argmax_tiebreak(np.where(finite, x_sq, -np.inf), tiebreak)
        for i in range(k):
            chosen[i] = pick
            min_dist[pick] = 0.0
            if i + 1 == k:
                break
            self._fold_in(min_dist, x, x_sq, x[pick : pick + 1])
            cumulative = np.cumsum(min_dist)
            total = cumulative[-1]
            if not (np.isfinite(total) and total > 0):
                return self._fill_at_random(chosen, i + 1, finite, tiebreak)
            pick = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
            if pick == n:  # rng.random() * total rounded up to total
                pick = int(np.flatnonzero(min_dist)[-1])
        return chosen

    @staticmethod
    def _fill_at_random(chosen, filled, finite, tiebreak):
        """Complete ``chosen`` with unchosen rows: finite ones first, each in tiebreak order."""
        taken = np.zeros(len(finite), dtype=bool)
        taken[chosen[:filled]] = True
        rest = np.flatnonzero(~taken)
        rest = rest[np.lexsort((tiebreak[rest], ~finite[rest]))]
        chosen[filled:] = rest[: len(chosen) - filled]
        return chosen


# --- strategies with an auxiliary model (orchestrator/auxiliary.py) ---------------------------


class EmaKLSemi(EmaKL):
    """The paper's semi-supervised variant: EMA-KL selection, and T trained with λ·D_reg on
    unlabelled batches too (the same as ``ema_kl`` with ``train.semi_supervised: true``)."""

    name = "ema_kl_semi"
    semi_supervised = True


class LearningLoss(RowwiseStrategy):
    """LL4AL (Yoo & Kweon 2019): the highest loss predicted by a module trained with T."""

    name = "ll4al"
    needs = frozenset({"predicted_loss"})

    def __init__(self, weight: float = 1.0, margin: float = 1.0, detach_after: float = 0.6,
                 order: str = "highest"):
        super().__init__(order=order)
        from orchestrator import auxiliary

        self.weight, self.margin, self.detach_after = weight, margin, detach_after
        self.auxiliary = auxiliary.LearningLoss(weight=weight, margin=margin,
                                                detach_after=detach_after)

    def utility(self, outputs):
        return _get(outputs, "predicted_loss", 1)


class NoiseStability(RowwiseStrategy):
    """Noise stability (Li et al. 2022): how far T's logits move when its weights get small
    Gaussian noise (scaled to each tensor's norm), mean L2 distance over the passes."""

    name = "noise_stability"
    needs = frozenset({"logits", "noisy_logits"})

    def __init__(self, passes: int = 10, scale: float = 0.001, order: str = "highest"):
        super().__init__(order=order)
        from orchestrator import auxiliary

        self.auxiliary = auxiliary.NoisePerturbation(passes=passes, scale=scale)
        self.passes, self.scale = self.auxiliary.passes, self.auxiliary.scale

    def utility(self, outputs):
        clean = _get(outputs, "logits", 2)
        noisy = _get(outputs, "noisy_logits", 3)
        return np.sqrt(((noisy - clean[:, :, None]) ** 2).sum(axis=1)).mean(axis=1)


class VAAL(RowwiseStrategy):
    """VAAL (Sinha et al. 2019): the volumes the discriminator finds least labelled-looking."""

    name = "vaal"
    needs = frozenset({"labelledness"})

    def __init__(self, epochs: int = 5, latent: int = 16, unlabelled_sample: int = 256,
                 order: str = "highest"):
        super().__init__(order=order)
        from orchestrator import auxiliary

        self.epochs, self.latent, self.unlabelled_sample = epochs, latent, unlabelled_sample
        self.auxiliary = auxiliary.VAAL(
            epochs=epochs, latent=latent, unlabelled_sample=unlabelled_sample
        )

    def utility(self, outputs):
        return 1.0 - _get(outputs, "labelledness", 1)


class HAL(Strategy):
    """HAL (the seed paper's hybrid): normalised entropy of T, H(p)/log C, plus λ·(1 − D(x)),
    D a convolutional labelled-vs-unlabelled discriminator on T's intermediate features.

    Subset sampling in m rounds: the k picks are split over ``rounds`` rounds; each round
    draws a random subset of the remaining candidates (``subset`` of them, at least that
    round's picks) and takes its top fused scores, so the picks do not all come from one
    region of high scores. NaN scores come last within a subset. Randomness from ``rng``.
    """

    name = "hal"
    needs = frozenset({"probs", "labelledness"})

    def __init__(self, lam: float = 1.0, rounds: int = 3, subset: float = 0.5, epochs: int = 5,
                 stage: int = -2, unlabelled_sample: int = 256):
        from orchestrator import auxiliary

        if not 0.0 < subset <= 1.0:
            raise ValueError(f"subset must be in (0, 1], got {subset}")
        self.lam, self.rounds, self.subset = float(lam), _positive_int("rounds", rounds), subset
        self.epochs, self.stage, self.unlabelled_sample = epochs, stage, unlabelled_sample
        self.auxiliary = auxiliary.FeatureDiscriminator(
            epochs=epochs, stage=stage, unlabelled_sample=unlabelled_sample
        )

    def fused(self, outputs) -> np.ndarray:
        """[N], pure and row-wise: H(p)/log C + λ·(1 − labelledness)."""
        p = _get(outputs, "probs", 2)
        return _entropy(p) / math.log(max(p.shape[1], 2)) + self.lam * (
            1.0 - _get(outputs, "labelledness", 1)
        )

    def select(self, candidates, k, rng):
        scores = self.fused(candidates.outputs)
        remaining = np.arange(len(scores))
        k = min(k, len(scores))
        per_round = np.diff(np.round(np.linspace(0, k, self.rounds + 1)).astype(np.int64))
        chosen = []
        for k_round in per_round:
            if k_round == 0:
                continue
            size = min(len(remaining), max(int(k_round), math.ceil(self.subset * len(remaining))))
            subset = np.sort(rng.choice(remaining, size=size, replace=False))
            picks = subset[top_k(scores[subset], int(k_round), rng)]
            chosen.append(picks)
            remaining = np.setdiff1d(remaining, picks)
        return np.concatenate(chosen) if chosen else np.empty(0, np.int64)


class TwoStream(Strategy):
    """Two feature streams, hierarchical k-means, cluster representatives as the queries.

    Unsupervised stream: an autoencoder's code of each volume ("ae_embeddings", the AE fitted
    each cycle on labelled + sampled unlabelled volumes). Supervised stream: T's embeddings and
    probabilities. Each stream is z-scored over the candidates (per column). Level 1: k-means
    on the unsupervised stream into ``top_clusters`` clusters (default ⌈√k⌉); the k picks are
    shared between them in proportion to their size. Level 2: inside each, k-means on the
    supervised stream into its share of clusters; each cluster's member nearest its centre is
    a query. Bigger clusters' representatives come first; rows with non-finite features last;
    any shortfall is filled at random. k-means++ seeding and ties from ``rng``.
    """

    name = "two_stream"
    needs = frozenset({"probs", "embeddings", "ae_embeddings"})

    def __init__(self, top_clusters: int = 0, iterations: int = 10, epochs: int = 5,
                 latent: int = 16, unlabelled_sample: int = 256):
        from orchestrator import auxiliary

        self.top_clusters = operator.index(top_clusters)
        self.iterations = _positive_int("iterations", iterations)
        self.epochs, self.latent, self.unlabelled_sample = epochs, latent, unlabelled_sample
        self.auxiliary = auxiliary.Autoencoder(
            epochs=epochs, latent=latent, unlabelled_sample=unlabelled_sample
        )

    def select(self, candidates, k, rng):
        out = candidates.outputs
        supervised = np.concatenate(
            [np.asarray(out["embeddings"], np.float64).reshape(len(candidates), -1),
             np.asarray(out["probs"], np.float64)], axis=1)
        unsupervised = np.asarray(out["ae_embeddings"], np.float64).reshape(len(candidates), -1)
        finite = np.isfinite(supervised).all(axis=1) & np.isfinite(unsupervised).all(axis=1)
        rows = np.flatnonzero(finite)
        k = min(k, len(candidates))
        k_finite = min(k, rows.size)
        chosen: list[int] = []
        if k_finite:
            supervised, unsupervised = _zscore(supervised[rows]), _zscore(unsupervised[rows])
            n_top = min(self.top_clusters or math.ceil(math.sqrt(k_finite)), k_finite)
            top, _ = _kmeans(unsupervised, n_top, rng, self.iterations)
            sizes = np.bincount(top, minlength=n_top)
            shares = _share(k_finite, sizes)
            for c in np.lexsort((rng.permutation(n_top), -sizes)):
                members = np.flatnonzero(top == c)
                if shares[c] == 0:
                    continue
                labels, centres = _kmeans(supervised[members], int(shares[c]), rng, self.iterations)
                sub_sizes = np.bincount(labels, minlength=len(centres))
                for j in np.lexsort((rng.permutation(len(centres)), -sub_sizes)):
                    inside = members[labels == j]
                    if inside.size:
                        d = ((supervised[inside] - centres[j]) ** 2).sum(axis=1)
                        chosen.append(int(rows[inside[np.argmin(d)]]))
        taken = np.zeros(len(candidates), dtype=bool)
        taken[chosen] = True
        rest = np.flatnonzero(~taken)
        rest = rest[np.lexsort((rng.permutation(rest.size), ~finite[rest]))]
        return np.concatenate([np.asarray(chosen, np.int64), rest[: k - len(chosen)]])


def _zscore(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def _share(k: int, sizes: np.ndarray) -> np.ndarray:
    """k split in proportion to ``sizes`` (largest remainders), none above its size."""
    ideal = k * sizes / sizes.sum()
    share = np.minimum(np.floor(ideal).astype(np.int64), sizes)
    while share.sum() < k:
        room = share < sizes
        share[np.flatnonzero(room)[np.argmax((ideal - share)[room])]] += 1
    return share


def _nearest(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest centre, squared distance to it) per row, in row chunks."""
    labels = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float64)
    c_sq = (centres**2).sum(axis=1)
    for start in range(0, len(x), CHUNK_ROWS):
        chunk = x[start : start + CHUNK_ROWS]
        d = (chunk**2).sum(axis=1)[:, None] - 2.0 * chunk @ centres.T + c_sq
        labels[start : start + len(chunk)] = d.argmin(axis=1)
        dist[start : start + len(chunk)] = np.maximum(d.min(axis=1), 0.0)
    return labels, dist


def _kmeans(x: np.ndarray, n_clusters: int, rng: np.random.Generator, iterations: int):
    """(labels, centres): k-means++ seeding (D² sampling from ``rng``), then Lloyd steps; an
    emptied cluster keeps its centre. n_clusters is clipped to len(x)."""
    n_clusters = min(n_clusters, len(x))
    centres = [x[rng.integers(len(x))]]
    dist = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, n_clusters):
        total = dist.sum()
        if total > 0:
            pick = int(np.searchsorted(np.cumsum(dist), rng.random() * total, side="right"))
            pick = min(pick, len(x) - 1)
        else:
            pick = int(rng.integers(len(x)))
        centres.append(x[pick])
        dist = np.minimum(dist, ((x - x[pick]) ** 2).sum(axis=1))
    centres = np.array(centres)
    labels, _ = _nearest(x, centres)
    for _ in range(iterations):
        for c in range(n_clusters):
            members = labels == c
            if members.any():
                centres[c] = x[members].mean(axis=0)
        new, _ = _nearest(x, centres)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, centres


# --- registry ---------------------------------------------------------------------------------

STRATEGIES: dict[str, type[Strategy]] = {
    "random": RandomSampling,
    "entropy": Entropy,
    "margin": Margin,
    "least_confidence": LeastConfidence,
    "ema_kl": EmaKL,
    "bald": BALD,
    "mc_entropy": MCEntropy,
    "coreset": CoreSet,
    "badge": Badge,
    "ema_kl_semi": EmaKLSemi,
    "ll4al": LearningLoss,
    "noise_stability": NoiseStability,
    "vaal": VAAL,
    "hal": HAL,
    "two_stream": TwoStream,
}


def _options(cls: type[Strategy]) -> list[str]:
    return [p for p in inspect.signature(cls).parameters if p not in ("self",)]


def make_strategy(name: str, **options) -> Strategy:
    """The strategy registered as ``name``, built with ``options`` (e.g. distance="js")."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {sorted(STRATEGIES)}")
    cls = STRATEGIES[name]
    valid = _options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"strategy {name!r} has no option(s) {unknown}; its options: {valid or 'none'}"
        )
    return cls(**options)
