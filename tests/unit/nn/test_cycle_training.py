"""How one cycle trains, decided by pure functions: its length, its batches, which model it
keeps, and what each strategy's training includes (no Ray, no model)."""

import numpy as np
import pytest
import torch

from orchestrator.config import TrainConfig, config_to_dict
from orchestrator.loop import strategy_training, unlabelled_for_training
from orchestrator.strategies import make_strategy
from orchestrator.train import _epoch_order, choose_classifier, cycle_plan, unlabelled_indices


def plan(n, **settings):
    return cycle_plan(n, config_to_dict(TrainConfig(**settings)))


# --- length ------------------------------------------------------------------------------------


def test_a_small_labelled_set_trains_for_more_epochs_to_reach_the_minimum_steps():
    small = plan(96, epochs=30, batch_size=32, min_steps=300)
    assert (small.steps_per_epoch, small.epochs) == (3, 100)
    large = plan(1950, epochs=30, batch_size=32, min_steps=300)
    assert (large.steps_per_epoch, large.epochs) == (61, 30)


def test_ranks_share_the_batch_so_a_cycle_takes_the_same_steps_whatever_the_workers():
    settings = config_to_dict(TrainConfig(batch_size=10, min_steps=0))
    one, two = cycle_plan(100, settings, world=1), cycle_plan(100, settings, world=2)
    assert (one.rank_batch, two.rank_batch) == (10, 5)
    assert one.steps_per_epoch == two.steps_per_epoch == 10
    assert one.epochs == two.epochs


def test_validation_runs_in_the_second_half_and_always_after_the_last_epoch():
    p = plan(1000, epochs=30, min_steps=0, evaluations=8)
    assert len(p.evaluate_at) == 8
    assert min(p.evaluate_at) >= 14 and max(p.evaluate_at) == 29
    assert p.evaluate_at <= p.checkpoint_at


def test_a_one_epoch_cycle_validates_and_checkpoints_after_it():
    p = plan(10, epochs=1, min_steps=0)
    assert p.evaluate_at == p.checkpoint_at == {0}


def test_checkpoints_come_at_least_every_eighth_of_the_cycle():
    p = plan(1000, epochs=80, min_steps=0, evaluations=2)
    gaps = np.diff(sorted({-1} | p.checkpoint_at))
    assert gaps.max() <= 10


# --- batches -----------------------------------------------------------------------------------


def test_unequal_classes_are_drawn_equally_often_when_balanced():
    labels = torch.tensor([0] * 90 + [1] * 10)
    drawn = np.concatenate([labels[_epoch_order(labels, 0, e, 0, 1, balanced=True)].numpy()
                            for e in range(20)])
    assert len(drawn) == 2000
    assert 0.4 < drawn.mean() < 0.6  # class 1 is 10% of the rows, about half of the draws
    plain = labels[_epoch_order(labels, 0, 0, 0, 1, balanced=False)].numpy()
    assert plain.mean() == pytest.approx(0.1)


def test_equal_classes_get_a_plain_permutation_even_when_balanced():
    labels = torch.tensor([0, 1, 2] * 10)
    order = _epoch_order(labels, 3, 1, 0, 1, balanced=True)
    assert sorted(order.tolist()) == list(range(30))


def test_ranks_take_disjoint_equal_slices_of_an_epoch():
    labels = torch.tensor([0, 1] * 11)
    a, b = (_epoch_order(labels, 0, 2, rank, 2) for rank in (0, 1))
    assert len(a) == len(b) == 11
    assert not set(a) & set(b)


def test_the_unlabelled_stream_visits_every_volume_once_per_pass_then_reshuffles():
    n, batch = 10, 4
    first_pass = torch.cat([unlabelled_indices(n, batch, 0, step) for step in range(5)])[:10]
    second_pass = torch.cat([unlabelled_indices(n, batch, 0, step) for step in range(5)])[10:20]
    assert sorted(first_pass.tolist()) == sorted(second_pass.tolist()) == list(range(n))
    assert first_pass.tolist() != second_pass.tolist()


