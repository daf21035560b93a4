"""Pools and run directories at URIs (s3://, gs://, file://…) through pyarrow's filesystems,
tested with local `file://` URIs: a pool reads the same through its URI as through its path,
a run directory at a URI is staged locally and uploaded after every step (state.json last), and
a campaign whose pool and run are both URIs finishes, even when resumed from the URI alone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.al.oracle import AwaitingLabels
from orchestrator.campaign import loop
from orchestrator.campaign.loop import Campaign
from orchestrator.config import ConfigError
from orchestrator.data.pool import (
    PoolError,
    PoolWriter,
    iter_batches,
    open_pool,
    read_index,
    read_volumes,
    shard_locations,
)
from orchestrator.campaign.cli import parse_args, prepare_run
from orchestrator.data.storage import STAGING_ENV, RunMirror, StorageError, is_uri, join

# tests/integration/test_strategy_campaigns.py's tiny campaign; scoring in this process (no Ray Data actors)
TINY = [
    "model.width=4", "model.stem=small", "train.epochs=1", "train.min_steps=0", "train.batch_size=8",
    "train.num_workers=0", "score.batch_size=32", "score.actors=0", "budget.counts=[12, 18]",
]


@pytest.fixture
def staging(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    return tmp_path / "staging"


def write_files(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def sets(settings: list[str]) -> list[str]:
    """run.py's `--set KEY=VALUE` arguments for these settings."""
    return [arg for setting in settings for arg in ("--set", setting)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- URIs and pools --------------------------------------------------------------------------

def test_only_strings_with_a_scheme_are_uris():
    assert all(is_uri(u) for u in ("s3://bucket/pools/p", "gs://b/p", "file:///tmp/p", "hdfs://nn/p"))
    assert not any(is_uri(p) for p in ("/tmp/pool", "runs/demo", "C:\\pools", Path("/tmp/pool")))


def test_joining_a_uri_keeps_its_query_at_the_end_and_a_path_stays_a_path():
    assert join("s3://b/pools/p/?region=eu-west-1", "pool.json") == "s3://b/pools/p/pool.json?region=eu-west-1"
    assert join("pools/p", "shards", "a.parquet") == str(Path("pools/p/shards/a.parquet"))


def test_a_pool_read_through_its_file_uri_gives_the_same_index_batches_and_volumes(shape_pool):
    uri = Path(shape_pool.path).as_uri()
    info = open_pool(uri)
    assert info.path == uri and dataclasses.replace(info, path=shape_pool.path) == shape_pool
    assert len(info.shards) > 1
    assert read_index(uri).equals(read_index(shape_pool.path))
    by_uri = pa.Table.from_batches(list(iter_batches(uri, batch_rows=7)))
    assert by_uri.equals(pa.Table.from_batches(list(iter_batches(shape_pool.path, batch_rows=7))))
    rows = [70, 3, 41, 0]
    np.testing.assert_array_equal(read_volumes(uri, rows), read_volumes(shape_pool.path, rows))


def test_a_local_pool_is_still_read_through_plain_paths(shape_pool):
    filesystem, shards = shard_locations(shape_pool)
    assert filesystem is None
    assert shards == [str(Path(shape_pool.path) / shard) for shard in shape_pool.shards]


def test_an_unknown_scheme_is_an_error_naming_the_uri():
    with pytest.raises(StorageError, match=r"nosuch://bucket/pool/pool.json: cannot open its filesystem \(Unrecognized"):
        open_pool("nosuch://bucket/pool")


def test_a_uri_without_a_manifest_is_not_a_pool(tmp_path):
    with pytest.raises(PoolError, match="not a pool"):
        open_pool(tmp_path.as_uri())


def test_pools_are_written_to_local_paths_only(tmp_path):
    with pytest.raises(PoolError, match="written to a local path"):
        PoolWriter((tmp_path / "pool").as_uri(), 4)


# -- run directories at URIs -----------------------------------------------------------------

def mirror_with(tmp_path: Path, files: dict[str, str]) -> RunMirror:
    mirror = RunMirror((tmp_path / "remote").as_uri(), tmp_path / "local")
    write_files(mirror.local, files)
    return mirror


def test_an_upload_skips_temp_files_partial_outputs_and_ray_train_checkpoints(tmp_path):
    mirror = mirror_with(tmp_path, {
        "state.json": "{}", "labels.csv": "a", "cycles/c00/model.pt": "m",
        ".labels.csv.x1.tmp": "t", "cycles/c00/scores.partial/p.parquet": "p",
        "cycles/c00/ray_train/train-c00/checkpoint/state.pt": "c",
    })
    mirror.upload()
    assert tree(tmp_path / "remote") == {"state.json": "{}", "labels.csv": "a", "cycles/c00/model.pt": "m"}


def test_an_upload_sends_only_the_files_changed_since_the_last_one(tmp_path):
    mirror = mirror_with(tmp_path, {"state.json": "1", "cycles/c00/model.pt": "m"})
    mirror.upload()
    model = tmp_path / "remote/cycles/c00/model.pt"
    inode = model.stat().st_ino  # every upload of a file renames a new one into place
    (mirror.local / "state.json").write_text("2")
    mirror.upload()
    assert model.stat().st_ino == inode
    assert (tmp_path / "remote/state.json").read_text() == "2"


def test_an_upload_cut_short_leaves_no_state_or_manifest_ahead_of_the_files_they_name(
    tmp_path, monkeypatch
):
    mirror = mirror_with(tmp_path, {"labels.csv": "12 labels", "state.json": "cycle 0"})
    mirror.upload()
    write_files(mirror.local, {"labels.csv": "18 labels", "state.json": "cycle 1",
                               "pool/pool.json": "manifest", "pool/shards/part-0.parquet": "shard"})
    copy = shutil.copyfileobj

    def disk_full_on_the_shard(source, out, *args):
        if source.name.endswith("part-0.parquet"):
            raise OSError(28, "No space left on device")
        return copy(source, out, *args)

    monkeypatch.setattr(shutil, "copyfileobj", disk_full_on_the_shard)
    with pytest.raises(StorageError, match=f"{mirror.uri}: cannot upload pool/shards/part-0.parquet"):
        mirror.upload()
    assert tree(tmp_path / "remote") == {"labels.csv": "18 labels", "state.json": "cycle 0"}
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    mirror.upload()  # the next save sends the rest
    assert tree(tmp_path / "remote") == tree(mirror.local)


def test_a_download_restores_the_remote_copy_and_later_uploads_send_what_it_lacked(tmp_path):
    files = {"state.json": "{}", "labels.csv": "a", "cycles/c00/selection.csv": "s"}
    mirror_with(tmp_path, files).upload()
    shutil.rmtree(tmp_path / "local")
    fresh = mirror_with(tmp_path, {"cycles/c01/selection.csv": "written before a crash"})
    fresh.download()
    assert tree(fresh.local) == {**files, "cycles/c01/selection.csv": "written before a crash"}
    fresh.upload()
    assert tree(tmp_path / "remote") == tree(fresh.local)


def test_a_download_leaves_scoring_outputs_to_be_computed_again(tmp_path):
    scored = {"cycles/c00/scores/part-0.parquet": "p", "cycles/c01/predictions/part-0.parquet": "p"}
    mirror_with(tmp_path, {"state.json": "{}", **scored}).upload()
    shutil.rmtree(tmp_path / "local")
    fresh = mirror_with(tmp_path, {})
    fresh.download()  # part of a directory may be all an interrupted upload sent
    assert tree(fresh.local) == {"state.json": "{}"}


def test_a_new_run_at_a_uri_is_staged_locally_and_a_second_start_there_is_refused(tmp_path, staging):
    uri = (tmp_path / "runs/a").as_uri()
    _, run_dir, mirror = prepare_run(parse_args(["--run-dir", uri]))
    assert run_dir.parent == staging and mirror.uri == uri
    assert (tmp_path / "runs/a/config.yaml").read_text() == (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=f"{uri} already holds a run; use --resume"):
        prepare_run(parse_args(["--run-dir", uri]))


def test_resuming_a_uri_that_holds_no_run_is_an_error_naming_it(tmp_path, staging):
    uri = (tmp_path / "runs/none").as_uri()
    with pytest.raises(ConfigError, match=f"--resume {uri}: not a run directory"):
        prepare_run(parse_args(["--resume", uri]))


def test_a_campaign_waiting_for_a_persons_labels_uploads_its_queries(shape_pool, tmp_path, staging):
    remote, pool_uri = tmp_path / "remote", Path(shape_pool.path).as_uri()
    settings = ["oracle=file", "budget.counts=[12, 18]", f"data.pool={pool_uri}"]
    cfg, run_dir, mirror = prepare_run(parse_args(["--run-dir", remote.as_uri(), *sets(settings)]))
    with pytest.raises(AwaitingLabels):  # before any training: no Ray needed
        Campaign(cfg, run_dir, open_pool(cfg.data.pool), mirror=mirror).run()
    assert len(read_csv(remote / "cycles/c00/queries/queries.csv")) == 12
    assert len(list((remote / "cycles/c00/queries/png").glob("*.png"))) == 12


# -- a campaign whose pool and run directory are URIs ----------------------------------------

class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_from_uri(ray_local, shape_pool, tmp_path_factory):
    """A campaign interrupted before cycle 1 trains, its staging copy deleted, then resumed
    from nothing but the run directory's URI."""
    root = tmp_path_factory.mktemp("storage")
    remote, pool_uri = root / "remote" / "run", Path(shape_pool.path).as_uri()
    trained = []
    real_training = loop.run_training

    def interrupted_at_cycle_1_once(job, *, run_name):
        trained.append(run_name)
        if trained == ["train-c00", "train-c01"]:
            raise Interrupted(run_name)
        return real_training(job, run_name=run_name)

    settings = sets(TINY + [f"data.pool={pool_uri}"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(STAGING_ENV, str(root / "staging"))
        patch.setattr(loop, "run_training", interrupted_at_cycle_1_once)
        cfg, run_dir, mirror = prepare_run(parse_args(["--run-dir", remote.as_uri(), *settings]))
        with pytest.raises(Interrupted):
            Campaign(cfg, run_dir, open_pool(cfg.data.pool), mirror=mirror).run()
        interrupted = json.loads((remote / "state.json").read_text())
        labels_then = read_csv(remote / "labels.csv")
        shutil.rmtree(run_dir)
        cfg, run_dir, mirror = prepare_run(parse_args(["--resume", remote.as_uri()]))
        state = Campaign(cfg, run_dir, open_pool(cfg.data.pool), mirror=mirror).run()
    return SimpleNamespace(remote=remote, pool_uri=pool_uri, interrupted=interrupted,
                           labels_then=labels_then, state=state, trained=trained)


@pytest.mark.ray
@pytest.mark.slow
def test_the_remote_copy_of_an_interrupted_run_records_only_steps_whose_files_it_holds(resumed_from_uri):
    cycles = resumed_from_uri.interrupted["cycles"]
    assert [(c.get("labelled"), bool(c.get("trained"))) for c in cycles] == [(12, True), (18, False)]
    assert len(resumed_from_uri.labels_then) == 18
    assert (resumed_from_uri.remote / "cycles/c00/model.pt").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_a_resume_from_the_uri_alone_trains_only_the_cycle_left_and_finishes(resumed_from_uri):
    assert resumed_from_uri.trained == ["train-c00", "train-c01", "train-c01"]
    assert [c["labelled"] for c in resumed_from_uri.state["cycles"]] == [12, 18]
    assert resumed_from_uri.state["pool"] == resumed_from_uri.pool_uri


@pytest.mark.ray
@pytest.mark.slow
def test_the_remote_run_directory_holds_the_finished_campaign(resumed_from_uri, shape_pool):
    remote = resumed_from_uri.remote
    assert json.loads((remote / "state.json").read_text())["done"] is True
    assert read_csv(remote / "labels.csv") == resumed_from_uri.labels_then  # nothing relabelled
    assert [r["cycle"] for r in read_csv(remote / "metrics.csv")] == ["0", "1"]
    assert (remote / "cycles/c01/model.pt").is_file()
    assert pq.read_table(remote / "predictions.parquet").num_rows == shape_pool.n_rows
    assert not list(remote.rglob("ray_train"))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_reads_a_uri_pools_shards_through_its_filesystem(ray_local, shape_pool):
    import ray.data

    filesystem, shards = shard_locations(open_pool(Path(shape_pool.path).as_uri()))
    rows = ray.data.read_parquet(shards, filesystem=filesystem).select_columns(["row"]).take_all()
    assert sorted(r["row"] for r in rows) == list(range(shape_pool.n_rows))
