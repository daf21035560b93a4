"""Fault: one scoring actor SIGKILLed mid-pass. Ray Data restarts the actor and retries its
batches (max_restarts / max_task_retries, on by default for ActorPoolStrategy); the pass still
scores every pool row exactly once, with the same scores as an undisturbed pass."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import ModelConfig, ScoreConfig, config_to_dict
from orchestrator.model import build_model
from orchestrator.score import column_array, read_scores, score_pool
from orchestrator.train import atomic_torch_save
from conftest import make_shape_pool
from faultutil import cpu_seconds, descendants

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]

CFG = ScoreConfig(batch_size=8, actors=2, cpus_per_actor=0.5)


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory):
    return make_shape_pool(tmp_path_factory.mktemp("pools") / "big", n_train=1200, n_val=0,
                           n_test=0, shard_mb=1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    cfg = config_to_dict(ModelConfig(width=4, stem="small"))
    torch.manual_seed(0)
    task = build_model(cfg["name"], num_classes=3, width=4, stem="small", dropout=0.0)
    torch.manual_seed(1)
    mean = build_model(cfg["name"], num_classes=3, width=4, stem="small", dropout=0.0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    atomic_torch_save({"model": task.state_dict(), "mean": mean.state_dict(), "epoch": 0,
                       "val_accuracy": 0.0, "num_classes": 3, "model_config": cfg}, path)
    return path


def scoring_actors() -> list[int]:
    return sorted(pid for pid, cmd in descendants(os.getpid()).items()
                  if cmd.startswith("ray::") and ("MapWorker" in cmd or "PoolScorer" in cmd))


def score(pool, model, out: Path):
    return score_pool(pool.path, str(model), out, strategy="ema_kl", strategy_options={},
                      exclude_rows=[5, 17], cfg=CFG, seed=0)


def test_a_killed_scoring_actor_leaves_every_row_scored_exactly_once(
    ray_local, big_pool, tiny_model, tmp_path
):
    reference = read_scores(score(big_pool, tiny_model, tmp_path / "reference"))
    out = tmp_path / "scores"
    killed: list[int] = []

    def kill_an_actor():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not out.exists():
            # the busiest actor, once it has scored for a while: its batches are in flight
            busy = [pid for pid in scoring_actors() if cpu_seconds(pid) > 6.0]
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_actor, daemon=True)
    killer.start()
    score(big_pool, tiny_model, out)
    killer.join(timeout=5)

    assert killed, "the pass ended before an actor could be killed mid-pass"
    scores = read_scores(out)
    rows = scores.column("row").to_pylist()
    expected = sorted(set(range(big_pool.n_rows)) - {5, 17})
    assert len(rows) == len(set(rows)), "a row was scored twice"
    assert rows == expected, "a row is missing"
    assert scores.column("subtomo_id").to_pylist() == reference.column("subtomo_id").to_pylist()
    for name in ("score", "ema_kl", "entropy", "margin", "pred"):
        np.testing.assert_allclose(column_array(scores, name), column_array(reference, name),
                                   rtol=1e-5, atol=1e-6)
