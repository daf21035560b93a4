"""One cycle's training on Ray Train: the worker group, checkpoints, restarts. The one module
importing ray.train.

The recipe itself (data, plan, models, the epoch, validation, the kept model) is plain PyTorch
in `orchestrator/nn/cycle.py`; this module runs it on `num_workers` Ray Train workers joined by
DDP, or with ``train.num_workers=0`` in the calling process. Rank 0 checkpoints T, M, the
optimiser, the scheduler, the epoch and the RNG state at the plan's checkpoint epochs; a
restarted worker group (FailureConfig) or a re-run of the same cycle after a driver crash
resumes from there (the Ray Train run name is fixed per cycle). Once a fit has succeeded,
checkpoint folders Ray Train never registered (uploaded by rank 0 just before a worker died)
are deleted; the ones it registered are its own to keep or evict (num_to_keep).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator import faults
from orchestrator.distributed.events import report_epoch
from orchestrator.nn.cycle import AMP_DTYPES, Cycle, CycleJob

STATE_FILE = "state.pt"  # in each Ray Train checkpoint: Cycle.state_dict()
SHOWN = ("loss", "seconds", "val_task", "val_mean", "val_accuracy")  # in the progress events


def train_loop_per_worker(config: dict) -> dict | None:
    """What each Ray Train worker runs for a cycle: the recipe's epochs, a progress event per
    epoch (rank 0), a checkpoint at the plan's epochs; rank 0 returns the cycle's summary."""
    job = CycleJob(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(float(job.train["cpus_per_worker"]))))
    # the cycle's volume caches are freed when it ends, and when it fails
    with Cycle(job, rank=rank, world=world, device=ray.train.torch.get_device(),
               wrap=ray.train.torch.prepare_model) as cycle:
        if (checkpoint := ray.train.get_checkpoint()) is not None:
            with checkpoint.as_directory() as directory:
                cycle.load_state_dict(torch.load(Path(directory) / STATE_FILE,
                                                 map_location=cycle.device, weights_only=False))
        for epoch in range(cycle.progress["epoch"], cycle.plan.epochs):
            metrics = cycle.train_epoch(epoch)
            if epoch in cycle.plan.evaluate_at:
                metrics.update(cycle.validate(epoch))  # rank 0 keeps model.pt when it is the best
            if rank == 0:  # one event per epoch: the driver's progress display follows them
                report_epoch(job.out_dir, epoch=epoch + 1, epochs=cycle.plan.epochs,
                             **{k: metrics[k] for k in SHOWN if k in metrics})
            if epoch in cycle.plan.checkpoint_at:
                report(metrics, cycle.state_dict() if rank == 0 else None)
                faults.maybe_fault("train-checkpointed", scope=f"rank{rank}")
        return cycle.finish() if rank == 0 else None


def report(metrics: dict, state: dict | None) -> None:
    """ray.train.report on every rank; rank 0 passes the checkpoint (``state``)."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run_training(job: CycleJob, *, run_name: str,
                 loop: Callable[[dict], dict | None] = train_loop_per_worker) -> dict:
    """Fit one cycle on Ray Train; returns rank 0's summary (val/test accuracy, epochs, …).

    Re-running with the same `run_name` resumes from the last epoch checkpoint: that is how a
    campaign resumed after a driver crash avoids retraining from scratch. ``loop`` is what each
    worker runs (tests wrap it to watch the training from outside).
    """
    tcfg = job.train
    scaling, backend = distributed_setup(tcfg)
    trainer = TorchTrainer(
        loop,
        train_loop_config=asdict(job),
        scaling_config=scaling,
        torch_config=backend,
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(job.out_dir).resolve() / "ray_train"),
            failure_config=FailureConfig(max_failures=int(tcfg["max_failures"])),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env=faults.runtime_env(),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    remove_unregistered_checkpoints(Path(job.out_dir).resolve() / "ray_train" / run_name)
    return result.return_value


def distributed_setup(tcfg: dict) -> tuple[ScalingConfig, TorchConfig]:
    """The worker group a cycle asks for: `num_workers` workers of `cpus_per_worker` CPUs and,
    with `use_gpu`, one GPU each, joined by NCCL (GPU tensors) or else gloo (CPU tensors)."""
    if tcfg["amp"] not in AMP_DTYPES:
        raise ValueError(f"train.amp={tcfg['amp']!r}: valid are {sorted(AMP_DTYPES)}")
    use_gpu = bool(tcfg["use_gpu"])
    scaling = ScalingConfig(
        num_workers=int(tcfg["num_workers"]),
        use_gpu=use_gpu,
        resources_per_worker={"CPU": float(tcfg["cpus_per_worker"])},
    )
    return scaling, TorchConfig(backend="nccl" if use_gpu else "gloo")


# -- checkpoint folders Ray Train never registered ---------------------------------------------

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it kept
CHECKPOINT_NAME = re.compile(r"checkpoint_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(\.\d+)?")  # its default


def registered_checkpoints(snapshot: dict) -> set[str]:
    """The checkpoint folder names (relative to the run's folder) a Ray Train snapshot refers to:
    the kept ones, the latest and any still pending validation."""
    states = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result"),
              *snapshot.get("pending_training_results", [])]
    return {s["checkpoint_dir_name"] for s in states if s and s.get("checkpoint_dir_name")}


def unregistered_checkpoints(registered, listing) -> list[str]:
    """Which of the run folder's entries (names) are checkpoint folders Ray Train never
    registered: uploaded by rank 0 but orphaned by a worker killed before the controller recorded
    them (a restart resumes from the previous checkpoint; nothing refers to them again).
    Registered ones are Ray Train's to keep or evict (CheckpointConfig(num_to_keep))."""
    keep = {Path(name).name for name in registered}
    return sorted(n for n in listing if CHECKPOINT_NAME.fullmatch(n) and n not in keep)


def remove_unregistered_checkpoints(run_dir: Path) -> list[Path]:
    """After a successful fit (no worker can still upload): delete the run's orphaned checkpoint
    folders. Without a readable snapshot nothing is known to be orphaned, so nothing is deleted."""
    try:
        snapshot = json.loads((run_dir / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return []
    listing = [p.name for p in run_dir.iterdir() if p.is_dir()]
    orphans = unregistered_checkpoints(registered_checkpoints(snapshot), listing)
    removed = [run_dir / name for name in orphans]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
