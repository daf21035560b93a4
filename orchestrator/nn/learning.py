"""Training and evaluation of T and M: loss, optimiser and schedule, one epoch, evaluation,
BatchNorm recalibration and RNG state. Plain PyTorch, no Ray.

One cycle's recipe (``orchestrator/nn/cycle.py``) calls ``train_epoch``/``evaluate``; the
scoring forward pass is ``orchestrator/nn/outputs.py``. Everything here runs as-is in a unit test.

Shape conventions: volumes ``[B, 1, D, H, W]`` (``[B, D, H, W]`` gets its channel axis added),
labels int64 ``[B]``, logits/probs ``[N, C]``, MC-dropout probs ``[N, C, K]``.
"""

from __future__ import annotations

import math
from copy import deepcopy
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.nn.augment import Augmentation, augment
from orchestrator.nn.ema import unwrap, update_mean_model
from orchestrator.nn.tensors import as_volumes, autocast, device_of, eval_mode

__all__ = [
    "DISTANCES",
    "regulariser",
    "objective",
    "OPTIMIZERS",
    "SCHEDULES",
    "make_optimizer",
    "make_scheduler",
    "lr_factor",
    "sigmoid_rampup",
    "train_epoch",
    "evaluate",
    "recalibrated",
    "seed_everything",
    "get_rng_state",
    "set_rng_state",
]


# ---------------------------------------------------------------------------------------------
# Loss


def _mse_logits(logits_t: torch.Tensor, logits_m: torch.Tensor) -> torch.Tensor:
    # Mean over batch and classes (F.mse_loss's default), so λ does not scale with C.
    return F.mse_loss(logits_t, logits_m)


def _kl(logits_t: torch.Tensor, logits_m: torch.Tensor) -> torch.Tensor:
    # KL(softmax T ‖ softmax M), summed over classes, averaged over the batch ("batchmean").
    log_p_t = F.log_softmax(logits_t, dim=1)
    log_p_m = F.log_softmax(logits_m, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_m)).sum(dim=1).mean()


DISTANCES = {"mse_logits": _mse_logits, "kl": _kl}


def regulariser(
    logits_t: torch.Tensor, logits_m: torch.Tensor, distance: str = "mse_logits"
) -> torch.Tensor:
    """D_reg(T(x), M(x)): a scalar; M's logits are detached, so only T gets gradients."""
    try:
        fn = DISTANCES[distance]
    except KeyError:
        raise ValueError(f"unknown distance {distance!r}; valid: {sorted(DISTANCES)}") from None
    return fn(logits_t.float(), logits_m.detach().float())


