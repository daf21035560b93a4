"""The Parquet pool: round trips, normalisation, sharding, streaming, refusals."""

import dataclasses
import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import pyarrow.parquet as pq
from conftest import mapped_from

from orchestrator.data import pool as pool_module
from orchestrator.data.pool import (
    INDEX_FILE,
    MANIFEST,
    ROW_GROUPS,
    DuplicateIdError,
    PoolError,
    PoolWriter,
    build_row_group_index,
    cache_volumes,
    consecutive_runs,
    iter_rows,
    iter_volumes,
    open_pool,
    read_index,
    read_volumes,
    row_group_index,
    save_index,
    zscore,
)

BOX = 4
VOXEL_BYTES_F16 = BOX**3 * 2


def volumes(n, seed=0, offset=0.0):
    return np.random.default_rng(seed).normal(loc=offset, scale=3.0, size=(n, BOX, BOX, BOX)).astype(np.float32)


def write_pool(path, vols, **kwargs):
    labels = kwargs.pop("labels", None)
    with PoolWriter(path, BOX, **kwargs) as writer:
        for i, vol in enumerate(vols):
            writer.add(f"s{i:03d}", vol, source=f"file{i}.mrc", label=None if labels is None else labels[i],
                       voxel_size_A=10.0, tomogram="TS_01", xyz=(i, 2 * i, 3 * i))
    return open_pool(path)


def read_all(path, batch_rows=256):
    ids, vols = [], []
    for batch_ids, batch_vols, _ in iter_volumes(path, batch_rows=batch_rows):
        ids.extend(batch_ids.tolist())
        vols.append(batch_vols)
    return ids, np.concatenate(vols)


def test_ids_volumes_and_labels_round_trip(tmp_path):
    vols = volumes(7)
    labels = [0, 1, 2, 0, 1, 2, 0]
    info = write_pool(tmp_path / "pool", vols, labels=labels, class_names=("a", "b", "c"), dtype="float32")
    ids, back = read_all(tmp_path / "pool")
    index = read_index(tmp_path / "pool")
    assert ids == [f"s{i:03d}" for i in range(7)]
    np.testing.assert_allclose(back, np.stack([zscore(v) for v in vols]), atol=1e-6)
    assert index.column("label").to_pylist() == labels
    assert index.column("row").to_pylist() == list(range(7))
    assert index.column("x").to_pylist() == [float(i) for i in range(7)]
    assert (info.n_rows, info.class_names) == (7, ("a", "b", "c"))


def test_zscoring_is_recorded_and_applied_to_each_volume(tmp_path):
    info = write_pool(tmp_path / "pool", volumes(5, offset=50.0))
    _, back = read_all(tmp_path / "pool")
    assert info.normalisation == "zscore"
    assert json.loads((tmp_path / "pool" / MANIFEST).read_text())["normalisation"] == "zscore"
    np.testing.assert_allclose(back.mean(axis=(1, 2, 3)), 0.0, atol=1e-2)
    np.testing.assert_allclose(back.std(axis=(1, 2, 3)), 1.0, atol=1e-2)


def test_normalisation_none_keeps_the_voxels(tmp_path):
    vols = volumes(3, offset=50.0)
    write_pool(tmp_path / "pool", vols, normalisation="none", dtype="float32")
    np.testing.assert_array_equal(read_all(tmp_path / "pool")[1], vols)


def test_shards_split_at_the_shard_size(tmp_path):
    rows_per_shard = 10
    info = write_pool(tmp_path / "pool", volumes(25), shard_mb=rows_per_shard * VOXEL_BYTES_F16 / 2**20)
    assert len(info.shards) == math.ceil(25 / rows_per_shard)
    assert all((tmp_path / "pool" / shard).is_file() for shard in info.shards)


def test_iter_volumes_yields_batches_of_the_asked_size_across_shards(tmp_path):
    write_pool(tmp_path / "pool", volumes(25), shard_mb=10 * VOXEL_BYTES_F16 / 2**20, rows_per_group=3)
    sizes = [len(ids) for ids, _, _ in iter_volumes(tmp_path / "pool", batch_rows=4)]
    assert sizes == [4, 4, 4, 4, 4, 4, 1]


