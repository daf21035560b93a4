"""A cycle's `model.pt` and the models in it: the one place that builds a model from a saved
checkpoint, and the atomic save every writer of model files uses. Plain PyTorch, no Ray.

`model.pt` (written by the Train loop's rank 0, `orchestrator/nn/cycle.py`) holds T ("model"),
M ("mean"), the epoch kept and its validation accuracies, which classifier validation chose
("classifier"), ``num_classes`` and the model config as a dict ("model_config"); with an
auxiliary, its weights ("auxiliary", and ``auxiliary_fitted`` once fitted after T).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from orchestrator.nn.model import build_model

__all__ = ["MODEL_FILE", "model_path", "build_from_config", "load_checkpoint",
           "model_from_checkpoint", "atomic_torch_save"]

MODEL_FILE = "model.pt"


def model_path(cycle_dir: str | Path) -> Path:
    """A cycle directory's model.pt."""
    return Path(cycle_dir) / MODEL_FILE


def build_from_config(model_config: dict, num_classes: int) -> nn.Module:
    """A fresh model from a ModelConfig as a dict (what CycleJob and model.pt carry)."""
    return build_model(model_config["name"], num_classes=num_classes, width=model_config["width"],
                       stem=model_config["stem"], dropout=model_config["dropout"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A model.pt as saved, its tensors on ``device``."""
    return torch.load(path, map_location=device)


def model_from_checkpoint(saved: dict, key: str = "model", device: str | torch.device = "cpu",
                          channels_last: bool = False) -> nn.Module:
    """T (``key="model"``) or M (``"mean"``) of a loaded model.pt, on ``device``, in eval mode.

    ``channels_last``: 3D channels-last (NDHWC) weights, which oneDNN's and cuDNN's 3D
    convolutions run 1.1–1.5× faster (bench/throughput.py): what the scoring actors hold.
    """
    model = build_from_config(saved["model_config"], saved["num_classes"])
    model.load_state_dict(saved[key])
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    return model.to(device).eval()


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync'd, then renamed over it: a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