def test_the_unlabelled_stream_is_a_pure_function_of_the_step_and_splits_across_ranks():
    assert torch.equal(unlabelled_indices(50, 8, 1, 3), unlabelled_indices(50, 8, 1, 3))
    rank0, rank1 = unlabelled_indices(50, 5, 1, 2, 0, 2), unlabelled_indices(50, 5, 1, 2, 1, 2)
    assert not set(rank0.tolist()) & set(rank1.tolist())


# --- which model a cycle keeps -----------------------------------------------------------------


@pytest.mark.parametrize("rule, val_task, val_mean, expected", [
    ("best", 0.6, 0.7, ("mean", 0.7)),
    ("best", 0.7, 0.6, ("task", 0.7)),
    ("best", 0.7, 0.7, ("task", 0.7)),  # a tie keeps T, the model the strategies score
    ("task", 0.6, 0.9, ("task", 0.6)),
    ("mean", 0.9, 0.6, ("mean", 0.6)),
])
def test_the_classifier_is_chosen_on_validation_accuracy(rule, val_task, val_mean, expected):
    assert choose_classifier(rule, val_task, val_mean) == expected


def test_an_unknown_classifier_rule_is_refused():
    with pytest.raises(ValueError, match="task, mean, best"):
        choose_classifier("ensemble", 0.5, 0.5)


# --- what each strategy's training includes ----------------------------------------------------


def test_baselines_train_on_plain_cross_entropy_and_ema_kl_keeps_its_regulariser():
    train = TrainConfig(lam=0.03)
    assert strategy_training(train, make_strategy("entropy"))["lam"] == 0.0
    assert strategy_training(train, make_strategy("badge"))["lam"] == 0.0
    assert strategy_training(train, make_strategy("ema_kl"))["lam"] == 0.03
    assert strategy_training(train, make_strategy("ema_kl_semi"))["lam"] == 0.03


def test_a_shared_trainer_gives_every_strategy_the_same_regulariser():
    train = TrainConfig(lam=0.03, trainer="shared")
    assert strategy_training(train, make_strategy("entropy"))["lam"] == 0.03


def test_semi_supervised_training_is_asked_for_by_the_strategy_or_the_config():
    assert strategy_training(TrainConfig(), make_strategy("ema_kl_semi"))["semi_supervised"]
    assert not strategy_training(TrainConfig(), make_strategy("ema_kl"))["semi_supervised"]
    assert strategy_training(TrainConfig(semi_supervised=True),
                             make_strategy("random"))["semi_supervised"]


def test_semi_supervised_training_draws_on_every_unlabelled_row_up_to_its_cap():
    rows = np.arange(100, 400)
    semi = strategy_training(TrainConfig(unlabelled_max=1000), make_strategy("ema_kl_semi"))
    assert np.array_equal(unlabelled_for_training(rows, semi, make_strategy("ema_kl_semi"), 0), rows)
    capped = strategy_training(TrainConfig(unlabelled_max=50), make_strategy("ema_kl_semi"))
    sample = unlabelled_for_training(rows, capped, make_strategy("ema_kl_semi"), 0)
    assert len(sample) == 50 and set(sample) <= set(rows)


def test_supervised_strategies_read_unlabelled_rows_only_for_their_auxiliary():
    rows = np.arange(1000)
    plain = strategy_training(TrainConfig(), make_strategy("entropy"))
    assert len(unlabelled_for_training(rows, plain, make_strategy("entropy"), 0)) == 0
    vaal = make_strategy("vaal", unlabelled_sample=64)
    assert len(unlabelled_for_training(rows, strategy_training(TrainConfig(), vaal), vaal, 0)) == 64


def test_junk_answers_are_neither_training_labels_nor_unlabelled_volumes(shape_pool, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.labels import JUNK, LabelRecord
    from orchestrator.loop import Campaign

    campaign = Campaign(load_config(None, [f"data.pool={shape_pool.path}"]), tmp_path, shape_pool)
    first, second = (str(campaign.view.ids[r]) for r in campaign.train_rows[:2])
    campaign.ledger.append([LabelRecord(first, 1, 0, "person"), LabelRecord(second, JUNK, 0, "person")])
    rows = [campaign.row_of[first], campaign.row_of[second]]
    assert campaign.training_pairs() == [(rows[0], 1)]
    unlabelled = campaign.unlabelled_rows()
    assert not set(rows) & set(unlabelled.tolist())
    assert len(unlabelled) == len(campaign.train_rows) - 2
