"""The scoring actor class, run in this process (no Ray)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from actors.scorer import PoolScorer
from orchestrator.data.pool import decode_volumes, iter_batches
from orchestrator.nn.ema import init_mean_model
from orchestrator.nn.model import build_model
from orchestrator.nn.outputs import forward_outputs

COLUMNS = ["row", "subtomo_id", "volume"]


def _saved_models(path, num_classes, **extra):
    torch.manual_seed(0)
    model = build_model("resnet10", num_classes=num_classes, width=4, stem="full")
    mean = init_mean_model(model)
    with torch.no_grad():
        for p in mean.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "mean": mean.state_dict(), "num_classes": num_classes,
                "model_config": {"name": "resnet10", "width": 4, "stem": "full", "dropout": 0.0},
                **extra}, path)
    return model.eval(), mean.eval()


def _first_batch(pool):
    batch = next(iter_batches(pool.path, columns=COLUMNS, batch_rows=16))
    return {c: batch.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}


def test_the_scorer_holds_both_models_channels_last_for_faster_3d_convolutions(shape_pool, tmp_path):
    _saved_models(tmp_path / "model.pt", shape_pool.num_classes)
    scorer = PoolScorer(str(tmp_path / "model.pt"), shape_pool.path, "ema_kl", {})
    for net in (scorer.model, scorer.mean):
        conv_weights = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
        assert conv_weights and all(
            w.is_contiguous(memory_format=torch.channels_last_3d) for w in conv_weights)


def test_channels_last_scores_equal_the_default_layouts(shape_pool, tmp_path):
    model, mean = _saved_models(tmp_path / "model.pt", shape_pool.num_classes)
    scorer = PoolScorer(str(tmp_path / "model.pt"), shape_pool.path, "ema_kl", {})
    batch = _first_batch(shape_pool)
    scored = scorer(batch)
    volumes = torch.from_numpy(decode_volumes(batch["volume"], shape_pool))
    expected = forward_outputs(model, mean, volumes, {"probs", "mean_probs"})
    log_p, log_q = np.log(expected["probs"]), np.log(expected["mean_probs"])
    kl = (expected["probs"] * (log_p - log_q)).sum(axis=1)
    np.testing.assert_allclose(scored["score"], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(scored["probs"], expected["probs"], rtol=1e-4, atol=1e-6)


def test_predictions_come_from_the_mean_model_when_training_chose_it(shape_pool, tmp_path):
    model, mean = _saved_models(tmp_path / "model.pt", shape_pool.num_classes, classifier="mean")
    scorer = PoolScorer(str(tmp_path / "model.pt"), shape_pool.path, "ema_kl", {})
    batch = _first_batch(shape_pool)
    scored = scorer(batch)
    volumes = torch.from_numpy(decode_volumes(batch["volume"], shape_pool))
    expected = forward_outputs(model, mean, volumes, {"probs", "mean_probs"})
    np.testing.assert_allclose(scored["probs"], expected["mean_probs"], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(scored["pred"], expected["mean_probs"].argmax(axis=1))
    assert not np.allclose(expected["probs"], expected["mean_probs"], rtol=1e-4, atol=1e-6)
    # the reported entropy, which the cycle's mean uncertainty reads, is that prediction's too
    shown = expected["mean_probs"]
    np.testing.assert_allclose(scored["entropy"], -(shown * np.log(shown)).sum(axis=1), rtol=1e-4)


def test_a_strategy_that_does_not_read_m_neither_loads_nor_runs_it(shape_pool, tmp_path, monkeypatch):
    from orchestrator.nn import outputs

    model, _ = _saved_models(tmp_path / "model.pt", shape_pool.num_classes)
    asked = []
    real = outputs.forward_outputs
    monkeypatch.setattr("actors.scorer.forward_outputs", lambda *a, **kw: asked.append(set(a[3])) or real(*a, **kw))
    scorer = PoolScorer(str(tmp_path / "model.pt"), shape_pool.path, "entropy", {})
    scored = scorer(_first_batch(shape_pool))
    assert scorer.mean is None and asked == [{"probs"}]
    assert set(scored) == {"row", "subtomo_id", "pred", "pred_prob", "probs", "entropy", "score"}
    np.testing.assert_allclose(scored["score"], scored["entropy"], rtol=1e-6)


def test_m_is_loaded_for_the_prediction_when_training_chose_it_whatever_the_strategy(shape_pool, tmp_path):
    _saved_models(tmp_path / "model.pt", shape_pool.num_classes, classifier="mean")
    scorer = PoolScorer(str(tmp_path / "model.pt"), shape_pool.path, "random", {})
    assert scorer.mean is not None and scorer.needs == {"probs", "mean_probs"}


def test_a_warm_worker_keeps_its_scorer_between_batches_and_passes(shape_pool, tmp_path, monkeypatch):
    from actors import scorer as module

    built = []
    monkeypatch.setattr(module, "_warm", {})
    monkeypatch.setattr(module, "PoolScorer", lambda **kw: built.append(kw) or PoolScorer(**kw))
    _saved_models(tmp_path / "model.pt", shape_pool.num_classes)
    kwargs = {"model_path": str(tmp_path / "model.pt"), "pool_path": shape_pool.path,
              "strategy": "ema_kl", "strategy_options": {}}
    batch = _first_batch(shape_pool)
    first = module.score_batch(batch, **kwargs)
    again = module.score_batch(batch, **kwargs)
    assert len(built) == 1  # the second batch found the scorer built
    np.testing.assert_array_equal(first["score"], again["score"])
    module.score_batch(batch, **{**kwargs, "strategy": "entropy"})
    assert len(built) == 2 and len(module._warm) == 1  # other settings: a new one, the old dropped


def test_a_warm_worker_loads_a_rewritten_model_file(shape_pool, tmp_path, monkeypatch):
    from actors import scorer as module

    monkeypatch.setattr(module, "_warm", {})
    path = tmp_path / "model.pt"
    _saved_models(path, shape_pool.num_classes)
    kwargs = {"model_path": str(path), "pool_path": shape_pool.path, "strategy": "entropy",
              "strategy_options": {}}
    batch = _first_batch(shape_pool)
    before = module.score_batch(batch, **kwargs)
    saved = torch.load(path, weights_only=False)  # the same cycle re-trained: other weights
    saved["model"] = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in saved["model"].items()}
    torch.save(saved, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later stamp, however fast
    after = module.score_batch(batch, **kwargs)
    assert not np.allclose(before["probs"], after["probs"])
    np.testing.assert_allclose(after["probs"], PoolScorer(**kwargs)(batch)["probs"], rtol=1e-5)
