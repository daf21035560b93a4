"""Training T (and its mean model M) for one cycle on Ray Train. The one module importing ray.train.

Every worker reads the cycle's labelled volumes from the pool (they are a small fraction of
it), takes its own slice of each epoch's shuffled order, and runs DDP. Weights are identical on
every rank after each step, so each rank updates its own copy of M the same way and M stays
identical across ranks. Rank 0 checkpoints T, M, the optimiser, the scheduler, the epoch and the
RNG state after every epoch; a restarted worker group (FailureConfig) or a re-run of the same
cycle after a driver crash resumes from there. Once a fit has succeeded, checkpoint folders Ray
Train never registered (uploaded by rank 0 just before a worker died) are deleted; the ones it
registered are its own to keep or evict (num_to_keep). The validation split chooses the epoch
whose T and M are kept (`model.pt` in the cycle directory); the test split is only reported.

The cycle's strategy is rebuilt here by name, and its hooks are honoured whatever it is:
``semi_supervised`` adds the unlabelled λ·D_reg term; an ``auxiliary`` with a joint loss is
built with T, trained in T's steps (its parameters in T's optimiser, its state in the epoch
checkpoint and in `model.pt` under "auxiliary"); then, on rank 0, ``fit_after`` fits it with
the kept T, the labelled volumes and a seeded sample of unlabelled ones, and `model.pt` is
re-saved with it (``auxiliary_fitted`` marks that done, so a re-run does not fit twice).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.ema import init_mean_model, unwrap
from orchestrator.learning import (
    evaluate,
    recalibrated,
    get_rng_state,
    make_optimizer,
    make_scheduler,
    set_rng_state,
    train_epoch,
)
from orchestrator.model import build_model
from orchestrator.pool import read_volumes
from orchestrator.strategies import make_strategy

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CycleJob:
    """Everything one cycle's training needs; plain data, so it travels to every worker."""

    pool: str
    out_dir: str  # the cycle directory: model.pt and the Ray Train run go here
    num_classes: int
    train_rows: list[int]
    train_labels: list[int]
    val_rows: list[int] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)
    test_rows: list[int] = field(default_factory=list)
    test_labels: list[int] = field(default_factory=list)
    unlabelled_rows: list[int] = field(default_factory=list)  # semi-supervised / auxiliary
    mean_model_path: str | None = None  # the previous cycle's model.pt, whose M carries over
    seed: int = 0
    model: dict = field(default_factory=dict)  # ModelConfig as a dict
    train: dict = field(default_factory=dict)  # TrainConfig as a dict
    record_trajectory: bool = False  # tests: rank 0 saves T after every step, every rank saves M
    strategy: str = ""  # the selection strategy: its training hooks (semi_supervised, auxiliary)
    strategy_options: dict = field(default_factory=dict)


def model_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "model.pt"


def run_training(job: CycleJob, *, run_name: str) -> dict:
    """Fit one cycle on Ray Train; returns rank 0's summary (val/test accuracy, epochs, …).

    Re-running with the same `run_name` resumes from the last epoch checkpoint: that is how a
    campaign resumed after a driver crash avoids retraining from scratch.
    """
    tcfg = job.train
    scaling, backend = distributed_setup(tcfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        scaling_config=scaling,
        torch_config=backend,
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(job.out_dir).resolve() / "ray_train"),
            failure_config=FailureConfig(max_failures=int(tcfg["max_failures"])),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    remove_unregistered_checkpoints(Path(job.out_dir).resolve() / "ray_train" / run_name)
    return result.return_value


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


