"""Ingest from folders, STAR files and arrays: every good subtomogram in, every bad one named."""

import csv
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from orchestrator.data.ingest import IngestError, ingest, main, parse_star
from orchestrator.data.pool import MANIFEST, PoolError, iter_volumes, open_pool, read_index, zscore
from orchestrator.data.volumes import write_volume

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
    assert "no .mrc/.map/.mrcs/.em files found" in capsys.readouterr().err


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


def test_without_box_the_most_common_box_wins_whichever_file_sorts_first(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_volume(src / "a_big.mrc", noise((BOX + 2,) * 3))  # sorts first: it used to set the box
    for i in range(4):
        write_volume(src / f"b{i}.mrc", noise(seed=i))
    assert main([str(src), "--out", str(tmp_path / "pool")]) == 0
    assert open_pool(tmp_path / "pool").box == (BOX,) * 3
    assert [(Path(r["source"]).name, r["reason_code"]) for r in rejects(tmp_path / "pool")] == [
        ("a_big.mrc", "box_mismatch")
    ]
    out = capsys.readouterr().out
    assert "the most common box: 4 of 5 volumes" in out
    assert "box mismatches (rejected): 8x8x8 ×1; pass --box N" in out


def test_a_box_is_counted_per_volume_so_a_stack_outweighs_single_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_volume(src / "one.mrc", noise())
    write_volume(src / "two.mrc", noise(seed=1))
    write_volume(src / "stack.mrcs", np.stack([noise((BOX + 2,) * 3, seed=s) for s in range(3)]))
    report = ingest(src, tmp_path / "pool")
    assert open_pool(tmp_path / "pool").box == (BOX + 2,) * 3
    assert report.box_census == {"8x8x8": 3, "6x6x6": 2}
    assert report.box_mismatches == {"6x6x6": 2}


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


# -- replacing a pool: only once the new one is complete


@pytest.fixture
def old_pool(tmp_path):
    """A pool of three subtomograms, and what its files hold, to check that it stays intact."""
    src = tmp_path / "old_src"
    src.mkdir()
    for i in range(3):
        write_volume(src / f"old{i}.mrc", noise(seed=10 + i))
    pool = tmp_path / "pool"
    ingest(src, pool)
    return pool, {p.relative_to(pool): p.read_bytes() for p in pool.rglob("*") if p.is_file()}


def test_overwrite_that_accepts_nothing_keeps_the_previous_pool_and_puts_the_rejects_beside_it(old_pool, tmp_path, capsys):
    pool, before = old_pool
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.mrc").write_text("garbage")
    assert main([str(bad), "--out", str(pool), "--overwrite"]) == 1
    assert {p.relative_to(pool): p.read_bytes() for p in pool.rglob("*") if p.is_file()} == before
    assert [r["reason_code"] for r in rejects(tmp_path / "pool.rejected")] == ["unreadable"]
    assert "the pool already at" in capsys.readouterr().out


def test_ctrl_c_during_an_overwrite_ends_in_one_line_and_leaves_the_previous_pool(old_pool, mixed_folder, tmp_path,
                                                                                  capsys, monkeypatch):
    pool, before = old_pool
    from orchestrator.data import ingest as module

    taken = []

    def take_then_interrupt(self, cand):
        taken.append(cand)
        if len(taken) == 3:
            raise KeyboardInterrupt
        original(self, cand)

    original = module._Run.take
    monkeypatch.setattr(module._Run, "take", take_then_interrupt)
    assert main([str(mixed_folder), "--out", str(pool), "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; nothing changed" in err and "Traceback" not in err
    assert {p.relative_to(pool): p.read_bytes() for p in pool.rglob("*") if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".pool.")]  # no staging left


def test_an_ingest_killed_outright_leaves_a_staging_folder_that_the_next_ingest_removes(mixed_folder, tmp_path):
    dead = tmp_path / ".pool.ingest-999999999"  # no such process
    (dead / "shards").mkdir(parents=True)
    (dead / "ingest_report.json").write_text('{"accepted": 100000}')
    ingest(mixed_folder, tmp_path / "pool")
    assert not dead.exists()
    assert json.loads((tmp_path / "pool" / "ingest_report.json").read_text())["accepted"] == 5


def test_a_pool_left_under_its_hidden_name_by_a_crash_mid_swap_is_put_back(old_pool, mixed_folder, tmp_path):
    pool, before = old_pool
    pool.rename(tmp_path / ".pool.old-4242")  # the first of the two renames happened, not the second
    with pytest.raises(IngestError, match="a pool already exists there"):
        ingest(mixed_folder, pool)
    assert {p.relative_to(pool): p.read_bytes() for p in pool.rglob("*") if p.is_file()} == before


def test_an_out_folder_holding_other_files_is_refused_before_anything_is_written(mixed_folder, tmp_path):
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "notes.txt").write_text("mine")
    with pytest.raises(IngestError, match=r"holds files that are not part of a pool \(notes\.txt\)"):
        ingest(mixed_folder, tmp_path / "pool", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == ["notes.txt"]


# -- headers other tools write loosely, .em files, complex values


def loose_header_copy(path: Path, out: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[208:216] = bytes(8)  # no "MAP " ID string, zero machine stamp
    out.write_bytes(raw)


def test_maps_without_map_id_or_machine_stamp_are_ingested_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="cryoal.ingest")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        write_volume(tmp_path / f"v{i}.mrc", noise(seed=i), 10.0)
        loose_header_copy(tmp_path / f"v{i}.mrc", src / f"v{i}.mrc")
    report = ingest(src, tmp_path / "pool", dtype="float32")
    assert report.accepted == 2 and report.rejected == 0
    np.testing.assert_allclose(pool_volumes(tmp_path / "pool")[0], zscore(noise(seed=0)), atol=1e-5)
    assert report.header_faults == {"Map ID string not found": 2, "Unrecognised machine stamp": 2}
    assert len([r for r in caplog.records if "Map ID string not found" in r.message]) == 1


def test_em_files_are_ingested_from_a_folder_beside_mrc_files(tmp_path):
    import emfile

    src = tmp_path / "src"
    src.mkdir()
    emfile.write(str(src / "a.em"), noise(seed=1))
    write_volume(src / "b.mrc", noise(seed=2), 10.0)
    report = ingest(src, tmp_path / "pool", dtype="float32")
    assert [(r["subtomo_id"], r["voxel_size_A"]) for r in index_rows(tmp_path / "pool")] == [
        ("a.em", None), ("b.mrc", 10.0)
    ]
    np.testing.assert_allclose(pool_volumes(tmp_path / "pool")[0], zscore(noise(seed=1)), atol=1e-5)
    assert report.ignored_files == 0


def test_ignored_files_are_counted_by_suffix(mixed_folder, tmp_path, capsys):
    (mixed_folder / "tilt.tif").write_bytes(b"II*")
    assert main([str(mixed_folder), "--out", str(tmp_path / "pool")]) == 0
    assert "ignored 2 file(s) without a .mrc/.map/.mrcs/.em suffix (.tif ×1, .txt ×1)" in capsys.readouterr().out


def test_complex_valued_mrc_is_rejected_as_complex_without_a_numpy_warning(tmp_path):
    import mrcfile

    src = tmp_path / "src"
    src.mkdir()
    with mrcfile.new(str(src / "fft.mrc")) as mrc:
        mrc.set_data((noise() + 1j * noise(seed=1)).astype(np.complex64))
    write_volume(src / "real.mrc", noise(seed=2))
    ingest(src, tmp_path / "pool")  # pytest turns a ComplexWarning into an error
    assert [(Path(r["source"]).name, r["reason_code"]) for r in rejects(tmp_path / "pool")] == [("fft.mrc", "complex")]


def test_tilt_image_stacks_in_a_folder_are_rejected_not_cut_into_cubes(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_volume(src / "TS_01_particle1.mrcs", noise((2 * BOX, BOX, BOX)))  # 12 tilts of 6x6: once "2 cubes"
    assert main([str(src), "--out", str(tmp_path / "pool"), "--box", str(BOX)]) == 1
    [row] = rejects(tmp_path / "pool")
    assert row["reason_code"] == "not_a_volume"
    assert "12 2-D images of 6x6" in row["reason"] and "ts_export_particles --3d" in row["reason"]


# -- RELION 5 / Warp conventions


RELION5_2D = """\
# version 50001

data_general

_rlnTomoSubTomosAre2DStacks                       1


# version 50001

data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImageDimensionality #3
_rlnTomoSubtomogramBinning #4
_rlnImagePixelSize #5
_rlnImageSize #6
           1 opticsGroup1            2     4.000000     5.400000           32


# version 50001

data_particles

loop_
_rlnTomoName #1
_rlnTomoParticleId #2
_rlnCoordinateX #3
_rlnCoordinateY #4
_rlnCoordinateZ #5
_rlnImageName #6
_rlnOpticsGroup #7
TS_01 1 10.0 20.0 30.0 Extract/job008/Subtomograms/TS_01/1_stack2d.mrcs 1
TS_01 2 40.0 50.0 60.0 Extract/job008/Subtomograms/TS_01/2_stack2d.mrcs 1
"""


def test_relion5_star_of_2d_stacks_is_refused_saying_how_to_extract_3d_subtomograms(tmp_path, capsys):
    (tmp_path / "particles.star").write_text(RELION5_2D)
    assert main([str(tmp_path / "particles.star"), "--out", str(tmp_path / "pool")]) == 2
    err = capsys.readouterr().err
    assert "rlnTomoSubTomosAre2DStacks 1" in err
    assert "'Write output as 2D stacks?' set to No" in err and "ts_export_particles --3d" in err
    assert not (tmp_path / "pool").exists()


def test_the_2d_flag_written_as_a_one_row_loop_is_read_too(tmp_path):
    text = RELION5_2D.replace("_rlnTomoSubTomosAre2DStacks                       1",
                              "loop_\n_rlnTomoSubTomosAre2DStacks #1\n1")
    (tmp_path / "particles.star").write_text(text)
    with pytest.raises(IngestError, match="2-D tilt-image stacks"):
        ingest(tmp_path / "particles.star", tmp_path / "pool")


def test_rows_of_a_2d_optics_group_are_rejected_and_the_3d_ones_ingested(tmp_path):
    write_volume(tmp_path / "p1.mrc", noise(seed=1), 5.4)
    write_volume(tmp_path / "p2.mrc", noise(seed=2), 5.4)
    (tmp_path / "mixed.star").write_text(
        "data_optics\nloop_\n_rlnOpticsGroup\n_rlnImageDimensionality\n1 3\n2 2\n\n"
        "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\np1.mrc 1\np2.mrc 2\n"
    )
    ingest(tmp_path / "mixed.star", tmp_path / "pool")
    assert [r["subtomo_id"] for r in index_rows(tmp_path / "pool")] == ["p1.mrc"]
    assert [(r["item"], r["reason_code"]) for r in rejects(tmp_path / "pool")] == [("row 2 (line 13)", "two_d_stack")]


@pytest.fixture
def relion_project(tmp_path):
    """A RELION project: job outputs, and a STAR whose paths are relative to the project folder."""
    project = tmp_path / "relion"
    job = project / "Extract" / "job005"
    (job / "Subtomograms" / "TS_01").mkdir(parents=True)
    for i in range(2):
        write_volume(job / "Subtomograms" / "TS_01" / f"{i}_data.mrc", noise(seed=i), 5.4)
    (job / "particles.star").write_text(
        "data_particles\nloop_\n_rlnImageName\n_rlnTomoName\n"
        "Extract/job005/Subtomograms/TS_01/0_data.mrc TS_01\n"
        "Extract/job005/Subtomograms/TS_01/1_data.mrc TS_01\n"
    )
    return project, job / "particles.star"


def test_star_in_a_relion_job_folder_resolves_paths_against_the_project_root(relion_project, tmp_path, monkeypatch):
    project, star = relion_project
    (project / "default_pipeline.star").write_text("data_pipeline_general\n_rlnPipeLineJobCounter 6\n")
    monkeypatch.chdir(tmp_path)  # neither the project nor the job folder
    report = ingest(star, tmp_path / "pool")
    assert report.accepted == 2
    assert index_rows(tmp_path / "pool")[0]["source"] == str(project / "Extract/job005/Subtomograms/TS_01/0_data.mrc")


def test_without_default_pipeline_a_missing_file_names_every_place_tried_and_the_fix(relion_project, tmp_path,
                                                                                    monkeypatch):
    project, star = relion_project
    monkeypatch.chdir(tmp_path)
    ingest(star, tmp_path / "pool")
    reason = rejects(tmp_path / "pool")[0]["reason"]
    assert str(star.parent / "Extract/job005/Subtomograms/TS_01/0_data.mrc") in reason
    assert str(tmp_path / "Extract/job005/Subtomograms/TS_01/0_data.mrc") in reason
    assert "--project-dir" in reason


def test_project_dir_option_resolves_relion_paths(relion_project, tmp_path):
    project, star = relion_project
    assert main([str(star), "--out", str(tmp_path / "pool"), "--project-dir", str(project)]) == 0
    assert open_pool(tmp_path / "pool").n_rows == 2


# -- smaller STAR faults


def test_star_with_a_header_and_no_rows_is_refused(tmp_path, capsys):
    (tmp_path / "empty.star").write_text("data_particles\n\nloop_\n_rlnImageName #1\n_rlnClassNumber #2\n")
    assert main([str(tmp_path / "empty.star"), "--out", str(tmp_path / "pool")]) == 2
    assert "the particle table (data_particles) has no rows" in capsys.readouterr().err


def test_an_unreadable_stack_is_rejected_on_every_star_row_naming_it_with_the_row(tmp_path):
    (tmp_path / "broken.mrcs").write_text("not an MRC stack")
    write_volume(tmp_path / "good.mrc", noise())
    (tmp_path / "p.star").write_text("data_\nloop_\n_rlnImageName\n1@broken.mrcs\n2@broken.mrcs\ngood.mrc\n")
    ingest(tmp_path / "p.star", tmp_path / "pool")
    got = rejects(tmp_path / "pool")
    assert [(r["item"], r["reason_code"]) for r in got] == [("row 1 (line 4)", "unreadable"),
                                                            ("row 2 (line 5)", "unreadable")]
    assert all(r["reason"].startswith(f"{tmp_path / 'p.star'} row") and "broken.mrcs" in r["reason"] for r in got)


def test_class_numbers_with_gaps_warn_about_the_empty_classes(tmp_path, capsys):
    for i in range(3):
        write_volume(tmp_path / f"v{i}.mrc", noise(seed=i))
    (tmp_path / "p.star").write_text("data_\nloop_\n_rlnImageName\n_rlnClassNumber\nv0.mrc 1\nv1.mrc 3\nv2.mrc 7\n")
    assert main([str(tmp_path / "p.star"), "--out", str(tmp_path / "pool"), "--star-labels"]) == 0
    out = capsys.readouterr().out
    assert "warning: 4 class(es) without any subtomogram: class_2, class_4, class_5, class_6" in out
    report = json.loads((tmp_path / "pool" / "ingest_report.json").read_text())
    assert report["empty_classes"] == ["class_2", "class_4", "class_5", "class_6"]


def test_star_parser_reads_what_starfile_reads_on_a_relion5_file(tmp_path):
    import starfile

    (tmp_path / "p.star").write_text(RELION5_2D)
    ours = parse_star(tmp_path / "p.star")
    theirs = starfile.read(tmp_path / "p.star", always_dict=True, parse_as_string=["rlnTomoName", "rlnImageName"])
    particles = [t for t in ours if t.block == "particles"][0]
    assert particles.columns == list(theirs["particles"].columns)
    assert [v[5] for _, v in particles.rows] == theirs["particles"]["rlnImageName"].tolist()
