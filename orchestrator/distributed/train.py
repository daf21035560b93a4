"""Training T (and its mean model M) for one cycle on Ray Train. The one module importing ray.train.

Every worker reads the cycle's labelled volumes from the pool (they are a small fraction of
it), takes its own slice of each epoch's order (class-balanced when the labelled classes are
unequal), augments each batch in ways that keep the missing wedge, and runs DDP with the
configured optimiser and per-step lr schedule. Weights are identical on every rank after each
step, so each rank updates its own copy of M the same way and M stays identical across ranks.

How long a cycle trains and when it validates is `cycle_plan`'s: ``train.epochs``, or more for
a small labelled set (``min_steps``), with validation over the second half. At each validation
T and M are both scored on the validation split (BatchNorm statistics recomputed on a fixed
labelled subset: "precise BN"), and the epoch whose chosen classifier (T, M, or the better of
the two) validates best is kept as `model.pt` in the cycle directory; the test split is only
reported, for both models. Rank 0 checkpoints T, M, the optimiser, the scheduler, the epoch and
the RNG state at the plan's checkpoint epochs; a restarted worker group (FailureConfig) or a
re-run of the same cycle after a driver crash resumes from there. Once a fit has succeeded,
checkpoint folders Ray Train never registered (uploaded by rank 0 just before a worker died)
are deleted; the ones it registered are its own to keep or evict (num_to_keep).

What the cycle trains with is decided by the campaign (`loop.strategy_training`): the λ of the
labelled consistency term (0 for strategies that do not use M), and semi-supervised batches
(the mean teacher: one unlabelled batch a step from every unlabelled volume in turn, two
augmented views, a ramped-up weight). The strategy is rebuilt here by name for its auxiliary:
one with a joint loss is built with T, trained in T's steps (its parameters in T's optimiser,
its state in the epoch checkpoint and in `model.pt` under "auxiliary"); then, on rank 0,
``fit_after`` fits it with the kept T, the labelled volumes and a seeded sample of unlabelled
ones, and `model.pt` is re-saved with it (``auxiliary_fitted`` marks that done, so a re-run
does not fit twice).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.augment import Augmentation
from orchestrator.ema import init_mean_model, unwrap
from orchestrator.learning import (
    evaluate,
    recalibrated,
    get_rng_state,
    make_optimizer,
    make_scheduler,
    set_rng_state,
    sigmoid_rampup,
    train_epoch,
)
from orchestrator.model import build_model
from orchestrator.pool import read_volumes
from orchestrator.progress import report_epoch
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

    data = _read_data(job)
    plan = cycle_plan(len(data.y_train), tcfg, world)
    strategy = make_strategy(job.strategy, **job.strategy_options) if job.strategy else None
    model, mean, aux, extra_loss = _build_models(job, strategy, device)
    optimizer = make_optimizer(
        model if aux is None else torch.nn.ModuleList([model, aux]), lr=tcfg["lr"],
        momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"], kind=tcfg["optimizer"],
    )
    scheduler = make_scheduler(optimizer, plan.epochs, decay_at=tcfg["decay_at"],
                               schedule=tcfg["schedule"], steps_per_epoch=plan.steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    progress = {"epoch": 0, "best_val": -1.0, "best_epoch": -1}
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        progress = _restore(checkpoint, device, model, mean, aux, optimizer, scheduler)

    trajectory_dir = Path(job.out_dir) / "trajectory"
    if job.record_trajectory and rank == 0 and progress["epoch"] == 0:
        trajectory_dir.mkdir(parents=True, exist_ok=True)
        torch.save(mean.state_dict(), trajectory_dir / "mean_initial.pt")
    augmentation = Augmentation(shift=tcfg["augment_shift"], intensity=tcfg["augment_intensity"])
    for epoch in range(progress["epoch"], plan.epochs):
        started = time.perf_counter()
        batches = _batches(data.x_train, data.y_train, _epoch_order(
            data.y_train, job.seed, epoch, rank, world, tcfg["balanced"]), plan.rank_batch)
        step_hook = _trajectory_hook(trajectory_dir, rank, epoch) if job.record_trajectory else None
        stats = train_epoch(
            model, mean, _with_hook(batches, step_hook, model), optimizer,
            lam=tcfg["lam"], distance=tcfg["regulariser"], alpha=tcfg["ema_alpha"],
            unlabelled_batches=_unlabelled_batches(data, job, plan, epoch, rank, world),
            lam_unlabelled=_unlabelled_weight(tcfg, plan, epoch),
            augmentation=augmentation if tcfg["augment"] else None,
            generator=torch.Generator().manual_seed(_seed(job.seed, 5, epoch, rank)),
            scheduler=scheduler, amp_dtype=amp_dtype, device=device, scaler=scaler,
            extra_loss=None if extra_loss is None else partial(extra_loss,
                                                               progress=epoch / plan.epochs),
        )
        progress["epoch"] = epoch + 1
        metrics = {"epoch": epoch, "loss": stats["loss"], "ce": stats["ce"], "reg": stats["reg"],
                   "seconds": time.perf_counter() - started}
        if epoch in plan.evaluate_at:
            metrics.update(_select(job, data, model, mean, aux, epoch, progress, rank, amp_dtype))
        if rank == 0:  # one event per epoch: the driver's progress display follows them
            report_epoch(job.out_dir, epoch=epoch + 1, epochs=plan.epochs, **{
                k: metrics[k] for k in ("loss", "seconds", "val_task", "val_mean", "val_accuracy")
                if k in metrics})
        if epoch in plan.checkpoint_at:
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
    if strategy is not None and strategy.auxiliary is not None:
        _fit_auxiliary(job, strategy.auxiliary, data.x_train, device)
    return {**_final_summary(job, progress, amp_dtype, device),
            "epochs": plan.epochs, "steps": plan.epochs * plan.steps_per_epoch}


@dataclass(frozen=True)
class CyclePlan:
    epochs: int  # train.epochs, or more to reach train.min_steps
    steps_per_epoch: int  # optimiser steps per epoch (the same on every rank)
    rank_batch: int  # volumes each rank takes per step: train.batch_size shared by the ranks
    evaluate_at: frozenset[int]  # epochs (0-based) after which T and M are validated
    checkpoint_at: frozenset[int]  # epochs after which rank 0 checkpoints (resume points)


def cycle_plan(n_labelled: int, tcfg: dict, world: int = 1) -> CyclePlan:
    """How long a cycle trains and when it validates: pure, from the labelled count.

    ``train.batch_size`` is the batch of one optimiser step, split between the ranks, so a
    cycle takes the same steps on the same batches' worth of volumes whatever the number of
    workers. Small labelled sets get more epochs, up to ``min_steps`` optimiser steps in all
    (a fixed epoch count would give a 5% set a few dozen steps). Validation runs ``evaluations`` times,
    evenly over the second half of the epochs and always after the last (with a one-cycle or
    cosine schedule the first half is never the best); checkpoints follow every validation and
    at least every eighth of the cycle, so a restarted worker group loses little.
    """
    per_rank = max(1, n_labelled // world) if n_labelled >= world else max(n_labelled, 1)
    rank_batch = max(1, int(tcfg["batch_size"]) // world)
    steps_per_epoch = math.ceil(per_rank / rank_batch)
    epochs = max(int(tcfg["epochs"]), math.ceil(int(tcfg.get("min_steps", 0)) / steps_per_epoch))
    evaluate_at = frozenset(
        max(1, math.ceil(e)) - 1
        for e in np.linspace(epochs / 2, epochs, int(tcfg.get("evaluations", 8)))
    ) | {epochs - 1}
    every = max(1, epochs // 8)
    checkpoint_at = evaluate_at | {e for e in range(epochs) if (e + 1) % every == 0}
    return CyclePlan(epochs, steps_per_epoch, rank_batch, evaluate_at, frozenset(checkpoint_at))


@dataclass
class CycleData:
    """The volumes a worker trains on, read once per cycle: labelled (train), validation, and
    for semi-supervised training the unlabelled ones (kept in storage dtype: float16 halves it)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor
    x_unlabelled: torch.Tensor | None
    calibration: list  # (x, y) batches of up to train.calibration_samples labelled volumes