def test_iter_volumes_streams_without_reading_later_shards_first(tmp_path):
    write_pool(tmp_path / "pool", volumes(30), shard_mb=10 * VOXEL_BYTES_F16 / 2**20)
    (tmp_path / "pool" / "shards" / "part-00002.parquet").write_bytes(b"damaged")
    batches = iter_volumes(tmp_path / "pool", batch_rows=5)
    first_ids, first_vols, _ = next(batches)  # served although the last shard is unreadable
    assert first_ids.tolist() == [f"s{i:03d}" for i in range(5)]
    assert first_vols.shape == (5, BOX, BOX, BOX)


def test_read_volumes_returns_the_asked_rows_in_that_order(tmp_path):
    vols = volumes(12)
    write_pool(tmp_path / "pool", vols, shard_mb=5 * VOXEL_BYTES_F16 / 2**20, dtype="float32")
    rows = [11, 0, 7, 3]
    np.testing.assert_allclose(read_volumes(tmp_path / "pool", rows), np.stack([zscore(vols[r]) for r in rows]), atol=1e-6)


def test_read_volumes_refuses_rows_not_in_the_pool_naming_the_first_missing_row(tmp_path):
    write_pool(tmp_path / "pool", volumes(3))
    for rows, missing in (([1, 99, 98], 99), ([-1], -1)):
        with pytest.raises(PoolError, match=rf"row {missing} is not in the pool .*pool \(it holds rows 0..2"):
            read_volumes(tmp_path / "pool", rows)


def test_read_volumes_refuses_a_row_asked_twice(tmp_path):
    write_pool(tmp_path / "pool", volumes(3))
    with pytest.raises(PoolError, match="row 2 asked twice"):
        read_volumes(tmp_path / "pool", [2, 0, 2])


# -- a cache of some rows on the local disk ---------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_cache_holds_the_asked_rows_in_that_order_as_read_volumes_reads_them(tmp_path, dtype):
    write_pool(tmp_path / "pool", volumes(30), shard_mb=12 * BOX**3 * 4 / 2**20, rows_per_group=4,
               dtype=dtype)
    rows = [29, 0, 13, 7, 8, 21]
    cache = cache_volumes(tmp_path / "pool", rows, directory=str(tmp_path))
    assert cache.dtype == dtype  # the pool's: half the disk of float32 for a float16 pool
    np.testing.assert_array_equal(cache.astype(np.float32), read_volumes(tmp_path / "pool", rows))


def test_a_cache_is_a_mapped_file_with_no_name_that_goes_with_the_array(tmp_path):
    write_pool(tmp_path / "pool", volumes(5))
    (tmp_path / "cache").mkdir()
    cache = cache_volumes(tmp_path / "pool", [4, 1], directory=str(tmp_path / "cache"))
    assert len(mapped_from(tmp_path / "cache")) == 1
    assert list((tmp_path / "cache").iterdir()) == []  # nothing a killed worker could leave behind
    del cache
    assert mapped_from(tmp_path / "cache") == []


def test_a_cache_of_no_rows_is_empty(tmp_path):
    write_pool(tmp_path / "pool", volumes(3))
    assert cache_volumes(tmp_path / "pool", [], directory=str(tmp_path)).shape == (0, BOX, BOX, BOX)


def test_a_cache_refuses_a_row_not_in_the_pool_or_asked_twice_as_read_volumes_does(tmp_path):
    write_pool(tmp_path / "pool", volumes(3))
    with pytest.raises(PoolError, match=r"row 99 is not in the pool .*pool \(it holds rows 0..2"):
        cache_volumes(tmp_path / "pool", [1, 99], directory=str(tmp_path))
    with pytest.raises(PoolError, match="row 2 asked twice"):
        cache_volumes(tmp_path / "pool", [2, 0, 2], directory=str(tmp_path))


