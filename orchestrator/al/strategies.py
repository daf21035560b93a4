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
stability) names that auxiliary in its training declaration: everything a strategy asks of
training is one :class:`~orchestrator.al.training.Training` (``strategy.training``: the
λ·D_reg(T, M) term, semi-supervised batches, the auxiliary and its options). Training builds and
fits the auxiliary through the same hooks whatever the strategy (``orchestrator/nn/auxiliary.py``),
the scorer adds the keys it provides, and the strategy scores or selects from them like any
other output. This module stays numpy: it names auxiliaries, it never builds one. The loop
never asks which strategy it runs.

Two more declarations give a strategy what only the campaign knows: ``needs_answers`` (the
ledger's answer for each labelled row, junk included, in ``candidates.labelled_answers``:
``poal``) and ``needs_history`` (the campaign's past cycles, ``orchestrator/al/history.py``, in
``candidates.history``: ``albl``). Every strategy may say which (base) strategy chose each of
its picks (:func:`select_with_record`); the loop writes it beside each query.

Composite strategies (docs/ARCHITECTURE.md, "Strategies"): ``albl`` learns per campaign which
base strategy to query with (a bandit); ``multi_criteria`` adds representativeness and a DPP's
diversity to an informativeness score; ``typiclust`` picks the most typical member of
uncovered clusters (also the cold start of cycle 0); ``poal`` keeps likely junk out of the
queries. Their arithmetic is ``orchestrator/al/selection_math.py``.
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

from orchestrator.al import selection_math as sm
from orchestrator.al.history import UNANSWERED
from orchestrator.al.training import Training
from orchestrator.data.pool import JUNK

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
    "TypiClust",
    "MultiCriteria",
    "ParetoJunkAware",
    "ActiveLearningByLearning",
    "Selection",
    "STRATEGIES",
    "make_strategy",
    "select",
    "select_with_record",
    "top_k",
    "top_k_merge",
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
    ``labelled_answers`` is the ledger's answer for each of those rows (a class or JUNK), for a
    strategy that ``needs_answers``, and ``labelled_rows`` their pool rows; ``history`` (an
    ``orchestrator.al.history.CampaignHistory``) the campaign's past cycles, for one that
    ``needs_history``. ``validation`` holds the keys of ``needs_validation`` for the validation
    split's rows, never candidates, and ``validation_answers`` their classes.
    """

    rows: np.ndarray
    outputs: dict[str, np.ndarray]
    labelled: dict[str, np.ndarray] = field(default_factory=dict)
    labelled_answers: np.ndarray | None = None
    history: object | None = None
    labelled_rows: np.ndarray | None = None
    validation: dict[str, np.ndarray] = field(default_factory=dict)
    validation_answers: np.ndarray | None = None

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
        if self.labelled_answers is not None:
            answers = np.asarray(self.labelled_answers)
            if answers.ndim != 1 or (self.labelled and len(answers) != n_labelled):
                raise ValueError(f"labelled_answers has shape {answers.shape}; expected one "
                                 "answer per labelled row")
            object.__setattr__(self, "labelled_answers", answers.astype(np.int64))
        if self.validation:
            n_validation = len(next(iter(self.validation.values())))
            _check_arrays("validation", self.validation, n_validation)
            if self.validation_answers is None or len(self.validation_answers) != n_validation:
                raise ValueError("validation needs one answer (validation_answers) per row")

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


def top_k_merge(best: dict[str, np.ndarray] | None, block: dict[str, np.ndarray], k: int
                ) -> dict[str, np.ndarray]:
    """The k best rows of ``best`` and ``block`` together, best first, in :func:`top_k`'s
    order: highest ``score`` first, NaN last, equal scores by ascending ``tiebreak``. Both are
    dicts of aligned columns holding at least "score" and "tiebreak" (other columns ride along).

    ``top_k`` ranks by (NaN, −score, tiebreak) with tiebreak a permutation, a total order, so
    folding a table's blocks through this (in any order and any sizes, from ``best=None``),
    each row carrying ``rng.permutation(N)[its position]``, gives exactly ``top_k(scores, k,
    rng)``'s picks, while holding k + one block of rows instead of the whole table. ``best``
    is None or an earlier answer of this function.
    """
    if best is not None and 0 < k <= len(best["score"]) and not np.isnan(best["score"][k - 1]):
        # best is an earlier answer of this function, best first: a block row scoring below its
        # k-th cannot enter (NaN neither), so only the few that may are sorted with it
        may_enter = np.asarray(block["score"], dtype=np.float64) >= float(best["score"][k - 1])
        block = {key: np.asarray(value)[may_enter] for key, value in block.items()}
    merged = block if best is None else {key: np.concatenate([best[key], block[key]]) for key in block}
    scores = np.asarray(merged["score"], dtype=np.float64)
    is_nan = np.isnan(scores)
    order = np.lexsort((merged["tiebreak"], -np.where(is_nan, 0.0, scores), is_nan))[:max(k, 0)]
    return {key: np.asarray(value)[order] for key, value in merged.items()}


def balanced_order(scores: np.ndarray, classes: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """All positions, round-robin over ``classes``: every class's best row, then every class's
    second best, and so on; a class with no rows left drops out. Within a class and within a
    round, :func:`top_k`'s order: NaN last, highest score first, equal scores by ascending
    ``tiebreak``. The first k are an equal share of each class (a class short of rows leaves
    its share to the best of the next round)."""
    scores = np.asarray(scores, dtype=np.float64)
    classes = np.asarray(classes)
    is_nan = np.isnan(scores)
    order = np.lexsort((tiebreak, -np.where(is_nan, 0.0, scores), is_nan))
    rank_in_class = np.empty(scores.size, dtype=np.int64)
    ordered_classes = classes[order]
    for c in np.unique(classes):
        at = np.flatnonzero(ordered_classes == c)
        rank_in_class[order[at]] = np.arange(at.size)
    position = np.empty(scores.size, dtype=np.int64)
    position[order] = np.arange(scores.size)
    return np.lexsort((position, rank_in_class))


def balanced_top_k(scores: np.ndarray, classes: np.ndarray, k: int, rng: np.random.Generator
                   ) -> np.ndarray:
    """Positions of k rows in equal shares of ``classes`` (:func:`balanced_order`), with
    :func:`top_k`'s tiebreak draw: the same seed gives the same picks whatever the order of
    reading (a campaign folds the score files through ``top_k_merge`` per class)."""
    n = len(scores)
    k = min(max(operator.index(k), 0), n)
    tiebreak = rng.permutation(n)
    return balanced_order(scores, classes, tiebreak)[:k].astype(np.int64)


def _rank(values: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Order of ``values`` highest first, equal values by ascending ``tiebreak``."""
    return np.lexsort((tiebreak, -values))