def _read_data(job: CycleJob) -> CycleData:
    tcfg = job.train
    x_train = torch.from_numpy(read_volumes(job.pool, job.train_rows))
    y_train = torch.as_tensor(job.train_labels, dtype=torch.int64)
    x_val = torch.from_numpy(read_volumes(job.pool, job.val_rows)) if job.val_rows else None
    semi = tcfg["semi_supervised"] and job.unlabelled_rows
    x_unlabelled = torch.from_numpy(read_volumes(job.pool, job.unlabelled_rows)) if semi else None
    # BatchNorm statistics for evaluation from a fixed subset: the same for T and M, and cheap
    # when the labelled set is large (a few hundred volumes pin the statistics down)
    order = np.random.default_rng([job.seed, 17]).permutation(len(y_train))
    order = np.sort(order[:int(tcfg["calibration_samples"])])
    calibration = list(_batches(x_train, y_train, order, int(tcfg["batch_size"])))
    return CycleData(x_train, y_train, x_val, torch.as_tensor(job.val_labels, dtype=torch.int64),
                     x_unlabelled, calibration)


def _build_models(job: CycleJob, strategy, device):
    """T (re-initialised each cycle, identically on every rank), M (the previous cycle's unless
    reset), and the strategy's jointly trained auxiliary with its loss, if it has one."""
    tcfg = job.train
    torch.manual_seed(job.seed)
    model = _build(job)
    if tcfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
    model = ray.train.torch.prepare_model(model)
    mean = init_mean_model(model)  # after prepare_model, so M starts identical on every rank
    if job.mean_model_path and not tcfg["reset_mean_model"]:
        mean.load_state_dict(torch.load(job.mean_model_path, map_location=device)["mean"])
    auxiliary = getattr(strategy, "auxiliary", None)
    if auxiliary is None or not auxiliary.joint:
        return model, mean, None, None
    with torch.random.fork_rng(devices=[]):  # T trains as it would without it
        torch.manual_seed(job.seed + 1)
        aux = auxiliary.build(unwrap(model), job.num_classes)
    aux = ray.train.torch.prepare_model(aux)

    def extra_loss(x, y, logits, stages, progress):
        return auxiliary.joint_loss(aux, model, x, y, logits, stages, progress)

    return model, mean, aux, extra_loss


