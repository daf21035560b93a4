import pytest

from orchestrator.al.budget import BudgetError, budget_schedule
from orchestrator.config import BudgetConfig


def test_the_paper_schedule_goes_from_ten_to_forty_percent_in_five_percent_steps():
    schedule = budget_schedule(BudgetConfig(initial=0.1, step=0.05, final=0.4), 1000)
    assert schedule == [100, 150, 200, 250, 300, 350, 400]


def test_absolute_counts_override_the_fractions():
    assert budget_schedule(BudgetConfig(counts=(10, 25, 60)), 100) == [10, 25, 60]


def test_counts_must_increase():
    with pytest.raises(BudgetError, match="must increase"):
        budget_schedule(BudgetConfig(counts=(10, 10)), 100)


def test_a_budget_larger_than_the_train_split_is_refused():
    with pytest.raises(BudgetError, match="train split has 50"):
        budget_schedule(BudgetConfig(counts=(10, 60)), 50)


def test_fractions_out_of_order_are_refused():
    with pytest.raises(BudgetError, match="initial"):
        budget_schedule(BudgetConfig(initial=0.5, final=0.2), 100)
