"""Watching a cycle's training from outside, for the tests of the mean model and of a worker
killed mid-cycle. The production Train loop has no hook for this: :func:`recording_loop` runs
the real loop with the EMA update that follows every optimiser step wrapped (``train_epoch``
looks ``update_mean_model`` up in ``orchestrator.nn.learning`` at each step), so what it
records is exactly what M was updated with. In ``OUT_DIR/trajectory/``:

- ``mean_initial.pt``: M before its first update (rank 0, first attempt);
- ``t_steps.pt``: T's state after every optimiser step of the last attempt (rank 0);
- ``mean_rank{r}.pt``: M of rank r when its loop ended.

Ray Train workers cannot import this file, so tests pickle it by value (:func:`loop`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def recording_loop(config: dict):
    import ray.train
    import torch

    from orchestrator.distributed.train import train_loop_per_worker
    from orchestrator.nn import learning
    from orchestrator.nn.ema import unwrap

    out = Path(config["out_dir"]) / "trajectory"
    out.mkdir(parents=True, exist_ok=True)
    rank = ray.train.get_context().get_world_rank()
    real = learning.update_mean_model
    steps: list[dict] = []
    seen: dict = {}

    def recording_update(mean, model, alpha):
        if not seen and rank == 0 and not (out / "mean_initial.pt").exists():
            torch.save(mean.state_dict(), out / "mean_initial.pt")
        seen["mean"] = mean
        real(mean, model, alpha)
        if rank == 0:
            steps.append({k: v.detach().clone() for k, v in unwrap(model).state_dict().items()})

    learning.update_mean_model = recording_update
    try:
        return train_loop_per_worker(config)
    finally:
        learning.update_mean_model = real
        if "mean" in seen:
            torch.save(seen["mean"].state_dict(), out / f"mean_rank{rank}.pt")
        if rank == 0:
            torch.save(steps, out / "t_steps.pt")


def loop():
    """recording_loop, made picklable by value for Ray Train's workers."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return recording_loop