def _restore(checkpoint, device, model, mean, aux, optimizer, scheduler) -> dict:
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", map_location=device, weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    mean.load_state_dict(state["mean"])
    if aux is not None:
        unwrap(aux).load_state_dict(state["auxiliary"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["progress"]


def _select(job, data: CycleData, model, mean, aux, epoch, progress, rank, amp_dtype) -> dict:
    """Validate T and M (each with BatchNorm statistics recomputed on the calibration set);
    when the chosen classifier beats the best so far, rank 0 saves this epoch's pair."""
    task_eval = recalibrated(model, data.calibration)
    mean_eval = recalibrated(mean, data.calibration)
    val_task = _accuracy(task_eval, data.x_val, data.y_val, job, amp_dtype)
    val_mean = _accuracy(mean_eval, data.x_val, data.y_val, job, amp_dtype)
    classifier, score = choose_classifier(job.train["classifier"], val_task, val_mean)
    if data.x_val is None or score > progress["best_val"]:
        progress.update(best_val=score, best_epoch=epoch)
        if rank == 0:
            _save_model(job, task_eval, mean_eval, epoch, aux, classifier=classifier,
                        val_task=val_task, val_mean=val_mean)
    return {"val_task": val_task, "val_mean": val_mean, "val_accuracy": score}


def choose_classifier(rule: str, val_task: float, val_mean: float) -> tuple[str, float]:
    """Which of T and M a cycle reports, and its validation accuracy. "best" takes M only when
    it validates strictly better (T on ties: it is what the selection strategies score)."""
    if rule == "task" or (rule == "best" and not val_mean > val_task):
        return "task", val_task
    if rule in ("mean", "best"):
        return "mean", val_mean
    raise ValueError(f"classifier {rule!r}: valid are task, mean, best")


def _unlabelled_batches(data: CycleData, job: CycleJob, plan: CyclePlan, epoch, rank, world):
    """One unlabelled batch per step, read in turn from a seeded order of every unlabelled
    volume that continues across epochs (reshuffled at each pass), so a cycle sees all of
    them, not a fixed sample; None without semi-supervised training."""
    if data.x_unlabelled is None:
        return None
    first = epoch * plan.steps_per_epoch
    b = plan.rank_batch
    return (data.x_unlabelled[unlabelled_indices(len(data.x_unlabelled), b, job.seed, step,
                                                 rank, world)]
            for step in range(first, first + plan.steps_per_epoch))


def unlabelled_indices(n: int, batch: int, seed: int, step: int, rank: int = 0, world: int = 1
                       ) -> torch.Tensor:
    """Rank ``rank``'s unlabelled batch at global step ``step``: positions ``step·batch·world``
    onwards in a stream of seeded permutations of range(n), one per pass; pure, so a resumed
    cycle draws what it would have drawn."""
    start = (step * world + rank) * batch
    positions = np.arange(start, start + batch)
    passes, offsets = np.divmod(positions, n)
    out = np.empty(batch, np.int64)
    for p in np.unique(passes):
        order = np.random.default_rng([seed, 11, int(p)]).permutation(n)
        out[passes == p] = order[offsets[passes == p]]
    return torch.from_numpy(out)


def _unlabelled_weight(tcfg: dict, plan: CyclePlan, epoch: int):
    """The unlabelled term's weight at each step of this epoch: lam_unlabelled after a sigmoid
    ramp-up over the first ``rampup`` of the cycle's steps."""
    rampup_steps = round(tcfg["rampup"] * plan.epochs * plan.steps_per_epoch)
    first = epoch * plan.steps_per_epoch
    return lambda i: tcfg["lam_unlabelled"] * sigmoid_rampup(first + i, rampup_steps)


def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**62))


