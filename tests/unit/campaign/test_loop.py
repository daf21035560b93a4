"""The campaign's selection from a scoring pass's files, without a campaign: picks read file by
file (a row-wise strategy's running top-k, a set-based strategy's memory-mapped arrays) are the
picks of the whole table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.al.stopping import cohens_kappa, mean_uncertainty
from orchestrator.al.strategies import balanced_top_k, make_strategy, select, top_k
from orchestrator.campaign.labelled import LabelledSet
from orchestrator.campaign.loop import (
    best_scored, candidates_of, picked_predictions, predicted_junk, skipped_rows, stability,
)
from orchestrator.distributed.score import read_scores


def write_pass(folder, n=200, files=7, seed=0):
    """A pass's files: rows 0..n-1 spread over `files` files in shuffled order, scores with
    many ties and a few NaN, predictions and their probabilities."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = rng.permutation(n)
    scores = rng.integers(0, 6, n).astype(np.float64)
    scores[rng.choice(n, 5, replace=False)] = np.nan
    for i, part in enumerate(np.array_split(rows, files)):
        pq.write_table(pa.table({"row": part, "subtomo_id": [f"s{r}" for r in part],
                                 "score": scores[part], "pred": part % 3,
                                 "pred_prob": (part / n).astype(np.float32)}),
                       folder / f"part-{i:05d}.parquet")
    return folder


def write_predictions_pass(folder, rows, pred, entropy, files=3, seed=0):
    """A pass's files holding `rows` (in shuffled order over `files` files) with their
    predictions and entropies."""
    folder.mkdir()
    order = np.random.default_rng(seed).permutation(len(rows))
    for i, part in enumerate(np.array_split(order, files)):
        pq.write_table(pa.table({"row": rows[part], "pred": pred[part], "entropy": entropy[part]}),
                       folder / f"part-{i:05d}.parquet")
    return folder


def test_agreement_compares_two_passes_on_the_unlabelled_rows_both_scored_whatever_their_files_order(tmp_path):
    rng = np.random.default_rng(5)
    now_rows, before_rows = np.arange(0, 300), np.arange(50, 320)  # each scored some the other did not
    now_pred, before_pred = rng.integers(0, 4, 300), rng.integers(0, 4, 320)
    before_pred[now_rows[now_rows % 3 == 0]] = now_pred[now_rows % 3 == 0]  # agree on a third, at least
    entropy = rng.random(300)
    now = write_predictions_pass(tmp_path / "now", now_rows, now_pred, entropy, seed=1)
    before = write_predictions_pass(tmp_path / "before", before_rows, before_pred[before_rows],
                                    np.zeros(len(before_rows)), seed=2)
    unlabelled = np.arange(20, 400, 2)  # also rows neither pass scored

    result = stability(now, before, unlabelled, num_classes=4)

    both = np.arange(50, 300, 2)  # unlabelled, and scored by both
    assert result["agreement"] == pytest.approx(cohens_kappa(before_pred[both], now_pred[both], 4))
    scored = np.arange(20, 300, 2)
    assert result["unlabelled"] == len(scored)
    assert result["uncertainty"] == pytest.approx(mean_uncertainty(entropy[scored], 4))
    assert "agreement" not in stability(now, None, unlabelled, num_classes=4)


@pytest.mark.parametrize("k", [0, 1, 17, 190, 500])
def test_row_wise_picks_read_file_by_file_equal_top_k_over_the_whole_table(tmp_path, k):
    folder = write_pass(tmp_path / "scores")
    labelled = LabelledSet(rows=np.arange(0, 200, 20), answers=np.zeros(10, np.int64),
                           train_rows=np.arange(200))
    best = best_scored(folder, labelled, k, np.random.default_rng([3, 1]))

    table = read_scores(folder)  # what the selection read before: the whole table
    is_candidate = ~labelled.contains(table.column("row").to_numpy())
    positions = top_k(table.column("score").to_numpy()[is_candidate], k, np.random.default_rng([3, 1]))
    for name in ("row", "pred", "pred_prob"):
        np.testing.assert_array_equal(best[name], table.column(name).to_numpy()[is_candidate][positions])
    assert not set(best["row"].tolist()) & set(range(0, 200, 20))


@pytest.mark.parametrize("k", [0, 1, 17, 100, 500])
def test_class_balanced_picks_read_file_by_file_equal_balanced_top_k_over_the_whole_table(tmp_path, k):
    folder = write_pass(tmp_path / "scores")
    labelled = LabelledSet(rows=np.arange(0, 200, 20), answers=np.zeros(10, np.int64),
                           train_rows=np.arange(200))
    best = best_scored(folder, labelled, k, np.random.default_rng([3, 1]), per_class=True)

    table = read_scores(folder)
    is_candidate = ~labelled.contains(table.column("row").to_numpy())
    positions = balanced_top_k(table.column("score").to_numpy()[is_candidate],
                               table.column("pred").to_numpy()[is_candidate], k, np.random.default_rng([3, 1]))
    for name in ("row", "pred", "pred_prob"):
        np.testing.assert_array_equal(best[name], table.column(name).to_numpy()[is_candidate][positions])


