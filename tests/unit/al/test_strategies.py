"""Query strategies: one contract for all, then known answers for each."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.al import selection_math as sm
from orchestrator.al.history import UNANSWERED, CampaignHistory, CycleSelection
from orchestrator.al.strategies import (
    OUTPUT_KEYS,
    STRATEGIES,
    Candidates,
    RowwiseStrategy,
    balanced_top_k,
    make_strategy,
    select,
    select_with_record,
    top_k,
    top_k_merge,
    unlabelled_positions,
)

N_POOL, N_LABELLED, C, E, K = 260, 60, 5, 16, 4  # 200 candidates

# Every registered strategy with its defaults, plus the option values worth their own run.
CONFIGS = [(name, {}) for name in STRATEGIES] + [
    ("ema_kl", {"distance": "reverse_kl"}),
    ("ema_kl", {"distance": "js"}),
    ("ema_kl", {"distance": "mse_logits"}),
    ("ema_kl", {"order": "lowest"}),
    ("bald", {"mc_passes": K}),
    ("coreset", {"chunk_rows": 64}),
    ("badge", {"chunk_rows": 64}),
    ("hal", {"rounds": 1}),
    ("hal", {"rounds": 7, "subset": 0.2}),
    ("two_stream", {"top_clusters": 3}),
    ("typiclust", {"max_clusters": 7, "anchors": 9}),
    ("multi_criteria", {"informativeness": "entropy", "anchors": 30}),
    ("multi_criteria", {"diversity_weight": 0.0}),
    ("poal", {"informativeness": "margin", "junk_clusters": 1}),
    ("albl", {"arms": ["random", "badge", "bald", "poal"]}),
    ("albl", {"credit": "balance_per_size"}),
]
CONFIG_IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in CONFIGS]


def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def pool_outputs(n, seed=0):
    """Plausible scoring-pass outputs for every key, float32 like the real pass."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n, C))
    mean_logits = logits + 0.5 * rng.standard_normal((n, C))
    mc_logits = logits[:, :, None] + rng.standard_normal((n, C, K))
    outputs = {
        "logits": logits,
        "mean_logits": mean_logits,
        "probs": softmax(logits),
        "mean_probs": softmax(mean_logits),
        "embeddings": rng.standard_normal((n, E)),
        "grad_embeddings": rng.standard_normal((n, E * C)),
        "mc_probs": softmax(mc_logits, axis=1),
        "predicted_loss": rng.standard_normal(n),
        "labelledness": rng.uniform(size=n),
        "noisy_logits": logits[:, :, None] + 0.1 * rng.standard_normal((n, C, K)),
        "ae_embeddings": rng.standard_normal((n, E)),
    }
    assert set(outputs) == OUTPUT_KEYS
    return {key: value.astype(np.float32) for key, value in outputs.items()}


def pool_candidates(strategy, seed=0):
    """(candidates, labelled pool rows): a pool whose first rows are labelled, in shuffled
    order; outputs hold only the keys the strategy declares, so reading others fails. The
    labelled rows' answers include junk; the history is two cycles of a campaign."""
    rng = np.random.default_rng(seed)
    all_rows = rng.permutation(np.arange(1000, 1000 + N_POOL))
    labelled_rows = all_rows[rng.permutation(N_POOL)[:N_LABELLED]]
    outputs = pool_outputs(N_POOL, seed)
    unlabelled = unlabelled_positions(all_rows, labelled_rows)
    labelled = np.flatnonzero(np.isin(all_rows, labelled_rows))
    candidates = Candidates(
        rows=all_rows[unlabelled],
        outputs={key: outputs[key][unlabelled] for key in strategy.needs},
        labelled={key: outputs[key][labelled] for key in strategy.needs_labelled},
        labelled_answers=rng.integers(-1, C, size=len(labelled)),
        history=two_cycles(all_rows[labelled]),
    )
    return candidates, labelled_rows


def two_cycles(rows):
    """A history: a random first half, then a second half chosen by two base strategies."""
    half = len(rows) // 2
    return CampaignHistory((
        CycleSelection(0, rows[:half], ("random",) * half, np.full(half, -1), np.zeros(half, int), 0.4),
        CycleSelection(1, rows[half:], ("entropy", "random") * (half // 2), np.zeros(half, int),
                       np.ones(half, int), 0.5),
    ))


def choose(name, candidates, k, seed=0, **options):
    return select(make_strategy(name, **options), candidates, k, np.random.default_rng(seed))


def probs_candidates(probs):
    probs = np.asarray(probs, dtype=np.float32)
    return Candidates(rows=np.arange(len(probs)), outputs={"probs": probs})


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=CONFIG_IDS)
class TestEveryStrategy:
    def test_declares_only_outputs_the_scoring_pass_can_produce(self, name, options):
        strategy = make_strategy(name, **options)
        assert strategy.needs | strategy.needs_labelled <= OUTPUT_KEYS

    def test_names_the_strategy_that_chose_each_pick(self, name, options):
        strategy = make_strategy(name, **options)
        candidates, _ = pool_candidates(strategy)
        selection = select_with_record(strategy, candidates, 17, np.random.default_rng(0))
        arms = set(getattr(strategy, "arms", (strategy.name,)))
        assert len(selection.chosen_by) == 17 and set(selection.chosen_by) <= arms

    def test_same_seed_gives_the_same_selection(self, name, options):
        strategy = make_strategy(name, **options)
        candidates, _ = pool_candidates(strategy)
        first = select(strategy, candidates, 30, np.random.default_rng(7))
        second = select(strategy, candidates, 30, np.random.default_rng(7))
        np.testing.assert_array_equal(first, second)

    def test_never_chooses_a_labelled_row(self, name, options):
        strategy = make_strategy(name, **options)
        candidates, labelled_rows = pool_candidates(strategy)
        n = len(candidates)
        chosen_rows = candidates.rows[select(strategy, candidates, n, np.random.default_rng(1))]
        assert set(chosen_rows.tolist()) == set(range(1000, 1000 + N_POOL)) - set(labelled_rows)

    def test_asking_for_more_than_the_pool_warns_and_returns_everything(self, name, options):
        strategy = make_strategy(name, **options)
        candidates, _ = pool_candidates(strategy)
        with pytest.warns(UserWarning, match=r"k=250.*N=200"):
            positions = select(strategy, candidates, 250, np.random.default_rng(0))
        np.testing.assert_array_equal(np.sort(positions), np.arange(200))

    def test_asking_for_nothing_returns_nothing(self, name, options):
        strategy = make_strategy(name, **options)
        candidates, _ = pool_candidates(strategy)
        for k in (0, -3):
            assert select(strategy, candidates, k, np.random.default_rng(0)).shape == (0,)


