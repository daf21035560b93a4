"""A node's shared cache of pool rows: the first asker reads the pool, the others map its file;
a rewritten pool is another pool; a failed read leaves nothing; old entries are let go."""

import os
import threading

import numpy as np
import pytest

from orchestrator.data import volume_cache
from orchestrator.data.pool import PoolError, PoolWriter, read_volumes
from orchestrator.data.volume_cache import shared_volumes

BOX = 4


def write_pool(path, n=20, seed=0, overwrite=False):
    vols = np.random.default_rng(seed).normal(size=(n, BOX, BOX, BOX)).astype(np.float32)
    with PoolWriter(path, BOX, class_names=["a", "b"], rows_per_group=4,
                    overwrite=overwrite) as writer:
        for i, volume in enumerate(vols):
            writer.add(f"v{i}", volume, source="test", label=i % 2)
    return path


@pytest.fixture
def pool_reads(monkeypatch):
    """How many times the cache read the pool, and which rows."""
    reads = []

    def counted(path, rows, out=None):
        reads.append(list(rows))
        return read_volumes(path, rows, out=out)

    monkeypatch.setattr(volume_cache, "read_volumes", counted)
    return reads


def entries(directory):
    return sorted(p.name for p in directory.glob("*.npy"))


def test_the_rows_come_back_in_the_asked_order_in_the_pools_dtype(tmp_path):
    pool = write_pool(tmp_path / "pool")
    rows = [17, 0, 9, 4]
    cached = shared_volumes(pool, rows, directory=tmp_path / "cache")
    assert cached.dtype == np.float16 and not cached.flags.writeable
    np.testing.assert_array_equal(cached.astype(np.float32), read_volumes(pool, rows))


def test_a_second_asker_of_the_same_rows_maps_the_first_ones_file_without_reading_the_pool(
    tmp_path, pool_reads
):
    pool = write_pool(tmp_path / "pool")
    first = shared_volumes(pool, [3, 1, 2], directory=tmp_path / "cache")
    second = shared_volumes(pool, [3, 1, 2], directory=tmp_path / "cache")
    assert pool_reads == [[3, 1, 2]]
    assert second.filename == first.filename
    np.testing.assert_array_equal(first, second)


def test_other_rows_or_another_order_are_another_entry(tmp_path, pool_reads):
    pool = write_pool(tmp_path / "pool")
    a = shared_volumes(pool, [1, 2], directory=tmp_path / "cache")
    b = shared_volumes(pool, [2, 1], directory=tmp_path / "cache")
    assert len(pool_reads) == 2 and len(entries(tmp_path / "cache")) == 2
    np.testing.assert_array_equal(a[::-1], b)


def test_a_pool_rewritten_in_place_is_read_again_not_served_from_the_cache(tmp_path):
    pool = write_pool(tmp_path / "pool", seed=0)
    before = np.array(shared_volumes(pool, [5, 6], directory=tmp_path / "cache"))
    write_pool(tmp_path / "pool", seed=1, overwrite=True)  # same path, same rows and names: other volumes
    after = shared_volumes(pool, [5, 6], directory=tmp_path / "cache")
    np.testing.assert_array_equal(after.astype(np.float32), read_volumes(pool, [5, 6]))
    assert not np.array_equal(before, after)


def test_workers_asking_at_once_read_the_pool_once(tmp_path, pool_reads):
    pool = write_pool(tmp_path / "pool")
    results = []
    workers = [threading.Thread(target=lambda: results.append(
        shared_volumes(pool, range(12), directory=tmp_path / "cache"))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 4 and len(pool_reads) == 1
    assert all(np.array_equal(r, results[0]) for r in results)


def test_a_failed_read_leaves_no_entry_and_says_which_row(tmp_path):
    pool = write_pool(tmp_path / "pool")
    with pytest.raises(PoolError, match="row 99 is not in the pool"):
        shared_volumes(pool, [1, 99], directory=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [tmp_path / "cache" / ".lock"]


def test_the_partial_file_of_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    pool = write_pool(tmp_path / "pool")
    (tmp_path / "cache").mkdir()
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    abandoned = tmp_path / "cache" / f"0123abcd.partial-{dead}"
    abandoned.write_bytes(b"half an entry")
    shared_volumes(pool, [0], directory=tmp_path / "cache")
    assert not abandoned.exists() and len(entries(tmp_path / "cache")) == 1


def test_the_entries_used_last_are_kept_and_an_evicted_one_still_reads_where_it_is_mapped(
    tmp_path, pool_reads
):
    pool = write_pool(tmp_path / "pool")
    cache = tmp_path / "cache"
    oldest = shared_volumes(pool, [0], directory=cache, keep=2)
    expected = np.array(oldest)
    shared_volumes(pool, [1], directory=cache, keep=2)
    os.utime(oldest.filename, (1, 1))  # as if used long ago
    shared_volumes(pool, [2], directory=cache, keep=2)
    assert len(entries(cache)) == 2 and not os.path.exists(oldest.filename)
    np.testing.assert_array_equal(oldest, expected)  # its map holds the blocks
    shared_volumes(pool, [0], directory=cache, keep=2)
    assert pool_reads == [[0], [1], [2], [0]]


def test_no_rows_need_no_entry(tmp_path):
    pool = write_pool(tmp_path / "pool")
    assert shared_volumes(pool, [], directory=tmp_path / "cache").shape == (0, BOX, BOX, BOX)
    assert not (tmp_path / "cache").exists()


def test_the_cache_goes_where_the_environment_says(tmp_path, monkeypatch):
    monkeypatch.setenv(volume_cache.CACHE_ENV, str(tmp_path / "elsewhere"))
    shared_volumes(write_pool(tmp_path / "pool"), [0, 1])
    assert len(entries(tmp_path / "elsewhere")) == 1
