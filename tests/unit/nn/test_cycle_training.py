"""How one cycle trains, decided by pure functions: its length, its batches, which model it
keeps (no Ray, no model). What each strategy's training includes: tests/unit/al/test_training.py."""

import numpy as np
import pytest
import torch

from orchestrator.config import TrainConfig, config_to_dict
from orchestrator.nn.cycle import choose_classifier, cycle_plan, epoch_order, step_batches, unlabelled_indices


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
    drawn = np.concatenate([labels[epoch_order(labels, 0, e, 0, 1, balanced=True)].numpy()
                            for e in range(20)])
    assert len(drawn) == 2000
    assert 0.4 < drawn.mean() < 0.6  # class 1 is 10% of the rows, about half of the draws
    plain = labels[epoch_order(labels, 0, 0, 0, 1, balanced=False)].numpy()
    assert plain.mean() == pytest.approx(0.1)


def test_equal_classes_get_a_plain_permutation_even_when_balanced():
    labels = torch.tensor([0, 1, 2] * 10)
    order = epoch_order(labels, 3, 1, 0, 1, balanced=True)
    assert sorted(order.tolist()) == list(range(30))


def test_ranks_take_disjoint_equal_slices_of_an_epoch():
    labels = torch.tensor([0, 1] * 11)
    a, b = (epoch_order(labels, 0, 2, rank, 2) for rank in (0, 1))
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


@pytest.mark.parametrize("n", [98, 96, 195, 31, 1])
def test_an_epochs_steps_share_its_labels_evenly_never_a_step_on_a_few(n):
    plan = cycle_plan(n, {"epochs": 1, "min_steps": 0, "batch_size": 32})
    order = np.random.default_rng(0).permutation(n)
    batches = step_batches(order, plan.steps_per_epoch)
    sizes = [len(b) for b in batches]
    assert len(batches) == plan.steps_per_epoch and max(sizes) <= plan.rank_batch
    assert max(sizes) - min(sizes) <= 1  # 98: 25, 25, 24, 24 rather than 32, 32, 32, 2
    np.testing.assert_array_equal(np.concatenate(batches), order)


def test_batchnorm_is_recalibrated_over_a_labelled_set_one_more_than_whole_batches():
    from orchestrator.nn.cycle import CycleData
    from orchestrator.nn.cycle_volumes import Volumes
    from orchestrator.nn.learning import recalibrated
    from orchestrator.nn.model import build_model

    n = 33  # in batches of 32, a last batch of one volume: BatchNorm cannot train on it
    data = CycleData(Volumes(np.random.default_rng(0).normal(size=(n, 32, 32, 32)).astype(np.float32)),
                     torch.zeros(n, dtype=torch.int64), None, torch.zeros(0, dtype=torch.int64), None,
                     np.arange(n), 32)
    assert sorted(len(y) for _, y in data.calibration()) == [16, 17]
    model = build_model("resnet10", num_classes=3, width=4)
    assert not recalibrated(model, data.calibration()).training
