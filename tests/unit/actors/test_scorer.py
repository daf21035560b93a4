"""The scoring actor class, run in this process (no Ray)."""

from __future__ import annotations

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
