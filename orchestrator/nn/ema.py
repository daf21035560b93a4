"""The mean model M: an exponential moving average of the task model T's weights.

θ_M ← α·θ_M + (1−α)·θ_T after every optimiser step (α = 0.999 in the paper); M is never trained
by gradients. Follows timm's ModelEma: floating tensors (parameters *and* float buffers such as
BatchNorm running statistics) are lerped, integer buffers (``num_batches_tracked``) are copied.

Where EMA goes wrong under DDP, and how this module avoids it:

- Build M *after* the model is placed on its device and wrapped (Ray Train's ``prepare_model``),
  i.e. from the weights DDP has broadcast from rank 0. Built from each rank's own random init
  before the broadcast, the ranks' Ms differ and never converge (measured gap 0.35).
- Update M on *every* rank after *every* ``optimizer.step()``. DDP keeps T's *parameters*
  identical across ranks, so identical updates keep M's parameters identical with no
  communication; checkpoint M from rank 0 only.
- T's BatchNorm running statistics are *not* identical across ranks after a step: each rank's
  forward updated them from its own shard (DDP only re-broadcasts rank 0's buffers at the start
  of the next forward). Lerping them as they are lets M's buffers drift apart across ranks
  (measured 7e-3 after 3 steps on 2 ranks). So for a ``DistributedDataParallel`` model with
  ``broadcast_buffers`` on, ``update_mean_model`` first broadcasts T's buffers from the group's
  first rank (what DDP's next forward would do anyway; one small broadcast per dtype), which
  makes it a collective: every rank must call it, as above.
- Pass the wrapped model in freely: ``.module`` is unwrapped here, so M's state-dict keys have no
  ``module.`` prefix and the checkpoint loads into a bare model.

Each active-learning cycle re-initialises T while M carries over; ``reset_mean_model`` is there
for the variant that restarts M from T instead.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap", "init_mean_model", "update_mean_model", "reset_mean_model"]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP (or any ``.module``-holding) wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def init_mean_model(model: nn.Module) -> nn.Module:
    """A deep copy of (unwrapped) ``model`` in eval mode whose parameters need no gradient."""
    mean = copy.deepcopy(unwrap(model))
    mean.eval()
    for p in mean.parameters():
        p.requires_grad_(False)
    return mean


def _paired_tensors(mean: nn.Module, model: nn.Module):
    # state_dict() tensors share storage with the modules' own, so in-place ops update them.
    m_sd = mean.state_dict()
    t_sd = unwrap(model).state_dict()
    if m_sd.keys() != t_sd.keys():
        missing = sorted(set(t_sd) ^ set(m_sd))[:5]
        raise ValueError(f"mean model and model differ in state-dict keys, e.g. {missing}")
    return [(m_sd[k], t_sd[k]) for k in m_sd]


def _broadcast_buffers_like_ddp(model: nn.Module) -> None:
    """Give T's buffers rank 0's values on every rank, as DDP's next forward would."""
    if not (
        isinstance(model, DistributedDataParallel)
        and model.broadcast_buffers
        and dist.is_available()
        and dist.is_initialized()
    ):
        return
    group = getattr(model, "process_group", None)
    if dist.get_world_size(group) < 2:
        return
    src = dist.get_global_rank(group, 0) if group is not None else 0
    buffers = list(model.module.buffers())
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        same = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.reshape(-1) for b in same])
        dist.broadcast(flat, src=src, group=group)
        for b, v in zip(same, flat.split([b.numel() for b in same])):
            b.copy_(v.view_as(b))


@torch.no_grad()
def update_mean_model(mean: nn.Module, model: nn.Module, alpha: float) -> None:
    """In place: float tensors of ``mean`` ← alpha·mean + (1−alpha)·model; integer ones copied.

    ``model`` may be DDP-wrapped. Call on every rank after every ``optimizer.step()``: for a
    multi-rank DDP model this is a collective (T's buffers are broadcast from rank 0 first).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _broadcast_buffers_like_ddp(model)
    for m, t in _paired_tensors(mean, model):
        t = t.to(device=m.device, dtype=m.dtype)
        if m.is_floating_point():
            m.lerp_(t, 1.0 - alpha)
        else:
            m.copy_(t)


@torch.no_grad()
def reset_mean_model(mean: nn.Module, model: nn.Module) -> None:
    """In place: make ``mean`` an exact copy of ``model``'s weights and buffers (alpha = 0)."""
    for m, t in _paired_tensors(mean, model):
        m.copy_(t)