def test_a_cache_that_does_not_fit_on_the_disk_says_how_much_it_needs_and_where(tmp_path, monkeypatch):
    write_pool(tmp_path / "pool", volumes(3))

    def full_disk(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    # 2 rows of BOX³ float16 voxels
    with pytest.raises(OSError, match=rf"reserve 256 bytes for the volume cache in {tmp_path}: "
                                      r"No space left on device \(set TMPDIR"):
        cache_volumes(tmp_path / "pool", [0, 1], directory=str(tmp_path))


# -- reads that open only the row groups holding the asked rows --------------------------------

def small_groups_pool(path, n=40):
    """4 rows a row group, 12 rows (3 row groups) a shard: rows 36..39 are shard 3's group 0."""
    vols = volumes(n)
    info = write_pool(path, vols, shard_mb=12 * BOX**3 * 4 / 2**20, rows_per_group=4, dtype="float32")
    return info, vols


def test_reading_some_rows_opens_only_the_row_groups_that_hold_them(tmp_path, row_groups_read):
    info, vols = small_groups_pool(tmp_path / "pool")
    rows = [37, 5, 6]
    back = read_volumes(info.path, rows)
    np.testing.assert_allclose(back, np.stack([zscore(vols[r]) for r in rows]), atol=1e-6)
    assert sorted((name, group) for name, group, _ in row_groups_read) == [("part-00000", 1), ("part-00003", 0)]
    assert all(columns == ("row", "volume") for _, _, columns in row_groups_read)


@pytest.mark.parametrize("read_ahead", [1, 3, 16])
def test_rows_spread_over_every_shard_come_back_in_the_asked_order_however_many_groups_are_read_at_once(
        tmp_path, monkeypatch, read_ahead):
    monkeypatch.setattr(pool_module, "READ_AHEAD", read_ahead)
    info, vols = small_groups_pool(tmp_path / "pool")
    rows = np.random.default_rng(1).permutation(40)[:25]  # every row group, in no order
    np.testing.assert_allclose(read_volumes(info.path, rows), np.stack([zscore(vols[r]) for r in rows]), atol=1e-6)


def test_each_shards_footer_is_parsed_once_however_many_of_its_groups_are_read(tmp_path, monkeypatch):
    info, _ = small_groups_pool(tmp_path / "pool")
    parsed = []
    original = pq.read_metadata
    monkeypatch.setattr(pq, "read_metadata", lambda where, **kw: parsed.append(where) or original(where, **kw))
    read_volumes(info.path, list(range(0, 40, 2)))  # 10 row groups in 4 shards
    assert sorted(Path(p).name for p in parsed) == [f"part-0000{i}.parquet" for i in range(4)]


@pytest.mark.parametrize("damage", ["removed", "garbage", "other shards", "other row count"])
def test_a_pool_without_a_usable_row_group_index_reads_from_the_parquet_footers(tmp_path, row_groups_read, damage):
    info, vols = small_groups_pool(tmp_path / "pool")
    index_file = tmp_path / "pool" / ROW_GROUPS
    saved = json.loads(index_file.read_text())
    if damage == "removed":  # a pool written before the index existed
        index_file.unlink()
    elif damage == "garbage":
        index_file.write_text("{not json")
    elif damage == "other shards":
        index_file.write_text(json.dumps({**saved, "shards": ["shards/elsewhere.parquet"]}))
    else:  # left behind by a writer that replaced the pool with fewer rows
        index_file.write_text(json.dumps({**saved, "last": [*saved["last"][:-1], 45]}))
    rows = [39, 0, 13]
    np.testing.assert_allclose(read_volumes(info.path, rows), np.stack([zscore(vols[r]) for r in rows]), atol=1e-6)
    # the index came from the footers alone: the only reads are the three asked rows' groups
    assert [columns for _, _, columns in row_groups_read] == [("row", "volume")] * 3
    assert damage == "removed" or index_file.exists()  # a reader leaves the pool as it found it
    assert not (damage == "removed" and index_file.exists())


def test_a_pool_at_a_uri_without_its_index_reads_the_asked_rows(tmp_path, row_groups_read):
    info, vols = small_groups_pool(tmp_path / "pool")
    (tmp_path / "pool" / ROW_GROUPS).unlink()
    rows = [20, 3]
    back = read_volumes((tmp_path / "pool").as_uri(), rows)
    np.testing.assert_allclose(back, np.stack([zscore(vols[r]) for r in rows]), atol=1e-6)
    assert sorted((name, group) for name, group, _ in row_groups_read) == [("part-00000", 0), ("part-00001", 2)]


def test_the_footers_give_the_index_the_writer_saved(tmp_path):
    info, _ = small_groups_pool(tmp_path / "pool")
    saved = json.loads((tmp_path / "pool" / ROW_GROUPS).read_text())
    built = build_row_group_index(info)
    assert built.first.tolist() == saved["first"] == list(range(0, 40, 4))
    assert built.last.tolist() == saved["last"] == list(range(3, 40, 4))
    assert built.shard.tolist() == saved["shard"] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert built.group.tolist() == saved["group"] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_the_index_is_read_from_its_own_file_without_opening_a_shard(tmp_path, monkeypatch):
    info, _ = small_groups_pool(tmp_path / "pool")
    from_shards = read_index(info.path)
    assert (tmp_path / "pool" / INDEX_FILE).is_file()

    def refuse(*args):
        raise AssertionError("the shards were read")

    monkeypatch.setattr(pool_module, "_index_from_shards", refuse)
    assert read_index(info.path).equals(from_shards)
    assert read_index((tmp_path / "pool").as_uri(), ["row", "subtomo_id"]).equals(from_shards.select(["row", "subtomo_id"]))


@pytest.mark.parametrize("damage", ["removed", "garbage", "other shards", "other row count"])
def test_a_pool_without_a_usable_index_file_reads_its_index_from_the_shards(tmp_path, damage):
    info, _ = small_groups_pool(tmp_path / "pool")
    index_file = tmp_path / "pool" / INDEX_FILE
    expected = read_index(info.path)
    if damage == "removed":  # a pool written before the file existed
        index_file.unlink()
    elif damage == "garbage":
        index_file.write_bytes(b"PAR1 not parquet")
    elif damage == "other shards":
        save_index(dataclasses.replace(info, shards=("shards/elsewhere.parquet",)), expected)
    else:  # left behind by a writer that replaced the pool with fewer rows
        save_index(info, expected.slice(0, 30))
    assert read_index(info.path).equals(expected)


def test_a_shard_with_rows_out_of_order_and_no_statistics_is_indexed_from_its_row_column(tmp_path):
    info, vols = small_groups_pool(tmp_path / "pool", n=12)  # one shard
    shard = tmp_path / "pool" / info.shards[0]
    table = pq.read_table(shard)
    shuffled = table.take([5, 0, 11, 3, 1, 2, 4, 6, 7, 10, 9, 8])  # groups {0,3,5,11} {1,2,4,6} {7..10}
    pq.write_table(shuffled, shard, row_group_size=4, write_statistics=False)
    (tmp_path / "pool" / ROW_GROUPS).unlink()
    index = row_group_index(open_pool(info.path))
    assert list(zip(index.first.tolist(), index.last.tolist(), index.group.tolist())) == [
        (0, 0, 0), (1, 2, 1), (3, 3, 0), (4, 4, 1), (5, 5, 0), (6, 6, 1), (7, 10, 2), (11, 11, 0)]
    rows = [11, 0, 5, 2]
    np.testing.assert_allclose(read_volumes(info.path, rows), np.stack([zscore(vols[r]) for r in rows]), atol=1e-6)


def test_an_index_that_no_longer_matches_its_shards_is_an_error_saying_to_delete_it(tmp_path):
    info, _ = small_groups_pool(tmp_path / "pool")
    index_file = tmp_path / "pool" / ROW_GROUPS
    saved = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**saved, "group": saved["group"][::-1]}))
    with pytest.raises(PoolError, match=rf"row 5 is not in shards/part-00000.parquet row group 2, .*delete .*{ROW_GROUPS}"):
        read_volumes(info.path, [5])