class Broken(RowwiseStrategy):
    """Returns whatever positions it is given: what select() must refuse."""

    name = "broken"

    def __init__(self, positions):
        super().__init__()
        self.positions = positions

    def select(self, candidates, k, rng):
        return np.asarray(self.positions)


@pytest.mark.parametrize("positions, why", [
    ([0, 1, 1], "a duplicate"), ([0, 1, 3], "out of range"), ([-1, 0, 1], "negative"),
    ([0, 1], "too few"), ([0, 1, 2, 0], "too many"),
])
def test_select_refuses_positions_that_break_the_contract(positions, why):
    """The contract every strategy is held to above is enforced by select() itself: a
    strategy's bug is an error at selection, never a wrong or repeated query."""
    candidates = probs_candidates([[0.5, 0.5]] * 3)
    with pytest.raises(RuntimeError, match="must be k unique positions|named the chooser"):
        select(Broken(positions), candidates, 3, np.random.default_rng(0))


ROWWISE = [(n, o) for n, o in CONFIGS if issubclass(STRATEGIES[n], RowwiseStrategy)]


@pytest.mark.parametrize(
    ("name", "options"), ROWWISE, ids=[CONFIG_IDS[CONFIGS.index(c)] for c in ROWWISE]
)
def test_scoring_in_uneven_chunks_matches_scoring_at_once(name, options):
    strategy = make_strategy(name, **options)
    outputs = pool_candidates(strategy)[0].outputs
    bounds = [(0, 7), (7, 120), (120, 200)]
    chunked = np.concatenate(
        [strategy.score({k: v[a:b] for k, v in outputs.items()}) for a, b in bounds]
    )
    at_once = strategy.score(outputs)
    assert at_once.dtype == np.float64
    np.testing.assert_array_equal(chunked, at_once)


def test_random_with_different_seeds_chooses_differently():
    strategy = make_strategy("random")
    candidates, _ = pool_candidates(strategy)
    first = select(strategy, candidates, 10, np.random.default_rng(0))
    second = select(strategy, candidates, 10, np.random.default_rng(1))
    assert first.tolist() != second.tolist()


# --- registry and inputs ----------------------------------------------------------------------


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"'entorpy'.*'bald'.*'coreset'.*'entropy'"):
        make_strategy("entorpy")


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match=r"'entropy'.*\['distance'\].*order"):
        make_strategy("entropy", distance="kl")


def test_unknown_distance_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['kl', 'reverse_kl', 'js', 'mse_logits'\], got 'kld'"):
        make_strategy("ema_kl", distance="kld")


def test_bald_refuses_a_single_mc_pass():
    with pytest.raises(ValueError, match="mc_passes >= 2"):
        make_strategy("bald", mc_passes=1)


def test_mc_strategies_tell_the_scoring_pass_how_many_passes():
    assert make_strategy("bald").mc_passes == 10
    assert make_strategy("mc_entropy", mc_passes=4).mc_passes == 4
    assert make_strategy("entropy").mc_passes == 0


def test_select_names_a_missing_output():
    candidates = Candidates(rows=np.arange(3), outputs={"probs": np.full((3, 2), 0.5)})
    with pytest.raises(ValueError, match=r"ema_kl needs outputs \['logits', 'mean_logits'\]"):
        choose("ema_kl", candidates, 1)


def test_coreset_needs_labelled_embeddings_even_if_there_are_none_yet():
    candidates = Candidates(rows=np.arange(3), outputs={"embeddings": np.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"\['embeddings'\] for the labelled set"):
        choose("coreset", candidates, 1)


def test_candidates_refuse_misaligned_outputs():
    with pytest.raises(ValueError, match=r"outputs\['probs'\] has shape \(4, 2\); expected 3"):
        Candidates(rows=np.arange(3), outputs={"probs": np.full((4, 2), 0.5)})


def test_candidates_refuse_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['prob'\]"):
        Candidates(rows=np.arange(3), outputs={"prob": np.full((3, 2), 0.5)})


def test_candidates_refuse_duplicate_rows():
    with pytest.raises(ValueError, match="duplicates"):
        Candidates(rows=np.array([4, 5, 4]), outputs={})


def test_unlabelled_positions_are_the_positions_of_rows_not_labelled():
    positions = unlabelled_positions(np.array([10, 11, 12, 13, 14]), np.array([14, 11]))
    np.testing.assert_array_equal(positions, [0, 2, 3])


# --- the shared selector ----------------------------------------------------------------------


def test_top_k_returns_highest_first():
    positions = top_k(np.array([0.2, 0.9, 0.1, 0.5]), 3, np.random.default_rng(0))
    np.testing.assert_array_equal(positions, [1, 3, 0])


def test_nan_scores_go_last_even_below_minus_infinity():
    scores = np.array([np.nan, -np.inf, 0.3, np.nan, 0.1])
    positions = top_k(scores, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(positions[:3], [2, 4, 1])
    assert set(positions[3:].tolist()) == {0, 3}
    np.testing.assert_array_equal(top_k(scores, 3, np.random.default_rng(0)), [2, 4, 1])


def test_ties_are_broken_by_the_seed_not_by_position():
    scores = np.zeros(50)
    first = top_k(scores, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(first, top_k(scores, 5, np.random.default_rng(0)))
    assert first.tolist() != top_k(scores, 5, np.random.default_rng(1)).tolist()
    assert first.tolist() != [0, 1, 2, 3, 4]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1.0, 2.0, 2.5, -np.inf, np.inf, np.nan]), max_size=30),
    st.integers(0, 35),
    st.integers(0, 2**32 - 1),
)
def test_top_k_takes_the_best_k_in_order_with_nan_last(values, k, seed):
    scores = np.array(values, dtype=np.float64)
    positions = top_k(scores, k, np.random.default_rng(seed))
    assert len(positions) == min(k, len(scores))
    assert len(set(positions.tolist())) == len(positions)
    # Ranked by score, NaN as the lowest possible value.
    key = np.where(np.isnan(scores), -np.inf, scores)
    nan_rank = np.isnan(scores).astype(int)
    ranked = list(zip(-key[positions], nan_rank[positions]))
    by_nan_then_score = [(n, s) for s, n in ranked]
    assert by_nan_then_score == sorted(by_nan_then_score)
    # Nothing left out beats anything taken.
    left_out = np.setdiff1d(np.arange(len(scores)), positions)
    if len(positions) and len(left_out):
        worst_taken = max((nan_rank[p], -key[p]) for p in positions)
        best_left = min((nan_rank[p], -key[p]) for p in left_out)
        assert worst_taken <= best_left


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1.0, 2.0, 2.5, -np.inf, np.inf, np.nan]), max_size=40),
    st.integers(0, 45),
    st.integers(1, 9),
    st.integers(0, 2**32 - 1),
)
def test_folding_blocks_through_top_k_merge_picks_exactly_what_top_k_picks(values, k, block, seed):
    # ties and NaN included: each row carries its entry of top_k's own permutation draw
    scores = np.array(values, dtype=np.float64)
    expected = top_k(scores, k, np.random.default_rng(seed))
    tiebreak = np.random.default_rng(seed).permutation(len(scores))
    shuffled = np.random.default_rng(seed + 1).permutation(len(scores))  # blocks in any row order
    best = None
    for start in range(0, len(scores), block):
        positions = shuffled[start:start + block]
        best = top_k_merge(best, {"score": scores[positions], "tiebreak": tiebreak[positions],
                                  "position": positions}, k)
    folded = [] if best is None else best["position"].tolist()
    assert folded == expected.tolist()


