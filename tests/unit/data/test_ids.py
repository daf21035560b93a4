"""Subtomogram id → pool row without a dict of every id (`orchestrator/data/ids.py`)."""

from __future__ import annotations

import numpy as np
import pytest

import pyarrow as pa

from orchestrator.data.ids import IdRows, strings_of


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


def test_a_string_column_becomes_the_same_numpy_strings_as_through_python():
    ids = ["s0000001", "tomo_7/particle_12", "a", "x" * 40]
    got = strings_of(pa.chunked_array([ids[:2], ids[2:]]))
    assert got.dtype == np.dtype("<U40")
    assert got.tolist() == ids


def test_a_sliced_column_gives_only_its_own_rows():
    column = pa.array(["first", "second", "third", "fourth"]).slice(1, 2)
    assert strings_of(column).tolist() == ["second", "third"]


def test_ids_beyond_ascii_come_through_unchanged():
    ids = ["particule_é", "粒子_1", "plain"]
    assert strings_of(pa.array(ids)).tolist() == ids


def test_an_empty_column_gives_an_empty_array():
    assert strings_of(pa.chunked_array([], pa.string())).tolist() == []
    assert strings_of(pa.array([""])).tolist() == [""]


def test_a_column_with_nulls_is_refused():
    with pytest.raises(ValueError, match="nulls"):
        strings_of(pa.array(["s1", None]))


def test_ids_written_in_order_are_looked_up_without_a_sorted_copy():
    ids = np.array(["a1", "a2", "b1"])
    assert IdRows(ids)._ids is ids
    shuffled = IdRows(np.array(["b1", "a1", "a2"]))
    assert shuffled.rows_of(["a1", "a2", "b1", "zz"]).tolist() == [1, 2, 0, -1]
