"""Every registered strategy runs a 2-cycle campaign on the tiny shape pool, through the same
loop: training on Ray Train in-process (`train.num_workers=0`), then scoring, selection, labels.

Scoring runs the real scoring actor class (`PoolScorer`, which loads the strategy's auxiliary
from model.pt) over the pool's batches in this process: on this shared 2-CPU machine one Ray
Data pass costs 15–40 s of actor start-up for a 1 s job, and a campaign makes two. One
strategy with a fitted auxiliary and a set-based selection (`hal`) goes through Ray Data
(its selection pass only; the final predictions pass is strategy-independent).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.scorer import PoolScorer
from orchestrator import loop
from orchestrator.config import load_config
from orchestrator.loop import Campaign
from orchestrator.pool import iter_batches
from orchestrator.strategies import STRATEGIES, make_strategy

THROUGH_RAY_DATA = {"hal"}

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "model.width=4", "model.stem=small", "model.dropout=0.3",  # dropout: MC strategies need it
    "train.epochs=1", "train.batch_size=8", "train.num_workers=0",
    "score.batch_size=32", "score.actors=1", "score.cpus_per_actor=1", "budget.counts=[12, 18]",
]
# CPU-sized auxiliaries: a couple of epochs of their small nets is enough to exercise them.
OPTIONS = {
    "bald": {"mc_passes": 3}, "mc_entropy": {"mc_passes": 3},
    "noise_stability": {"passes": 3},
    "vaal": {"epochs": 2}, "hal": {"epochs": 2}, "two_stream": {"epochs": 2},
}


def score_in_process(pool_path, model_path, out_dir, *, strategy, strategy_options,
                     exclude_rows=(), cfg=None, seed=0):
    """`score.score_pool`'s contract (same actor class, same Parquet columns), no Ray Data."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return out_dir
    scorer = PoolScorer(model_path, pool_path, strategy, strategy_options,
                        exclude_rows=np.asarray(exclude_rows, np.int64), seed=seed)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    columns = ["row", "subtomo_id", "volume"]
    for i, batch in enumerate(iter_batches(pool_path, columns=columns, batch_rows=32)):
        result = scorer({c: batch.column(c).to_numpy(zero_copy_only=False) for c in columns})
        if len(result["row"]) == 0:  # every row of the batch excluded
            continue
        table = pa.table({
            key: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(value))
            if np.ndim(value) > 1 else value
            for key, value in result.items()
        })
        pq.write_table(table, partial / f"part-{i:04d}.parquet")
    partial.rename(out_dir)
    return out_dir


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_completes_a_two_cycle_campaign(name, ray_local, shape_pool, tmp_path,
                                                 monkeypatch):
    if name not in THROUGH_RAY_DATA:
        monkeypatch.setattr(loop, "score_pool", score_in_process)
    else:  # the final predictions pass is the same for every strategy (tests/test_campaign.py)
        monkeypatch.setattr(loop, "write_predictions", lambda campaign: None)
    options = OPTIONS.get(name, {})
    cfg = load_config(None, TINY + [
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
