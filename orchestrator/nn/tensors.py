"""Small tensor helpers every network module here shares: where a model lives, volumes in the
shape the networks take, eval mode for a block, autocast only when asked. Plain PyTorch."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["device_of", "as_volumes", "eval_mode", "autocast"]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def as_volumes(x, device: torch.device) -> torch.Tensor:
    """float32 ``[B, 1, D, H, W]`` on ``device`` from a tensor or array (float16 storage ok)."""
    x = torch.as_tensor(x).to(device=device, dtype=torch.float32, non_blocking=True)
    if x.dim() == 4:
        x = x.unsqueeze(1)
    if x.dim() != 5:
        raise ValueError(f"volumes must be [B, 1, D, H, W] or [B, D, H, W], got {tuple(x.shape)}")
    return x


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None):
    """Every submodule in eval mode inside the block; each module's own flag restored after."""
    modules = [m for model in models if model is not None for m in model.modules()]
    flags = [m.training for m in modules]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """torch.autocast for ``amp_dtype`` on the device's type; nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)
