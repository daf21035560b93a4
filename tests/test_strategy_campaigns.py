"""Every registered strategy runs a 2-cycle campaign on the tiny shape pool, through the same
loop: training on Ray Train in-process (`train.num_workers=0`), then scoring, selection, labels.

Scoring runs the real scoring actor class (`PoolScorer`, which loads the strategy's auxiliary
from model.pt) over the pool's batches in this process (`score.actors=0`): on this shared 2-CPU
machine one Ray Data pass costs 15–40 s of actor start-up for a 1 s job, and a campaign makes two. One
strategy with a fitted auxiliary and a set-based selection (`hal`) goes through Ray Data
(its selection pass only; the final predictions pass is strategy-independent).
"""

from __future__ import annotations

import csv

import pytest
import torch

from orchestrator import loop
from orchestrator.config import load_config
from orchestrator.loop import Campaign
from orchestrator.strategies import STRATEGIES, make_strategy

THROUGH_RAY_DATA = {"hal"}

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "model.width=4", "model.stem=small", "model.dropout=0.3",  # dropout: MC strategies need it
    "train.epochs=1", "train.min_steps=0", "train.batch_size=8", "train.num_workers=0",
    "score.batch_size=32", "score.cpus_per_actor=1", "budget.counts=[12, 18]",
]
# CPU-sized auxiliaries: a couple of epochs of their small nets is enough to exercise them.
OPTIONS = {
    "bald": {"mc_passes": 3}, "mc_entropy": {"mc_passes": 3},
    "noise_stability": {"passes": 3},
    "vaal": {"epochs": 2}, "hal": {"epochs": 2}, "two_stream": {"epochs": 2},
}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_completes_a_two_cycle_campaign(name, ray_local, shape_pool, tmp_path,
                                                 monkeypatch):
    if name in THROUGH_RAY_DATA:
        # the final predictions pass is the same for every strategy (tests/test_campaign.py)
        monkeypatch.setattr(loop, "write_predictions", lambda campaign: None)
    options = OPTIONS.get(name, {})
    actors = 1 if name in THROUGH_RAY_DATA else 0
    cfg = load_config(None, TINY + [f"score.actors={actors}", 
        f"data.pool={shape_pool.path}", f"strategy.name={name}", f"strategy.options={options}",
    ])
    state = Campaign(cfg, tmp_path, shape_pool).run()

    assert [c["labelled"] for c in state["cycles"]] == [12, 18]
    with open(tmp_path / "labels.csv", newline="") as f:
        labels = list(csv.DictReader(f))
    ids = [r["subtomo_id"] for r in labels]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("train-") for i in ids)
    assert [r["cycle"] for r in labels].count("1") == 6
    assert state["done"]

    saved = torch.load(tmp_path / "cycles/c00/model.pt")
    auxiliary = make_strategy(name, **options).auxiliary
    has_module = auxiliary is not None and auxiliary.build(_model(saved), 3) is not None
    assert ("auxiliary" in saved) == has_module


def _model(saved):
    from orchestrator.model import build_model

    cfg = saved["model_config"]
    return build_model(cfg["name"], num_classes=saved["num_classes"], width=cfg["width"],
                       stem=cfg["stem"], dropout=cfg["dropout"])
