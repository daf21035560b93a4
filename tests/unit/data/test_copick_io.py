"""copick both ways, on a small local project the tests build: subtomograms cut at its picks
(labels from the pick objects), and a campaign's predictions written back as picks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import finished_run
from orchestrator.campaign.export import after_campaign, write_copick
from orchestrator.data.copick_io import CopickSelection, root_logging_kept
from orchestrator.data.ingest import IngestError, ingest, main
from orchestrator.data.pool import iter_volumes, open_pool, read_index, zscore
from orchestrator.data.simulate import builtin_structure

with root_logging_kept():  # importing copick takes over the root logger
    import copick

VOXEL = 20.0  # Å
SHAPE = (40, 48, 44)  # z, y, x
BOX = 12
# (object, user, position in voxels x, y, z); the last one sits at the edge: its box leaves the tomogram
PICKS = [
    ("ring", "curator", (12, 12, 10)),
    ("barrel", "curator", (30, 20, 24)),
    ("ring", "curator", (20, 34, 28)),
    ("barrel", "otherlab", (14, 30, 16)),
    ("ring", "curator", (2, 20, 20)),
]


def make_project(root: Path) -> tuple[Path, np.ndarray]:
    """A filesystem copick project: one run, one 20 Å tomogram of noise with a built-in structure
    of the simulator placed at each pick, and picks by two users."""
    with root_logging_kept():
        return _make_project(root)


def _make_project(root: Path) -> tuple[Path, np.ndarray]:
    config = root / "copick.json"
    config.write_text(json.dumps({
        "config_type": "filesystem", "name": "test", "user_id": "tester",
        "pickable_objects": [
            {"name": "ring", "is_particle": True, "label": 1, "radius": 80},
            {"name": "barrel", "is_particle": True, "label": 2, "radius": 100},
            {"name": "membrane", "is_particle": False, "label": 3},
        ],
        "overlay_root": f"local://{root / 'overlay'}", "static_root": f"local://{root / 'static'}",
        "overlay_fs_args": {"auto_mkdir": True}, "static_fs_args": {"auto_mkdir": True},
    }))
    rng = np.random.default_rng(0)
    tomogram = rng.normal(scale=0.2, size=SHAPE).astype(np.float32)
    for name, _, (x, y, z) in PICKS:
        density = builtin_structure(0 if name == "ring" else 1, VOXEL)
        half = density.shape[0] // 2
        region = tuple(slice(max(c - half, 0), c - half + density.shape[0]) for c in (z, y, x))
        target = tomogram[region]
        target += density[tuple(slice(density.shape[i] - target.shape[i], None) if region[i].start == 0
                                else slice(0, target.shape[i]) for i in range(3))]
    project = copick.from_file(str(config))
    run = project.new_run("run1")
    run.new_voxel_spacing(VOXEL).new_tomogram("wbp").from_numpy(tomogram, levels=1)
    for (name, user) in dict.fromkeys((n, u) for n, u, _ in PICKS):
        points = [np.array(p, float) * VOXEL for n, u, p in PICKS if (n, u) == (name, user)]
        run.new_picks(name, session_id="0", user_id=user).from_numpy(np.array(points))
    return config, tomogram


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("copick"))


def rejects(pool) -> list[dict]:
    with open(Path(pool) / "rejects.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_ingest_cuts_a_box_at_each_pick_labelled_by_its_object(project, tmp_path):
    config, tomogram = project
    report = ingest(config, tmp_path / "pool", box=BOX, dtype="float32")
    info = open_pool(tmp_path / "pool")
    assert info.class_names == ("ring", "barrel")  # picked particle objects, in the config's order
    rows = read_index(info.path).to_pylist()
    assert [(r["subtomo_id"], r["label"], r["tomogram"]) for r in rows] == [
        ("run1/curator_0_ring/0", 0, "run1"),
        ("run1/curator_0_ring/1", 0, "run1"),
        ("run1/curator_0_barrel/0", 1, "run1"),
        ("run1/otherlab_0_barrel/0", 1, "run1"),
    ]
    volumes = np.concatenate([v for _, v, _ in iter_volumes(info.path)])
    x, y, z = PICKS[0][2]
    expected = tomogram[z - BOX // 2:z + BOX // 2, y - BOX // 2:y + BOX // 2, x - BOX // 2:x + BOX // 2]
    np.testing.assert_allclose(volumes[0], zscore(expected), atol=1e-5)
    assert (rows[0]["x"], rows[0]["y"], rows[0]["z"], rows[0]["voxel_size_A"]) == (12.0, 12.0, 10.0, VOXEL)
    assert report.accepted == 4


def test_a_pick_whose_box_leaves_the_tomogram_is_rejected_with_its_position(project, tmp_path):
    config, _ = project
    ingest(config, tmp_path / "pool", box=BOX)
    [row] = rejects(tmp_path / "pool")
    assert (row["item"], row["reason_code"]) == ("run run1 picks curator_0_ring point 2", "outside_tomogram")
    assert "centred at voxel (2.0, 20.0, 20.0)" in row["reason"]


def test_picks_can_be_limited_to_one_user(project, tmp_path):
    config, _ = project
    ingest(config, tmp_path / "pool", box=BOX, copick=CopickSelection(user_id="otherlab"))
    assert [r["subtomo_id"] for r in read_index(tmp_path / "pool").to_pylist()] == ["run1/otherlab_0_barrel/0"]
    assert open_pool(tmp_path / "pool").class_names == ("barrel",)


def test_a_copick_project_needs_a_box(project, tmp_path, capsys):
    config, _ = project
    assert main([str(config), "--out", str(tmp_path / "pool")]) == 2
    assert "--box is required for a copick project" in capsys.readouterr().err


def test_a_voxel_spacing_the_project_lacks_rejects_every_pick_naming_what_it_has(project, tmp_path):
    config, _ = project
    ingest(config, tmp_path / "pool", box=BOX, copick=CopickSelection(voxel_size=10.0))
    reasons = {(r["reason_code"], r["reason"].split(": ", 1)[1]) for r in rejects(tmp_path / "pool")}
    assert reasons == {("missing_file", "run run1 has no --copick-voxel-size 10.0 (it has 20 Å)")}


def test_several_tomogram_types_need_a_choice(tmp_path):
    config, tomogram = make_project(tmp_path)
    with root_logging_kept():
        run = copick.from_file(str(config)).get_run("run1")
        run.get_voxel_spacing(VOXEL).new_tomogram("denoised").from_numpy(tomogram, levels=1)
    with pytest.raises(IngestError, match=r"several tomogram types \(.*\): choose one with --copick-tomo-type"):
        ingest(config, tmp_path / "pool", box=BOX)
    assert ingest(config, tmp_path / "pool", box=BOX, copick=CopickSelection(tomo_type="wbp")).accepted == 4


# -- predictions back as picks


def test_predictions_go_back_as_one_picks_file_per_class_with_the_probability_as_score(project, tmp_path):
    config, _ = project
    ingest(config, tmp_path / "pool", box=BOX)
    info = open_pool(tmp_path / "pool")
    run_dir = finished_run(tmp_path / "ema_kl-20261201-101500", tmp_path / "pool", [1, 0, 1, 1], [0.9, 0.8, 0.7, 0.6])
    assert write_copick(run_dir, info, config) == {"barrel": 3, "ring": 1}
    picks = {(p.pickable_object_name, p.user_id, p.session_id): p
             for p in copick.from_file(str(config)).get_run("run1").picks}
    barrel = picks[("barrel", "cryoal", "ema-kl-20261201-101500")]
    positions, _ = barrel.numpy()
    expected = [np.array(p, float) * VOXEL for p in (PICKS[0][2], PICKS[1][2], PICKS[3][2])]  # rows 0, 2, 3
    np.testing.assert_allclose(positions, expected)
    np.testing.assert_allclose(barrel.scores(), [0.9, 0.7, 0.6])
    assert picks[("ring", "cryoal", "ema-kl-20261201-101500")].scores().tolist() == [0.8]


def test_a_finished_campaign_on_a_copick_pool_writes_its_picks_and_star_by_itself(tmp_path):
    config, _ = make_project(tmp_path)
    ingest(config, tmp_path / "pool", box=BOX)
    info = open_pool(tmp_path / "pool")
    run_dir = finished_run(tmp_path / "run", tmp_path / "pool", [0, 0, 1, 1], [0.5, 0.6, 0.7, 0.8])
    after_campaign(run_dir, info)
    sessions = {(p.pickable_object_name, p.session_id) for p in copick.from_file(str(config)).get_run("run1").picks
                if p.user_id == "cryoal"}
    assert sessions == {("ring", "run"), ("barrel", "run")}
    assert (run_dir / "predictions.star").is_file()
