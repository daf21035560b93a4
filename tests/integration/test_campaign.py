"""The EMA-KL campaign end to end on a local Ray: Train with 2 workers, Data with 2 actors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import trajectory
from orchestrator.al.labels import LabelLedger
from orchestrator.campaign.labelled import PoolView
from orchestrator.campaign.loop import Campaign
from orchestrator.config import ModelConfig, ScoreConfig, TrainConfig, config_to_dict, load_config
from orchestrator.data.pool import read_volumes
from orchestrator.distributed.score import column_array, read_scores, score_pool
from orchestrator.distributed.train import run_training
from orchestrator.nn.checkpoint import model_from_checkpoint
from orchestrator.nn.cycle import CycleJob
from orchestrator.nn.learning import evaluate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "model.width=4", "model.stem=small", "train.epochs=2", "train.min_steps=0", "train.batch_size=8", "train.num_workers=2",
    "score.batch_size=16", "score.actors=2", "budget.counts=[12, 18]", "strategy.name=ema_kl",
]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_campaign(ray_local, shape_pool, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("campaign")
    cfg = load_config(None, TINY + [f"data.pool={shape_pool.path}"])
    state = Campaign(cfg, run_dir, shape_pool).run()
    return run_dir, state


def test_the_labelled_set_grows_by_exactly_each_cycles_budget(finished_campaign):
    run_dir, state = finished_campaign
    assert [c["labelled"] for c in state["cycles"]] == [12, 18]
    cycles = [int(r["cycle"]) for r in read_csv(run_dir / "labels.csv")]
    assert [cycles.count(0), cycles.count(1)] == [12, 6]


def test_no_subtomogram_is_queried_twice(finished_campaign):
    run_dir, _ = finished_campaign
    ids = [r["subtomo_id"] for r in read_csv(run_dir / "labels.csv")]
    assert len(ids) == len(set(ids))


def test_only_train_split_subtomograms_are_queried(finished_campaign):
    run_dir, _ = finished_campaign
    ids = [r["subtomo_id"] for r in read_csv(run_dir / "labels.csv")]
    assert all(i.startswith("train-") for i in ids)


def test_the_scoring_pass_skips_labelled_and_held_out_subtomograms(finished_campaign, shape_pool):
    run_dir, _ = finished_campaign
    scored = set(read_scores(run_dir / "cycles/c00/scores", ["row"]).column("row").to_pylist())
    initial = [r for r in read_csv(run_dir / "labels.csv") if r["cycle"] == "0"]
    initial_rows = {int(r["subtomo_id"].split("-")[1]) for r in initial}  # train rows come first
    assert scored == set(range(60)) - initial_rows


def test_kl_scores_match_a_plain_torch_computation_with_the_same_weights(finished_campaign, shape_pool):
    run_dir, _ = finished_campaign
    table = read_scores(run_dir / "cycles/c00/scores")
    rows = table.column("row").to_numpy()
    saved = torch.load(run_dir / "cycles/c00/model.pt")
    nets = {key: model_from_checkpoint(saved, key) for key in ("model", "mean")}
    x = torch.from_numpy(read_volumes(shape_pool.path, rows))[:, None]
    with torch.no_grad():
        log_p = torch.log_softmax(nets["model"](x), dim=1)
        log_q = torch.log_softmax(nets["mean"](x), dim=1)
    expected = (log_p.exp() * (log_p - log_q)).sum(dim=1).numpy()
    np.testing.assert_allclose(column_array(table, "score"), expected, rtol=1e-4, atol=1e-6)  # kl: T‖M


def _rescore_cycle_0(finished_campaign, pool, tmp_path, cfg: ScoreConfig):
    """Cycle 0's scoring pass again with `cfg`: same model, same rows (the labelled excluded)."""
    run_dir, _ = finished_campaign
    scored = read_scores(run_dir / "cycles/c00/scores").column("row").to_pylist()
    labelled = sorted(set(range(pool.n_rows)) - set(scored))
    return read_scores(score_pool(
        pool.path, str(run_dir / "cycles/c00/model.pt"), tmp_path / "scores",
        strategy="ema_kl", strategy_options={}, exclude_rows=labelled, cfg=cfg,
    ))


def test_scoring_in_process_writes_the_same_scores_as_the_ray_data_pass(finished_campaign,
                                                                       shape_pool, tmp_path):
    on_ray = read_scores(finished_campaign[0] / "cycles/c00/scores")
    in_process = _rescore_cycle_0(finished_campaign, shape_pool, tmp_path,
                                  ScoreConfig(actors=0, batch_size=16))
    assert in_process.column("row").to_pylist() == on_ray.column("row").to_pylist()
    for column in ("score", "entropy", "pred"):
        np.testing.assert_allclose(column_array(in_process, column), column_array(on_ray, column),
                                   rtol=1e-5, atol=1e-7)


def test_an_actor_pool_started_for_the_pass_writes_the_same_scores_as_warm_workers(
        finished_campaign, shape_pool, tmp_path):
    warm = read_scores(finished_campaign[0] / "cycles/c00/scores")  # a small pass: warm workers
    actors = _rescore_cycle_0(finished_campaign, shape_pool, tmp_path,
                              ScoreConfig(actors=2, batch_size=16, warm_below_rows=0))
    assert actors.column("row").to_pylist() == warm.column("row").to_pylist()
    for column in ("score", "entropy", "pred"):
        np.testing.assert_allclose(column_array(actors, column), column_array(warm, column),
                                   rtol=1e-5, atol=1e-7)


