"""One cycle's training recipe on one worker, in plain PyTorch: what the Ray Train loop runs.

``Cycle`` holds a cycle's state on one rank and does its steps; ``orchestrator/distributed/
train.py`` runs it on Ray Train (DDP, checkpoints, restarts), and a unit test runs it as is.

- The data (:class:`CycleData`): the cycle's labelled and validation volumes come from the
  node's shared cache (the first worker of a node reads them from the pool, the others map its
  file, and the validation split stays there across cycles); for semi-supervised training each
  worker reads the unlabelled ones into a cache of its own (``orchestrator/nn/cycle_volumes.py``).
  Each batch is gathered from them as float32, so a worker's memory follows the batch, not the
  labels.
- How long it trains and when it validates (:func:`cycle_plan`): ``train.epochs``, or more for a
  small labelled set (``min_steps``), validation over the second half, checkpoints after every
  validation and at least every eighth of the cycle.
- Each epoch, each rank takes its slice of the epoch's seeded order (class-balanced when the
  labelled classes are unequal), augments each batch in ways that keep the missing wedge, and
  steps T with the configured optimiser and per-step lr schedule; M follows T's weights
  (``orchestrator/nn/ema.py``). With semi-supervised training, one unlabelled batch a step
  from every unlabelled volume in turn, two augmented views, a ramped-up weight.
- At each validation T and M are both scored on the validation split (BatchNorm statistics
  recomputed on a fixed labelled subset: "precise BN"), and the epoch whose chosen classifier
  (T, M, or the better of the two) validates best is kept as `model.pt`; the test split is only
  reported, for both models, at the end.
- A strategy's auxiliary (named in the job, ``orchestrator/nn/auxiliary.py``): one with a joint
  loss trains in T's steps (its parameters in T's optimiser, its state in the checkpoint and in
  `model.pt`); one fitted after T is fitted once by rank 0 with the kept T, the labelled volumes
  and the campaign's sample of unlabelled ones (``auxiliary_fitted`` marks that done).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from orchestrator.nn.augment import Augmentation
from orchestrator.nn.auxiliary import make_auxiliary
from orchestrator.nn.checkpoint import (
    atomic_torch_save,
    build_from_config,
    load_checkpoint,
    model_from_checkpoint,
    model_path,
)
from orchestrator.nn.ema import init_mean_model, unwrap
from orchestrator.nn.learning import (
    evaluate,
    get_rng_state,
    make_optimizer,
    make_scheduler,
    recalibrated,
    set_rng_state,
    sigmoid_rampup,
    train_epoch,
)
from orchestrator.nn.cycle_volumes import Volumes, cached_volumes, shared_cached_volumes

__all__ = ["AMP_DTYPES", "CycleJob", "CyclePlan", "cycle_plan", "CycleData", "Cycle",
           "choose_classifier", "step_batches", "unlabelled_indices"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CycleJob:
    """Everything one cycle's training needs; plain data, so it travels to every worker."""

    pool: str
    out_dir: str  # the cycle directory: model.pt and the Ray Train run go here
    num_classes: int  # the real classes; with junk_class the model has one output more
    train_rows: list[int]
    train_labels: list[int]
    val_rows: list[int] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)
    test_rows: list[int] = field(default_factory=list)
    test_labels: list[int] = field(default_factory=list)
    unlabelled_rows: list[int] = field(default_factory=list)  # semi-supervised batches
    mean_model_path: str | None = None  # the previous cycle's model.pt, whose M carries over
    seed: int = 0
    model: dict = field(default_factory=dict)  # ModelConfig as a dict
    train: dict = field(default_factory=dict)  # TrainConfig as a dict, as the strategy trains
    # the strategy's auxiliary (its Training declaration) and the rows it is fitted on
    auxiliary: str | None = None
    auxiliary_options: dict = field(default_factory=dict)
    auxiliary_rows: list[int] = field(default_factory=list)
    junk_class: bool = False  # train_labels may hold num_classes: "not a particle"

    @property
    def outputs(self) -> int:
        """The model's outputs: the classes, and junk after them with ``junk_class``."""
        return self.num_classes + int(self.junk_class)


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
    """The volumes a worker trains on, in the pool's dtype on its node's disk: labelled (train)
    and validation from the node's shared cache (:func:`shared_cached_volumes`), and for
    semi-supervised training the unlabelled ones, read into a cache of its own
    (:func:`cached_volumes`). ``close()`` lets them go."""

    x_train: Volumes
    y_train: torch.Tensor
    x_val: Volumes | None
    y_val: torch.Tensor
    x_unlabelled: Volumes | None
    calibration_order: np.ndarray  # the labelled positions that set BatchNorm statistics
    batch_size: int  # of a calibration batch

    @classmethod
    def read(cls, job: CycleJob) -> "CycleData":
        tcfg = job.train
        y_train = torch.as_tensor(job.train_labels, dtype=torch.int64)
        semi = tcfg["semi_supervised"] and job.unlabelled_rows
        # BatchNorm statistics for evaluation from a fixed subset: the same for T and M, and
        # cheap when the labelled set is large (a few hundred volumes pin the statistics down)
        order = np.random.default_rng([job.seed, 17]).permutation(len(y_train))
        order = np.sort(order[:int(tcfg["calibration_samples"])])
        with contextlib.ExitStack() as cached:  # a failed read frees the caches before it
            def cache(read, rows):
                return cached.enter_context(read(job.pool, rows))

            x_train = cache(shared_cached_volumes, job.train_rows)
            x_val = cache(shared_cached_volumes, job.val_rows) if job.val_rows else None
            x_unlabelled = cache(cached_volumes, job.unlabelled_rows) if semi else None
            cached.pop_all()  # read: the cycle closes them (close())
        return cls(x_train, y_train, x_val, torch.as_tensor(job.val_labels, dtype=torch.int64),
                   x_unlabelled, order, int(tcfg["batch_size"]))

    def calibration(self):
        """(x, y) batches of the calibration volumes, gathered afresh at each call, in sizes that
        differ by one at most (97 in batches of up to 32: 25, 24, 24, 24): a last batch of one
        volume stops BatchNorm in training mode, whose statistics these batches set."""
        steps = math.ceil(len(self.calibration_order) / self.batch_size)
        return _gathered(self.x_train, self.y_train, step_batches(self.calibration_order, steps))

    def close(self) -> None:
        for volumes in (self.x_train, self.x_val, self.x_unlabelled):
            if volumes is not None:
                volumes.close()