def test_top_k_merge_keeps_at_most_k_rows_with_their_columns():
    best = top_k_merge(None, {"score": np.array([0.1, 0.9, 0.5]), "tiebreak": np.array([0, 1, 2]),
                              "row": np.array([10, 11, 12])}, 2)
    best = top_k_merge(best, {"score": np.array([0.7]), "tiebreak": np.array([3]), "row": np.array([13])}, 2)
    assert best["row"].tolist() == [11, 13]
    assert best["score"].tolist() == [0.9, 0.7]


# --- uncertainty: known rankings --------------------------------------------------------------

# Rows in shuffled order: confident [1, 0, 0], in between [0.6, 0.4, 0], uniform.
THREE = [[0.6, 0.4, 0.0], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", ["entropy", "margin", "least_confidence"])
def test_uncertainty_ranks_uniform_then_split_then_confident(name):
    positions = choose(name, probs_candidates(THREE), 3)
    np.testing.assert_array_equal(positions, [1, 0, 2])


def test_entropy_values():
    scores = make_strategy("entropy").score({"probs": np.array(THREE)})
    expected = [-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), math.log(3), 0.0]
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)


def test_margin_is_minus_the_gap_between_the_top_two():
    scores = make_strategy("margin").score({"probs": np.array([[0.1, 0.5, 0.4], [0.9, 0.0, 0.1]])})
    np.testing.assert_allclose(scores, [-0.1, -0.8], rtol=1e-12)


def test_least_confidence_is_one_minus_the_top_probability():
    scores = make_strategy("least_confidence").score({"probs": np.array([[0.1, 0.7, 0.2]])})
    np.testing.assert_allclose(scores, [0.3], rtol=1e-12)


def test_lowest_order_ranks_confident_first_and_nan_still_last():
    probs = THREE + [[np.nan, np.nan, np.nan]]
    positions = choose("entropy", probs_candidates(probs), 4, order="lowest")
    np.testing.assert_array_equal(positions, [2, 0, 1, 3])


def test_a_nan_row_is_left_out_when_k_does_not_reach_it():
    probs = THREE + [[np.nan, np.nan, np.nan]]
    positions = choose("entropy", probs_candidates(probs), 3)
    np.testing.assert_array_equal(positions, [1, 0, 2])


# --- BALD and MC entropy ----------------------------------------------------------------------

CONFIDENT_A = [0.98, 0.01, 0.01]
CONFIDENT_B = [0.01, 0.98, 0.01]
UNIFORM = [1 / 3, 1 / 3, 1 / 3]


def mc(*passes):
    """[C, K] from K per-pass probability vectors."""
    return np.array(passes).T


MC_ROWS = np.stack(
    [
        mc(CONFIDENT_A, CONFIDENT_A, CONFIDENT_A, CONFIDENT_A),  # agree, confident
        mc(CONFIDENT_A, CONFIDENT_B, CONFIDENT_A, CONFIDENT_B),  # disagree, each confident
        mc(UNIFORM, UNIFORM, UNIFORM, UNIFORM),  # agree, each unsure
    ]
)