def test_warm_workers_predict_with_the_last_cycles_model_not_the_one_they_kept(
        finished_campaign, shape_pool):
    # the workers that scored cycle 0 stay warm with its model; the predictions are model 1's
    run_dir, _ = finished_campaign
    predictions = read_scores(run_dir / "cycles/c01/predictions")
    rows = predictions.column("row").to_numpy()
    saved = torch.load(run_dir / "cycles/c01/model.pt")
    net = model_from_checkpoint(saved, "mean" if saved.get("classifier") == "mean" else "model")
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(read_volumes(shape_pool.path, rows))[:, None]), 1)
    np.testing.assert_allclose(column_array(predictions, "probs"), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_a_ray_data_pass_with_a_buffer_smaller_than_one_batch_still_scores_every_row(
        finished_campaign, shape_pool, tmp_path):
    full_buffer = read_scores(finished_campaign[0] / "cycles/c00/scores")
    tiny_buffer = _rescore_cycle_0(finished_campaign, shape_pool, tmp_path,
                                   ScoreConfig(actors=2, batch_size=16, buffer_mb=1))
    assert tiny_buffer.column("row").to_pylist() == full_buffer.column("row").to_pylist()
    np.testing.assert_allclose(column_array(tiny_buffer, "score"), column_array(full_buffer, "score"),
                               rtol=1e-5, atol=1e-7)


def test_the_run_directory_holds_every_promised_file(finished_campaign):
    run_dir, _ = finished_campaign
    for name in ("state.json", "labels.csv", "metrics.csv", "learning_curve.png", "predictions.parquet"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "cycles/c01/model.pt").is_file()


def test_metrics_have_a_row_per_cycle_with_the_kept_models_test_accuracy(finished_campaign, shape_pool):
    """metrics.csv says what state.json says, and that is the accuracy of the classifier
    validation kept (model.pt), measured again here on the test split."""
    run_dir, state = finished_campaign
    rows = read_csv(run_dir / "metrics.csv")
    assert [r["cycle"] for r in rows] == ["0", "1"]
    test_rows = PoolView.load(shape_pool).scored_rows_of("test")
    x = torch.from_numpy(read_volumes(shape_pool.path, test_rows))
    y = torch.as_tensor(PoolView.load(shape_pool).truth[test_rows])
    for row, record in zip(rows, state["cycles"]):
        assert row["test_accuracy"] == f"{record['test_accuracy']:.4f}"
        saved = torch.load(run_dir / f"cycles/c{record['cycle']:02d}/model.pt")
        kept = model_from_checkpoint(saved, "mean" if saved["classifier"] == "mean" else "model")
        measured = evaluate(kept, [(x, y)], num_classes=3)["accuracy"]
        assert record["classifier"] == saved["classifier"]
        assert record["test_accuracy"] == pytest.approx(measured, abs=1e-9)


def test_predictions_cover_every_subtomogram_of_the_pool(finished_campaign, shape_pool):
    run_dir, _ = finished_campaign
    predictions = pq.read_table(run_dir / "predictions.parquet")
    assert sorted(predictions.column("row").to_pylist()) == list(range(shape_pool.n_rows))
    assert set(predictions.column("pred_class").to_pylist()) <= set(shape_pool.class_names)


def test_running_a_finished_campaign_again_changes_nothing(finished_campaign, shape_pool):
    run_dir, state = finished_campaign
    before = (run_dir / "labels.csv").read_bytes()
    cfg = load_config(None, TINY + [f"data.pool={shape_pool.path}"])
    again = Campaign(cfg, run_dir, shape_pool).run()
    assert (run_dir / "labels.csv").read_bytes() == before
    assert again["cycles"] == state["cycles"]


def test_the_mean_model_is_the_ema_of_the_task_models_trajectory_on_every_rank(
    ray_local, shape_pool, tmp_path
):
    alpha = 0.9  # large enough steps that a wrong update would show
    job = CycleJob(
        pool=shape_pool.path, out_dir=str(tmp_path), num_classes=3,
        train_rows=list(range(24)), train_labels=[r % 3 for r in range(24)],
        model=config_to_dict(ModelConfig(width=4, stem="small")),
        train=config_to_dict(TrainConfig(epochs=1, min_steps=0, batch_size=8, num_workers=2, ema_alpha=alpha)),
    )
    run_training(job, run_name="ema-trajectory", loop=trajectory.loop())  # records T and M
    recorded = tmp_path / "trajectory"
    steps = torch.load(recorded / "t_steps.pt")
    expected = torch.load(recorded / "mean_initial.pt")
    for state in steps:
        for key, value in state.items():
            if value.is_floating_point():
                expected[key] = alpha * expected[key] + (1 - alpha) * value
            else:
                expected[key] = value.clone()
    rank0 = torch.load(recorded / "mean_rank0.pt")
    rank1 = torch.load(recorded / "mean_rank1.pt")
    assert len(steps) == 3  # 24 volumes over 2 ranks, a global batch of 8: 4 a rank
    for key in expected:
        torch.testing.assert_close(rank0[key], expected[key], rtol=1e-5, atol=1e-6)
        assert torch.equal(rank0[key], rank1[key]), key


def test_a_ledger_survives_a_campaign_unchanged_when_reopened(finished_campaign, shape_pool):
    run_dir, state = finished_campaign
    ledger = LabelLedger(run_dir / "labels.csv", known_ids=None, num_classes=3)
    assert len(ledger.current()) == state["cycles"][-1]["labelled"]