def write_embedding_pass(folder, n=120, files=5, dim=6, seed=0):
    """A pass's files with embeddings, in shuffled row order across files."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = rng.permutation(n)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    for i, part in enumerate(np.array_split(rows, files)):
        pq.write_table(pa.table({"row": part, "pred": part % 4, "pred_prob": (part / n).astype(np.float32),
                                 "embeddings": pa.FixedShapeTensorArray.from_numpy_ndarray(emb[part])}),
                       folder / f"part-{i:05d}.parquet")
    return folder


@pytest.mark.parametrize("name", ["coreset", "typiclust"])
def test_set_based_candidates_read_file_by_file_into_memory_maps_pick_as_the_whole_table(tmp_path, name):
    folder = write_embedding_pass(tmp_path / "scores")
    labelled = LabelledSet(rows=np.arange(0, 120, 10), answers=np.zeros(12, np.int64),
                           train_rows=np.arange(120))
    strategy = make_strategy(name)
    (tmp_path / "scratch").mkdir()
    mapped = candidates_of(folder, labelled, strategy, scratch=tmp_path / "scratch")
    whole = candidates_of(read_scores(folder), labelled, strategy)

    assert isinstance(mapped.outputs["embeddings"], np.memmap)  # on disk, not in the driver
    np.testing.assert_array_equal(mapped.rows, whole.rows)
    for part in ("outputs", "labelled"):
        for key, array in getattr(whole, part).items():
            np.testing.assert_array_equal(getattr(mapped, part)[key], array)
    np.testing.assert_array_equal(select(strategy, mapped, 15, np.random.default_rng(4)),
                                  select(strategy, whole, 15, np.random.default_rng(4)))


def test_the_picked_rows_predictions_come_back_aligned_with_them(tmp_path):
    folder = write_embedding_pass(tmp_path / "scores")
    rows = np.array([77, 3, 118, 40])
    pred, prob = picked_predictions(folder, rows)
    assert pred.tolist() == (rows % 4).tolist()
    np.testing.assert_allclose(prob, rows / 120, rtol=1e-6)


@pytest.mark.parametrize("skip_labelled", [True, False])
def test_a_pass_skips_the_other_splits_and_the_labelled_unless_the_strategy_reads_them(skip_labelled):
    split = np.array(["train", "val", "train", "test", "train", "train"])
    labelled = np.array([2, 4])
    expected = [1, 2, 3, 4] if skip_labelled else [1, 3]
    in_train = split == "train"
    assert skipped_rows(in_train, labelled, skip_labelled).tolist() == expected
    assert in_train.tolist() == [True, False, True, False, True, True]  # left as it was


def test_a_pass_keeps_the_validation_rows_a_strategy_reads():
    split = np.array(["train", "val", "train", "test", "val"])
    assert skipped_rows(split == "train", np.array([2]), True, keep=np.array([1, 4])).tolist() == [2, 3]


def write_junk_pass(folder, junk_prob, files=3):
    """A pass of a model with a junk output: rows 0..n-1 with their junk probability and
    embeddings, spread over files."""
    folder.mkdir()
    n = len(junk_prob)
    emb = np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)
    for i, part in enumerate(np.array_split(np.arange(n)[::-1], files)):
        pq.write_table(pa.table({"row": part, "score": part.astype(np.float64), "pred": part % 2,
                                 "pred_prob": np.full(len(part), 0.5, np.float32),
                                 "junk_prob": np.asarray(junk_prob, np.float32)[part],
                                 "embeddings": pa.FixedShapeTensorArray.from_numpy_ndarray(emb[part])}),
                       folder / f"part-{i:05d}.parquet")
    return folder


def unlabelled(n):
    return LabelledSet(rows=np.zeros(0, np.int64), answers=np.zeros(0, np.int64), train_rows=np.arange(n))


def test_candidates_the_model_calls_junk_are_skipped_by_row_wise_and_set_based_selection(tmp_path):
    junk = np.zeros(20)
    junk[[19, 18, 3]] = [0.9, 0.5, 0.7]  # rows 19 and 18 would be the best scores
    folder = write_junk_pass(tmp_path / "scores", junk)
    labelled = LabelledSet(rows=np.array([3]), answers=np.array([-1]), train_rows=np.arange(20))
    skip = predicted_junk(folder, labelled, 5, threshold=0.5)
    assert skip.tolist() == [18, 19]  # row 3 is labelled already: not a candidate

    best = best_scored(folder, labelled, 3, np.random.default_rng(0), skip=skip)
    assert best["row"].tolist() == [17, 16, 15]
    candidates = candidates_of(folder, labelled, make_strategy("coreset"), skip=skip)
    assert sorted(candidates.rows.tolist()) == [r for r in range(20) if r not in (3, 18, 19)]


def test_only_the_likeliest_junk_is_skipped_when_skipping_all_would_leave_too_few(tmp_path):
    folder = write_junk_pass(tmp_path / "scores", [0.9, 0.6, 0.95, 0.1, 0.2])
    assert predicted_junk(folder, unlabelled(5), 3, threshold=0.5).tolist() == [0, 2]
    assert predicted_junk(folder, unlabelled(5), 5, threshold=0.5).tolist() == []


def test_validation_rows_in_a_pass_are_not_candidates_for_the_junk_skip(tmp_path):
    folder = write_junk_pass(tmp_path / "scores", [0.9, 0.6, 0.95, 0.1, 0.2])
    skip = predicted_junk(folder, unlabelled(5), 1, threshold=0.5, not_candidates=np.array([2]))
    assert skip.tolist() == [0, 1]


def test_a_pass_without_a_junk_output_skips_nothing(tmp_path):
    folder = write_pass(tmp_path / "scores")
    assert predicted_junk(folder, unlabelled(200), 10, threshold=0.5).tolist() == []
