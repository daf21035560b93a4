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

from orchestrator.al.labels import parse_label
from orchestrator.al.strategies import STRATEGIES, make_strategy
from orchestrator.campaign import loop
from orchestrator.campaign.labelled import LabelledSet
from orchestrator.campaign.loop import Campaign
from orchestrator.config import load_config
from orchestrator.nn.auxiliary import make_auxiliary
from orchestrator.nn.checkpoint import model_from_checkpoint

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
        # the final predictions pass is the same for every strategy (tests/integration/test_campaign.py),
        # and so is the export of those predictions that follows it
        monkeypatch.setattr(Campaign, "write_predictions", lambda campaign: None)
        monkeypatch.setattr(loop, "after_campaign", lambda run_dir, info: None)
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
    training = make_strategy(name, **options).training
    auxiliary = make_auxiliary(training.auxiliary, training.auxiliary_options)
    has_module = auxiliary is not None and auxiliary.build(model_from_checkpoint(saved), 3) is not None
    assert ("auxiliary" in saved) == has_module


# --- issue 17: junk, cold start, the bandit's record ---------------------------------------------


@pytest.fixture(scope="module")
def junk_pool(tmp_path_factory):
    """The three shapes plus noise-only volumes labelled junk (-1), in every split."""
    import numpy as np

    from conftest import shape_volume
    from orchestrator.data.pool import PoolWriter

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pools") / "junk"
    with PoolWriter(path, 16, class_names=["ball", "slab", "rod"], shard_mb=0.05) as writer:
        for split, count in (("train", 60), ("val", 12), ("test", 12)):
            for i in range(count):
                label = i % 4 - 1 if i % 4 == 0 else i % 3  # a quarter junk
                volume = (rng.normal(size=(16, 16, 16)).astype(np.float32) if label == -1
                          else shape_volume(label, 16, rng))
                writer.add(f"{split}-{i:04d}", volume, source="synthetic", label=label, split=split)
    return writer.close()


def run_campaign(pool, run_dir, *settings, counts="[12, 18]"):
    cfg = load_config(None, TINY + ["score.actors=0", f"data.pool={pool.path}",
                                    f"budget.counts={counts}", *settings])
    return Campaign(cfg, run_dir, pool).run()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_pool_with_junk_is_answered_junk_and_accuracy_counts_real_classes_only(
        ray_local, junk_pool, tmp_path):
    from orchestrator.data.pool import read_index

    state = run_campaign(junk_pool, tmp_path, "strategy.name=poal",
                         "strategy.options={informativeness: entropy}")
    truth = dict(zip(*read_index(junk_pool.path, ["subtomo_id", "label"]).to_pydict().values()))
    labels = read_csv(tmp_path / "labels.csv")
    assert all(int(r["label"]) == truth[r["subtomo_id"]] for r in labels)
    assert any(r["label"] == "-1" for r in labels)  # the random draw met junk
    # evaluation on val/test would fail on a junk row (no class -1): it ran on real classes only
    assert all(0 <= c["val_accuracy"] <= 1 and len(c["per_class_accuracy"]) == 3 for c in state["cycles"])
    assert state["cycles"][1]["chosen_by"] == {"poal": 6}


def test_a_junk_class_is_learnt_from_junk_answers_and_keeps_predicted_junk_out_of_the_queries(
        ray_local, junk_pool, tmp_path):
    import numpy as np

    import pyarrow.parquet as pq

    from orchestrator.distributed.score import read_scores

    state = run_campaign(junk_pool, tmp_path, "train.junk_class=true", "strategy.name=entropy",
                         "train.epochs=20", "strategy.junk_threshold=0.4")
    saved = torch.load(tmp_path / "cycles/c00/model.pt")
    assert (saved["junk_class"], saved["num_classes"]) == (True, 4)  # three shapes and junk
    assert all(len(c["per_class_accuracy"]) == 3 for c in state["cycles"])  # real classes only
    scores = read_scores(tmp_path / "cycles/c00/scores", ["row", "junk_prob", "probs"])
    probs = scores.column("probs").combine_chunks().to_numpy_ndarray()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # renormalised over the shapes
    rows, junk_prob = scores.column("row").to_numpy(), scores.column("junk_prob").to_numpy()
    is_junk = rows % 4 == 0  # the pool's junk rows (every fourth, in every split)
    assert junk_prob[is_junk].mean() > 2 * junk_prob[~is_junk].mean()  # it learnt what junk is
    flagged = set(rows[junk_prob >= 0.4].tolist())
    asked = {int(r["row"]) for r in read_csv(tmp_path / "cycles/c01/selection.csv")}
    assert flagged and not flagged & asked
    assert "junk_prob" in pq.read_schema(tmp_path / "predictions.parquet").names