def test_iter_rows_gives_only_the_asked_rows_in_pool_order_in_batches(tmp_path, row_groups_read):
    info, _ = small_groups_pool(tmp_path / "pool")
    rows = [38, 2, 1, 13, 14, 15, 16, 17]
    tables = list(iter_rows(info.path, rows, ["subtomo_id", "volume"], batch_rows=3))
    assert [t.num_rows for t in tables] == [3, 3, 2]
    assert [r for t in tables for r in t.column("row").to_pylist()] == sorted(rows)
    assert tables[0].column("subtomo_id").to_pylist() == ["s001", "s002", "s013"]
    assert {(name, group) for name, group, _ in row_groups_read} == {
        ("part-00000", 0), ("part-00001", 0), ("part-00001", 1), ("part-00003", 0)}


def test_consecutive_rows_make_one_run():
    assert consecutive_runs(np.array([0, 1, 2, 5, 6, 9])) == [(0, 2), (5, 6), (9, 9)]
    assert consecutive_runs(np.array([4, 4])) == [(4, 4), (4, 4)]
    assert consecutive_runs(np.array([], dtype=np.int64)) == []


def test_duplicate_id_is_refused(tmp_path):
    writer = PoolWriter(tmp_path / "pool", BOX)
    writer.add("a", volumes(1)[0], source="x")
    with pytest.raises(DuplicateIdError, match="'a'"):
        writer.add("a", volumes(1, seed=1)[0], source="y")
    assert writer.close().n_rows == 1


