"""Aftermath of a Train worker killed between rank 0's checkpoint upload and Ray Train's
registering it: the restart resumes from the previous checkpoint, and once the fit has
succeeded the orphaned folder is deleted (orchestrator/distributed/train.py). No Ray cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.distributed.train import (
    SNAPSHOT,
    registered_checkpoints,
    remove_unregistered_checkpoints,
    unregistered_checkpoints,
)

pytestmark = [pytest.mark.faults]

KEPT = ["checkpoint_2026-01-01_10-00-02.000001", "checkpoint_2026-01-01_10-00-03.000001"]
ORPHAN = "checkpoint_2026-01-01_10-00-01.500000"  # uploaded, never registered


def ray_snapshot(kept: list[str]) -> str:
    """A snapshot as Ray Train 2.60 writes it (its own model, so a format change shows here)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=name, metrics={"epoch": i})
               for i, name in enumerate(kept)]
    return _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(kept))),
        latest_checkpoint_result=results[-1] if results else None,
        pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(kept), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    ).model_dump_json()


def test_only_checkpoint_folders_ray_train_never_registered_are_to_delete():
    listing = [*KEPT, ORPHAN, "checkpoint_manager_snapshot.json", "worker_logs", ".tmp"]
    assert unregistered_checkpoints(KEPT, listing) == [ORPHAN]
    assert unregistered_checkpoints([f"/store/run/{n}" for n in KEPT], listing) == [ORPHAN]
    assert unregistered_checkpoints(KEPT, KEPT) == []
    assert unregistered_checkpoints([], [ORPHAN]) == [ORPHAN]


def test_the_registered_ones_are_read_from_ray_trains_snapshot():
    import json

    snapshot = json.loads(ray_snapshot(KEPT))
    assert registered_checkpoints(snapshot) == set(KEPT)
    pending = {"checkpoint_dir_name": "checkpoint_pending", "metrics": {}}
    snapshot["pending_training_results"] = [pending]
    assert registered_checkpoints(snapshot) == {*KEPT, "checkpoint_pending"}


def make_run(run: Path, names: list[str]) -> None:
    for name in names:
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x")


def test_the_orphan_is_deleted_and_the_kept_checkpoints_stay(tmp_path):
    run = tmp_path / "ray_train" / "train-c00"
    make_run(run, [*KEPT, ORPHAN])
    (run / SNAPSHOT).write_text(ray_snapshot(KEPT))
    assert remove_unregistered_checkpoints(run) == [run / ORPHAN]
    assert sorted(p.name for p in run.iterdir()) == sorted([*KEPT, SNAPSHOT])
    assert all((run / name / "state.pt").is_file() for name in KEPT)
    assert remove_unregistered_checkpoints(run) == []  # idempotent


def test_without_a_readable_snapshot_nothing_is_deleted(tmp_path):
    run = tmp_path / "train-c00"
    make_run(run, [ORPHAN])
    assert remove_unregistered_checkpoints(run) == []
    (run / SNAPSHOT).write_text('{"checkpoint_res')  # caught mid-write
    assert remove_unregistered_checkpoints(run) == []
    assert (run / ORPHAN / "state.pt").is_file()
    assert remove_unregistered_checkpoints(tmp_path / "absent") == []