def objective(
    logits_t: torch.Tensor,
    logits_m: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    distance: str = "mse_logits",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(T(x), y) + lam · D_reg(T(x), M(x)); the parts come back detached (no host sync)."""
    ce = F.cross_entropy(logits_t.float(), y)
    reg = regulariser(logits_t, logits_m, distance)
    return ce + lam * reg, {"ce": ce.detach(), "reg": reg.detach()}


# ---------------------------------------------------------------------------------------------
# Optimiser


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "onecycle", "cosine", "constant")
WARMUP = 0.2  # one-cycle: fraction of the steps spent raising the lr (Smith's pct_start)


def make_optimizer(
    model: nn.Module, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
    kind: str = "sgd",
) -> torch.optim.Optimizer:
    """The paper's SGD (lr 0.1, momentum 0.9, weight decay 5e-4), or AdamW.

    AdamW decays only weights of convolutions and linear layers: decaying BatchNorm scales and
    biases towards 0 under a decoupled decay of ~0.05 shrinks the network's outputs instead of
    regularising them (the usual practice since Loshchilov & Hutter).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    raise ValueError(f"unknown optimizer {kind!r}; valid: {list(OPTIMIZERS)}")


def lr_factor(schedule: str, step: int, total_steps: int, decay_step: int | None = None,
              gamma: float = 0.1) -> float:
    """The lr at optimiser step ``step`` (0-based) as a fraction of the configured lr.

    "step": 1, then ``gamma`` from ``decay_step`` on (the paper: epoch 80 of 100); "cosine":
    half a cosine from 1 to 0; "onecycle": a linear rise from 1/25 over the first 20% of the
    steps, then half a cosine to 0 (Smith & Topin's one-cycle, without momentum cycling);
    "constant": 1.
    """
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    if schedule == "step":
        return gamma if decay_step is not None and step >= decay_step else 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "onecycle":
        if t < WARMUP:
            return 1.0 / 25 + (1.0 - 1.0 / 25) * t / WARMUP
        return 0.5 * (1.0 + math.cos(math.pi * (t - WARMUP) / (1.0 - WARMUP)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, decay_at: float | None = 0.8,
    gamma: float = 0.1, *, schedule: str = "step", steps_per_epoch: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The lr schedule over ``epochs`` × ``steps_per_epoch`` optimiser steps; call ``step()``
    after every optimiser step (``train_epoch(scheduler=...)`` does).

    "step" cuts the lr × ``gamma`` at the epoch boundary nearest ``decay_at`` of the epochs
    (epoch 80 of 100); ``decay_at=None`` keeps it constant (the paper's real-data runs).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {list(SCHEDULES)}")
    total = max(1, epochs * steps_per_epoch)
    decay_step = None if decay_at is None else max(1, round(decay_at * epochs)) * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, step, total, decay_step, gamma)
    )


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """Tarvainen & Valpola's consistency ramp-up: exp(−5(1 − t)²) for t = step / rampup_steps
    in [0, 1], then 1. A fresh T's predictions are noise, so the unlabelled term starts near 0."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step, 0), rampup_steps) / rampup_steps
    return math.exp(-5.0 * (1.0 - t) ** 2)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def _paired(batches: Iterable, unlabelled: Iterable | None):
    """(labelled batch, unlabelled x or None), one unlabelled batch per labelled step.

    A re-iterable unlabelled source (list, DataLoader) restarts when it runs out; a spent
    iterator leaves the remaining steps without an unlabelled batch.
    """
    if unlabelled is None:
        for b in batches:
            yield b, None
        return
    end = object()
    it = iter(unlabelled)
    for b in batches:
        u = next(it, end)
        if u is end:
            it = iter(unlabelled)
            u = next(it, None)
        if isinstance(u, (tuple, list)):  # (x, y) or (x,): the labels of the pool are not used
            u = u[0]
        yield b, u


def train_epoch(
    model: nn.Module,
    mean_model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    lam: float,
    distance: str = "mse_logits",
    alpha: float = 0.999,
    unlabelled_batches: Iterable | None = None,
    lam_unlabelled: float | Callable[[int], float] | None = None,
    augmentation: Augmentation | None = None,
    generator: torch.Generator | None = None,
    scheduler=None,
    amp_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    scaler: torch.amp.GradScaler | None = None,
    extra_loss: Callable | None = None,
) -> dict[str, float]:
    """One pass over ``batches`` of (x, y): step T on CE + lam·D_reg(T, M), then EMA-update M.

    ``model`` may be DDP-wrapped; ``mean_model`` is the bare M (see ``orchestrator.nn.ema``). M runs
    in eval mode, as when it scores. ``lam == 0`` with no unlabelled batches is plain
    cross-entropy: M gets no forward (the reg metric is then 0) but still follows T's weights.

    With ``augmentation`` each batch is transformed (``orchestrator.nn.augment``, draws from
    ``generator``) before T sees it. With ``unlabelled_batches`` (semi-supervised: Tarvainen &
    Valpola's mean teacher), each step also adds ``lam_unlabelled``·D_reg(T, M) on one unlabelled
    batch, which shares T's forward with the labelled batch (so BatchNorm sees both), and, when
    augmenting, M sees its own augmentation of every volume (two views, as the mean teacher
    does). ``lam_unlabelled`` is a weight or a function of the step index within this epoch
    (for a ramp-up); None means ``lam``. ``scheduler.step()`` runs after every optimiser step.
    fp16 on CUDA uses a GradScaler: pass one to keep its scale across epochs.

    ``extra_loss(x, y, logits, stages)`` (a strategy's auxiliary module trained jointly with T,
    e.g. LL4AL's loss predictor) gets the labelled part of the step: volumes as T saw them,
    labels, T's logits and T's stage outputs (``model(x, return_stages=True)``, the same
    forward); a tensor it returns is added to the loss, None adds nothing.

    Returns sample-weighted means over the labelled samples: loss, ce, reg (+ reg_unlabelled,
    + extra), and n (labelled samples) and steps.
    """
    device = torch.device(device)
    if scaler is None and amp_dtype == torch.float16 and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    if augmentation is not None and generator is None:
        raise ValueError("augmentation needs a torch.Generator (seeded, for reproducible epochs)")
    weight_u = _as_schedule(lam if lam_unlabelled is None else lam_unlabelled)
    model.train()
    mean_model.eval()
    sums = {k: torch.zeros((), device=device)
            for k in ("loss", "ce", "reg", "reg_unlabelled", "extra")}
    n = steps = 0
    for (x, y), xu in _paired(batches, unlabelled_batches):
        x = as_volumes(x, device)
        y = torch.as_tensor(y).to(device=device, dtype=torch.long, non_blocking=True)
        b = len(x)
        if xu is not None:
            x = torch.cat([x, as_volumes(xu, device)])
        x_t = x if augmentation is None else augment(x, generator, augmentation)
        # the mean teacher's second view; without unlabelled data M judges T's own input
        x_m = x_t if xu is None or augmentation is None else augment(x, generator, augmentation)
        w_u = weight_u(steps) if xu is not None else 0.0
        with autocast(device, amp_dtype):
            if extra_loss is None:
                logits_t = model(x_t)
            else:
                logits_t, stages = model(x_t, return_stages=True)
            if lam or w_u:
                with torch.no_grad():
                    logits_m = mean_model(x_m)
            else:
                logits_m = logits_t.detach()
            loss, parts = objective(logits_t[:b], logits_m[:b], y, lam, distance)
            if xu is not None:
                reg_u = regulariser(logits_t[b:], logits_m[b:], distance)
                loss = loss + w_u * reg_u
                sums["reg_unlabelled"] += reg_u.detach() * b
            if extra_loss is not None:
                extra = extra_loss(x_t[:b], y, logits_t[:b], [h[:b] for h in stages])
                if extra is not None:
                    loss = loss + extra
                    sums["extra"] += extra.detach() * b
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        update_mean_model(mean_model, model, alpha)

        sums["loss"] += loss.detach() * b
        sums["ce"] += parts["ce"] * b
        sums["reg"] += parts["reg"] * b
        n += b
        steps += 1
    if unlabelled_batches is None:
        del sums["reg_unlabelled"]
    if extra_loss is None:
        del sums["extra"]
    out = {k: (v.item() / n if n else math.nan) for k, v in sums.items()}
    return {**out, "n": n, "steps": steps}


def _as_schedule(weight: float | Callable[[int], float]) -> Callable[[int], float]:
    return weight if callable(weight) else (lambda step: float(weight))


def evaluate(
    model: nn.Module,
    batches: Iterable,
    num_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
) -> dict:
    """Accuracy, per-class accuracy (NaN for classes absent from ``batches``), mean CE, n.

    Over the first ``num_classes`` outputs: a junk output after them (``train.junk_class``) is
    not a class a particle can be right in, so the prediction is the best real class, as the
    scoring pass's is. Runs in eval mode under inference_mode on the model's device; the
    model's mode is restored. Also returns ``confusion`` (rows: true class, columns: predicted),
    as nested lists.
    """
    device = device_of(model)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = 0.0
    with torch.inference_mode(), eval_mode(model):
        for x, y in batches:
            x = as_volumes(x, device)
            y = torch.as_tensor(y).to(device=device, dtype=torch.long)
            with autocast(device, amp_dtype):
                logits = model(x)
            logits = logits[:, :num_classes].float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            pairs = (y * num_classes + logits.argmax(dim=1)).cpu()
            confusion += torch.bincount(pairs, minlength=num_classes**2).view(
                num_classes, num_classes
            )
    n = int(confusion.sum())
    per_class_n = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class = [
        (int(c) / int(k)) if k > 0 else math.nan for c, k in zip(correct, per_class_n)
    ]
    return {
        "accuracy": int(correct.sum()) / n if n else math.nan,
        "per_class_accuracy": per_class,
        "n": n,
        "loss": loss_sum / n if n else math.nan,
        "confusion": confusion.tolist(),
    }


def recalibrated(model: nn.Module, batches: Iterable) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are the exact averages over ``batches``.

    A cycle on a small labelled set takes few optimiser steps, and BatchNorm's running averages
    (momentum 0.1, starting at mean 0 / variance 1) are then still far from the statistics of
    the trained weights, so the model is much worse in eval mode than in training ("precise
    BN"). Validation, test and scoring use such a copy; the live model and the EMA are untouched.
    """
    copy = deepcopy(unwrap(model))
    norms = [m for m in copy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return copy
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over every batch below
    device = device_of(copy)
    copy.train()
    with torch.no_grad():
        for x, _ in batches:
            copy(as_volumes(x, device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return copy.eval()


# ---------------------------------------------------------------------------------------------
# Randomness


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy's global and torch's (CPU and CUDA) RNGs; return a fresh torch
    Generator seeded the same, for DataLoader shuffling and anything that takes one."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_rng_state() -> dict:
    """The python, numpy and torch RNG states, as tuples/ints/tensors only, so a checkpoint
    holding them loads with ``torch.load(weights_only=True)``."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``get_rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
