"""The labelled set as the campaign reads it (`LabelledSet`, built from the ledger): what is
labelled, what is not, what training learns from, and what a strategy selects from out of a
scoring pass's table. No Ray, no model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.al.labels import JUNK, LabelRecord
from orchestrator.al.strategies import make_strategy
from orchestrator.campaign.labelled import LabelledSet, PoolView
from orchestrator.campaign.loop import Campaign, candidates_of
from orchestrator.config import load_config


@pytest.fixture
def view(shape_pool):
    return PoolView.load(shape_pool)


def answered(view, labels: dict[int, int]) -> LabelledSet:
    """A labelled set of pool rows → answers, through the ids as the ledger holds them."""
    return LabelledSet.of({str(view.ids[r]): a for r, a in labels.items()}, view)


def test_junk_answers_are_neither_training_labels_nor_unlabelled_volumes(shape_pool, tmp_path):
    campaign = Campaign(load_config(None, [f"data.pool={shape_pool.path}"]), tmp_path, shape_pool)
    first, second = (str(campaign.view.ids[r]) for r in campaign.train_rows[:2])
    campaign.ledger.append([LabelRecord(first, 1, 0, "person"), LabelRecord(second, JUNK, 0, "person")])
    rows = [campaign.view.row_of(first), campaign.view.row_of(second)]
    assert campaign.training_pairs() == [(rows[0], 1)]
    unlabelled = campaign.unlabelled_rows()
    assert not set(rows) & set(unlabelled.tolist())
    assert len(unlabelled) == len(campaign.train_rows) - 2


def test_a_campaign_reads_its_tables_with_an_allocator_that_gives_freed_memory_back(shape_pool, tmp_path):
    try:
        mimalloc = pa.mimalloc_memory_pool()  # Arrow's default where it is built in
    except NotImplementedError:
        pytest.skip("this pyarrow has no mimalloc to start from")
    before = pa.default_memory_pool()
    pa.set_memory_pool(mimalloc)
    try:
        Campaign(load_config(None, [f"data.pool={shape_pool.path}"]), tmp_path, shape_pool)
        assert pa.default_memory_pool().backend_name == "system"
    finally:
        pa.set_memory_pool(before)


MALLOC_BLOCKS_AFTER_A_LARGE_FREE = """
import ctypes, sys
import numpy as np
from orchestrator.campaign.loop import glibc_mmap_threshold

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "fixed":
    assert glibc_mmap_threshold(256 * 1024)
