"""What a strategy asks of T's training, declared in one place, and the cycle settings it makes.

Every strategy carries one :class:`Training` (``strategy.training``): whether T trains with the
λ·D_reg(T, M) consistency term (the EMA-KL family), on unlabelled batches too (the mean
teacher), and which model of its own it trains beside T (an auxiliary, named here and built by
``orchestrator/nn/auxiliary.py``) on how many unlabelled volumes. The campaign reads nothing
else about a strategy to train a cycle: :func:`strategy_training` turns the declaration and the
configured recipe into the settings the Train workers get, and :func:`unlabelled_for_training`
draws, once per cycle, the unlabelled rows that training reads. Pure numpy, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from orchestrator.config import TrainConfig, config_to_dict

__all__ = ["Training", "strategy_training", "unlabelled_for_training", "auxiliary_sample"]


@dataclass(frozen=True)
class Training:
    """How T is trained for a strategy (the defaults: plain cross-entropy, nothing beside T)."""

    mean_model: bool = False  # the λ·D_reg(T, M) term on labelled batches: the EMA-KL family
    semi_supervised: bool = False  # ... and on unlabelled batches (Tarvainen & Valpola)
    auxiliary: str | None = None  # a model trained beside T: a name in nn.auxiliary.AUXILIARIES
    auxiliary_options: Mapping = field(default_factory=dict)  # its constructor's options
    unlabelled_sample: int = 0  # unlabelled volumes the auxiliary is fitted on (seeded sample)

    @staticmethod
    def combined(trainings) -> "Training":
        """What training must do for several strategies at once (albl's arms, which may not
        have an auxiliary): the consistency terms any of them uses."""
        trainings = list(trainings)
        return Training(mean_model=any(t.mean_model for t in trainings),
                        semi_supervised=any(t.semi_supervised for t in trainings))


def strategy_training(train: TrainConfig, strategy) -> dict:
    """The cycle's training settings for this strategy (a dict, as Ray Train workers get it).

    Each method as its paper trains it: the λ·D_reg(T, M) term only for strategies that use
    M (the EMA-KL family), plain cross-entropy for the rest; ``trainer: shared`` gives every
    strategy the configured λ instead (one trainer for all: a comparison of selection only).
    Semi-supervised training when the config or the strategy asks for it.
    """
    settings = config_to_dict(train)
    if train.trainer == "per_strategy" and not strategy.training.mean_model:
        settings["lam"] = 0.0
    settings["semi_supervised"] = bool(train.semi_supervised or strategy.training.semi_supervised)
    return settings


def unlabelled_for_training(unlabelled: np.ndarray, train: dict, strategy, seed) -> np.ndarray:
    """The unlabelled rows a cycle's training may read, drawn once: all of them (up to
    unlabelled_max, a seeded sample beyond) for semi-supervised batches; the sample an auxiliary
    model is fitted on; none otherwise."""
    wanted = int(train["unlabelled_max"]) if train["semi_supervised"] else 0
    if strategy.training.auxiliary is not None:
        wanted = max(wanted, strategy.training.unlabelled_sample)
    return _sample(unlabelled, wanted, seed)


def auxiliary_sample(unlabelled: np.ndarray, strategy, seed) -> np.ndarray:
    """The rows of ``unlabelled`` (what :func:`unlabelled_for_training` drew) the strategy's
    auxiliary is fitted on: all of them, or a seeded subset when a semi-supervised cycle drew
    more than the auxiliary wants."""
    if strategy.training.auxiliary is None:
        return unlabelled[:0]
    return _sample(unlabelled, strategy.training.unlabelled_sample, seed)


def _sample(rows: np.ndarray, size: int, seed) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if not size:
        return rows[:0]
    if len(rows) <= size:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
