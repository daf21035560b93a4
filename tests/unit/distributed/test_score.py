"""A scoring pass reads only what it scores: the rows it skips (held out, labelled) are filtered
in the read, in this process's pass (`score.actors=0`) as in Ray Data's, never sent to the
scorer; row groups holding none of the scored rows are not read at all."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.al.cold_start import pool_features
from orchestrator.config import ScoreConfig
from orchestrator.distributed import score as scoring
from orchestrator.distributed.score import (read_scores, rows_per_file, rows_to_score, score_pool,
                                          scored_rows_filter)
from orchestrator.nn.ema import init_mean_model
from orchestrator.nn.model import build_model

# the shape pool: rows 0..59 train, 60..71 val, 72..83 test; 6 rows (one row group) a shard
HELD_OUT = list(range(60, 84))


def saved_model(path, num_classes):
    torch.manual_seed(0)
    model = build_model("resnet10", num_classes=num_classes, width=4, stem="small")
    torch.save({"model": model.state_dict(), "mean": init_mean_model(model).state_dict(),
                "num_classes": num_classes,
                "model_config": {"name": "resnet10", "width": 4, "stem": "small", "dropout": 0.0}}, path)
    return path


def test_the_rows_to_score_are_every_row_but_the_excluded_and_none_means_the_whole_pool(shape_pool):
    assert rows_to_score(shape_pool, []) is None
    assert rows_to_score(shape_pool, [83, 0, 0, 500] + HELD_OUT).tolist() == list(range(1, 60))


def test_an_in_process_pass_reads_only_the_row_groups_holding_rows_it_scores(
        shape_pool, tmp_path, row_groups_read, one_torch_thread):
    labelled = [0, 1, 2, 3, 4, 5, 9]  # shard 0 whole, and one row of shard 1
    out = score_pool(shape_pool.path, str(saved_model(tmp_path / "model.pt", shape_pool.num_classes)),
                     tmp_path / "scores", strategy="entropy", strategy_options={},
                     exclude_rows=labelled + HELD_OUT, cfg=ScoreConfig(actors=0, batch_size=16))
    scored = read_scores(out, ["row", "subtomo_id", "score"])
    assert scored.column("row").to_pylist() == sorted(set(range(60)) - set(labelled))
    assert scored.column("subtomo_id").to_pylist()[:2] == ["train-0006", "train-0007"]
    assert np.isfinite(scored.column("score").to_numpy()).all()
    assert sorted(name for name, _, _ in row_groups_read) == [f"part-{s:05d}" for s in range(1, 10)]


def test_a_large_pass_writes_files_of_rows_per_file_and_a_small_one_about_fifty():
    cfg = ScoreConfig(batch_size=64, rows_per_file=8192)
    assert rows_per_file(1_000_000, cfg) == 8192  # 123 files, not 15,625 batches
    assert rows_per_file(100_000, cfg) == 2000  # 50 files: the stage's progress counts them
    assert rows_per_file(1_000, cfg) == 64  # never less than a batch


def test_an_in_process_pass_bundles_its_batches_into_files_of_at_least_rows_per_file(
        shape_pool, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setattr(scoring, "PROGRESS_FILES", 1)  # the 84-row pool: files of rows_per_file
    out = score_pool(shape_pool.path, str(saved_model(tmp_path / "model.pt", shape_pool.num_classes)),
                     tmp_path / "scores", strategy="entropy", strategy_options={},
                     exclude_rows=[0] + HELD_OUT, cfg=ScoreConfig(actors=0, batch_size=8, rows_per_file=20))
    files = sorted(out.glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [24, 24, 11]  # 3 batches, 3, the rest
    assert read_scores(out, ["row"]).column("row").to_pylist() == list(range(1, 60))


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_data_pass_bundles_its_batches_into_files_of_at_least_rows_per_file(
        ray_local, shape_pool, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "PROGRESS_FILES", 1)
    out = score_pool(shape_pool.path, str(saved_model(tmp_path / "model.pt", shape_pool.num_classes)),
                     tmp_path / "scores", strategy="entropy", strategy_options={}, exclude_rows=HELD_OUT,
                     cfg=ScoreConfig(actors=2, batch_size=8, rows_per_file=24, warm_below_rows=0))
    sizes = [pq.read_metadata(f).num_rows for f in out.glob("*.parquet")]
    assert sum(sizes) == 60 and len(sizes) < 60 // 8  # fewer files than batches
    assert sorted(sizes)[1:] == [size for size in sorted(sizes)[1:] if size >= 24]  # one remainder
    assert read_scores(out, ["row"]).column("row").to_pylist() == list(range(60))


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_data_pass_reads_the_shards_footers_in_one_actor_not_one_per_cpu_of_a_cluster(
        ray_local, shape_pool, tmp_path):
    assert len(shape_pool.shards) >= 10  # Ray Data's default would start 32 readers for them

    def footer_readers() -> int:  # dead ones too: a pass kills its readers when it is planned
        from ray._private import state  # the GCS's actor table; the public state API needs the dashboard
        return sum(a.get("ActorClassName") == "FooterReader" for a in state.actors().values())

    before = footer_readers()
    score_pool(shape_pool.path, str(saved_model(tmp_path / "model.pt", shape_pool.num_classes)),
               tmp_path / "scores", strategy="entropy", strategy_options={}, exclude_rows=HELD_OUT,
               cfg=ScoreConfig(actors=1, batch_size=8, warm_below_rows=0))
    assert footer_readers() - before == 1


@pytest.mark.ray
@pytest.mark.slow
def test_a_pool_of_one_shard_is_read_in_blocks_of_about_a_batch_to_feed_every_worker(ray_local, tmp_path):
    from conftest import make_shape_pool

    pool = make_shape_pool(tmp_path / "one-shard", shard_mb=10)  # 84 rows in one file
    assert len(pool.shards) == 1
    blocks = scoring._read_rows(pool.path, None, ["row", "volume"], ScoreConfig(actors=2, batch_size=8))
    sizes = [bundle.num_rows() for bundle in blocks.iter_internal_ref_bundles()]
    # Ray Data closes a block once it holds more than the target and slices one of 1.5× it
    assert sum(sizes) == 84 and len(sizes) >= 84 // 12 and max(sizes) <= 12


def test_the_ray_data_filter_skips_row_groups_without_a_scored_row_in_the_parquet_scan(shape_pool):
    # what Ray Data pushes into its Parquet reads, checked on PyArrow's scan without Ray
    import pyarrow.dataset as ds

    rows = rows_to_score(shape_pool, list(range(0, 12)) + HELD_OUT)  # shards 0, 1 and 10..13 skipped
    expression = scored_rows_filter(rows, np.arange(shape_pool.n_rows)).to_pyarrow()
    kept = {}
    for fragment in ds.dataset(shape_pool.shard_paths, format="parquet").get_fragments():
        kept[fragment.path.rsplit("/", 1)[-1]] = len(fragment.subset(filter=expression).row_groups)
    assert [name for name, groups in sorted(kept.items()) if groups] == [f"part-{s:05d}.parquet" for s in range(2, 10)]
    table = ds.dataset(shape_pool.shard_paths, format="parquet").to_table(columns=["row"], filter=expression)
    assert sorted(table.column("row").to_pylist()) == list(range(12, 60))


def test_the_filter_names_the_skipped_rows_when_they_are_fewer_than_the_scored():
    import pyarrow as pa
    import pyarrow.dataset as ds

    pool_rows = np.arange(1000)
    skipped = np.r_[np.arange(0, 900, 10), np.arange(900, 1000)]  # 90 scattered, then a block
    rows = np.setdiff1d(pool_rows, skipped)  # 810 scored
    expression = scored_rows_filter(rows, pool_rows).to_pyarrow()
    text = str(expression)
    assert "invert(is_in(row" in text and "  11,\n" not in text  # a set of the skipped rows
    assert "(row < 900) or (row > 999)" in text  # the block a range, which statistics can skip
    table = ds.dataset(pa.table({"row": pool_rows})).to_table(filter=expression)
    assert table.column("row").to_pylist() == rows.tolist()


def test_there_is_no_filter_when_every_row_is_read():
    assert scored_rows_filter(np.arange(50), np.arange(50)) is None


def test_small_cpu_passes_score_in_warm_task_workers_and_the_rest_in_an_actor_pool():
    import ray.data

    from actors.scorer import PoolScorer, score_batch
    from orchestrator.distributed.score import SCORING_WORKER_ENV, scoring_udf

    cfg = ScoreConfig(actors=3, warm_below_rows=1000)
    warm = scoring_udf({"model_path": "m.pt"}, cfg, 999)
    assert warm["fn"] is score_batch and warm["fn_kwargs"] == {"model_path": "m.pt"}
    assert isinstance(warm["compute"], ray.data.TaskPoolStrategy) and warm["compute"].size == 3
    assert SCORING_WORKER_ENV in warm["runtime_env"]["env_vars"]  # workers of their own
    for cfg, n_rows in ((cfg, 1000), (ScoreConfig(warm_below_rows=0), 1),
                        (ScoreConfig(gpus_per_actor=0.5, warm_below_rows=1000), 10)):
        fresh = scoring_udf({"model_path": "m.pt"}, cfg, n_rows)
        assert fresh["fn"] is PoolScorer and fresh["fn_constructor_kwargs"] == {"model_path": "m.pt"}
        assert isinstance(fresh["compute"], ray.data.ActorPoolStrategy) and "runtime_env" not in fresh


# -- the cold start's description: the same read, a label-free mapper --------------------------
DESCRIBED = np.array([1, 7, 8, 30, 59])  # in shards 0, 1, 5 and 9


def test_an_in_process_description_reads_only_the_row_groups_holding_its_rows(
        shape_pool, tmp_path, row_groups_read, monkeypatch):
    monkeypatch.setattr(scoring, "DESCRIBE_IN_PROCESS_BELOW", 0)  # in process for actors=0 alone
    out = scoring.describe_pool(shape_pool.path, DESCRIBED[::-1], tmp_path / "description",
                                embedding="density", cfg=ScoreConfig(actors=0), batch_rows=2)
    np.testing.assert_allclose(scoring.read_description(out, DESCRIBED),
                               pool_features(shape_pool.path, DESCRIBED, embedding="density"), rtol=1e-6)
    assert sorted({name for name, _, _ in row_groups_read}) == ["part-00000", "part-00001", "part-00005",
                                                                "part-00009"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_data_description_gives_the_features_this_process_computes(ray_local, shape_pool, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(scoring, "DESCRIBE_IN_PROCESS_BELOW", 0)
    out = scoring.describe_pool(shape_pool.path, DESCRIBED, tmp_path / "description", embedding="radial",
                                cfg=ScoreConfig(actors=2), batch_rows=2)
    # equal to float32's rounding: the features are float32 matrix products, which the workers
    # run on batches of 2 rows with one BLAS thread and this process on all rows with its own,
    # summing in another order (1.1e-6 relative seen once in ~10 runs)
    np.testing.assert_allclose(scoring.read_description(out, DESCRIBED),
                               pool_features(shape_pool.path, DESCRIBED, embedding="radial"), rtol=1e-5)


def test_a_written_description_is_read_back_and_one_lacking_rows_says_which(shape_pool, tmp_path):
    cfg = ScoreConfig(actors=0)
    out = scoring.describe_pool(shape_pool.path, DESCRIBED, tmp_path / "d", embedding="radial", cfg=cfg)
    again = scoring.describe_pool(shape_pool.path, [0, 2], tmp_path / "d", embedding="radial", cfg=cfg)
    assert again == out and read_scores(out, ["row"]).column("row").to_pylist() == DESCRIBED.tolist()
    with pytest.raises(ValueError, match=r"1 of the asked rows were not described \(first: \[2\]\)"):
        scoring.read_description(out, [1, 2, 7])


def test_an_unknown_embedding_is_refused_before_anything_is_read_or_written(shape_pool, tmp_path):
    with pytest.raises(ValueError, match="embedding: 'pixels' is not one of"):
        scoring.describe_pool(shape_pool.path, DESCRIBED, tmp_path / "d", embedding="pixels")
    assert not list(tmp_path.iterdir())
