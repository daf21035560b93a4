"""The campaign history a strategy reads: rebuilt from the run directory's own files."""

import math

import numpy as np

from orchestrator.al.history import UNANSWERED, read_history
from orchestrator.al.oracle import Query
from orchestrator.campaign.files import write_selection


def selection(run_dir, cycle, rows, chosen_by, pred):
    queries = [Query(r, f"s{r}", "synthetic", p, 0.5, c) for r, c, p in zip(rows, chosen_by, pred)]
    write_selection(run_dir / "cycles" / f"c{cycle:02d}" / "selection.csv", queries)


def test_the_history_holds_each_past_cycles_queries_choosers_answers_and_accuracy(tmp_path):
    selection(tmp_path, 0, [4, 1], ["random", "random"], [-1, -1])
    selection(tmp_path, 1, [7, 2, 9], ["entropy", "random", "entropy"], [0, 1, 2])
    selection(tmp_path, 2, [3], ["random"], [1])  # the cycle being selected for: left out
    state = {"cycles": [{"val_accuracy": 0.4}, {"val_accuracy": 0.55}, {}]}
    answers = {"s4": 0, "s1": 2, "s7": -1, "s2": 1}  # s9 not answered yet

    history = read_history(tmp_path, state, answers, before_cycle=2)

    first, second = history.cycles
    assert (first.cycle, first.rows.tolist(), first.answers.tolist(), first.val_accuracy) == (
        0, [4, 1], [0, 2], 0.4)
    assert second.chosen_by == ("entropy", "random", "entropy")
    assert second.pred.tolist() == [0, 1, 2]
    assert second.answers.tolist() == [-1, 1, UNANSWERED]
    assert second.val_accuracy == 0.55


def test_a_cycle_without_a_selection_file_or_accuracy_is_skipped_or_nan(tmp_path):
    selection(tmp_path, 1, [5], ["margin"], [0])
    history = read_history(tmp_path, {"cycles": [{}, {"val_accuracy": None}]}, {}, before_cycle=3)
    assert [c.cycle for c in history.cycles] == [1]
    assert math.isnan(history.cycles[0].val_accuracy)


def test_a_selection_file_from_before_choosers_were_recorded_reads_with_empty_choosers(tmp_path):
    folder = tmp_path / "cycles" / "c01"
    folder.mkdir(parents=True)
    (folder / "selection.csv").write_text("row,subtomo_id,source,pred,pred_prob\n3,s3,x,1,0.5\n")
    (cycle,) = read_history(tmp_path, {"cycles": []}, {"s3": 2}, before_cycle=2).cycles
    assert (cycle.chosen_by, cycle.answers.tolist(), cycle.pred.dtype) == (("",), [2], np.int64)


def test_test_accuracy_never_reaches_the_history(tmp_path):
    """A strategy learning from the history (albl) cannot see the test split."""
    selection(tmp_path, 0, [1], ["random"], [-1])
    selection(tmp_path, 1, [2], ["entropy"], [0])
    states = [{"cycles": [{"val_accuracy": 0.5, "test_accuracy": test},
                          {"val_accuracy": 0.6, "test_accuracy": 1 - test}]} for test in (0.1, 0.9)]
    one, other = (read_history(tmp_path, state, {}, before_cycle=2) for state in states)
    assert [c.val_accuracy for c in one.cycles] == [c.val_accuracy for c in other.cycles] == [0.5, 0.6]
    assert {f for c in one.cycles for f in vars(c)} == {
        "cycle", "rows", "chosen_by", "pred", "answers", "val_accuracy"}
