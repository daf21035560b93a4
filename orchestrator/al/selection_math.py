"""The arithmetic behind the composite strategies, pure numpy: no strategy, loop or I/O here.

Everything is linear in the number of rows N: distances are computed in row chunks against a
bounded set (anchors, class means, the labelled rows, one new pick), never N×N. Randomness only
from a given ``np.random.Generator``.

- :func:`percentile_rank`: scores of any scale on [0, 1], so two criteria can be added;
- :func:`typicality`: TypiClust's typicality (inverse mean distance to the nearest neighbours),
  against at most ``anchors`` rows;
- :func:`greedy_log_det`: greedy MAP of a DPP over embeddings (a quality per row, a cosine
  kernel plus ε·I), one pick at a time in O(N·E);
- :func:`pareto_fronts`: non-dominated sorting of two objectives in O(N log N);
- :func:`fit_gaussians`, :func:`mahalanobis_sq`: class means and one shared, shrunk covariance;
- :func:`exp3_probabilities`: the bandit's arm probabilities, replayed from its rounds;
- :func:`probe_accuracy`, :func:`leave_group_out_gain`: a linear probe on frozen embeddings, and
  what each group of its training rows adds to its validation accuracy (albl's per-arm credit);
- :func:`useful_balance`, :func:`expected_even_entropy`: how evenly a set of answers covers the
  classes, junk counted against it, judged against log C or against as many even draws (albl's
  other per-arm credits);
- :func:`kmeans`, :func:`nearest`: the project's one k-means (k-means++ seeding from a given
  generator, or a deterministic farthest-point start), used by the strategies and by the
  labelling page's look-alike groups.
"""

from __future__ import annotations

import math
from bisect import bisect_left

import numpy as np

__all__ = [
    "CHUNK_ROWS",
    "percentile_rank",
    "sample_anchors",
    "typicality",
    "typicality_within",
    "greedy_log_det",
    "pareto_fronts",
    "fit_gaussians",
    "mahalanobis_sq",
    "exp3_probabilities",
    "probe_accuracy",
    "leave_group_out_gain",
    "useful_balance",
    "expected_even_entropy",
    "kmeans",
    "nearest",
]

CHUNK_ROWS = 4096  # rows per distance chunk: temporaries are CHUNK_ROWS × (anchors or classes)


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Each value's rank among the finite values, scaled to [0, 1] (lowest 0, highest 1; equal
    values share their mean rank); non-finite values stay NaN. One finite value ranks 1."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    if finite.size == 0:
        return out
    if finite.size == 1:
        out[finite] = 1.0
        return out
    v = values[finite]
    order = np.argsort(v, kind="stable")
    ranks = np.empty(v.size)
    ranks[order] = np.arange(v.size, dtype=np.float64)
    # ties: the mean rank of their run
    sorted_v = v[order]
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    for a, b in zip(starts, ends):
        if b - a > 1:
            ranks[order[a:b]] = (a + b - 1) / 2.0
    out[finite] = ranks / (v.size - 1)
    return out


