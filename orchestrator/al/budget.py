"""How many labels each cycle has: the budget schedule, from the config and the train split."""

from __future__ import annotations

import math

from orchestrator.config import BudgetConfig

__all__ = ["BudgetError", "budget_schedule"]


class BudgetError(ValueError):
    """A budget that cannot be run on this pool; the message says what to change."""


def budget_schedule(cfg: BudgetConfig, n_train: int) -> list[int]:
    """Cumulative labelled counts, one per cycle: the paper's 10% → 40% in 5% steps by default."""
    if cfg.counts:
        counts = [int(c) for c in cfg.counts]
    else:
        if not 0 < cfg.initial <= cfg.final <= 1 or cfg.step <= 0:
            raise BudgetError(
                f"budget: need 0 < initial ≤ final ≤ 1 and step > 0, got {cfg.initial}, "
                f"{cfg.final}, {cfg.step}"
            )
        steps = int(math.floor((cfg.final - cfg.initial) / cfg.step + 1e-9))
        fractions = [cfg.initial + i * cfg.step for i in range(steps + 1)]
        counts = [max(1, round(f * n_train)) for f in fractions]
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise BudgetError(f"budget: counts must increase, got {counts}")
    if counts[-1] > n_train:
        raise BudgetError(f"budget: {counts[-1]} labels asked but the train split has {n_train}")
    return counts
