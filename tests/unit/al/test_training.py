"""What each strategy asks of training (its `Training` declaration) and the cycle settings and
unlabelled rows that makes: pure functions, no model."""

import numpy as np

from orchestrator.al.strategies import STRATEGIES, make_strategy
from orchestrator.al.training import (
    Training,
    auxiliary_sample,
    strategy_training,
    unlabelled_for_training,
)
from orchestrator.config import TrainConfig
from orchestrator.nn.auxiliary import AUXILIARIES, make_auxiliary


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


def test_an_auxiliary_fitted_on_fewer_rows_than_a_semi_supervised_cycle_reads_gets_a_subset():
    rows = np.arange(1000)
    vaal = make_strategy("vaal", unlabelled_sample=64)
    semi = strategy_training(TrainConfig(semi_supervised=True, unlabelled_max=500), vaal)
    read = unlabelled_for_training(rows, semi, vaal, [0, 1, 7])
    fitted = auxiliary_sample(read, vaal, [1, 23])
    assert len(read) == 500 and len(fitted) == 64 and set(fitted) <= set(read)
    assert np.array_equal(fitted, np.sort(fitted))
    plain = strategy_training(TrainConfig(), vaal)
    drawn = unlabelled_for_training(rows, plain, vaal, [0, 1, 7])
    assert np.array_equal(auxiliary_sample(drawn, vaal, [1, 23]), drawn)  # drawn once: all of it
    assert len(auxiliary_sample(drawn, make_strategy("entropy"), [1, 23])) == 0


def test_every_declared_auxiliary_is_one_the_networks_can_build():
    for name in STRATEGIES:
        training = make_strategy(name).training
        assert training.auxiliary is None or training.auxiliary in AUXILIARIES, name
        auxiliary = make_auxiliary(training.auxiliary, training.auxiliary_options)
        assert (auxiliary is None) == (training.auxiliary is None), name


def test_albl_trains_with_what_any_of_its_arms_uses():
    assert Training.combined([Training(), Training(mean_model=True)]) == Training(mean_model=True)
    assert make_strategy("albl", arms=["random", "entropy"]).training == Training()
    assert make_strategy("albl", arms=["random", "ema_kl_semi"]).training == Training(
        mean_model=True, semi_supervised=True)