@dataclass(frozen=True, eq=False)
class Selection:
    """A strategy's picks (positions into ``candidates.rows``, best first) and, for each, the
    strategy that chose it: the strategy's own name, or for ``albl`` the base strategy."""

    positions: np.ndarray
    chosen_by: tuple[str, ...]
    notes: Mapping = field(default_factory=dict)  # what the strategy measured to choose (JSON)


def select(
    strategy: Strategy, candidates: Candidates, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Positions (into ``candidates.rows``) of the k to label, best first.

    k <= 0 returns nothing; k > N warns and returns all N in priority order.
    """
    return select_with_record(strategy, candidates, k, rng, stacklevel=3).positions


def select_with_record(
    strategy: Strategy, candidates: Candidates, k: int, rng: np.random.Generator,
    stacklevel: int = 2,
) -> Selection:
    """What the loop calls: :func:`select`'s positions, and which strategy chose each."""
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
    missing = sorted(strategy.needs_validation - set(candidates.validation))
    if missing:
        raise ValueError(f"{strategy.name} needs outputs {missing} for the validation split")
    if strategy.needs_answers and candidates.labelled_answers is None:
        raise ValueError(f"{strategy.name} needs the ledger's answers for the labelled set")
    if strategy.needs_history and candidates.history is None:
        raise ValueError(f"{strategy.name} needs the campaign's history (orchestrator/al/history.py)")
    if k <= 0:
        return Selection(np.empty(0, dtype=np.int64), ())
    if k > n:
        warnings.warn(
            f"asked for k={k} but only N={n} candidates are left; selecting all {n}",
            UserWarning,
            stacklevel=stacklevel,
        )
        k = n
    selection = strategy.plan(candidates, k, rng)
    positions = np.asarray(selection.positions, dtype=np.int64)
    if (
        positions.shape != (k,)
        or np.unique(positions).size != k
        or (k and (positions.min() < 0 or positions.max() >= n))
    ):
        raise RuntimeError(
            f"{strategy.name} returned positions of shape {positions.shape} for k={k}, N={n}: "
            "they must be k unique positions in [0, N)"
        )
    if len(selection.chosen_by) != k:
        raise RuntimeError(f"{strategy.name} named the chooser of {len(selection.chosen_by)} "
                           f"picks, not {k}")
    return Selection(positions, tuple(selection.chosen_by), dict(selection.notes))


# --- base classes -----------------------------------------------------------------------------


class Strategy:
    """A query strategy. Subclasses set ``name`` and ``needs`` and implement ``select``."""

    name: str = ""
    needs: frozenset[str] = frozenset()  # what the scoring pass must produce for candidates
    needs_labelled: frozenset[str] = frozenset()  # ... and for the labelled set
    needs_validation: frozenset[str] = frozenset()  # ... and for the validation split
    mc_passes: int = 0  # MC-dropout passes the scoring pass must run for "mc_probs"
    # What training must do for it, all in one declaration (orchestrator/al/training.py): the
    # λ·D_reg(T, M) term only for the EMA-KL family (the others train on plain cross-entropy
    # as their papers do, unless train.trainer is "shared"), semi-supervised batches, and the
    # auxiliary model trained beside T.
    training: Training = Training()
    needs_answers: bool = False  # candidates.labelled_answers: the ledger's, junk included
    needs_history: bool = False  # candidates.history: the campaign's past cycles

    def select(self, candidates: Candidates, k: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (0..N-1) into candidates.rows, length min(k, N), unique, best first."""
        raise NotImplementedError

    def plan(self, candidates: Candidates, k: int, rng: np.random.Generator) -> Selection:
        """``select``'s positions and who chose them: this strategy, unless it delegates."""
        positions = np.asarray(self.select(candidates, k, rng), dtype=np.int64)
        return Selection(positions, (self.name,) * len(positions))

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
    training = Training(mean_model=True)
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


class ClassBalanced(RowwiseStrategy):
    """A row-wise strategy's scores (``base``, built with ``base_options``), queried in equal
    shares of the predicted classes: round-robin over the classes, each class's highest score
    first (:func:`balanced_top_k`). Uncertainty alone piles its labels on the classes the model
    confuses: on SHREC'21 at SNR 0.05 entropy gave one class 133 of 780 labels and another 6
    (docs/BENCHMARKS.md, "Results so far"). Training is the base's.

    In a campaign the class is the scoring pass's prediction (``pred``: the classifier training
    kept, T or M); on ``Candidates`` it is T's most probable class."""

    name = "class_balanced"
    per_class = True  # the campaign ranks its score files per predicted class

    def __init__(self, base: str = "ema_kl", base_options: dict | None = None):
        super().__init__()
        scorer = make_strategy(base, **dict(base_options or {}))
        if (not isinstance(scorer, RowwiseStrategy) or isinstance(scorer, ClassBalanced)
                or scorer.training.auxiliary is not None):
            raise ValueError(f"class_balanced: base must be a row-wise strategy without an "
                             f"auxiliary model, got {base!r}")
        self.base, self.base_options, self._scorer = base, dict(base_options or {}), scorer
        self.needs = scorer.needs | {"probs"}
        self.training, self.mc_passes = scorer.training, scorer.mc_passes

    def score(self, outputs):
        return self._scorer.score(outputs)

    def select(self, candidates, k, rng):
        classes = np.argmax(_get(candidates.outputs, "probs", 2), axis=1)
        return balanced_top_k(self.score(candidates.outputs), classes, k, rng)


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


# --- strategies with an auxiliary model (orchestrator/nn/auxiliary.py) ------------------------


class EmaKLSemi(EmaKL):
    """The paper's semi-supervised variant: EMA-KL selection, and T trained with λ·D_reg on
    unlabelled batches too (the same as ``ema_kl`` with ``train.semi_supervised: true``)."""

    name = "ema_kl_semi"
    training = Training(mean_model=True, semi_supervised=True)


class LearningLoss(RowwiseStrategy):
    """LL4AL (Yoo & Kweon 2019): the highest loss predicted by a module trained with T."""

    name = "ll4al"
    needs = frozenset({"predicted_loss"})

    def __init__(self, weight: float = 1.0, margin: float = 1.0, detach_after: float = 0.6,
                 order: str = "highest"):
        super().__init__(order=order)
        self.weight, self.margin, self.detach_after = weight, margin, detach_after
        self.training = Training(auxiliary="learning_loss", auxiliary_options={
            "weight": weight, "margin": margin, "detach_after": detach_after})

    def utility(self, outputs):
        return _get(outputs, "predicted_loss", 1)


class NoiseStability(RowwiseStrategy):
    """Noise stability (Li et al. 2022): how far T's logits move when its weights get small
    Gaussian noise (scaled to each tensor's norm), mean L2 distance over the passes."""

    name = "noise_stability"
    needs = frozenset({"logits", "noisy_logits"})

    def __init__(self, passes: int = 10, scale: float = 0.001, order: str = "highest"):
        super().__init__(order=order)
        self.passes, self.scale = int(passes), float(scale)
        self.training = Training(auxiliary="noise_perturbation",
                                 auxiliary_options={"passes": self.passes, "scale": self.scale})

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
        self.epochs, self.latent, self.unlabelled_sample = epochs, latent, unlabelled_sample
        self.training = Training(auxiliary="vaal", auxiliary_options={
            "epochs": epochs, "latent": latent}, unlabelled_sample=int(unlabelled_sample))

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
        if not 0.0 < subset <= 1.0:
            raise ValueError(f"subset must be in (0, 1], got {subset}")
        self.lam, self.rounds, self.subset = float(lam), _positive_int("rounds", rounds), subset
        self.epochs, self.stage, self.unlabelled_sample = epochs, stage, unlabelled_sample
        self.training = Training(auxiliary="feature_discriminator", auxiliary_options={
            "epochs": epochs, "stage": stage}, unlabelled_sample=int(unlabelled_sample))

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

    def __init__(self, top_clusters: int = 0, iterations: int = 10, epochs: int = 8,
                 latent: int = 16, unlabelled_sample: int = 256):
        self.top_clusters = operator.index(top_clusters)
        self.iterations = _positive_int("iterations", iterations)
        self.epochs, self.latent, self.unlabelled_sample = epochs, latent, unlabelled_sample
        self.training = Training(auxiliary="autoencoder", auxiliary_options={
            "epochs": epochs, "latent": latent}, unlabelled_sample=int(unlabelled_sample))

    def select(self, candidates, k, rng):
        out = candidates.outputs
        # the [N, E + C] float64 table is this strategy's memory: one copy, z-scored in place
        supervised = _columns_float64([np.asarray(out["embeddings"]).reshape(len(candidates), -1),
                                       np.asarray(out["probs"])])
        unsupervised = np.array(out["ae_embeddings"], np.float64).reshape(len(candidates), -1)
        finite = np.isfinite(supervised).all(axis=1) & np.isfinite(unsupervised).all(axis=1)
        rows = np.flatnonzero(finite)
        k = min(k, len(candidates))
        k_finite = min(k, rows.size)
        chosen: list[int] = []
        if k_finite:
            if rows.size < len(candidates):
                supervised, unsupervised = supervised[rows], unsupervised[rows]
            supervised, unsupervised = _zscore_in_place(supervised), _zscore_in_place(unsupervised)
            n_top = min(self.top_clusters or math.ceil(math.sqrt(k_finite)), k_finite)
            top, _ = sm.kmeans(unsupervised, n_top, rng, self.iterations)
            sizes = np.bincount(top, minlength=n_top)
            shares = _share(k_finite, sizes)
            for c in np.lexsort((rng.permutation(n_top), -sizes)):
                members = np.flatnonzero(top == c)
                if shares[c] == 0:
                    continue
                labels, centres = sm.kmeans(supervised[members], int(shares[c]), rng, self.iterations)
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


def _columns_float64(parts: list[np.ndarray]) -> np.ndarray:
    """The 2-D ``parts`` side by side as one float64 array, written into it part by part (no
    float64 copy of each part first, as np.concatenate of converted parts would make)."""
    table = np.empty((len(parts[0]), sum(p.shape[1] for p in parts)), np.float64)
    start = 0
    for part in parts:
        table[:, start:start + part.shape[1]] = part
        start += part.shape[1]
    return table


def _zscore_in_place(x: np.ndarray, columns: int = 64) -> np.ndarray:
    """Each column minus its mean, over its standard deviation (1 where that is 0), in place and
    a block of columns at a time: np.std of the whole table makes a temporary of its size."""
    for start in range(0, x.shape[1], columns):
        block = x[:, start:start + columns]
        std = block.std(axis=0)
        block -= block.mean(axis=0)
        block /= np.where(std > 0, std, 1.0)
    return x


def _share(k: int, sizes: np.ndarray) -> np.ndarray:
    """k split in proportion to ``sizes`` (largest remainders), none above its size."""
    ideal = k * sizes / sizes.sum()
    share = np.minimum(np.floor(ideal).astype(np.int64), sizes)
    while share.sum() < k:
        room = share < sizes
        share[np.flatnonzero(room)[np.argmax((ideal - share)[room])]] += 1
    return share


# --- composite strategies (arithmetic in orchestrator/al/selection_math.py) ---------------------


def _rowwise(name: str, role: str) -> RowwiseStrategy:
    """A registered row-wise strategy (with its defaults), to score with inside another."""
    strategy = make_strategy(name)
    if not isinstance(strategy, RowwiseStrategy) or strategy.training.auxiliary is not None:
        valid = sorted(n for n, c in STRATEGIES.items() if issubclass(c, RowwiseStrategy)
                       and make_strategy(n).training.auxiliary is None)
        raise ValueError(f"{role} must be a row-wise strategy without an auxiliary model, got "
                         f"{name!r}; valid: {valid}")
    return strategy


def _embeddings(outputs: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings as float64 [n, E], which rows are finite)."""
    x = np.asarray(outputs["embeddings"], dtype=np.float64).reshape(n, -1)
    return x, np.isfinite(x).all(axis=1)


class TypiClust(Strategy):
    """TypiClust (Hacohen et al., ICML 2022): k-means on the embeddings of candidates and
    labelled rows together into min(|L| + k, ``max_clusters``) clusters; each pick is the most
    typical unpicked candidate (:func:`selection_math.typicality`, ``neighbours`` nearest of at
    most ``anchors`` members of its cluster) of the cluster with the fewest labelled rows and
    picks so far, the largest first among equals; clusters under ``min_cluster_size`` only once
    no larger one has a candidate left. So with no labels (the cold start of cycle 0) it takes
    one typical member of each of the k largest clusters. Rows with non-finite embeddings come
    last; k-means++ seeding, anchors and ties from ``rng``. The labelled set's embeddings may
    have 0 rows.
    """

    name = "typiclust"
    needs = frozenset({"embeddings"})
    needs_labelled = frozenset({"embeddings"})

    def __init__(self, max_clusters: int = 500, min_cluster_size: int = 5, neighbours: int = 20,
                 anchors: int = 1000, iterations: int = 10):
        self.max_clusters = _positive_int("max_clusters", max_clusters)
        self.min_cluster_size = _positive_int("min_cluster_size", min_cluster_size)
        self.neighbours = _positive_int("neighbours", neighbours)
        self.anchors = _positive_int("anchors", anchors)
        self.iterations = _positive_int("iterations", iterations)

    def select(self, candidates, k, rng):
        n = len(candidates)
        x, finite = _embeddings(candidates.outputs, n)
        labelled = np.asarray(candidates.labelled["embeddings"], np.float64).reshape(
            -1, x.shape[1])
        labelled = labelled[np.isfinite(labelled).all(axis=1)]
        rows = np.flatnonzero(finite)
        points = np.concatenate([x[rows], labelled])
        tiebreak = rng.permutation(n)
        chosen: list[int] = []
        if rows.size and k:
            n_clusters = min(len(labelled) + k, self.max_clusters, len(points))
            cluster, _ = sm.kmeans(points, n_clusters, rng, self.iterations)
            size = np.bincount(cluster, minlength=n_clusters)
            covered = np.bincount(cluster[rows.size:], minlength=n_clusters)
            typical = np.full(len(points), np.nan)  # among the cluster's members
            members_of = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
            for members in members_of:
                if (members < rows.size).any():  # the cluster has candidates
                    typical[members] = sm.typicality_within(points, members, rng, self.anchors,
                                                            self.neighbours)
            # each cluster's candidates, most typical first
            queue = [mine[np.lexsort((tiebreak[rows[mine]], -np.nan_to_num(typical[mine], nan=-1)))]
                     for mine in (m[m < rows.size] for m in members_of)]
            taken_from = np.zeros(n_clusters, dtype=np.int64)
            cluster_order = rng.permutation(n_clusters)
            for _ in range(min(k, rows.size)):
                open_ = [c for c in range(n_clusters) if taken_from[c] < len(queue[c])]
                big = [c for c in open_ if size[c] >= self.min_cluster_size] or open_
                c = min(big, key=lambda c: (covered[c], -size[c], cluster_order[c]))
                chosen.append(int(rows[queue[c][taken_from[c]]]))
                taken_from[c] += 1
                covered[c] += 1
        taken = np.zeros(n, dtype=bool)
        taken[chosen] = True
        rest = np.flatnonzero(~taken)
        rest = rest[np.lexsort((tiebreak[rest], ~finite[rest]))]
        return np.concatenate([np.asarray(chosen, np.int64), rest])[:k]


class MultiCriteria(Strategy):
    """Informativeness, representativeness and diversity in one batch.

    Per candidate: informativeness u = the percentile rank of ``informativeness``'s score (a
    row-wise strategy; EMA-KL by default), representativeness t = the percentile rank of its
    typicality among the candidates (1 / mean distance to its ``neighbours`` nearest of at most
    ``anchors`` candidates drawn from ``rng``: density in embedding space). The batch is then
    chosen greedily (:func:`selection_math.greedy_log_det`), each pick maximising

        info_weight·u + repr_weight·t + diversity_weight·log(d² / (1 + ε)),

    d² the candidate's variance under the kernel cos(φ_i, φ_j) + ε·[i = j] on T's embeddings,
    given the picks so far: a greedy log-determinant (DPP MAP) whose second term is 0 for a
    candidate unlike every pick and log(ε(2+ε)/(1+ε)²) ≈ −1.76 (ε = 0.1) for a copy of one.
    O(N·E) per pick and O(N·A) for the typicality: linear in the pool, no N×N matrix. Rows with
    a non-finite score or embedding come last.
    """

    name = "multi_criteria"

    def __init__(self, informativeness: str = "ema_kl", info_weight: float = 1.0,
                 repr_weight: float = 0.5, diversity_weight: float = 1.0, epsilon: float = 0.1,
                 neighbours: int = 20, anchors: int = 1000):
        self.informativeness = informativeness
        self.base = _rowwise(informativeness, "informativeness")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.info_weight, self.repr_weight = float(info_weight), float(repr_weight)
        self.diversity_weight, self.epsilon = float(diversity_weight), float(epsilon)
        self.neighbours = _positive_int("neighbours", neighbours)
        self.anchors = _positive_int("anchors", anchors)
        self.needs = self.base.needs | {"embeddings"}
        self.mc_passes = self.base.mc_passes
        self.training = Training(mean_model=self.base.training.mean_model)

    def quality(self, outputs: Mapping[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """[N] info_weight·u + repr_weight·t (NaN where a score or embedding is not finite)."""
        n = len(outputs["embeddings"])
        x, finite = _embeddings(outputs, n)
        u = sm.percentile_rank(self.base.score(outputs))
        typical = np.full(n, np.nan)
        rows = np.flatnonzero(finite)
        typical[rows] = sm.typicality_within(x, rows, rng, self.anchors, self.neighbours)
        return self.info_weight * u + self.repr_weight * sm.percentile_rank(typical)

    def select(self, candidates, k, rng):
        quality = self.quality(candidates.outputs, rng)
        x, _ = _embeddings(candidates.outputs, len(candidates))
        return sm.greedy_log_det(x, quality, k, rng.permutation(len(candidates)),
                                 epsilon=self.epsilon, diversity=self.diversity_weight)


class ParetoJunkAware(Strategy):
    """POAL-style selection (Zhan et al. 2022) that keeps likely junk out of the queries.

    Two objectives per candidate, both higher = better: informativeness (``informativeness``'s
    score, EMA-KL by default) and in-distribution-ness, −min_c Mahalanobis²(x, μ_c) over the
    labelled classes' embedding means (one covariance shared by the classes, shrunk by
    ``shrinkage`` towards its mean variance: :func:`selection_math.fit_gaussians`). Candidates
    are ranked front by front of the Pareto sort of the two (:func:`selection_math.pareto_fronts`),
    within a front by the sum of the two percentile ranks. Before that, a candidate nearer (same
    metric) to labelled junk than to every labelled class's mean is put after every other: the
    ledger's junk answers say where junk lies. Junk is of many kinds, so the labelled junk is
    summarised by up to ``junk_clusters`` k-means centres rather than one mean. With no labelled
    class yet, informativeness alone. Rows with a non-finite score or embedding come last.
    O(N·(classes + junk_clusters)·E): linear in the pool.
    """

    name = "poal"
    needs_labelled = frozenset({"embeddings"})
    needs_answers = True

    def __init__(self, informativeness: str = "ema_kl", shrinkage: float = 0.5,
                 junk_clusters: int = 8):
        self.informativeness = informativeness
        self.base = _rowwise(informativeness, "informativeness")
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.shrinkage = float(shrinkage)
        self.junk_clusters = _positive_int("junk_clusters", junk_clusters)
        self.needs = self.base.needs | {"embeddings"}
        self.mc_passes = self.base.mc_passes
        self.training = Training(mean_model=self.base.training.mean_model)

    def objectives(self, candidates: Candidates, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(informativeness, in-distribution score, likely junk) per candidate."""
        n = len(candidates)
        x, finite = _embeddings(candidates.outputs, n)
        informative = np.asarray(self.base.score(candidates.outputs), dtype=np.float64)
        labelled = np.asarray(candidates.labelled["embeddings"], np.float64).reshape(-1, x.shape[1])
        answers = candidates.labelled_answers
        keep = np.isfinite(labelled).all(axis=1) & ((answers >= 0) | (answers == JUNK))
        labelled, answers = labelled[keep], answers[keep]
        real = answers >= 0
        in_distribution = np.zeros(n)
        junk = np.zeros(n, dtype=bool)
        if real.any():
            _, means, precision = sm.fit_gaussians(labelled[real], answers[real], self.shrinkage)
            in_distribution = -sm.mahalanobis_sq(x, means, precision).min(axis=1)
            if (~real).any():
                _, centres = sm.kmeans(labelled[~real], self.junk_clusters, rng, 10)
                junk = sm.mahalanobis_sq(x, centres, precision).min(axis=1) < -in_distribution
        in_distribution[~finite] = np.nan
        return informative, in_distribution, junk & finite

    def select(self, candidates, k, rng):
        informative, in_distribution, junk = self.objectives(candidates, rng)
        front = sm.pareto_fronts(informative, in_distribution)
        balance = sm.percentile_rank(informative) + sm.percentile_rank(in_distribution)
        tiebreak = rng.permutation(len(candidates))
        last = np.iinfo(np.int64).max
        order = np.lexsort((tiebreak, -np.nan_to_num(balance, nan=-np.inf),
                            np.where(front < 0, last, front), junk))
        return order[:k]


