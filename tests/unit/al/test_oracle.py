"""Oracles: the simulated one answers from ground truth; the file one is the person in the loop."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_shape_pool
from orchestrator.al.labels import LabelLedger, LedgerError
from orchestrator.al.oracle import AwaitingLabels, FileOracle, Query, SimulatedOracle, pick_initial


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_shape_pool(tmp_path_factory.mktemp("oracle") / "pool", n_train=9, n_val=0, n_test=0)


def queries_of(ids: list[str]) -> list[Query]:
    return [Query(int(sid.split("-")[1]), sid, "synthetic", 0, 0.5) for sid in ids]


def new_ledger(run_dir: Path) -> LabelLedger:
    return LabelLedger(run_dir / "labels.csv", known_ids={f"train-{i:04d}" for i in range(9)}, num_classes=3)


def test_the_simulated_oracle_answers_with_the_ground_truth(tmp_path):
    ledger = new_ledger(tmp_path)
    oracle = SimulatedOracle({"train-0001": 1, "train-0002": 2})
    oracle.answer(queries_of(["train-0001", "train-0002"]), 1, ledger, tmp_path)
    assert ledger.current() == {"train-0001": 1, "train-0002": 2}


def test_the_simulated_oracle_refuses_queries_without_ground_truth(tmp_path):
    with pytest.raises(ValueError, match="oracle: file"):
        SimulatedOracle({}).answer(queries_of(["train-0001"]), 1, new_ledger(tmp_path), tmp_path)


def test_the_file_oracle_writes_queries_and_waits_for_a_person(pool, tmp_path):
    with pytest.raises(AwaitingLabels, match="--resume"):
        FileOracle(pool).answer(queries_of(["train-0003", "train-0004"]), 1, new_ledger(tmp_path), tmp_path)
    folder = tmp_path / "cycles/c01/queries"
    assert (folder / "queries.csv").read_text().count("train-000") == 2
    assert "data_particles" in (folder / "queries.star").read_text()
    assert sorted(p.name for p in (folder / "png").iterdir()) == ["00000.png", "00001.png"]


def test_each_query_picture_shows_its_own_query_in_the_queries_order(pool, tmp_path):
    from orchestrator.data.images import slices_png
    from orchestrator.data.pool import read_volumes

    ids = ["train-0007", "train-0001", "train-0005"]  # not in pool order
    with pytest.raises(AwaitingLabels):
        FileOracle(pool).answer(queries_of(ids), 1, new_ledger(tmp_path), tmp_path)
    pictures = [(tmp_path / f"cycles/c01/queries/png/{n:05d}.png").read_bytes() for n in range(3)]
    volumes = read_volumes(pool.path, [7, 1, 5])
    assert pictures == [slices_png(v) for v in volumes] and len(set(pictures)) == 3


def test_the_file_oracle_imports_a_filled_labels_file_by_class_name(pool, tmp_path):
    ledger = new_ledger(tmp_path)
    queries = queries_of(["train-0003", "train-0004"])
    with pytest.raises(AwaitingLabels):
        FileOracle(pool).answer(queries, 1, ledger, tmp_path)
    (tmp_path / "cycles/c01/queries/labels.csv").write_text("subtomo_id,label\ntrain-0003,rod\ntrain-0004,junk\n")
    assert FileOracle(pool).answer(queries, 1, ledger, tmp_path) == 2
    assert ledger.current() == {"train-0003": 2, "train-0004": -1}


@pytest.mark.parametrize(
    "bad_row, reason",
    [
        ("train-9999,1", "train-9999"),  # an id that is not in the pool
        ("train-0004,7", "7"),  # a class that does not exist
        ("train-0004,1,extra", "extra fields"),  # a malformed row
    ],
)
def test_a_bad_labels_file_is_refused_with_the_row_and_the_ledger_is_unchanged(pool, tmp_path, bad_row, reason):
    ledger = new_ledger(tmp_path)
    SimulatedOracle({"train-0001": 1}).answer(queries_of(["train-0001"]), 0, ledger, tmp_path)
    before = (tmp_path / "labels.csv").read_bytes()
    queries = queries_of(["train-0003", "train-0004"])
    with pytest.raises(AwaitingLabels):
        FileOracle(pool).answer(queries, 1, ledger, tmp_path)
    labels = tmp_path / "cycles/c01/queries/labels.csv"
    labels.write_text(f"subtomo_id,label\ntrain-0003,1\n{bad_row}\n")
    with pytest.raises(LedgerError) as refused:
        FileOracle(pool).answer(queries, 1, ledger, tmp_path)
    assert "line 3" in str(refused.value) and reason in str(refused.value)
    assert (tmp_path / "labels.csv").read_bytes() == before


def test_a_labels_file_that_leaves_queries_unanswered_keeps_waiting(pool, tmp_path):
    ledger = new_ledger(tmp_path)
    queries = queries_of(["train-0003", "train-0004"])
    with pytest.raises(AwaitingLabels):
        FileOracle(pool).answer(queries, 1, ledger, tmp_path)
    (tmp_path / "cycles/c01/queries/labels.csv").write_text("subtomo_id,label\ntrain-0003,1\n")
    with pytest.raises(AwaitingLabels, match="1 of 2"):
        FileOracle(pool).answer(queries, 1, ledger, tmp_path)


def test_the_initial_draw_is_seeded_and_without_repeats():
    rows = list(range(100))
    first = pick_initial(rows, 10, seed=3)
    assert list(first) == list(pick_initial(rows, 10, seed=3))
    assert len(set(first)) == 10
    assert list(first) != list(pick_initial(rows, 10, seed=4))