def sample_anchors(n: int, anchors: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of at most ``anchors`` of n rows, drawn without replacement (all when
    n ≤ anchors, and then no draw is made)."""
    if n <= anchors:
        return np.arange(n)
    return np.sort(rng.choice(n, size=anchors, replace=False))


def typicality(
    x: np.ndarray, anchors: np.ndarray, neighbours: int = 20, *, self_anchor: np.ndarray | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> np.ndarray:
    """TypiClust's typicality of each row of ``x``: 1 / (mean Euclidean distance to its
    ``neighbours`` nearest ``anchors``), the anchors being a sample of the rows (all of them
    in a small set, which makes it exact). ``self_anchor[i]`` is the anchor that *is* row i
    (or −1): it is not its own neighbour. Non-finite rows get NaN. O(N·A) time, O(chunk·A)
    memory."""
    x = np.asarray(x, dtype=np.float64)
    anchors = np.asarray(anchors, dtype=np.float64)
    out = np.full(len(x), np.nan)
    if len(anchors) == 0:
        return out
    a_sq = np.einsum("ij,ij->i", anchors, anchors)
    for start in range(0, len(x), chunk_rows):
        chunk = x[start:start + chunk_rows]
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.einsum("ij,ij->i", chunk, chunk)[:, None] - 2.0 * chunk @ anchors.T + a_sq
        d = np.sqrt(np.maximum(d, 0.0))
        if self_anchor is not None:
            own = np.asarray(self_anchor[start:start + len(chunk)])
            mine = np.flatnonzero(own >= 0)
            d[mine, own[mine]] = np.inf
        m = min(neighbours, len(anchors) - (0 if self_anchor is None else 1))
        if m < 1:
            continue
        nearest = np.partition(d, m - 1, axis=1)[:, :m]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start:start + len(chunk)] = 1.0 / nearest.mean(axis=1)
    out[~np.isfinite(out)] = np.nan  # non-finite rows (and a row on top of all its neighbours: inf)
    return out


def typicality_within(
    x: np.ndarray, members: np.ndarray, rng: np.random.Generator, anchors: int = 1000,
    neighbours: int = 20,
) -> np.ndarray:
    """:func:`typicality` of each of the rows ``members`` of ``x`` among those rows, against at
    most ``anchors`` of them drawn from ``rng`` (all of them, exactly, in a smaller set)."""
    members = np.asarray(members, dtype=np.int64)
    chosen = sample_anchors(members.size, anchors, rng)
    self_anchor = np.full(members.size, -1)
    self_anchor[chosen] = np.arange(chosen.size)
    return typicality(x[members], x[members[chosen]], neighbours, self_anchor=self_anchor)


def greedy_log_det(
    features: np.ndarray, quality: np.ndarray, k: int, tiebreak: np.ndarray, *,
    epsilon: float = 0.1, diversity: float = 1.0,
) -> np.ndarray:
    """Positions of k rows chosen one at a time, each maximising its gain

        quality_i + diversity · log(d_i² / (1 + ε)),

    where d_i² is row i's variance under the kernel K = ΦΦᵀ + ε·I (Φ: the L2-normalised
    features, so ΦΦᵀ is the cosine similarity) conditioned on the rows already chosen. With
    diversity = 1 this is the greedy MAP of the DPP L = diag(q)·K·diag(q), q_i = exp(quality_i/2):
    each pick adds log det of the chosen set's L. The gain's second term is 0 for a row
    orthogonal to every pick and falls towards log(ε/(1+ε)) for a copy of one.

    By the matrix inversion lemma d_i² = ε·(1 + φ_iᵀA⁻¹φ_i), A = ε·I + Σ_picks φφᵀ (E×E);
    each pick updates A⁻¹ and every row's φ_iᵀA⁻¹φ_i by Sherman–Morrison: O(N·E) time per pick,
    O(N + E²) memory, no N×N or N×k matrix. Rows with non-finite quality or features come after
    every finite row (in tiebreak order); equal gains go by ascending ``tiebreak``.
    """
    phi = np.asarray(features, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    n = len(phi)
    k = min(k, n)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", phi, phi))
    finite = np.isfinite(quality) & np.isfinite(norms)
    phi = np.where(finite[:, None], phi, 0.0) / np.where(finite & (norms > 0), norms, 1.0)[:, None]
    dim = phi.shape[1] if phi.ndim == 2 else 0
    a_inv = np.eye(dim) / epsilon
    v = np.einsum("ij,ij->i", phi, phi) / epsilon  # φᵀA⁻¹φ for A = εI
    gain = np.where(finite, quality, -np.inf)
    chosen = np.zeros(n, dtype=bool)
    picks = []
    for _ in range(min(k, int(finite.sum()))):
        total = gain + diversity * np.log(epsilon * (1.0 + v) / (1.0 + epsilon))
        total[chosen | ~finite] = -np.inf
        best = np.flatnonzero(total == total.max())
        pick = int(best[np.argmin(tiebreak[best])])
        picks.append(pick)
        chosen[pick] = True
        w = a_inv @ phi[pick]
        denominator = 1.0 + phi[pick] @ w
        a_inv -= np.outer(w, w) / denominator
        v -= (phi @ w) ** 2 / denominator
        np.maximum(v, 0.0, out=v)  # rounding
    rest = np.flatnonzero(~chosen)
    rest = rest[np.lexsort((tiebreak[rest], ~finite[rest]))]
    return np.concatenate([np.asarray(picks, np.int64), rest])[:k].astype(np.int64)


def pareto_fronts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-dominated sorting of rows by two objectives, both to be maximised: 0 for the rows no
    other row dominates (at least as good in both, better in one), 1 for those only front 0
    dominates, and so on. Rows with a non-finite objective get −1. O(N log N) (sweep by a,
    binary search over the fronts' last b)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    front = np.full(a.shape, -1, dtype=np.int64)
    finite = np.flatnonzero(np.isfinite(a) & np.isfinite(b))
    # by a descending, then b descending: every earlier row has a ≥ this row's a, so an earlier
    # row dominates this one iff its b ≥ this b (ties in both excepted: then neither dominates)
    order = finite[np.lexsort((-b[finite], -a[finite]))]
    # Along a front, rows come with a falling and b rising, so a front's latest row has its
    # highest b: the row joins the first front whose highest b is below its own (or equal, from
    # an identical row). Those highest b fall from front to front.
    last_b: list[float] = []
    last_a: list[float] = []
    negated: list[float] = []  # -last_b, non-decreasing: what bisect needs
    for i in order:
        j = bisect_left(negated, -b[i])
        while j < len(last_b) and last_b[j] == b[i] and last_a[j] != a[i]:
            j += 1  # an equal b with a larger a dominates
        if j == len(last_b):
            last_b.append(b[i])
            last_a.append(a[i])
            negated.append(-b[i])
        else:
            last_b[j], last_a[j], negated[j] = b[i], a[i], -b[i]
        front[i] = j
    return front


def fit_gaussians(
    x: np.ndarray, labels: np.ndarray, shrinkage: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, means [C, E], precision [E, E]) of the rows of ``x`` by label: one Gaussian per
    class with a covariance shared by all (Lee et al. 2018's Mahalanobis detector), shrunk
    towards its mean variance: Σ = (1 − s)·Σ_pooled + s·(tr Σ_pooled / E)·I, so that a few
    labelled rows in many dimensions still give an invertible matrix."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    classes = np.unique(labels)
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    dim = x.shape[1]
    pooled = centred.T @ centred / max(len(x) - len(classes), 1)
    scale = np.trace(pooled) / dim
    if not scale > 0:  # one row per class: nothing to estimate a spread from
        scale = max(float(np.mean(x.var(axis=0))), 1e-12)
        pooled = np.zeros_like(pooled)
    covariance = (1.0 - shrinkage) * pooled + shrinkage * scale * np.eye(dim)
    if shrinkage == 0.0:
        covariance += 1e-9 * scale * np.eye(dim)
    return classes, means, np.linalg.inv(covariance)


def mahalanobis_sq(
    x: np.ndarray, centres: np.ndarray, precision: np.ndarray, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """[N, C] squared Mahalanobis distances (x − μ)ᵀP(x − μ), in row chunks."""
    x = np.asarray(x, dtype=np.float64)
    centres = np.asarray(centres, dtype=np.float64)
    out = np.empty((len(x), len(centres)))
    pc = centres @ precision
    c_term = np.einsum("ij,ij->i", pc, centres)
    for start in range(0, len(x), chunk_rows):
        chunk = x[start:start + chunk_rows]
        with np.errstate(invalid="ignore", over="ignore"):
            px = chunk @ precision
            d = np.einsum("ij,ij->i", px, chunk)[:, None] - 2.0 * chunk @ pc.T + c_term
        out[start:start + len(chunk)] = np.maximum(d, 0.0)
    return out


def exp3_probabilities(
    rounds: list[tuple[np.ndarray, float]], n_arms: int, gamma: float, eta: float
) -> list[np.ndarray]:
    """EXP3 (Auer et al. 2002) for batches: the arm probabilities of each round, replayed from
    the rounds already played, then the next round's (so ``len(rounds) + 1`` vectors).

    A round is (queries each arm chose [K], reward). Each query of a batch is one pull, its arm
    drawn with probability p_a; every pull of the round shares its reward r (the gain the batch
    brought), so arm a's importance-weighted estimate is r·n_a / (k·p_a), unbiased for r (EXP3's
    estimator summed over the batch's pulls). log w_a grows by η times it; p = (1 − γ)·w/Σw +
    γ/K keeps every arm explored. A NaN reward (no measurement) changes nothing.

    A limit of the batch form: r is the mixed batch's gain, not arm a's, so every arm's estimate
    has the same expectation r; arms separate only by how far n_a strays from k·p_a by chance,
    and more rounds do not change that. In expectation the probabilities do not move.
    """
    log_w = np.zeros(n_arms)
    history = []
    for counts, reward in [*rounds, (None, math.nan)]:
        w = np.exp(log_w - log_w.max())
        p = (1.0 - gamma) * w / w.sum() + gamma / n_arms
        history.append(p)
        if counts is None or not np.isfinite(reward):
            continue
        counts = np.asarray(counts, dtype=np.float64)
        if counts.sum() > 0:
            log_w += eta * reward * counts / (counts.sum() * p)
    return history


# The probe's L2 penalty on z-scored embeddings, and its optimiser's iteration limit: enough to
# converge on a few thousand rows of a few hundred features in well under a second.
PROBE_L2 = 1e-2
PROBE_ITERATIONS = 200


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, num_classes: int, l2: float = PROBE_L2) -> float:
    """Accuracy on (test_x, test_y) of a multinomial logistic regression fitted on (train_x,
    train_y): features z-scored with the training rows' statistics, an L2 penalty ``l2`` on the
    weights, L-BFGS from zero (deterministic). NaN without test rows; no training rows predicts
    class 0 everywhere (the constant model)."""
    from scipy.optimize import minimize

    test_y = np.asarray(test_y, np.int64)
    if not len(test_y):
        return math.nan
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    if not len(train_x):
        return float(np.mean(test_y == 0))
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-8
    x, xt = (train_x - mean) / std, (test_x - mean) / std
    x, xt = np.hstack([x, np.ones((len(x), 1))]), np.hstack([xt, np.ones((len(xt), 1))])
    onehot = np.eye(num_classes)[np.asarray(train_y, np.int64)]
    shape = (x.shape[1], num_classes)
    penalised = np.ones(shape)
    penalised[-1] = 0.0  # the bias is not penalised

    def loss_and_grad(flat):
        w = flat.reshape(shape)
        logits = x @ w
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -(onehot * log_p).sum() / len(x) + 0.5 * l2 * (penalised * w * w).sum()
        grad = x.T @ (np.exp(log_p) - onehot) / len(x) + l2 * penalised * w
        return loss, grad.ravel()

    fit = minimize(loss_and_grad, np.zeros(shape).ravel(), jac=True, method="L-BFGS-B",
                   options={"maxiter": PROBE_ITERATIONS})
    predicted = (xt @ fit.x.reshape(shape)).argmax(axis=1)
    return float(np.mean(predicted == test_y))


def leave_group_out_gain(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int,
                         val_x: np.ndarray, val_y: np.ndarray, num_classes: int) -> np.ndarray:
    """What each group of training rows adds to a probe's validation accuracy: for g in
    0 … n_groups−1, :func:`probe_accuracy` fitted on every row minus that fitted on every row
    but group g's ([n_groups]; NaN for a group with no rows). Rows of group −1 are never left
    out; rows with a negative ``y`` (junk answers) never train the probe but keep their group."""
    x, y, groups = np.asarray(x), np.asarray(y, np.int64), np.asarray(groups, np.int64)
    trains = y >= 0
    everything = probe_accuracy(x[trains], y[trains], val_x, val_y, num_classes)
    gain = np.full(n_groups, np.nan)
    for g in range(n_groups):
        if np.any(groups == g):
            kept = trains & (groups != g)
            gain[g] = everything - probe_accuracy(x[kept], y[kept], val_x, val_y, num_classes)
    return gain


def useful_balance(answers: np.ndarray, num_classes: int, per_size: bool = False) -> float:
    """How useful a set of answers is as labels, judged by their spread: the share that are
    classes (not junk: any negative answer) times the evenness of their class counts. NaN for
    no answers; 0 for junk only.

    Evenness is the entropy H of the class counts with Miller and Madow's correction
    (m − 1)/(2n) for the n answers' m classes seen, over the entropy an even spread could have:
    - ``per_size=False``: log C, capped at 1. A small sample's entropy is biased low (20 even
      draws from 13 classes average 0.95, 5 draws 0.68), so of two equally even arms the one
      with more answers scores higher;
    - ``per_size=True``: :func:`expected_even_entropy` of as many answers, not capped. An arm
      whose answers are as even as draws spread evenly over the classes scores 1 on average
      however many it has, so arms are compared by spread, not by how many queries they got.
    """
    answers = np.asarray(answers, np.int64)
    if not len(answers):
        return math.nan
    classes = answers[answers >= 0]
    if not len(classes) or num_classes < 2:
        return 0.0 if not len(classes) else len(classes) / len(answers)
    counts = np.bincount(classes, minlength=num_classes)
    p = counts[counts > 0] / len(classes)
    entropy = -(p * np.log(p)).sum() + (len(p) - 1) / (2 * len(classes))
    useful = len(classes) / len(answers)
    if not per_size:
        return useful * min(1.0, entropy / math.log(num_classes))
    if len(classes) == 1:
        return useful  # one answer: nothing to be uneven
    return useful * entropy / expected_even_entropy(len(classes), num_classes)


def expected_even_entropy(n: int, num_classes: int) -> float:
    """The mean Miller–Madow-corrected entropy of n answers drawn evenly (uniformly at random)
    from num_classes classes, exactly: each class's count is Binomial(n, 1/C), so
    E[Σ p log p] = C · E[(c/n) log(c/n)], and the classes seen average C·(1 − (1 − 1/C)ⁿ)."""
    from scipy.stats import binom

    if n < 2 or num_classes < 2:
        return 0.0  # one answer, or one class: no spread to have
    k = np.arange(1, n + 1)
    q = k / n
    plogp = num_classes * float((binom.pmf(k, n, 1.0 / num_classes) * q * np.log(q)).sum())
    seen = num_classes * (1.0 - (1.0 - 1.0 / num_classes) ** n)
    return -plogp + (seen - 1.0) / (2.0 * n)


def nearest(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def kmeans(x: np.ndarray, n_clusters: int, rng: np.random.Generator | None,
           iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(labels, centres) of Lloyd's k-means on the rows of ``x``; n_clusters is clipped to len(x).

    Seeding: k-means++ (D² sampling) from ``rng``; with ``rng=None`` a deterministic
    farthest-point start from the first row (each next centre the row farthest from every
    centre so far), for callers that must give the same answer for the same rows without a
    seed. Then at most ``iterations`` Lloyd steps, stopping early once no row changes cluster;
    an emptied cluster keeps its centre.
    """
    n_clusters = min(n_clusters, len(x))
    if n_clusters < 1:
        return np.zeros(0, np.int64), np.zeros((0,) + np.shape(x)[1:])
    centres = [x[0 if rng is None else rng.integers(len(x))]]
    dist = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, n_clusters):
        total = dist.sum()
        if rng is None:
            pick = int(np.argmax(dist))
        elif total > 0:
            pick = int(np.searchsorted(np.cumsum(dist), rng.random() * total, side="right"))
            pick = min(pick, len(x) - 1)
        else:
            pick = int(rng.integers(len(x)))
        centres.append(x[pick])
        dist = np.minimum(dist, ((x - x[pick]) ** 2).sum(axis=1))
    centres = np.array(centres)
    labels, _ = nearest(x, centres)
    for _ in range(iterations):
        for c in range(n_clusters):
            members = labels == c
            if members.any():
                centres[c] = x[members].mean(axis=0)
        new, _ = nearest(x, centres)
        if np.array_equal(new, labels):
            break
        labels = new
    return labels, centres
