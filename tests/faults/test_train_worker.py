"""Fault: one Ray Train worker SIGKILLed mid-cycle at a fixed point: rank 1, right after the
fifth epoch's checkpoint report (`CRYOAL_FAULT=train-checkpointed#5@rank1`,
orchestrator/faults.py; once in all processes, so the restarted worker goes on). The worker
group restarts (FailureConfig) from the last checkpoint Ray Train registered: the epochs before
it are not trained again, the cycle ends at its last epoch, no orphaned checkpoint folder is
left, and M is still the same on every rank at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import trajectory
from orchestrator.config import ModelConfig, TrainConfig, config_to_dict
from orchestrator.distributed.events import EVENTS
from orchestrator.distributed.train import SNAPSHOT, registered_checkpoints, run_training
from orchestrator.faults import ENV, ONCE_ENV
from orchestrator.nn.cycle import CycleJob

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]

EPOCHS, KILLED_AFTER = 8, 5  # a checkpoint after every epoch (cycle_plan: every eighth)


def checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "ray_train").glob("**/checkpoint_*/state.pt"))


def test_a_killed_train_worker_resumes_from_the_last_epoch_checkpoint(
    ray_local, shape_pool, tmp_path, monkeypatch
):
    job = CycleJob(
        pool=shape_pool.path, out_dir=str(tmp_path), num_classes=3,
        train_rows=list(range(60)), train_labels=[r % 3 for r in range(60)],
        val_rows=list(range(60, 72)), val_labels=[r % 3 for r in range(12)],
        model=config_to_dict(ModelConfig(width=4, stem="small")),
        train=config_to_dict(TrainConfig(epochs=EPOCHS, min_steps=0, batch_size=4, num_workers=2,
                                         max_failures=2)),
    )
    fired = tmp_path / "fired"
    monkeypatch.setenv(ENV, f"train-checkpointed#{KILLED_AFTER}@rank1")  # to the workers
    monkeypatch.setenv(ONCE_ENV, str(fired))
    summary = run_training(job, run_name="worker-kill", loop=trajectory.loop())

    assert fired.is_file(), "rank 1 never reached its fifth checkpoint"
    with pytest.raises(ProcessLookupError):
        os.kill(int(fired.read_text()), 0)
    # Rank 0's epoch events: 1 … 5 before the kill, then the restart from the last registered
    # checkpoint (after epoch k, 1 ≤ k ≤ 5) on to the last epoch. Epoch 1 was trained once.
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / EVENTS).read_text().splitlines()]
    assert epochs[:KILLED_AFTER] == list(range(1, KILLED_AFTER + 1)), epochs
    resumed_at = epochs[KILLED_AFTER]
    assert 2 <= resumed_at <= KILLED_AFTER + 1, f"restarted from scratch, not resumed: {epochs}"
    assert epochs[KILLED_AFTER:] == list(range(resumed_at, EPOCHS + 1)), epochs
    assert summary["best_epoch"] >= 0 and summary["epochs"] == EPOCHS
    assert torch.load(checkpoints(tmp_path)[-1], weights_only=False)["progress"]["epoch"] == EPOCHS
    run = tmp_path / "ray_train" / "worker-kill"  # no checkpoint folder left that Ray Train
    on_disk = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}  # did not register
    assert on_disk == registered_checkpoints(json.loads((run / SNAPSHOT).read_text()))
    rank0 = torch.load(tmp_path / "trajectory" / "mean_rank0.pt")
    rank1 = torch.load(tmp_path / "trajectory" / "mean_rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
