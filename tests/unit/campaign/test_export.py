"""A finished campaign's predictions as a RELION STAR file that RELION's readers take."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import starfile

from conftest import finished_run
from orchestrator.campaign.export import write_star
from orchestrator.data.ingest import ingest, parse_star
from orchestrator.data.pool import PoolWriter, open_pool
from orchestrator.data.volumes import write_volume
from orchestrator.run import main as run_main


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(6, 6, 6)).astype(np.float32)


@pytest.fixture
def star_pool(tmp_path):
    """A pool ingested from a STAR file: a stack section and a single volume, with coordinates."""
    write_volume(tmp_path / "stack.mrcs", np.stack([noise(1), noise(2)]), 10.0)
    write_volume(tmp_path / "single.mrc", noise(3), 10.0)
    (tmp_path / "in.star").write_text(
        "data_particles\nloop_\n_rlnImageName\n_rlnTomoName\n_rlnCoordinateX\n_rlnCoordinateY\n_rlnCoordinateZ\n"
        "2@stack.mrcs TS_01 10 20 30\nsingle.mrc TS_02 40 50 60\n"
    )
    ingest(tmp_path / "in.star", tmp_path / "pool", class_names=["ribosome", "proteasome"])
    return open_pool(tmp_path / "pool")


def test_star_gives_each_subtomogram_its_relion_image_name_class_number_and_probability(star_pool, tmp_path):
    run_dir = finished_run(tmp_path / "run", Path(star_pool.path), [1, 0], [0.75, 0.5])
    out = write_star(run_dir, star_pool)
    table = starfile.read(out)  # the field's reader, as RELION's tools see it
    assert table["rlnImageName"].tolist() == [f"2@{tmp_path / 'stack.mrcs'}", str(tmp_path / "single.mrc")]
    assert table["rlnTomoName"].tolist() == ["TS_01", "TS_02"]
    assert table["rlnCoordinateZ"].tolist() == [30.0, 60.0]
    assert table["rlnClassNumber"].tolist() == [2, 1]  # class i of the pool is number i + 1
    assert table["rlnMaxValueProbDistribution"].tolist() == [0.75, 0.5]
    [ours] = parse_star(out)  # and ingest's own reader: the file can come back in
    assert ours.block == "particles" and len(ours.rows) == 2


def test_star_of_a_pool_without_files_or_positions_carries_only_classes(tmp_path):
    with PoolWriter(tmp_path / "pool", 6, class_names=["a", "b"]) as writer:
        writer.add("arr[0]", noise(0), source="arr.npy[0]")
        writer.add("arr[1]", noise(1), source="arr.npy[1]")
        writer.add("a-000001", noise(2), source="simulated:a")
    info = writer.close()
    run_dir = finished_run(tmp_path / "run", tmp_path / "pool", [0, 1, 1], [0.9, 0.8, 0.7])
    table = starfile.read(write_star(run_dir, info))
    assert list(table.columns) == ["rlnClassNumber", "rlnMaxValueProbDistribution"]


def test_export_command_writes_the_star_where_asked(star_pool, tmp_path, capsys):
    run_dir = finished_run(tmp_path / "run", Path(star_pool.path), [0, 1], [0.6, 0.7])
    assert run_main(["export", str(run_dir), "--star", str(tmp_path / "classes.star")]) == 0
    assert starfile.read(tmp_path / "classes.star")["rlnClassNumber"].tolist() == [1, 2]
    assert f"STAR: {tmp_path / 'classes.star'}" in capsys.readouterr().out


def test_export_of_an_unfinished_campaign_says_so(star_pool, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"pool": star_pool.path, "done": False}))
    assert run_main(["export", str(run_dir)]) == 2
    assert "no predictions.parquet (the campaign has not finished)" in capsys.readouterr().err


def test_copick_export_of_a_pool_not_from_copick_is_refused(star_pool, tmp_path, capsys):
    run_dir = finished_run(tmp_path / "run", Path(star_pool.path), [0, 1], [0.6, 0.7])
    (tmp_path / "copick.json").write_text(json.dumps({"pickable_objects": [], "overlay_root": "local:///x"}))
    assert run_main(["export", str(run_dir), "--copick", str(tmp_path / "copick.json")]) == 2
    assert "no subtomogram of this pool was ingested from a copick project" in capsys.readouterr().err