def _build(job: CycleJob) -> torch.nn.Module:
    m = job.model
    return build_model(
        m["name"], num_classes=job.num_classes, width=m["width"], stem=m["stem"],
        dropout=m["dropout"],
    )


def _epoch_order(labels: torch.Tensor, seed: int, epoch: int, rank: int, world: int,
                 balanced: bool = False) -> np.ndarray:
    """This rank's slice of the epoch's order of the labelled rows; every rank gets as many
    rows, so DDP ranks take the same number of steps (the few left over rotate each epoch).

    Balanced: when the labelled classes are unequal (queries rarely are equal), the epoch draws
    as many rows as there are, with replacement, each class equally likely; equal classes get a
    plain permutation either way.
    """
    y = np.asarray(labels)
    n = len(y)
    rng = np.random.default_rng([seed, epoch])
    counts = np.bincount(y) if n else np.zeros(0, np.int64)
    if balanced and len(set(counts[counts > 0].tolist())) > 1:
        weights = 1.0 / counts[y]
        order = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    else:
        order = rng.permutation(n)
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


def _save_model(job: CycleJob, model, mean, epoch: int, aux=None, *, classifier: str,
                val_task: float, val_mean: float) -> None:
    state = {
        "model": unwrap(model).state_dict(), "mean": mean.state_dict(), "epoch": epoch,
        "classifier": classifier, "val_accuracy_task": val_task, "val_accuracy_mean": val_mean,
        "num_classes": job.num_classes, "model_config": job.model,
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
    """Rank 0: the kept epoch's accuracies. ``test_accuracy`` is the chosen classifier's (T or
    M, chosen on validation); both models' are kept too, to measure which is better."""
    saved = torch.load(model_path(job.out_dir), map_location=device)
    summary = {
        "best_epoch": progress["best_epoch"], "val_accuracy": progress["best_val"],
        "classifier": saved.get("classifier", "task"),
        "val_accuracy_task": saved.get("val_accuracy_task", float("nan")),
        "val_accuracy_mean": saved.get("val_accuracy_mean", float("nan")),
        "test_accuracy": float("nan"), "per_class_accuracy": [], "confusion": [],
    }
    if not job.test_rows:
        return summary
    x_test = torch.from_numpy(read_volumes(job.pool, job.test_rows))
    y_test = torch.as_tensor(job.test_labels, dtype=torch.int64)
    for key, name in (("model", "task"), ("mean", "mean")):
        model = _build(job).to(device)
        model.load_state_dict(saved[key])
        batches = _batches(x_test, y_test, np.arange(len(x_test)), job.train["batch_size"] * 2)
        result = evaluate(model, batches, job.num_classes, amp_dtype=amp_dtype)
        summary[f"test_accuracy_{name}"] = float(result["accuracy"])
        if name == summary["classifier"]:
            summary.update(
                test_accuracy=float(result["accuracy"]),
                per_class_accuracy=[float(a) for a in result["per_class_accuracy"]],
                confusion=result["confusion"],
            )
    return summary