freed = np.ones(2**22)  # 32 MB, mmapped; freeing it moves glibc's threshold up to 32 MB
del freed
before = libc.mallinfo2().hblks
block = np.ones(2**17)  # 1 MB
print(libc.mallinfo2().hblks - before)  # 1: it got pages of its own (given back when freed)
"""


@pytest.mark.parametrize("threshold, mmapped", [("moving", 0), ("fixed", 1)])
def test_with_a_fixed_mmap_threshold_a_megabyte_block_still_gets_pages_it_gives_back(threshold, mmapped):
    import ctypes
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018  (glibc 2.33 or later)
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+: the driver's allocator is left as it is there")
    out = subprocess.run([sys.executable, "-c", MALLOC_BLOCKS_AFTER_A_LARGE_FREE, threshold],
                         capture_output=True, text=True, check=True, timeout=120)
    assert int(out.stdout) == mmapped


def test_with_a_junk_class_junk_answers_train_the_output_after_the_real_classes(shape_pool, tmp_path):
    cfg = load_config(None, [f"data.pool={shape_pool.path}", "train.junk_class=true"])
    campaign = Campaign(cfg, tmp_path, shape_pool)
    first, second = (str(campaign.view.ids[r]) for r in campaign.train_rows[:2])
    campaign.ledger.append([LabelRecord(first, 1, 0, "person"), LabelRecord(second, JUNK, 0, "person")])
    rows = [campaign.view.row_of(first), campaign.view.row_of(second)]
    junk_output = len(shape_pool.class_names)
    assert sorted(campaign.training_pairs()) == sorted([(rows[0], 1), (rows[1], junk_output)])
    assert not set(rows) & set(campaign.unlabelled_rows().tolist())  # answered all the same


def test_rows_come_sorted_with_their_answers_whatever_order_the_ledger_has(view):
    labelled = LabelledSet.of({str(view.ids[9]): 2, str(view.ids[3]): JUNK, str(view.ids[5]): 0}, view)
    assert labelled.rows.tolist() == [3, 5, 9]
    assert labelled.answers.tolist() == [JUNK, 0, 2]
    assert labelled.training_pairs() == [(5, 0), (9, 2)]
    assert labelled.contains([9, 4, 3]).tolist() == [True, False, True]
    assert labelled.answers_of([9, 3]).tolist() == [2, JUNK]
    assert labelled.label_or_none([4, 5, 9]) == [None, 0, 2]
    with pytest.raises(KeyError, match="not labelled"):
        labelled.answers_of([4])


def test_ids_map_to_their_rows_and_an_id_not_in_the_pool_is_unknown(view):
    rows = [7, 0, len(view.ids) - 1]
    assert view.rows_of_ids([str(view.ids[r]) for r in rows]).tolist() == rows
    assert view.row_of(str(view.ids[5])) == 5
    longer = str(view.ids[5]) + "x"  # longer than any id of the pool: no truncated match
    assert view.rows_of_ids(["nope", longer, str(view.ids[5])[:-1]]).tolist() == [-1, -1, -1]
    with pytest.raises(KeyError, match="nope"):
        view.row_of("nope")
    known = view.known_ids()
    assert str(view.ids[3]) in known and longer not in known and 3 not in known
    assert len(known) == len(view.ids) and set(known) == set(view.ids.tolist())
    with pytest.raises(KeyError, match="nope"):
        LabelledSet.of({str(view.ids[3]): 1, "nope": 0}, view)


def test_the_view_holds_each_rows_split_as_in_the_pools_index(shape_pool, view):
    from orchestrator.data.pool import read_index

    index = read_index(shape_pool.path, ["row", "split"]).sort_by("row")
    splits = np.array(index.column("split").to_pylist())
    assert view.split_codes.dtype == np.int8
    for name in ("train", "val", "test"):
        assert view.rows_of(name).tolist() == np.flatnonzero(splits == name).tolist()
    assert view.rows_of("holdout").tolist() == []  # a split the pool lacks has no rows


def test_unlabelled_is_the_train_split_minus_every_answer(view):
    train = view.rows_of("train")
    not_train = int(np.setdiff1d(np.arange(len(view.ids)), train)[0])
    labelled = answered(view, {int(train[0]): 1, int(train[1]): JUNK, not_train: 0})
    assert labelled.unlabelled.tolist() == train[2:].tolist()
    assert LabelledSet.of({}, view).unlabelled.tolist() == train.tolist()
    assert LabelledSet.of({}, view).label_or_none([0]) == [None]


def scores_table(rows, n_classes=3, dim=4) -> pa.Table:
    """A scoring pass's table for these rows: each row's arrays hold the row number, so
    alignment can be read back."""
    rows = np.asarray(rows, dtype=np.int64)
    emb = np.repeat(rows[:, None].astype(np.float32), dim, axis=1)
    probs = np.full((len(rows), n_classes), 1.0 / n_classes, dtype=np.float32)
    return pa.table({
        "row": rows,
        "embeddings": pa.FixedShapeTensorArray.from_numpy_ndarray(emb),
        "probs": pa.FixedShapeTensorArray.from_numpy_ndarray(probs),
    })


def test_candidates_are_the_unlabelled_rows_with_their_own_arrays(view):
    table = scores_table([0, 1, 2, 3, 4, 5, 6, 7])
    labelled = answered(view, {2: 1, 5: JUNK, 7: 0})
    candidates = candidates_of(table, labelled, make_strategy("poal", informativeness="entropy"))
    assert candidates.rows.tolist() == [0, 1, 3, 4, 6]
    assert candidates.outputs["embeddings"][:, 0].tolist() == [0, 1, 3, 4, 6]
    assert candidates.labelled["embeddings"][:, 0].tolist() == [2, 5, 7]
    assert candidates.labelled_answers.tolist() == [1, JUNK, 0]  # poal reads the answers


def test_candidates_carry_only_what_the_strategy_declared(view):
    table = scores_table([0, 1, 2, 3])
    candidates = candidates_of(table, answered(view, {1: 0}), make_strategy("coreset"))
    assert set(candidates.outputs) == {"embeddings"} and set(candidates.labelled) == {"embeddings"}
    assert candidates.rows.tolist() == [0, 2, 3]
    assert candidates.labelled_answers is None  # coreset does not read the ledger's answers


def test_a_pass_that_skipped_the_labelled_rows_gives_every_row_as_a_candidate(view):
    # the scoring pass leaves the labelled rows out unless the strategy reads them
    table = scores_table([0, 3, 4])
    candidates = candidates_of(table, answered(view, {1: 0, 2: 2}), make_strategy("typiclust"))
    assert candidates.rows.tolist() == [0, 3, 4]
    assert candidates.labelled["embeddings"].shape == (0, 4)


def test_validation_rows_in_a_pass_are_never_candidates_and_come_with_their_classes(view):
    table = scores_table([0, 1, 2, 3, 4, 5, 6])
    strategy = make_strategy("albl", arms=["entropy", "random"], credit="probe")
    candidates = candidates_of(table, answered(view, {1: 0}), strategy,
                               validation=(np.array([5, 3]), np.array([2, 1])))
    assert candidates.rows.tolist() == [0, 2, 4, 6]
    assert candidates.labelled_rows.tolist() == [1]
    assert candidates.validation["embeddings"][:, 0].tolist() == [3, 5]  # the pass's order
    assert candidates.validation_answers.tolist() == [1, 2]  # aligned with it


def test_a_pass_without_the_validation_rows_the_strategy_reads_is_refused(view):
    strategy = make_strategy("albl", arms=["entropy", "random"], credit="probe")
    with pytest.raises(ValueError, match="lacks validation rows"):
        candidates_of(scores_table([0, 1, 2]), answered(view, {1: 0}), strategy,
                      validation=(np.array([5]), np.array([2])))
