"""Fault: one scoring worker SIGKILLed mid-pass, at a fixed point: right after it has scored its
third batch, before handing it back (`CRYOAL_FAULT=score-batch#3`, orchestrator/faults.py; once
in all processes, so the restarted worker goes on). With an actor pool, Ray Data restarts the
actor and retries its batches (max_restarts / max_task_retries, on by default for
ActorPoolStrategy); with warm task workers, Ray retries the task in another worker. Either way
the pass still scores every pool row exactly once, with the same scores as an undisturbed pass."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_shape_pool
from orchestrator.config import ModelConfig, ScoreConfig, config_to_dict
from orchestrator.distributed.score import column_array, read_scores, score_pool
from orchestrator.faults import ENV, ONCE_ENV
from orchestrator.nn.checkpoint import atomic_torch_save
from orchestrator.nn.model import build_model

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]

CFG = ScoreConfig(batch_size=8, actors=2, cpus_per_actor=0.5)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_shape_pool(tmp_path_factory.mktemp("pools") / "scored", n_train=120, n_val=0,
                           n_test=0, shard_mb=0.1)


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


def score(pool, model, out: Path, warm_workers: bool):
    return score_pool(pool.path, str(model), out, strategy="ema_kl", strategy_options={},
                      exclude_rows=[5, 17], cfg=replace(CFG, warm_below_rows=10**9 if warm_workers else 0), seed=0)


@pytest.mark.parametrize("warm_workers", [True, False], ids=["warm task workers", "actor pool"])
def test_a_killed_scoring_worker_leaves_every_row_scored_exactly_once(
    ray_local, pool, tiny_model, tmp_path, monkeypatch, warm_workers
):
    reference = read_scores(score(pool, tiny_model, tmp_path / "reference", warm_workers))
    fired = tmp_path / "fired"
    monkeypatch.setenv(ENV, "score-batch#3")  # handed to the pass's actors (faults.runtime_env)
    monkeypatch.setenv(ONCE_ENV, str(fired))
    scores = read_scores(score(pool, tiny_model, tmp_path / "scores", warm_workers))

    assert fired.is_file(), "no worker reached its third batch"
    killed = int(fired.read_text())
    assert killed != os.getpid()  # a worker, not this process
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)
    rows = scores.column("row").to_pylist()
    assert len(rows) == len(set(rows)), "a row was scored twice"
    assert rows == sorted(set(range(pool.n_rows)) - {5, 17}), "a row is missing"
    assert scores.column("subtomo_id").to_pylist() == reference.column("subtomo_id").to_pylist()
    for name in ("score", "entropy", "pred"):
        np.testing.assert_allclose(column_array(scores, name), column_array(reference, name),
                                   rtol=1e-5, atol=1e-6)
