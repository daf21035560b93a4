"""Subtomogram id → pool row without a dict of every id (`orchestrator/data/ids.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.ids import IdRows


def test_ids_map_to_their_rows_like_a_dict_and_unknown_ids_are_missing():
    ids = IdRows(["b7", "a1", "c3"], rows=[70, 10, 30])
    assert ids["a1"] == 10 and ids.get("c3") == 30 and ids.get("zz") is None
    assert "b7" in ids and "b" not in ids and "b77" not in ids and 70 not in ids
    assert dict(ids) == {"a1": 10, "b7": 70, "c3": 30} and len(ids) == 3
    with pytest.raises(KeyError, match="zz"):
        ids["zz"]


def test_many_ids_are_looked_up_at_once_with_minus_one_for_the_unknown():
    ids = IdRows(np.array([f"s{i:04d}" for i in range(1000)]))  # rows default to the order given
    assert ids.rows_of(["s0999", "s0000", "s10000", "s0500"]).tolist() == [999, 0, -1, 500]
    assert ids.rows_of([]).tolist() == [] and IdRows([]).rows_of(["a"]).tolist() == [-1]


def test_ids_and_rows_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="2 ids but 1 rows"):
        IdRows(["a", "b"], rows=[1])