CREDITS = ("batch", "probe", "balance", "balance_per_size")  # how albl credits its arms


class ActiveLearningByLearning(Strategy):
    """Automatic choice among base strategies, learnt per campaign: Active Learning by Learning
    (Hsu & Lin, AAAI 2015) in batch form, a bandit over ``arms``.

    Each cycle every query slot draws its arm from the bandit's probabilities; each arm fills
    its slots with its own picks in its own order, skipping rows another arm took. The reward
    of a cycle is measured on the validation split (never the test split), in one of two ways
    (``credit``):

    - ``"batch"``: the validation accuracy the cycle's labels bought, that of the model trained
      after them minus that of the model before. EXP3 credits it to the arms by importance
      weight (:func:`selection_math.exp3_probabilities`: learning rate ``eta`` on accuracy
      fractions). Every arm of a mixed batch shares its one reward, so the arms separate only by
      chance (see there).
    - ``"probe"``: one credit per arm. A linear probe on the current model's embeddings is fitted
      on every labelled subtomogram, and again without all the queries an arm has chosen so far;
      the arm's credit is the validation accuracy its queries add, per query, times the batch
      size k (:func:`selection_math.leave_group_out_gain`: "what a batch of this arm's picks is
      worth"). The probabilities are exponential weights on the credits (``eta``); every arm
      that has chosen queries is measured every cycle, so no importance weighting is needed.
      The scoring pass then also scores the validation split (its embeddings, ~10% more rows).
    - ``"balance"``: one credit per arm from the labels it bought: how evenly all its answers so
      far cover the classes, times the share of them that are not junk
      (:func:`selection_math.useful_balance`). Not a measured gain but a proxy for one: on every
      data set of the label-efficiency benchmark the class balance of what a strategy bought
      ranked its AUBC (docs/BENCHMARKS.md). Exponential weights on it (``eta``), as above.
    - ``"balance_per_size"``: as ``"balance"``, but each arm's spread is judged against what as
      many answers drawn evenly over the classes give (``per_size`` of
      :func:`selection_math.useful_balance`), so an arm is not credited for having been given
      more queries: with ``"balance"``, 20 even answers of 13 classes score 0.95 and 80 score
      0.99, a lead worth e^0.8 ≈ 2× the probability at η = 20.

    In both, ``gamma`` of the probability is spread evenly so no arm is starved. Everything is
    recomputed each cycle from the campaign's history (which arm chose each query, in
    selection.csv; validation accuracies in state.json) and the current pass, so nothing is
    remembered between cycles and a resumed campaign chooses as an uninterrupted one. Which arm
    chose each query is written beside it (the ``chosen_by`` column); the credits and
    probabilities of each cycle go into its record in state.json. Arms may not have an
    auxiliary model.
    """

    name = "albl"
    needs_history = True

    def __init__(self, arms: tuple[str, ...] | list[str] = ("random", "entropy", "ema_kl", "coreset"),
                 gamma: float = 0.2, eta: float = 20.0, credit: str = "balance"):
        if credit not in CREDITS:
            raise ValueError(f"albl: credit {credit!r}; valid: {list(CREDITS)}")
        self.credit = credit
        self.arms = tuple(arms)
        if len(self.arms) < 2 or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"albl needs at least two distinct arms, got {list(self.arms)}")
        self.strategies = [make_strategy(arm) for arm in self.arms]
        for strategy in self.strategies:
            if strategy.training.auxiliary is not None or strategy.needs_history:
                raise ValueError(f"albl: arm {strategy.name!r} trains a model of its own or learns "
                                 "across cycles itself; arms must be plain strategies")
        if not 0.0 < gamma <= 1.0 or not eta >= 0:
            raise ValueError(f"albl needs 0 < gamma <= 1 and eta >= 0, got {gamma}, {eta}")
        self.gamma, self.eta = float(gamma), float(eta)
        self.needs = frozenset().union(*(s.needs for s in self.strategies))
        self.needs_labelled = frozenset().union(*(s.needs_labelled for s in self.strategies))
        self.needs_answers = any(s.needs_answers for s in self.strategies)
        if credit == "probe":  # embeddings of the labelled and validation rows, and the answers
            self.needs = self.needs | {"embeddings"}
            self.needs_labelled = self.needs_labelled | {"embeddings"}
            self.needs_validation = frozenset({"embeddings"})
            self.needs_answers = True
        if credit.startswith("balance"):  # the number of classes, from the probabilities' width
            self.needs = self.needs | {"probs"}
        self.mc_passes = max(s.mc_passes for s in self.strategies)
        self.training = Training.combined(s.training for s in self.strategies)

    def probabilities(self, history) -> list[np.ndarray]:
        """The arm probabilities of each past bandit cycle (1, 2, …) and then of the next."""
        rounds = []
        cycles = {c.cycle: c for c in history.cycles}
        for c in sorted(cycles):
            if c == 0:
                continue  # the initial draw is not a bandit round
            counts = np.array([sum(1 for a in cycles[c].chosen_by if a == arm) for arm in self.arms])
            before = cycles.get(c - 1)
            reward = cycles[c].val_accuracy - (before.val_accuracy if before else math.nan)
            rounds.append((counts, reward))
        return sm.exp3_probabilities(rounds, len(self.arms), self.gamma, self.eta)

    def probe_credit(self, candidates: Candidates, k: int) -> np.ndarray:
        """Each arm's credit [K]: the validation accuracy a batch of k of its picks adds to a
        linear probe on the labelled embeddings (0 for an arm that has chosen nothing yet)."""
        arm_of = self.arm_of_labelled(candidates)
        answers = np.asarray(candidates.labelled_answers, np.int64)
        val_answers = np.asarray(candidates.validation_answers, np.int64)
        classes = int(max(answers.max(initial=-1), val_answers.max(initial=-1))) + 1
        gain = sm.leave_group_out_gain(
            candidates.labelled["embeddings"], answers, arm_of, len(self.arms),
            candidates.validation["embeddings"], val_answers, max(classes, 1))
        counts = np.bincount(arm_of[arm_of >= 0], minlength=len(self.arms))
        return np.where(counts > 0, np.nan_to_num(gain) * k / np.maximum(counts, 1), 0.0)

    def arm_of_labelled(self, candidates: Candidates) -> np.ndarray:
        """The arm that chose each labelled row ([n_labelled], −1: the initial draw or none)."""
        arm_of_row = {}
        for cycle in candidates.history.cycles:
            if cycle.cycle == 0:
                continue  # the initial draw is not a bandit round
            for row, chooser in zip(cycle.rows, cycle.chosen_by):
                if chooser in self.arms:
                    arm_of_row[int(row)] = self.arms.index(chooser)
        rows = candidates.labelled_rows if candidates.labelled_rows is not None else ()
        return np.asarray([arm_of_row.get(int(r), -1) for r in rows], np.int64)

    def balance_credit(self, candidates: Candidates) -> np.ndarray:
        """Each arm's credit [K]: :func:`selection_math.useful_balance` of every answer its
        queries got so far (an arm with none: the others' mean, or 0)."""
        answers: list[list[int]] = [[] for _ in self.arms]
        for cycle in candidates.history.cycles:
            if cycle.cycle == 0:
                continue  # the initial draw is not a bandit round
            for answer, chooser in zip(cycle.answers, cycle.chosen_by):
                if chooser in self.arms and answer != UNANSWERED:
                    answers[self.arms.index(chooser)].append(int(answer))
        classes = candidates.outputs["probs"].shape[1] if len(candidates) else 0
        per_size = self.credit == "balance_per_size"
        credit = np.array([sm.useful_balance(np.asarray(a, np.int64), classes, per_size)
                           for a in answers])
        measured = np.isfinite(credit)
        return np.where(measured, credit, credit[measured].mean() if measured.any() else 0.0)

    def next_probabilities(self, candidates: Candidates, k: int) -> tuple[np.ndarray, dict]:
        """The arm probabilities of this cycle, and what they came from (the cycle's notes)."""
        if self.credit == "batch":
            p = self.probabilities(candidates.history)[-1]
            return p, {"probabilities": dict(zip(self.arms, np.round(p, 4).tolist()))}
        credit = (self.probe_credit(candidates, k) if self.credit == "probe"
                  else self.balance_credit(candidates))
        w = np.exp(self.eta * (credit - credit.max()))
        p = (1.0 - self.gamma) * w / w.sum() + self.gamma / len(self.arms)
        return p, {"credit": dict(zip(self.arms, np.round(credit, 5).tolist())),
                   "probabilities": dict(zip(self.arms, np.round(p, 4).tolist()))}

    def plan(self, candidates, k, rng):
        p, notes = self.next_probabilities(candidates, k)
        slots = rng.choice(len(self.arms), size=k, p=p)
        arm_rngs = [np.random.default_rng(seed) for seed in rng.integers(2**63, size=len(self.arms))]
        rankings = {a: iter(select(self.strategies[a], candidates, k, arm_rngs[a]))
                    for a in np.unique(slots)}
        taken = np.zeros(len(candidates), dtype=bool)
        positions, chosen_by = [], []
        for a in slots:
            # an arm's first k picks hold enough untaken ones: the others take at most k − its slots
            pick = next(position for position in rankings[a] if not taken[position])
            taken[pick] = True
            positions.append(pick)
            chosen_by.append(self.arms[a])
        return Selection(np.asarray(positions, np.int64), tuple(chosen_by), notes)

    def select(self, candidates, k, rng):
        return self.plan(candidates, k, rng).positions


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
    "class_balanced": ClassBalanced,
    "ll4al": LearningLoss,
    "noise_stability": NoiseStability,
    "vaal": VAAL,
    "hal": HAL,
    "two_stream": TwoStream,
    "typiclust": TypiClust,
    "multi_criteria": MultiCriteria,
    "poal": ParetoJunkAware,
    "albl": ActiveLearningByLearning,
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