class Cycle:
    """One cycle's training on one rank of ``world``: its data, plan, models, optimiser and
    progress, and the steps the Train loop calls (``train_epoch``, ``validate``, ``finish``).

    ``wrap`` places a freshly built module on its device and wraps it for data parallelism
    (Ray Train's ``prepare_model``; in a unit test, ``.to(device)``). T is re-initialised every
    cycle identically on every rank (seeded); M is built after wrapping, from the weights the
    ranks share, and carries over from the previous cycle's model.pt unless reset.
    """

    def __init__(self, job: CycleJob, *, rank: int = 0, world: int = 1,
                 device: torch.device = torch.device("cpu"),
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        tcfg = job.train
        wrap = wrap or (lambda module: module.to(device))
        self.job, self.rank, self.world, self.device = job, rank, world, torch.device(device)
        self.amp_dtype = AMP_DTYPES[tcfg["amp"]] if self.device.type == "cuda" else None
        self.data = CycleData.read(job)
        try:
            self._build(wrap)
        except BaseException:
            self.close()
            raise

    def _build(self, wrap) -> None:
        """The plan, T, M, the auxiliary, optimiser, scheduler and augmentation."""
        job, tcfg = self.job, self.job.train
        self.plan = cycle_plan(len(self.data.y_train), tcfg, self.world)
        self.auxiliary = make_auxiliary(job.auxiliary, job.auxiliary_options)
        self.model, self.mean, self.aux = self._build_models(wrap)
        trained = self.model if self.aux is None else torch.nn.ModuleList([self.model, self.aux])
        self.optimizer = make_optimizer(trained, lr=tcfg["lr"], momentum=tcfg["momentum"],
                                        weight_decay=tcfg["weight_decay"], kind=tcfg["optimizer"])
        self.scheduler = make_scheduler(self.optimizer, self.plan.epochs, decay_at=tcfg["decay_at"],
                                        schedule=tcfg["schedule"],
                                        steps_per_epoch=self.plan.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype is torch.float16 else None
        augmentation = Augmentation(shift=tcfg["augment_shift"], intensity=tcfg["augment_intensity"])
        self.augmentation = augmentation if tcfg["augment"] else None
        self.progress = {"epoch": 0, "best_val": -1.0, "best_epoch": -1}

    def close(self) -> None:
        """Free the cycle's volume caches (their disk): after the cycle, or when it fails."""
        self.data.close()

    def __enter__(self) -> "Cycle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build_models(self, wrap):
        """T, M, and the strategy's jointly trained auxiliary if it has one."""
        job, tcfg = self.job, self.job.train
        torch.manual_seed(job.seed)
        model = build_from_config(job.model, job.outputs)
        if tcfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last_3d)
        model = wrap(model)
        mean = init_mean_model(model)  # after wrapping, so M starts identical on every rank
        if job.mean_model_path and not tcfg["reset_mean_model"]:
            mean.load_state_dict(load_checkpoint(job.mean_model_path, self.device)["mean"])
        if self.auxiliary is None or not self.auxiliary.joint:
            return model, mean, None
        with torch.random.fork_rng(devices=[]):  # T trains as it would without it
            torch.manual_seed(job.seed + 1)
            aux = self.auxiliary.build(unwrap(model), job.outputs)
        return model, mean, wrap(aux)

    # -- the steps ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """One epoch of this rank's batches; its loss terms and duration."""
        tcfg, plan, started = self.job.train, self.plan, time.perf_counter()
        order = epoch_order(self.data.y_train, self.job.seed, epoch, self.rank, self.world,
                            tcfg["balanced"])
        stats = train_epoch(
            self.model, self.mean, _gathered(self.data.x_train, self.data.y_train,
                                             step_batches(order, plan.steps_per_epoch)), self.optimizer,
            lam=tcfg["lam"], distance=tcfg["regulariser"], alpha=tcfg["ema_alpha"],
            unlabelled_batches=self._unlabelled_batches(epoch),
            lam_unlabelled=self._unlabelled_weight(epoch), augmentation=self.augmentation,
            generator=torch.Generator().manual_seed(_seed(self.job.seed, 5, epoch, self.rank)),
            scheduler=self.scheduler, amp_dtype=self.amp_dtype, device=self.device,
            scaler=self.scaler, extra_loss=self._extra_loss(epoch),
        )
        self.progress["epoch"] = epoch + 1
        return {"epoch": epoch, "loss": stats["loss"], "ce": stats["ce"], "reg": stats["reg"],
                "seconds": time.perf_counter() - started}

    def validate(self, epoch: int) -> dict:
        """Validate T and M (each with BatchNorm statistics recomputed on the calibration set);
        when the chosen classifier beats the best so far, rank 0 saves this epoch's pair."""
        data = self.data
        task_eval = recalibrated(self.model, data.calibration())
        mean_eval = recalibrated(self.mean, data.calibration())
        val_task = self._accuracy(task_eval, data.x_val, data.y_val)
        val_mean = self._accuracy(mean_eval, data.x_val, data.y_val)
        classifier, score = choose_classifier(self.job.train["classifier"], val_task, val_mean)
        if data.x_val is None or score > self.progress["best_val"]:
            self.progress.update(best_val=score, best_epoch=epoch)
            if self.rank == 0:
                self._save_model(task_eval, mean_eval, epoch, classifier=classifier,
                                 val_task=val_task, val_mean=val_mean)
        return {"val_task": val_task, "val_mean": val_mean, "val_accuracy": score}

    def finish(self) -> dict:
        """Rank 0, after the last epoch: the auxiliary fitted after T (if any), and the summary
        of the kept epoch (validation and test accuracies), from model.pt read once."""
        saved = load_checkpoint(model_path(self.job.out_dir), self.device)
        if self.auxiliary is not None:
            self._fit_auxiliary(saved)
        return {**self._summary(saved), "epochs": self.plan.epochs,
                "steps": self.plan.epochs * self.plan.steps_per_epoch}

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a restarted worker resumes from: T, M, the auxiliary, optimiser, scheduler, RNG
        state and progress."""
        return {
            "model": unwrap(self.model).state_dict(), "mean": self.mean.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": get_rng_state(), "progress": dict(self.progress),
            **({"auxiliary": unwrap(self.aux).state_dict()} if self.aux is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.mean.load_state_dict(state["mean"])
        if self.aux is not None:
            unwrap(self.aux).load_state_dict(state["auxiliary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.progress = state["progress"]

    # -- parts --------------------------------------------------------------------------------
    def _extra_loss(self, epoch: int):
        if self.aux is None:
            return None
        auxiliary, aux, model = self.auxiliary, self.aux, self.model

        def extra_loss(x, y, logits, stages, progress):
            return auxiliary.joint_loss(aux, model, x, y, logits, stages, progress)

        return partial(extra_loss, progress=epoch / self.plan.epochs)

    def _unlabelled_batches(self, epoch: int):
        """One unlabelled batch per step, read in turn from a seeded order of every unlabelled
        volume that continues across epochs (reshuffled at each pass), so a cycle sees all of
        them, not a fixed sample; None without semi-supervised training."""
        x = self.data.x_unlabelled
        if x is None:
            return None
        first, b = epoch * self.plan.steps_per_epoch, self.plan.rank_batch
        return (x.gather(unlabelled_indices(len(x), b, self.job.seed, step, self.rank, self.world))
                for step in range(first, first + self.plan.steps_per_epoch))

    def _unlabelled_weight(self, epoch: int):
        """The unlabelled term's weight at each step of this epoch: lam_unlabelled after a
        sigmoid ramp-up over the first ``rampup`` of the cycle's steps."""
        tcfg, plan = self.job.train, self.plan
        rampup_steps = round(tcfg["rampup"] * plan.epochs * plan.steps_per_epoch)
        first = epoch * plan.steps_per_epoch
        return lambda i: tcfg["lam_unlabelled"] * sigmoid_rampup(first + i, rampup_steps)

    def _accuracy(self, model, x: Volumes | None, y) -> float:
        if x is None:
            return float("nan")
        return float(self._evaluate(model, x, y)["accuracy"])

    def _evaluate(self, model, x: Volumes, y) -> dict:
        batches = _batches(x, y, np.arange(len(x)), self.job.train["batch_size"] * 2)
        return evaluate(model, batches, self.job.num_classes, amp_dtype=self.amp_dtype)

    def _save_model(self, model, mean, epoch: int, *, classifier: str, val_task: float,
                    val_mean: float) -> None:
        job = self.job
        state = {
            "model": unwrap(model).state_dict(), "mean": mean.state_dict(), "epoch": epoch,
            "classifier": classifier, "val_accuracy_task": val_task, "val_accuracy_mean": val_mean,
            "num_classes": job.outputs, "junk_class": job.junk_class, "model_config": job.model,
        }
        if self.aux is not None:  # the jointly trained auxiliary of the same epoch as T
            state["auxiliary"] = unwrap(self.aux).state_dict()
        atomic_torch_save(state, model_path(job.out_dir))

    def _fit_auxiliary(self, saved: dict) -> None:
        """``fit_after`` with the kept T; model.pt (and ``saved``) gain "auxiliary". Seeded: a
        re-run fits the same module from the same start, and a fitted one is not fitted again."""
        job, device = self.job, self.device
        if saved.get("auxiliary_fitted"):
            return
        model = model_from_checkpoint(saved, "model", device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed + 1)
            aux = self.auxiliary.build(model, job.outputs)
        if aux is None:  # nothing to fit or keep (noise stability reads T itself)
            return
        if "auxiliary" in saved:
            aux.load_state_dict(saved["auxiliary"])
        aux.to(device)
        with cached_volumes(job.pool, job.auxiliary_rows) as x_unlabelled:
            self.auxiliary.fit_after(aux, model, self.data.x_train, x_unlabelled, device=device,
                                     seed=job.seed)
        saved.update(auxiliary=aux.state_dict(), auxiliary_fitted=True)
        atomic_torch_save(saved, model_path(job.out_dir))

    def _summary(self, saved: dict) -> dict:
        """The kept epoch's accuracies. ``test_accuracy`` is the chosen classifier's (T or M,
        chosen on validation); both models' are kept too, to measure which is better."""
        job = self.job
        summary = {
            "best_epoch": self.progress["best_epoch"], "val_accuracy": self.progress["best_val"],
            "classifier": saved.get("classifier", "task"),
            "val_accuracy_task": saved.get("val_accuracy_task", float("nan")),
            "val_accuracy_mean": saved.get("val_accuracy_mean", float("nan")),
            "test_accuracy": float("nan"), "per_class_accuracy": [], "confusion": [],
        }
        if not job.test_rows:
            return summary
        y_test = torch.as_tensor(job.test_labels, dtype=torch.int64)
        with shared_cached_volumes(job.pool, job.test_rows) as x_test:
            results = {name: self._evaluate(model_from_checkpoint(saved, key, self.device),
                                            x_test, y_test)
                       for key, name in (("model", "task"), ("mean", "mean"))}
        for name, result in results.items():
            summary[f"test_accuracy_{name}"] = float(result["accuracy"])
            if name == summary["classifier"]:
                summary.update(
                    test_accuracy=float(result["accuracy"]),
                    per_class_accuracy=[float(a) for a in result["per_class_accuracy"]],
                    confusion=result["confusion"],
                )
        return summary


def choose_classifier(rule: str, val_task: float, val_mean: float) -> tuple[str, float]:
    """Which of T and M a cycle reports, and its validation accuracy. "best" takes M only when
    it validates strictly better (T on ties: it is what the selection strategies score)."""
    if rule == "task" or (rule == "best" and not val_mean > val_task):
        return "task", val_task
    if rule in ("mean", "best"):
        return "mean", val_mean
    raise ValueError(f"classifier {rule!r}: valid are task, mean, best")


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


def epoch_order(labels: torch.Tensor, seed: int, epoch: int, rank: int, world: int,
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


def step_batches(order: np.ndarray, steps: int) -> list[np.ndarray]:
    """An epoch's order cut into ``steps`` batches whose sizes differ by one at most: 98 labels
    in 4 batches of up to 32 are 25, 25, 24, 24, not 32, 32, 32 and a step on 2 volumes, whose
    gradient and BatchNorm statistics are noise at the one-cycle schedule's full rate (each
    epoch's last step at 5% of a SHREC'21 train split was such a step: docs/TRAINING.md)."""
    return np.array_split(order, steps) if len(order) else []


def _gathered(x: Volumes, y: torch.Tensor, batches: list[np.ndarray]):
    """(volumes, labels) of each batch of positions, gathered when reached."""
    for positions in batches:
        index = torch.from_numpy(positions)
        yield x.gather(index), y[index]


def _batches(x: Volumes, y: torch.Tensor | None, order: np.ndarray, batch_size: int):
    """(volumes, labels) at ``order``, ``batch_size`` at a time, each gathered when reached."""
    for start in range(0, len(order), batch_size):
        index = torch.from_numpy(order[start:start + batch_size])
        yield x.gather(index), (None if y is None else y[index])


def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**62))