def entropy_of(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_bald_is_zero_when_passes_agree_and_high_when_confident_passes_disagree():
    scores = make_strategy("bald", mc_passes=4).score({"mc_probs": MC_ROWS})
    mean = [(a + b) / 2 for a, b in zip(CONFIDENT_A, CONFIDENT_B)]
    disagreement = entropy_of(mean) - entropy_of(CONFIDENT_A)
    np.testing.assert_allclose(scores, [0.0, disagreement, 0.0], atol=1e-12)
    assert disagreement > 0.5


def test_mc_entropy_ranks_the_unsure_but_agreeing_row_first():
    scores = make_strategy("mc_entropy", mc_passes=4).score({"mc_probs": MC_ROWS})
    mean = [(a + b) / 2 for a, b in zip(CONFIDENT_A, CONFIDENT_B)]
    expected = [entropy_of(CONFIDENT_A), entropy_of(mean), math.log(3)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert np.argmax(scores) == 2


# --- EMA disagreement (the paper) -------------------------------------------------------------

P_T, P_M = [0.5, 0.5], [0.9, 0.1]
KL_TM = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
KL_MT = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
MIX = [0.7, 0.3]
JS = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (
    0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
)


@pytest.mark.parametrize(
    ("distance", "expected"), [("kl", KL_TM), ("reverse_kl", KL_MT), ("js", JS)]
)
@pytest.mark.parametrize("source", ["logits", "probs"])
def test_ema_divergences_match_hand_computed_values(distance, expected, source):
    if source == "logits":  # log p plus a per-row shift: softmax gives p back
        outputs = {"logits": np.log([P_T]) + 3.0, "mean_logits": np.log([P_M]) - 1.0}
    else:
        outputs = {"probs": np.array([P_T]), "mean_probs": np.array([P_M])}
    score = make_strategy("ema_kl", distance=distance).score(outputs)
    np.testing.assert_allclose(score, [expected], rtol=1e-12)


def test_ema_kl_prefers_logits_when_probabilities_are_also_present():
    outputs = {
        "logits": np.log([P_T]),
        "mean_logits": np.log([P_M]),
        "probs": np.array([[0.1, 0.9]]),  # would give a different KL
        "mean_probs": np.array([[0.1, 0.9]]),
    }
    np.testing.assert_allclose(make_strategy("ema_kl").score(outputs), [KL_TM], rtol=1e-12)


def test_ema_kl_is_finite_for_saturated_logits():
    outputs = {"logits": np.array([[800.0, -800.0]]), "mean_logits": np.array([[-800.0, 800.0]])}
    score = make_strategy("ema_kl").score(outputs)
    np.testing.assert_allclose(score, [1600.0], rtol=1e-12)


def test_ema_mse_logits_is_the_mean_squared_logit_difference():
    outputs = {"logits": np.array([[1.0, 2.0, 3.0]]), "mean_logits": np.array([[1.0, 0.0, 3.0]])}
    score = make_strategy("ema_kl", distance="mse_logits").score(outputs)
    np.testing.assert_allclose(score, [4 / 3], rtol=1e-12)


def test_ema_kl_of_identical_models_is_exactly_zero():
    logits = np.random.default_rng(0).standard_normal((20, 5))
    score = make_strategy("ema_kl").score({"logits": logits, "mean_logits": logits})
    np.testing.assert_array_equal(score, np.zeros(20))


def test_ema_kl_lowest_order_reverses_the_ranking():
    mean = np.log([[0.5, 0.5]] * 3)
    logits = np.log([[0.6, 0.4], [0.99, 0.01], [0.8, 0.2]])  # KL small, large, medium
    candidates = Candidates(rows=np.arange(3), outputs={"logits": logits, "mean_logits": mean})
    np.testing.assert_array_equal(choose("ema_kl", candidates, 3), [1, 2, 0])
    np.testing.assert_array_equal(choose("ema_kl", candidates, 3, order="lowest"), [0, 2, 1])


def test_lowest_order_is_in_the_score_so_ranking_stored_scores_agrees_with_select():
    # The loop may rank scores the Ray pass wrote with top_k instead of calling select.
    strategy = make_strategy("ema_kl", order="lowest")
    candidates, _ = pool_candidates(strategy)
    stored = strategy.score(candidates.outputs)
    np.testing.assert_array_equal(stored, -strategy.utility(candidates.outputs))
    ranked = top_k(stored, 20, np.random.default_rng(3))
    np.testing.assert_array_equal(ranked, choose("ema_kl", candidates, 20, seed=3, order="lowest"))


# --- core-set ---------------------------------------------------------------------------------

# A labelled item at the origin; candidates at distance 1, 5 and 10 along x, and a cluster
# far up the y axis (distances 50, 51 and ~50.01).
LINE_AND_CLUSTER = np.array(
    [[1.0, 0.0], [0.0, 50.0], [5.0, 0.0], [0.0, 51.0], [10.0, 0.0], [1.0, 50.0]], np.float32
)


def coreset_candidates(points, labelled):
    return Candidates(
        rows=np.arange(len(points)),
        outputs={"embeddings": points},
        labelled={"embeddings": np.asarray(labelled, np.float32).reshape(-1, points.shape[1])},
    )


@pytest.mark.parametrize("chunk_rows", [8192, 2])
def test_coreset_takes_the_farthest_then_the_farthest_from_both(chunk_rows):
    candidates = coreset_candidates(LINE_AND_CLUSTER, [[0.0, 0.0]])
    strategy = make_strategy("coreset", chunk_rows=chunk_rows)
    positions = select(strategy, candidates, 4, np.random.default_rng(0))
    # (0, 51); then (10, 0), 10 from the origin; then (5, 0), 5 from both; then (1, 50),
    # √2 from (0, 51), beating (1, 0) and (0, 50) at 1.
    np.testing.assert_array_equal(positions, [3, 4, 2, 5])


def test_coreset_without_labelled_items_starts_at_random_then_goes_farthest():
    points = np.stack([np.arange(11.0), np.zeros(11)], axis=1).astype(np.float32)
    candidates = coreset_candidates(points, np.zeros((0, 2)))
    firsts = set()
    for seed in range(6):
        first, second = choose("coreset", candidates, 2, seed=seed)
        firsts.add(int(first))
        farthest = np.abs(points[:, 0] - points[first, 0]).max()
        assert abs(points[second, 0] - points[first, 0]) == farthest
    assert len(firsts) > 1


def test_coreset_takes_a_non_finite_embedding_last():
    points = LINE_AND_CLUSTER.copy()
    points[3] = [np.nan, 0.0]
    candidates = coreset_candidates(points, [[0.0, 0.0]])
    positions = choose("coreset", candidates, 6)
    assert positions[-1] == 3


# --- BADGE ------------------------------------------------------------------------------------


def clusters(n_clusters=4, per_cluster=50, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = 100.0 * rng.standard_normal((n_clusters, dim))
    noise = rng.standard_normal((n_clusters * per_cluster, dim))
    points = centres.repeat(per_cluster, axis=0) + noise
    return points.astype(np.float32), np.arange(n_clusters).repeat(per_cluster)


def badge_candidates(points):
    return Candidates(rows=np.arange(len(points)), outputs={"grad_embeddings": points})


def test_badge_takes_one_candidate_from_each_well_separated_cluster():
    points, cluster = clusters()
    positions = choose("badge", badge_candidates(points), 4)
    assert sorted(cluster[positions].tolist()) == [0, 1, 2, 3]


def test_badge_starts_from_the_largest_gradient():
    points, _ = clusters()
    points[17] *= 3.0
    positions = choose("badge", badge_candidates(points), 1)
    np.testing.assert_array_equal(positions, [17])


def test_badge_fills_up_at_random_once_every_candidate_sits_on_a_pick():
    points = np.ones((6, 3), np.float32)  # all the same point
    first = choose("badge", badge_candidates(points), 6)
    second = choose("badge", badge_candidates(points), 6, seed=1)
    assert sorted(first.tolist()) == list(range(6))
    assert first.tolist() != second.tolist()


# --- strategies with an auxiliary model -------------------------------------------------------


def test_ema_kl_semi_scores_like_ema_kl_and_asks_for_semi_supervised_training():
    semi, plain = make_strategy("ema_kl_semi", distance="js"), make_strategy("ema_kl", distance="js")
    outputs = pool_candidates(plain)[0].outputs
    np.testing.assert_array_equal(semi.score(outputs), plain.score(outputs))
    assert semi.training.semi_supervised and not plain.training.semi_supervised


def test_only_strategies_with_a_model_of_their_own_declare_an_auxiliary():
    with_auxiliary = {n for n in STRATEGIES if make_strategy(n).training.auxiliary is not None}
    assert with_auxiliary == {"ll4al", "noise_stability", "vaal", "hal", "two_stream"}


def test_ll4al_asks_for_the_highest_predicted_loss_first():
    candidates = Candidates(rows=np.arange(3), outputs={"predicted_loss": np.array([0.2, 3.0, 1.0])})
    np.testing.assert_array_equal(choose("ll4al", candidates, 3), [1, 2, 0])


def test_noise_stability_is_the_mean_distance_of_the_noisy_logits():
    logits = np.array([[0.0, 0.0], [1.0, 1.0]])
    noisy = np.stack([logits + [[3.0, 4.0], [0.0, 0.0]], logits + [[0.0, 0.0], [0.0, 1.0]]], axis=2)
    score = make_strategy("noise_stability").score({"logits": logits, "noisy_logits": noisy})
    np.testing.assert_allclose(score, [2.5, 0.5], rtol=1e-12)


def test_vaal_asks_for_the_least_labelled_looking_first():
    candidates = Candidates(rows=np.arange(3), outputs={"labelledness": np.array([0.9, 0.1, 0.5])})
    np.testing.assert_array_equal(choose("vaal", candidates, 3), [1, 2, 0])


def test_hal_fuses_normalised_entropy_with_unlabelledness():
    outputs = {"probs": np.array([[0.5, 0.5], [1.0, 0.0]]), "labelledness": np.array([0.25, 0.5])}
    np.testing.assert_allclose(make_strategy("hal").fused(outputs), [1.75, 0.5], rtol=1e-12)
    np.testing.assert_allclose(make_strategy("hal", lam=0.0).fused(outputs), [1.0, 0.0],
                               atol=1e-12)


def test_hal_in_one_round_over_the_whole_set_is_the_top_k_of_the_fused_score():
    strategy = make_strategy("hal", rounds=1, subset=1.0)
    candidates, _ = pool_candidates(strategy)
    expected = top_k(strategy.fused(candidates.outputs), 20, np.random.default_rng(0))
    chosen = choose("hal", candidates, 20, rounds=1, subset=1.0)
    np.testing.assert_array_equal(np.sort(chosen), np.sort(expected))


def test_hal_subset_rounds_spread_the_picks_beyond_the_global_top():
    strategy = make_strategy("hal", rounds=5, subset=0.2)
    candidates, _ = pool_candidates(strategy)
    best = set(top_k(strategy.fused(candidates.outputs), 20, np.random.default_rng(0)).tolist())
    chosen = set(select(strategy, candidates, 20, np.random.default_rng(0)).tolist())
    assert chosen != best


def test_two_stream_takes_one_representative_per_well_separated_cluster():
    points, cluster = clusters(n_clusters=4, per_cluster=30, dim=E)
    n = len(points)
    rng = np.random.default_rng(0)
    candidates = Candidates(rows=np.arange(n), outputs={
        "ae_embeddings": points,
        "embeddings": points + rng.standard_normal(points.shape).astype(np.float32),
        "probs": softmax(rng.standard_normal((n, C))).astype(np.float32),
    })
    positions = choose("two_stream", candidates, 4, top_clusters=4)
    assert sorted(cluster[positions].tolist()) == [0, 1, 2, 3]


def test_two_streams_in_place_z_score_is_the_columns_standard_score_and_leaves_constant_columns_centred():
    from orchestrator.al.strategies import _zscore_in_place

    x = np.random.default_rng(0).standard_normal((50, 150)) * 3 + 7
    x[:, 70] = 2.0  # a constant column, in the second block of 64
    expected = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    result = _zscore_in_place(x)
    assert result is x
    np.testing.assert_allclose(x, expected, atol=1e-12)
    assert not x[:, 70].any()


def test_two_stream_takes_rows_with_non_finite_features_last():
    strategy = make_strategy("two_stream")
    candidates, _ = pool_candidates(strategy)
    candidates.outputs["ae_embeddings"][5] = np.nan
    positions = select(strategy, candidates, len(candidates), np.random.default_rng(0))
    assert positions[-1] == 5


# --- TypiClust --------------------------------------------------------------------------------


def star_clusters(sizes, dim=3, spread=1.0):
    """Clusters far apart, each a centre point and copies on the ±axes around it (one per slot
    of its size): the centre is its cluster's most typical member."""
    offsets = np.concatenate([np.eye(dim), -np.eye(dim)]) * spread
    points, cluster, centres = [], [], []
    for c, size in enumerate(sizes):
        centre = np.zeros(dim)
        centre[c % dim] = 100.0 * (1 + c // dim)
        centres.append(len(points))
        points.append(centre)
        points.extend(centre + offsets[i % len(offsets)] * (1 + i // len(offsets)) for i in range(size - 1))
        cluster += [c] * size
    return np.asarray(points, np.float32), np.asarray(cluster), centres


def typiclust_candidates(points, labelled=()):
    labelled = np.asarray(labelled, np.float32).reshape(-1, points.shape[1])
    return Candidates(rows=np.arange(len(points)), outputs={"embeddings": points},
                      labelled={"embeddings": labelled})


def test_typiclust_takes_the_centre_of_each_cluster_largest_first():
    points, cluster, centres = star_clusters([12, 9, 7, 6])
    positions = choose("typiclust", typiclust_candidates(points), 4, max_clusters=4)
    np.testing.assert_array_equal(positions, centres)


def test_typiclust_asks_in_clusters_without_labels_first():
    points, cluster, centres = star_clusters([12, 9, 7, 6])
    labelled = points[[centres[0], centres[1]]] + 0.1  # the two largest clusters are covered
    positions = choose("typiclust", typiclust_candidates(points, labelled), 2, max_clusters=4)
    assert sorted(cluster[positions].tolist()) == [2, 3]


def test_typiclust_leaves_clusters_smaller_than_the_minimum_for_last():
    points, cluster, centres = star_clusters([12, 9, 3])
    positions = choose("typiclust", typiclust_candidates(points), 3, max_clusters=3,
                       min_cluster_size=5)
    assert cluster[positions].tolist()[:2] == [0, 1] and cluster[positions[2]] != 2


# --- multiple criteria ------------------------------------------------------------------------


def mixed_candidates(probs, embeddings):
    return Candidates(rows=np.arange(len(probs)), outputs={
        "probs": np.asarray(probs, np.float32), "embeddings": np.asarray(embeddings, np.float32)})


# the most informative volume twice (same embedding), then a less informative, different one
TWIN = mixed_candidates([[0.5, 0.5], [0.5, 0.5], [0.7, 0.3], [0.99, 0.01]],
                       [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])


def test_multi_criteria_does_not_ask_twice_about_the_same_volume():
    positions = choose("multi_criteria", TWIN, 2, informativeness="entropy", repr_weight=0.0)
    assert positions[0] in (0, 1) and positions[1] == 2


def test_multi_criteria_without_diversity_is_the_informativeness_ranking():
    positions = choose("multi_criteria", TWIN, 4, informativeness="entropy", repr_weight=0.0,
                       diversity_weight=0.0)
    assert set(positions[:2].tolist()) == {0, 1} and positions[2:].tolist() == [2, 3]


def test_multi_criteria_prefers_the_dense_region_when_scores_tie():
    rng = np.random.default_rng(0)
    dense = rng.normal(0.0, 0.05, size=(30, 4)) + [1, 1, 0, 0]
    lonely = np.array([[-1.0, 1.0, 0.0, 0.0]])
    candidates = mixed_candidates(np.full((31, 2), 0.5), np.concatenate([lonely, dense]))
    first = choose("multi_criteria", candidates, 1, informativeness="entropy", info_weight=0.0,
                   repr_weight=1.0)
    assert first[0] != 0


def test_multi_criteria_needs_a_row_wise_informativeness():
    with pytest.raises(ValueError, match=r"row-wise strategy.*'coreset'.*valid:.*'entropy'"):
        make_strategy("multi_criteria", informativeness="coreset")
    assert make_strategy("multi_criteria").training.mean_model  # EMA-KL: trained with M, like ema_kl
    assert make_strategy("multi_criteria").needs == {"logits", "mean_logits", "embeddings"}


# --- POAL: junk-aware -------------------------------------------------------------------------

# Labelled: class 0 around (0, 0), class 1 around (10, 0), junk around (0, 10).
LABELLED = np.array([[0.5, 0], [-0.5, 0], [10.5, 0], [9.5, 0], [0.5, 10], [-0.5, 10]], np.float32)
ANSWERS = np.array([0, 0, 1, 1, -1, -1])


def poal_candidates(probs, embeddings, answers=ANSWERS):
    return Candidates(rows=np.arange(len(probs)),
                      outputs={"probs": np.asarray(probs, np.float32),
                               "embeddings": np.asarray(embeddings, np.float32)},
                      labelled={"embeddings": LABELLED}, labelled_answers=answers)


def test_poal_asks_about_likely_junk_last_however_uncertain_it_is():
    #                 near junk: most uncertain  at class 0, fairly unsure  near class 1, sure
    candidates = poal_candidates([[0.5, 0.5], [0.6, 0.4], [0.9, 0.1]],
                                 [[0.2, 9.8], [0.0, 0.0], [10.0, 0.4]])
    np.testing.assert_array_equal(choose("poal", candidates, 3, informativeness="entropy"), [1, 2, 0])
    np.testing.assert_array_equal(choose("entropy", candidates, 3), [0, 1, 2])  # what it avoids


def test_poal_ranks_by_pareto_fronts_of_informativeness_and_closeness_to_the_classes():
    no_junk = ANSWERS.copy()
    no_junk[4:] = 0
    # P: most uncertain, far off; Q: sure, on class 1; R: between; S: dominated by R
    candidates = poal_candidates([[0.5, 0.5], [0.95, 0.05], [0.6, 0.4], [0.7, 0.3]],
                                 [[5.0, -30.0], [10.0, 0.0], [10.0, 2.0], [10.0, 6.0]], no_junk)
    positions = choose("poal", candidates, 4, informativeness="entropy")
    assert set(positions[:3].tolist()) == {0, 1, 2} and positions[3] == 3


def test_poal_with_no_labelled_class_is_its_informativeness():
    candidates = Candidates(rows=np.arange(3),
                            outputs={"probs": np.array(THREE, np.float32),
                                     "embeddings": np.eye(3, dtype=np.float32)},
                            labelled={"embeddings": np.zeros((0, 3), np.float32)},
                            labelled_answers=np.zeros(0, np.int64))
    np.testing.assert_array_equal(choose("poal", candidates, 3, informativeness="entropy"), [1, 0, 2])


def test_poal_needs_the_ledgers_answers():
    candidates = poal_candidates([[0.5, 0.5]], [[0.0, 0.0]])
    bare = Candidates(candidates.rows, candidates.outputs, candidates.labelled)
    with pytest.raises(ValueError, match="poal needs the ledger's answers"):
        choose("poal", bare, 1, informativeness="entropy")


# --- ALBL: automatic choice -------------------------------------------------------------------


def albl_history(gains):
    """Cycle 0, then one cycle per (arm, accuracy after it): every query of a cycle by one arm."""
    cycles = [CycleSelection(0, np.arange(4), ("random",) * 4, np.full(4, -1), np.zeros(4, int), 0.5)]
    for c, (arm, accuracy) in enumerate(gains, 1):
        rows = np.arange(4 * c, 4 * c + 4)
        cycles.append(CycleSelection(c, rows, (arm,) * 4, np.zeros(4, int), np.zeros(4, int), accuracy))
    return CampaignHistory(tuple(cycles))


def albl_candidates(history, n=400):
    strategy = make_strategy("albl", arms=["entropy", "random"])
    candidates, _ = pool_candidates(strategy)
    outputs = pool_outputs(n, seed=5)
    return Candidates(np.arange(n), {k: outputs[k] for k in strategy.needs}, history=history)


def test_albl_starts_with_every_arm_equally_likely():
    strategy = make_strategy("albl", arms=["entropy", "random", "margin"], credit="batch")
    (p,) = strategy.probabilities(albl_history([]))
    np.testing.assert_allclose(p, [1 / 3] * 3)


def test_albl_moves_towards_the_arm_whose_cycles_gained_validation_accuracy():
    strategy = make_strategy("albl", arms=["entropy", "random"], gamma=0.2, eta=10.0, credit="batch")
    history = albl_history([("entropy", 0.6), ("random", 0.55)])
    probabilities = strategy.probabilities(history)
    expected = sm.exp3_probabilities([(np.array([4, 0]), 0.1), (np.array([0, 4]), -0.05)], 2, 0.2, 10.0)
    np.testing.assert_allclose(probabilities, expected)
    assert probabilities[-1][0] > 0.85
    selection = select_with_record(strategy, albl_candidates(history), 200, np.random.default_rng(0))
    counts = {arm: selection.chosen_by.count(arm) for arm in ("entropy", "random")}
    assert counts["entropy"] > 3 * counts["random"] > 0


def test_albl_picks_are_each_arms_own_picks_in_its_own_order():
    strategy = make_strategy("albl", arms=["entropy", "margin"])
    candidates = albl_candidates(albl_history([]))
    selection = select_with_record(strategy, candidates, 60, np.random.default_rng(4))
    entropy_order = top_k(make_strategy("entropy").score(candidates.outputs), 60, np.random.default_rng(0))
    by_entropy = [p for p, arm in zip(selection.positions, selection.chosen_by) if arm == "entropy"]
    assert by_entropy == [p for p in entropy_order if p in set(by_entropy)]  # a subsequence
    assert set(selection.chosen_by) == {"entropy", "margin"}


def test_albl_needs_the_history_and_plain_distinct_arms():
    candidates = albl_candidates(albl_history([]))
    bare = Candidates(candidates.rows, candidates.outputs)
    with pytest.raises(ValueError, match="albl needs the campaign's history"):
        choose("albl", bare, 3, arms=["entropy", "random"])
    with pytest.raises(ValueError, match="arm 'vaal' trains a model of its own"):
        make_strategy("albl", arms=["entropy", "vaal"])
    with pytest.raises(ValueError, match="at least two distinct arms"):
        make_strategy("albl", arms=["entropy", "entropy"])


def test_albl_declares_what_its_arms_need():
    strategy = make_strategy("albl", arms=["coreset", "bald", "ema_kl"], credit="batch")
    assert strategy.needs == {"embeddings", "mc_probs", "logits", "mean_logits"}
    assert strategy.needs_labelled == {"embeddings"}
    assert (strategy.mc_passes, strategy.training.mean_model, strategy.needs_history) == (10, True, True)


def test_every_strategy_says_it_chose_its_own_picks_unless_it_delegates():
    candidates, _ = pool_candidates(make_strategy("entropy"))
    selection = select_with_record(make_strategy("entropy"), candidates, 5, np.random.default_rng(0))
    assert selection.chosen_by == ("entropy",) * 5


# --- class_balanced: equal shares of the predicted classes ----------------------------------------


def test_balanced_top_k_gives_each_class_an_equal_share_and_a_short_class_all_it_has():
    classes = np.array([0] * 10 + [1] * 10 + [2] * 2)
    scores = np.random.default_rng(1).random(classes.size)
    picks = balanced_top_k(scores, classes, 9, np.random.default_rng(0))
    assert sorted(np.bincount(classes[picks], minlength=3).tolist()) == [2, 3, 4]
    for c in range(3):  # within a class, its highest scores
        chosen = scores[picks][classes[picks] == c]
        assert chosen.min() >= np.sort(scores[classes == c])[::-1][len(chosen) - 1]


def test_balanced_top_k_of_one_class_is_top_k():
    scores = np.random.default_rng(2).integers(0, 4, 50).astype(np.float64)
    scores[[3, 9]] = np.nan
    np.testing.assert_array_equal(balanced_top_k(scores, np.zeros(50, int), 20, np.random.default_rng(5)),
                                  top_k(scores, 20, np.random.default_rng(5)))


def test_class_balanced_entropy_queries_every_predicted_class_where_entropy_takes_one():
    # class 0's rows are the uncertain ones: entropy alone spends every query on them
    confusable = [[0.4, 0.3, 0.3]] * 20
    sure = [[0.1, 0.85, 0.05]] * 20 + [[0.05, 0.1, 0.85]] * 20
    candidates = probs_candidates(confusable + sure)
    rng = np.random.default_rng
    plain = select(make_strategy("entropy"), candidates, 9, rng(0))
    balanced = select(make_strategy("class_balanced", base="entropy"), candidates, 9, rng(0))
    predicted = np.argmax(candidates.outputs["probs"], axis=1)
    assert np.bincount(predicted[plain], minlength=3).tolist() == [9, 0, 0]
    assert np.bincount(predicted[balanced], minlength=3).tolist() == [3, 3, 3]


def test_class_balanced_trains_and_scores_as_its_base():
    strategy = make_strategy("class_balanced", base="ema_kl", base_options={"distance": "js"})
    base = make_strategy("ema_kl", distance="js")
    outputs = pool_candidates(base)[0].outputs
    np.testing.assert_array_equal(strategy.score(outputs), base.score(outputs))
    assert strategy.training == base.training and base.needs <= strategy.needs


@pytest.mark.parametrize("base", ["coreset", "vaal", "class_balanced"])
def test_class_balanced_refuses_a_base_that_is_not_a_plain_row_wise_score(base):
    with pytest.raises(ValueError, match=f"base must be a row-wise strategy.*'{base}'"):
        make_strategy("class_balanced", base=base)


def probe_albl_candidates(arm_classes: dict[str, int], n=60, seed=0):
    """albl (credit="probe") over entropy and random after one bandit cycle: the initial draw
    labelled classes 0 and 1, each arm's queries of that cycle one class (``arm_classes``);
    embeddings separate the three classes; the validation split has all three."""
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(3, 4)

    def embed(classes):
        return (centres[classes] + 0.3 * rng.standard_normal((len(classes), 4))).astype(np.float32)

    initial = np.repeat([0, 1], 10)
    bought = np.concatenate([np.full(8, c) for c in arm_classes.values()])
    chosen_by = tuple(arm for arm in arm_classes for _ in range(8))
    answers = np.r_[initial, bought]
    labelled_rows = np.arange(1000, 1000 + len(answers))
    history = CampaignHistory((
        CycleSelection(0, labelled_rows[:20], ("random",) * 20, np.full(20, -1), initial, 0.5),
        CycleSelection(1, labelled_rows[20:], chosen_by, np.zeros(len(bought), int), bought, 0.6),
    ))
    outputs = pool_outputs(n, seed=5)
    strategy = make_strategy("albl", arms=list(arm_classes), credit="probe")
    val_classes = np.repeat([0, 1, 2], 10)
    candidates = Candidates(
        np.arange(n), {**{k: outputs[k] for k in strategy.needs if k != "embeddings"},
                       "embeddings": embed(rng.integers(3, size=n))},
        labelled={"embeddings": embed(answers)}, labelled_answers=answers, history=history,
        labelled_rows=labelled_rows, validation={"embeddings": embed(val_classes)},
        validation_answers=val_classes,
    )
    return strategy, candidates


def test_albl_probe_credits_the_arm_whose_queries_taught_the_probe_a_class():
    strategy, candidates = probe_albl_candidates({"entropy": 2, "random": 0})
    credit = strategy.probe_credit(candidates, 40)
    assert credit[0] == pytest.approx(40 * (1 / 3) / 8)  # class 2 found: a third of validation
    assert credit[1] == 0.0  # more of a class the initial draw already had
    selection = select_with_record(strategy, candidates, 40, np.random.default_rng(0))
    assert selection.chosen_by.count("entropy") > 2 * selection.chosen_by.count("random") > 0
    assert selection.notes["credit"]["entropy"] == pytest.approx(credit[0], abs=1e-5)
    assert sum(selection.notes["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)


def test_albl_probe_keeps_every_arm_equally_likely_before_any_arm_has_chosen():
    strategy, candidates = probe_albl_candidates({"entropy": 2, "random": 0})
    first = CampaignHistory(candidates.history.cycles[:1])
    p, notes = strategy.next_probabilities(dataclasses.replace(candidates, history=first), 16)
    np.testing.assert_allclose(p, [0.5, 0.5])
    assert notes["credit"] == {"entropy": 0.0, "random": 0.0}


def test_albl_probe_declares_the_validation_embeddings_and_the_answers_it_reads():
    strategy = make_strategy("albl", arms=["entropy", "random"], credit="probe")
    assert "embeddings" in strategy.needs and strategy.needs_labelled == {"embeddings"}
    assert strategy.needs_validation == {"embeddings"} and strategy.needs_answers
    assert make_strategy("albl", arms=["entropy", "random"]).needs_validation == frozenset()
    _, candidates = probe_albl_candidates({"entropy": 2, "random": 0})
    with pytest.raises(ValueError, match="needs outputs \\['embeddings'\\] for the validation split"):
        select_with_record(strategy, dataclasses.replace(candidates, validation={}, validation_answers=None),
                           4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="credit 'loo'; valid"):
        make_strategy("albl", arms=["entropy", "random"], credit="loo")


def balance_history(answers_by_arm: dict[str, list[int]]):
    """Cycle 0, then one bandit cycle where each arm's queries got these answers."""
    rows = np.arange(sum(len(a) for a in answers_by_arm.values())) + 100
    chosen_by = tuple(arm for arm, answers in answers_by_arm.items() for _ in answers)
    answers = np.concatenate([np.asarray(a, np.int64) for a in answers_by_arm.values()])
    return CampaignHistory((
        CycleSelection(0, np.arange(4), ("random",) * 4, np.full(4, -1), np.arange(4), 0.5),
        CycleSelection(1, rows, chosen_by, np.zeros(len(rows), int), answers, 0.6),
    ))


def balance_candidates(history):
    """albl's candidates with the probabilities the balance credit reads its class count from."""
    candidates = albl_candidates(history)
    probs = pool_outputs(len(candidates), seed=5)["probs"]
    return dataclasses.replace(candidates, outputs={**candidates.outputs, "probs": probs})


def test_albl_balance_credits_the_arm_whose_answers_cover_the_classes_and_are_not_junk():
    strategy = make_strategy("albl", arms=["entropy", "random", "margin"], credit="balance", eta=20.0)
    history = balance_history({"entropy": [0] * 18 + [1, 2], "random": list(range(C)) * 4,
                               "margin": list(range(C)) * 2 + [-1] * (2 * C)})
    candidates = balance_candidates(history)
    credit = strategy.balance_credit(candidates)
    assert credit[1] == pytest.approx(1.0)  # every class, evenly
    assert credit[2] == pytest.approx(0.5)  # as even, but half of it junk
    assert credit[0] < 0.5  # nearly all one class
    p, notes = strategy.next_probabilities(candidates, 10)
    assert p.argmax() == 1 and p.min() >= 0.2 / 3 - 1e-12  # γ keeps every arm explored
    assert notes["credit"]["random"] == pytest.approx(1.0)


def test_albl_balance_per_size_does_not_credit_an_arm_for_having_more_answers():
    few, many = [0, 1, 2], list(range(C)) * 6  # both as even as they can be
    history = balance_history({"entropy": few, "random": many})
    candidates = balance_candidates(history)
    plain = make_strategy("albl", arms=["entropy", "random"], credit="balance").balance_credit(candidates)
    sized = make_strategy("albl", arms=["entropy", "random"],
                          credit="balance_per_size").balance_credit(candidates)
    assert plain[0] < plain[1] - 0.1
    assert sized[0] > sized[1] >= 1.0  # more even than even draws, the few answers most of all


def test_albl_balance_gives_an_arm_without_answers_the_others_mean_and_unanswered_queries_nothing():
    strategy = make_strategy("albl", arms=["entropy", "random", "margin"], credit="balance")
    history = balance_history({"entropy": [0] * 10, "random": list(range(C)) * 3,
                               "margin": [UNANSWERED] * 5})
    credit = strategy.balance_credit(balance_candidates(history))
    assert credit[0] == 0.0 and credit[1] == pytest.approx(1.0)
    assert credit[2] == pytest.approx(credit[:2].mean())