def test_a_junk_row_keeps_label_minus_one_but_another_label_outside_the_classes_is_refused(tmp_path):
    writer = PoolWriter(tmp_path / "pool", BOX, class_names=("a", "b"))
    writer.add("junk", volumes(1)[0], source="x", label=-1)
    for bad in (2, -2):
        with pytest.raises(PoolError, match=rf"label {bad} outside 0..1 \(or -1: junk\)"):
            writer.add(f"bad{bad}", volumes(1, seed=1)[0], source="y", label=bad)
    info = writer.close()
    assert (read_index(info.path).column("label").to_pylist(), info.num_classes) == ([-1], 2)


def test_volume_of_the_wrong_box_is_refused(tmp_path):
    writer = PoolWriter(tmp_path / "pool", BOX)
    with pytest.raises(PoolError, match="differs from the pool's box"):
        writer.add("a", np.ones((BOX + 1,) * 3), source="x")


@pytest.mark.parametrize("bad, reason", [(np.nan, "NaN or Inf"), (np.inf, "NaN or Inf")])
def test_non_finite_volume_is_refused(tmp_path, bad, reason):
    vol = volumes(1)[0]
    vol[1, 2, 3] = bad
    writer = PoolWriter(tmp_path / "pool", BOX)
    with pytest.raises(PoolError, match=reason):
        writer.add("a", vol, source="x")


def test_constant_volume_is_refused(tmp_path):
    writer = PoolWriter(tmp_path / "pool", BOX)
    with pytest.raises(PoolError, match="constant"):
        writer.add("a", np.full((BOX,) * 3, 7.0), source="x")


def test_interrupted_writer_leaves_no_manifest_so_the_pool_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="power cut"):
        with PoolWriter(tmp_path / "pool", BOX, rows_per_group=2) as writer:
            for i, vol in enumerate(volumes(5)):
                writer.add(f"s{i}", vol, source="x")
            raise RuntimeError("power cut")
    assert not (tmp_path / "pool" / MANIFEST).exists()
    with pytest.raises(PoolError, match="interrupted"):
        open_pool(tmp_path / "pool")


def test_existing_pool_is_not_overwritten_by_accident(tmp_path):
    write_pool(tmp_path / "pool", volumes(2))
    with pytest.raises(PoolError, match="already exists"):
        PoolWriter(tmp_path / "pool", BOX)


def test_a_pool_opened_by_a_relative_path_carries_its_absolute_path(tmp_path, monkeypatch):
    # the path goes to Ray workers, whose working directory is not the driver's
    write_pool(tmp_path / "runs" / "pool", volumes(3))
    monkeypatch.chdir(tmp_path)
    info = open_pool("runs/pool")
    assert info.path == str(tmp_path / "runs" / "pool")
    monkeypatch.chdir("/")
    assert len(read_volumes(info.path, [0, 2])) == 2