def test_typiclust_chooses_cycle_0_instead_of_the_random_draw(ray_local, shape_pool, tmp_path):
    import numpy as np

    state = run_campaign(shape_pool, tmp_path, "strategy.name=entropy", "strategy.initial=typiclust",
                         "strategy.initial_options={max_clusters: 12}")
    initial = read_csv(tmp_path / "cycles/c00/selection.csv")
    assert {r["chosen_by"] for r in initial} == {"typiclust"} and len(initial) == 12
    assert state["cycles"][0]["chosen_by"] == {"typiclust": 12}
    import pyarrow.parquet as pq

    described = pq.read_table(tmp_path / "cycles/c00/description-density", columns=["row"])  # kept for a resume
    assert described.num_rows == len(Campaign(load_config(None, TINY + [f"data.pool={shape_pool.path}"]),
                                              tmp_path / "other", shape_pool).train_rows)
    classes = [int(r["subtomo_id"].split("-")[1]) % 3 for r in initial]  # shape_pool: label = i % 3
    assert sorted(set(classes)) == [0, 1, 2]
    random_draw = loop.pick_initial(np.asarray(Campaign(load_config(None, TINY + [
        f"data.pool={shape_pool.path}"]), tmp_path / "other", shape_pool).train_rows), 12, 0)
    assert sorted(int(r["row"]) for r in initial) != sorted(random_draw.tolist())


@pytest.mark.parametrize("credit", ["batch", "probe", "balance"])
def test_albl_records_its_arms_and_a_resumed_selection_chooses_the_same(ray_local, shape_pool, tmp_path,
                                                                        credit, capsys):
    import numpy as np

    from orchestrator.distributed.score import read_scores

    options = f"strategy.options={{arms: [entropy, random, coreset], credit: {credit}}}"
    state = run_campaign(shape_pool, tmp_path, "strategy.name=albl", options, counts="[12, 18, 24]")
    assert "cycle 1 · select: 6 queries by albl (" in capsys.readouterr().out  # and by which arms
    for cycle in (1, 2):
        chosen = [r["chosen_by"] for r in read_csv(tmp_path / f"cycles/c{cycle:02d}/selection.csv")]
        assert set(chosen) <= {"entropy", "random", "coreset"} and len(chosen) == 6
        assert state["cycles"][cycle]["chosen_by"] == {a: chosen.count(a) for a in set(chosen)}
        notes = state["cycles"][cycle]["selection_notes"]
        assert set(notes["probabilities"]) == {"entropy", "random", "coreset"}
        assert set(notes.get("credit", {})) == ({"entropy", "random", "coreset"} if credit != "batch" else set())
    # the probe's credit reads the validation split's embeddings: the selection pass scored them
    campaign = Campaign(load_config(None, TINY + [
        "score.actors=0", f"data.pool={shape_pool.path}", "budget.counts=[12, 18, 24]",
        "strategy.name=albl", options]), tmp_path, shape_pool)
    scored = set(read_scores(tmp_path / "cycles/c01/scores", ["row"]).column("row").to_numpy().tolist())
    validation = set(campaign.view.scored_rows_of("val").tolist())
    assert validation and (validation <= scored) == (credit == "probe")
    # Selecting cycle 2 again from the run directory alone (as a resume after a crash would)
    # gives the same queries and arms: the bandit keeps nothing outside those files.
    before = LabelledSet.of({r["subtomo_id"]: parse_label(r["label"]) for r in
                             read_csv(tmp_path / "labels.csv") if int(r["cycle"]) < 2}, campaign.view)
    again = campaign._strategy_queries(2, 6, before, {})
    first = read_csv(tmp_path / "cycles/c02/selection.csv")
    assert [(q.row, q.chosen_by) for q in again] == [(int(r["row"]), r["chosen_by"]) for r in first]