def train_loop_per_worker(config: dict) -> dict | None:
    job = CycleJob(**config)
    tcfg = job.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(float(tcfg["cpus_per_worker"]))))
    device = ray.train.torch.get_device()
    amp_dtype = AMP_DTYPES[tcfg["amp"]] if device.type == "cuda" else None

    x_train = torch.from_numpy(read_volumes(job.pool, job.train_rows))
    y_train = torch.as_tensor(job.train_labels, dtype=torch.int64)
    x_val = torch.from_numpy(read_volumes(job.pool, job.val_rows)) if job.val_rows else None
    y_val = torch.as_tensor(job.val_labels, dtype=torch.int64)
    strategy = make_strategy(job.strategy, **job.strategy_options) if job.strategy else None
    auxiliary = getattr(strategy, "auxiliary", None)
    semi = tcfg["semi_supervised"] or getattr(strategy, "semi_supervised", False)
    x_unlabelled = (
        torch.from_numpy(read_volumes(job.pool, job.unlabelled_rows))
        if semi and job.unlabelled_rows else None
    )

    torch.manual_seed(job.seed)  # T is re-initialised each cycle, identically on every rank
    model = ray.train.torch.prepare_model(_build(job))
    mean = init_mean_model(model)  # after prepare_model, so M starts identical on every rank
    if job.mean_model_path and not tcfg["reset_mean_model"]:
        mean.load_state_dict(torch.load(job.mean_model_path, map_location=device)["mean"])
    aux, extra_loss = None, None
    if auxiliary is not None and auxiliary.joint:  # trained in T's steps, with T's optimiser
        with torch.random.fork_rng(devices=[]):  # T trains as it would without it
            torch.manual_seed(job.seed + 1)
            aux = auxiliary.build(unwrap(model), job.num_classes)
        aux = ray.train.torch.prepare_model(aux)

        def extra_loss(x, y, logits, stages):
            return auxiliary.joint_loss(aux, model, x, y, logits, stages)

    optimizer = make_optimizer(
        model if aux is None else torch.nn.ModuleList([model, aux]),
        lr=tcfg["lr"], momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"],
    )
    scheduler = make_scheduler(optimizer, tcfg["epochs"], decay_at=tcfg["decay_at"])
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None

    progress = {"epoch": 0, "best_val": -1.0, "best_epoch": -1}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", map_location=device, weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        mean.load_state_dict(state["mean"])
        if aux is not None:
            unwrap(aux).load_state_dict(state["auxiliary"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        progress = state["progress"]

    trajectory_dir = Path(job.out_dir) / "trajectory"
    if job.record_trajectory and rank == 0 and progress["epoch"] == 0:
        trajectory_dir.mkdir(parents=True, exist_ok=True)
        torch.save(mean.state_dict(), trajectory_dir / "mean_initial.pt")
    for epoch in range(progress["epoch"], tcfg["epochs"]):
        started = time.perf_counter()
        order = _epoch_order(len(x_train), job.seed, epoch, rank, world)
        batches = _batches(x_train, y_train, order, tcfg["batch_size"])
        unlabelled = None
        if x_unlabelled is not None:
            u_order = _epoch_order(len(x_unlabelled), job.seed + 1, epoch, rank, world)
            unlabelled = (b for b, _ in _batches(x_unlabelled, None, u_order, tcfg["batch_size"]))
        step_hook = _trajectory_hook(trajectory_dir, rank, epoch) if job.record_trajectory else None
        stats = train_epoch(
            model, mean, _with_hook(batches, step_hook, model), optimizer,
            lam=tcfg["lam"], distance=tcfg["regulariser"], alpha=tcfg["ema_alpha"],
            unlabelled_batches=unlabelled, amp_dtype=amp_dtype, device=device, scaler=scaler,
            extra_loss=extra_loss,
        )
        scheduler.step()
        calibration = list(_batches(x_train, y_train, np.arange(len(x_train)), tcfg["batch_size"]))
        task_eval = recalibrated(model, calibration)
        val_accuracy = _accuracy(task_eval, x_val, y_val, job, amp_dtype)
        improved = x_val is None or val_accuracy > progress["best_val"]
        if improved:
            progress.update(best_val=val_accuracy, best_epoch=epoch)
            if rank == 0:
                _save_model(job, task_eval, recalibrated(mean, calibration), epoch, val_accuracy,
                            aux)
        progress["epoch"] = epoch + 1
        metrics = {
            "epoch": epoch, "loss": stats["loss"], "ce": stats["ce"], "reg": stats["reg"],
            "val_accuracy": val_accuracy, "seconds": time.perf_counter() - started,
        }
        if rank == 0:
            print(
                f"  epoch {epoch + 1}/{tcfg['epochs']}  loss {stats['loss']:.3f}  "
                f"val acc {val_accuracy:.3f}  ({metrics['seconds']:.1f} s)", flush=True,
            )
        _report(metrics, rank, {
            "model": unwrap(model).state_dict(), "mean": mean.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": get_rng_state(), "progress": dict(progress),
            **({"auxiliary": unwrap(aux).state_dict()} if aux is not None else {}),
        })
    if job.record_trajectory:
        torch.save(mean.state_dict(), trajectory_dir / f"mean_rank{rank}.pt")
    if rank != 0:
        return None
    if auxiliary is not None:
        _fit_auxiliary(job, auxiliary, x_train, device)
    return _final_summary(job, progress, amp_dtype, device)


def _build(job: CycleJob) -> torch.nn.Module:
    m = job.model
    return build_model(
        m["name"], num_classes=job.num_classes, width=m["width"], stem=m["stem"],
        dropout=m["dropout"],
    )


def _epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's slice of the epoch's shuffled order; every rank gets as many rows, so DDP
    ranks take the same number of steps (the few left over rotate from epoch to epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    per_rank = max(1, n // world) if n >= world else n
    return order[rank * per_rank:(rank + 1) * per_rank] if n >= world else order


def _batches(x: torch.Tensor, y: torch.Tensor | None, order: np.ndarray, batch_size: int):
    for start in range(0, len(order), batch_size):
        index = torch.from_numpy(order[start:start + batch_size])
        yield x[index], (None if y is None else y[index])


def _with_hook(batches, hook, model):
    for batch in batches:
        yield batch
        if hook is not None:  # runs when train_epoch asks for the next batch: after the step
            hook(model)
    if hook is not None:
        hook(model, final=True)


def _trajectory_hook(directory: Path, rank: int, epoch: int):
    """Tests: T's weights after every optimiser step (rank 0), to recompute M's EMA by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    steps: list[dict] = []

    def snapshot(model) -> dict:
        return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    def hook(model, final=False):
        if final:
            if rank == 0:
                torch.save(steps, directory / f"t_steps_epoch{epoch}.pt")
            return
        steps.append(snapshot(model))

    return hook


def _accuracy(model, x, y, job: CycleJob, amp_dtype) -> float:
    if x is None:
        return float("nan")
    batches = _batches(x, y, np.arange(len(x)), job.train["batch_size"] * 2)
    return float(evaluate(model, batches, job.num_classes, amp_dtype=amp_dtype)["accuracy"])


def _save_model(job: CycleJob, model, mean, epoch: int, val_accuracy: float, aux=None) -> None:
    state = {
        "model": unwrap(model).state_dict(), "mean": mean.state_dict(), "epoch": epoch,
        "val_accuracy": val_accuracy, "num_classes": job.num_classes, "model_config": job.model,
    }
    if aux is not None:  # the jointly trained auxiliary of the same epoch as T
        state["auxiliary"] = unwrap(aux).state_dict()
    atomic_torch_save(state, model_path(job.out_dir))


def _fit_auxiliary(job: CycleJob, auxiliary, x_train: torch.Tensor, device) -> None:
    """Rank 0, after training: the strategy's ``fit_after`` with the kept T; `model.pt` gains
    (or updates) "auxiliary". Seeded: a re-run fits the same module from the same start."""
    path = model_path(job.out_dir)
    saved = torch.load(path, map_location=device)
    if saved.get("auxiliary_fitted"):
        return
    model = _build(job).to(device)
    model.load_state_dict(saved["model"])
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.seed + 1)
        aux = auxiliary.build(model, job.num_classes)
    if aux is None:  # nothing to fit or keep (noise stability reads T itself)
        return
    if "auxiliary" in saved:
        aux.load_state_dict(saved["auxiliary"])
    aux.to(device)
    rng = np.random.default_rng([job.seed, 23])
    n = min(len(job.unlabelled_rows), auxiliary.unlabelled_sample)
    rows = np.sort(rng.choice(np.asarray(job.unlabelled_rows, np.int64), size=n, replace=False))
    x_unlabelled = torch.from_numpy(read_volumes(job.pool, rows)) if n else x_train[:0]
    auxiliary.fit_after(aux, model, x_train, x_unlabelled, device=device, seed=job.seed)
    saved.update(auxiliary=aux.state_dict(), auxiliary_fitted=True)
    atomic_torch_save(saved, path)


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _report(metrics: dict, rank: int, state: dict) -> None:
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        torch.save(state, Path(directory) / "state.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _final_summary(job: CycleJob, progress: dict, amp_dtype, device) -> dict:
    """Rank 0: the kept (best-validation) model's accuracy on the test split."""
    saved = torch.load(model_path(job.out_dir), map_location=device)
    model = _build(job).to(device)
    model.load_state_dict(saved["model"])
    summary = {
        "best_epoch": progress["best_epoch"], "val_accuracy": progress["best_val"],
        "test_accuracy": float("nan"), "per_class_accuracy": [],
    }
    if job.test_rows:
        x_test = torch.from_numpy(read_volumes(job.pool, job.test_rows))
        y_test = torch.as_tensor(job.test_labels, dtype=torch.int64)
        batches = _batches(x_test, y_test, np.arange(len(x_test)), job.train["batch_size"] * 2)
        result = evaluate(model, batches, job.num_classes, amp_dtype=amp_dtype)
        summary.update(
            test_accuracy=float(result["accuracy"]),
            per_class_accuracy=[float(a) for a in result["per_class_accuracy"]],
        )
    return summary
