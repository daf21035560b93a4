"""Ingest from folders, STAR files and arrays: every good subtomogram in, every bad one named."""

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from orchestrator.ingest import IngestError, ingest, main, parse_star
from orchestrator.pool import MANIFEST, PoolError, iter_volumes, open_pool, read_index, zscore
from orchestrator.volumes import write_volume

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BOX = 6


def noise(shape=(BOX,) * 3, seed=0, offset=0.0):
    return np.random.default_rng(seed).normal(loc=offset, size=shape).astype(np.float32)


def rejects(pool) -> list[dict]:
    with open(Path(pool) / "rejects.csv", newline="") as f:
        return list(csv.DictReader(f))


def index_rows(pool) -> list[dict]:
    return read_index(pool).to_pylist()


def pool_volumes(pool) -> np.ndarray:
    return np.concatenate([v for _, v, _ in iter_volumes(pool)])


# -- folders


@pytest.fixture
def mixed_folder(tmp_path):
    """Good subtomograms (3 files + a 2-section stack) beside one file of each bad kind."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        write_volume(src / f"good{i}.mrc", noise(seed=i), 10.0)
    write_volume(src / "sub" / "pair.mrcs", np.stack([noise(seed=7), noise(seed=8)]), 10.0)
    good = (src / "good0.mrc").read_bytes()
    (src / "truncated.mrc").write_bytes(good[: len(good) - 100])
    (src / "words.map").write_text("not an MRC file at all\n" * 80)
    write_volume(src / "image.mrc", noise((BOX, BOX)), 10.0)
    write_volume(src / "wrongbox.mrc", noise((BOX + 2,) * 3), 10.0)
    one_voxel = np.arange(BOX**3).reshape((BOX,) * 3) == 5
    with warnings.catch_warnings():  # mrcfile warns while writing NaN/Inf; such files are the point
        warnings.simplefilter("ignore", RuntimeWarning)
        write_volume(src / "nan.mrc", np.where(one_voxel, np.nan, noise()), 10.0)
        write_volume(src / "inf.mrc", np.where(one_voxel, np.inf, noise()), 10.0)
    write_volume(src / "constant.mrc", np.full((BOX,) * 3, 3.0), 10.0)
    (src / "README.txt").write_text("ignored: not an MRC suffix")
    return src


EXPECTED_REJECTS = {
    "truncated.mrc": "unreadable",
    "words.map": "unreadable",
    "image.mrc": "not_a_volume",
    "wrongbox.mrc": "box_mismatch",
    "nan.mrc": "nonfinite",
    "inf.mrc": "nonfinite",
    "constant.mrc": "constant",
}


def test_mixed_folder_accepts_each_good_subtomogram_once_and_rejects_each_bad_file(mixed_folder, tmp_path):
    report = ingest(mixed_folder, tmp_path / "pool")
    ids = [row["subtomo_id"] for row in index_rows(tmp_path / "pool")]
    assert ids == ["good0.mrc", "good1.mrc", "good2.mrc", "sub/pair.mrcs@1", "sub/pair.mrcs@2"]
    got = {Path(r["source"]).name: r["reason_code"] for r in rejects(tmp_path / "pool")}
    assert got == EXPECTED_REJECTS
    assert report.accepted == 5
    assert report.rejected_by_reason == {"unreadable": 2, "not_a_volume": 1, "box_mismatch": 1, "nonfinite": 2, "constant": 1}


def test_each_reject_reason_names_its_file(mixed_folder, tmp_path):
    ingest(mixed_folder, tmp_path / "pool")
    for row in rejects(tmp_path / "pool"):
        assert Path(row["source"]).name in row["reason"]


def test_report_file_holds_the_counts(mixed_folder, tmp_path):
    ingest(mixed_folder, tmp_path / "pool")
    saved = json.loads((tmp_path / "pool" / "ingest_report.json").read_text())
    assert (saved["accepted"], saved["rejected"], saved["ignored_files"]) == (5, 7, 1)
    assert saved["rejected_by_reason"]["nonfinite"] == 2


def test_stack_gives_one_row_per_section_with_its_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stack = np.stack([noise(seed=s) for s in range(3)])
    write_volume(src / "three.mrcs", stack, 10.0)
    ingest(src, tmp_path / "pool", dtype="float32")
    rows = index_rows(tmp_path / "pool")
    assert [r["subtomo_id"] for r in rows] == ["three.mrcs@1", "three.mrcs@2", "three.mrcs@3"]
    assert rows[2]["source"] == f"{src / 'three.mrcs'}@3"
    np.testing.assert_allclose(pool_volumes(tmp_path / "pool"), np.stack([zscore(v) for v in stack]), atol=1e-5)


def test_cli_summary_lists_accepted_and_rejected_by_reason(mixed_folder, tmp_path, capsys):
    assert main([str(mixed_folder), "--out", str(tmp_path / "pool")]) == 0
    out = capsys.readouterr().out
    assert "5 accepted, 7 rejected" in out
    assert "rejected nonfinite" in out


def test_empty_folder_exits_2_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "pool")]) == 2
    assert "no .mrc/.map/.mrcs files found" in capsys.readouterr().err


def test_folder_with_nothing_good_exits_1_and_leaves_no_pool(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.mrc").write_text("garbage")
    write_volume(src / "b.mrc", np.zeros((BOX,) * 3))
    assert main([str(src), "--out", str(tmp_path / "pool")]) == 1
    assert [r["reason_code"] for r in rejects(tmp_path / "pool")] == ["unreadable", "constant"]
    with pytest.raises(PoolError, match="not a pool"):
        open_pool(tmp_path / "pool")


def test_existing_pool_is_kept_unless_overwrite(mixed_folder, tmp_path, capsys):
    ingest(mixed_folder, tmp_path / "pool")
    assert main([str(mixed_folder), "--out", str(tmp_path / "pool")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(mixed_folder), "--out", str(tmp_path / "pool"), "--overwrite"]) == 0


def test_progress_lines_are_logged_during_a_long_ingest(mixed_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cryoal.ingest")
    ingest(mixed_folder, tmp_path / "pool", progress_every=4)
    progress = [r for r in caplog.records if r.levelno == logging.INFO and "items/s" in r.message]
    assert len(progress) == 3  # after items 4, 8 and 12 of 12


# -- box: crop and pad


def test_box_centre_crops_a_larger_volume(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = noise((BOX + 2,) * 3, seed=3)
    write_volume(src / "big.mrc", big)
    report = ingest(src, tmp_path / "pool", box=BOX, dtype="float32")
    np.testing.assert_allclose(pool_volumes(tmp_path / "pool")[0], zscore(big[1:-1, 1:-1, 1:-1]), atol=1e-5)
    assert (report.cropped, report.padded) == (1, 0)


def test_box_pads_a_smaller_volume_with_its_mean_before_zscoring(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_volume(src / "small.mrc", noise((BOX - 2,) * 3, seed=4, offset=100.0))  # far from 0: zero padding would show
    report = ingest(src, tmp_path / "pool", box=BOX, dtype="float32")
    vol = pool_volumes(tmp_path / "pool")[0]
    frame = vol.copy()
    frame[1:-1, 1:-1, 1:-1] = 0.0
    np.testing.assert_allclose(frame, 0.0, atol=1e-5)  # the mean, z-scored, is 0
    assert (report.cropped, report.padded) == (0, 1)
    with open(tmp_path / "pool" / "resized.csv", newline="") as f:
        assert [(r["subtomo_id"], r["original_shape"], r["action"]) for r in csv.DictReader(f)] == [
            ("small.mrc", "4x4x4", "pad_with_mean")
        ]


def test_without_box_the_first_accepted_volume_sets_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_volume(src / "a_constant.mrc", np.ones((BOX + 2,) * 3))  # rejected, so it does not set the box
    write_volume(src / "b.mrc", noise())
    write_volume(src / "c.mrc", noise((BOX + 2,) * 3))
    ingest(src, tmp_path / "pool")
    assert open_pool(tmp_path / "pool").box == (BOX,) * 3
    assert [r["reason_code"] for r in rejects(tmp_path / "pool")] == ["constant", "box_mismatch"]


# -- voxel size


def test_unknown_voxel_size_is_kept_as_null_and_warned_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cryoal.ingest")  # a Ray session may have raised it
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        write_volume(src / f"v{i}.mrc", noise(seed=i))  # header voxel size 0
    report = ingest(src, tmp_path / "pool")
    assert [r["voxel_size_A"] for r in index_rows(tmp_path / "pool")] == [None, None, None]
    voxel_warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "voxel size" in r.message]
    assert len(voxel_warnings) == 1
    assert report.voxel_size_unknown == 3


def test_voxel_size_option_fills_unknown_sizes_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_volume(src / "known.mrc", noise(seed=1), 10.0)
    write_volume(src / "unknown.mrc", noise(seed=2))
    ingest(src, tmp_path / "pool", voxel_size=7.5)
    assert [r["voxel_size_A"] for r in index_rows(tmp_path / "pool")] == [10.0, 7.5]


@pytest.mark.skipif(not (SHARED_DATA / "real").is_dir(), reason=f"shared test data not found at {SHARED_DATA}")
def test_real_subtomogram_with_header_voxel_size_0_ingests_with_null_voxel_size(tmp_path):
    report = ingest(SHARED_DATA / "real", tmp_path / "pool")
    rows = index_rows(tmp_path / "pool")
    assert (report.accepted, report.rejected) == (1, 0)
    assert [(r["subtomo_id"], r["voxel_size_A"]) for r in rows] == [("tomotwin_model_0_1BXN_1.mrc", None)]
    assert open_pool(tmp_path / "pool").box == (37, 37, 37)


# -- STAR files


STAR = """\
# version 30001
data_optics

