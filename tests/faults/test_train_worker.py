"""Fault: one Ray Train worker SIGKILLed mid-epoch. The worker group restarts (FailureConfig)
from the last epoch checkpoint: the epochs before it are not trained again, and M is still the
same on every rank at the end."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from orchestrator.config import ModelConfig, TrainConfig, config_to_dict
from orchestrator.train import SNAPSHOT, CycleJob, registered_checkpoints, run_training

from faultutil import descendants

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]


def train_workers() -> list[int]:
    return sorted(pid for pid, cmd in descendants(os.getpid()).items()
                  if cmd.startswith("ray::RayTrainWorker"))


def n_registered(out_dir: Path) -> int:
    """Checkpoints Ray Train has registered (not merely uploaded: one uploaded but not yet
    registered when the worker dies is not resumed from; the epoch is trained again)."""
    try:
        snapshot = json.loads(next((out_dir / "ray_train").glob(f"*/{SNAPSHOT}")).read_text())
    except (StopIteration, OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


def checkpoints(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "ray_train").glob("**/checkpoint_*/state.pt"))


def test_a_killed_train_worker_resumes_from_the_last_epoch_checkpoint(ray_local, shape_pool, tmp_path):
    epochs = 8
    job = CycleJob(
        pool=shape_pool.path, out_dir=str(tmp_path), num_classes=3,
        train_rows=list(range(60)), train_labels=[r % 3 for r in range(60)],
        val_rows=list(range(60, 72)), val_labels=[r % 3 for r in range(12)],
        model=config_to_dict(ModelConfig(width=4, stem="small")),
        train=config_to_dict(TrainConfig(epochs=epochs, min_steps=0, batch_size=4, num_workers=2, max_failures=2)),
        record_trajectory=True,  # t_steps_epoch{e}.pt per epoch (rank 0), mean_rank{r}.pt at the end
    )
    trajectory = tmp_path / "trajectory"
    seen: dict = {}

    def kill_a_worker():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            workers = train_workers()
            if n_registered(tmp_path) and len(workers) == 2:
                seen["before"] = {p.name: p.stat().st_mtime_ns for p in trajectory.glob("*.pt")}
                seen["killed"] = workers[-1]
                seen["at"] = time.time_ns()
                os.kill(workers[-1], signal.SIGKILL)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    summary = run_training(job, run_name="worker-kill")
    killer.join(timeout=5)

    assert "killed" in seen, "the run ended before a worker could be killed after a checkpoint"
    assert seen["killed"] not in train_workers()
    before = seen["before"]
    assert "t_steps_epoch0.pt" in before and len(before) < epochs + 1, "killed too late to tell"
    after = {p.name: p.stat().st_mtime_ns for p in trajectory.glob("*.pt")}
    # Resumed, not restarted: M's initial state and epoch 0 were not trained again ...
    assert after["mean_initial.pt"] == before["mean_initial.pt"]
    assert after["t_steps_epoch0.pt"] == before["t_steps_epoch0.pt"]
    # ... and training went on after the kill, to the last epoch.
    assert all(f"t_steps_epoch{e}.pt" in after for e in range(epochs))
    assert after[f"t_steps_epoch{epochs - 1}.pt"] > seen["at"]
    assert summary["best_epoch"] >= 0
    assert torch.load(checkpoints(tmp_path)[-1], weights_only=False)["progress"]["epoch"] == epochs
    run = tmp_path / "ray_train" / "worker-kill"  # no checkpoint folder left that Ray Train
    on_disk = {p.name for p in run.glob("checkpoint_*") if p.is_dir()}  # did not register
    assert on_disk == registered_checkpoints(json.loads((run / SNAPSHOT).read_text()))
    rank0 = torch.load(trajectory / "mean_rank0.pt")
    rank1 = torch.load(trajectory / "mean_rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