loop_
_rlnOpticsGroup #1
_rlnImagePixelSize #2
1 10.0

data_particles

loop_
_rlnImageName #1
_rlnCoordinateX #2
_rlnCoordinateY #3
_rlnCoordinateZ #4
_rlnTomoName #5
_rlnClassNumber #6
1@Stacks/ts01.mrcs 101.5 202 303 TS_01 1
2@Stacks/ts01.mrcs 111 212 313 'TS 01' 2   # quoted value, then a comment
single.mrc 5 6 7 TS_02 2
3@Stacks/ts01.mrcs 1 2 3 TS_01 1
1@Stacks/absent.mrcs 1 2 3 TS_01 1
1@Stacks/ts01.mrcs 1 2 3 TS_01 1
2@Stacks/ts01.mrcs 1 2 3 TS_01 2
1@Stacks/ts02.mrcs 1 2 3 TS_02 3
1@Stacks/ts02.mrcs 1 2
"""


@pytest.fixture
def star_file(tmp_path):
    folder = tmp_path / "project"
    (folder / "Stacks").mkdir(parents=True)
    write_volume(folder / "Stacks" / "ts01.mrcs", np.stack([noise(seed=1), noise(seed=2)]), 10.0)
    write_volume(folder / "Stacks" / "ts02.mrcs", np.stack([noise(seed=3)]), 10.0)
    write_volume(folder / "single.mrc", noise(seed=4), 10.0)
    (folder / "particles.star").write_text(STAR)
    return folder / "particles.star"


def test_star_parser_reads_quoted_values_and_skips_comments(star_file):
    tables = parse_star(star_file)
    particles = [t for t in tables if t.block == "particles"][0]
    assert particles.columns[:2] == ["rlnImageName", "rlnCoordinateX"]
    assert particles.rows[1][1] == ["2@Stacks/ts01.mrcs", "111", "212", "313", "TS 01", "2"]


def test_star_rows_give_ids_coordinates_tomograms_and_0_based_labels(star_file, tmp_path):
    ingest(star_file, tmp_path / "pool", star_labels=True, class_names=["ribosome", "proteasome"])
    rows = index_rows(tmp_path / "pool")
    assert [(r["subtomo_id"], r["tomogram"], r["label"]) for r in rows] == [
        ("Stacks/ts01.mrcs@1", "TS_01", 0),
        ("Stacks/ts01.mrcs@2", "TS 01", 1),
        ("single.mrc", "TS_02", 1),
    ]
    assert (rows[0]["x"], rows[0]["y"], rows[0]["z"]) == (101.5, 202.0, 303.0)
    assert open_pool(tmp_path / "pool").class_names == ("ribosome", "proteasome")


def test_star_bad_rows_are_rejected_with_their_row_numbers(star_file, tmp_path):
    ingest(star_file, tmp_path / "pool", star_labels=True, class_names=["ribosome", "proteasome"])
    got = [(r["item"], r["reason_code"]) for r in rejects(tmp_path / "pool")]
    assert got == [
        ("row 4 (line 21)", "missing_section"),
        ("row 5 (line 22)", "missing_file"),
        ("row 6 (line 23)", "duplicate_id"),
        ("row 7 (line 24)", "duplicate_id"),
        ("row 8 (line 25)", "label_out_of_range"),
        ("row 9 (line 26)", "bad_row"),
    ]
    reasons = {r["reason_code"]: r["reason"] for r in rejects(tmp_path / "pool")}
    assert "absent.mrcs does not exist" in reasons["missing_file"]
    assert "section 3 requested" in reasons["missing_section"]


def test_star_without_star_labels_leaves_labels_unknown(star_file, tmp_path):
    ingest(star_file, tmp_path / "pool")
    assert {r["label"] for r in index_rows(tmp_path / "pool")} == {None}
    assert "label_out_of_range" not in {r["reason_code"] for r in rejects(tmp_path / "pool")}


def test_star_labels_default_to_relion_class_names(star_file, tmp_path):
    ingest(star_file, tmp_path / "pool", star_labels=True)
    assert open_pool(tmp_path / "pool").class_names == ("class_1", "class_2", "class_3")


def test_star_without_image_names_is_refused(tmp_path):
    (tmp_path / "bad.star").write_text("data_particles\nloop_\n_rlnCoordinateX #1\n1.0\n")
    with pytest.raises(IngestError, match="rlnImageName"):
        ingest(tmp_path / "bad.star", tmp_path / "pool")


# -- arrays


def test_npy_rows_become_subtomograms_with_their_labels(tmp_path):
    array = np.stack([noise(seed=s) for s in range(4)])
    np.save(tmp_path / "subtomos.npy", array)
    np.save(tmp_path / "labels.npy", np.array([0, 2, 1, 5]))
    report = ingest(tmp_path / "subtomos.npy", tmp_path / "pool", labels=tmp_path / "labels.npy",
                    class_names=["a", "b", "c"], dtype="float32")
    rows = index_rows(tmp_path / "pool")
    assert [(r["subtomo_id"], r["label"]) for r in rows] == [("subtomos.npy[0]", 0), ("subtomos.npy[1]", 2), ("subtomos.npy[2]", 1)]
    assert [(r["item"], r["reason_code"]) for r in rejects(tmp_path / "pool")] == [("index 3", "label_out_of_range")]
    np.testing.assert_allclose(pool_volumes(tmp_path / "pool"), np.stack([zscore(v) for v in array[:3]]), atol=1e-5)
    assert report.accepted == 3


def test_npy_labels_of_the_wrong_length_are_refused(tmp_path):
    np.save(tmp_path / "subtomos.npy", np.stack([noise(seed=s) for s in range(3)]))
    np.save(tmp_path / "labels.npy", np.array([0, 1]))
    with pytest.raises(IngestError, match="expected 3 labels"):
        ingest(tmp_path / "subtomos.npy", tmp_path / "pool", labels=tmp_path / "labels.npy")
    assert not (tmp_path / "pool").exists()


def test_npy_that_is_not_4d_is_refused(tmp_path):
    np.save(tmp_path / "one.npy", noise())
    with pytest.raises(IngestError, match=r"expected an array \[N, D, H, W\]"):
        ingest(tmp_path / "one.npy", tmp_path / "pool")


# -- options


def test_class_names_file_sets_the_pools_class_map(mixed_folder, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("# one per line, index 0 first\nribosome\n\nproteasome\n")
    assert main([str(mixed_folder), "--out", str(tmp_path / "pool"), "--class-names-file", str(names)]) == 0
    assert open_pool(tmp_path / "pool").class_names == ("ribosome", "proteasome")


def test_labels_option_without_an_npy_source_exits_2(mixed_folder, tmp_path, capsys):
    np.save(tmp_path / "labels.npy", np.zeros(5, dtype=int))
    assert main([str(mixed_folder), "--out", str(tmp_path / "pool"), "--labels", str(tmp_path / "labels.npy")]) == 2
    assert "--labels goes with a .npy source" in capsys.readouterr().err


def test_star_class_number_that_is_not_an_integer_is_rejected_as_bad_label(tmp_path):
    write_volume(tmp_path / "a.mrc", noise(seed=1))
    write_volume(tmp_path / "b.mrc", noise(seed=2))
    (tmp_path / "p.star").write_text(
        "data_\nloop_\n_rlnImageName\n_rlnClassNumber\na.mrc 1\nb.mrc two\n"
    )
    ingest(tmp_path / "p.star", tmp_path / "pool", star_labels=True)
    assert [(r["item"], r["reason_code"]) for r in rejects(tmp_path / "pool")] == [("row 2 (line 6)", "bad_label")]
    assert [r["label"] for r in index_rows(tmp_path / "pool")] == [0]
