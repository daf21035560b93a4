"""Where a cycle's volumes live: memory-mapped caches on the node's disk, read once from the
pool (labelled and validation sets shared by the node's workers and kept across cycles),
gathered a batch at a time. Training from them is training from memory, their memory does not
follow the labelled set, and no map of them outlives the cycle. Short cycles on tiny models,
in this process (no Ray)."""

import tempfile
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import mapped_from

from orchestrator.config import ModelConfig, TrainConfig, config_to_dict
from orchestrator.data import volume_cache
from orchestrator.data.pool import PoolError, PoolWriter, read_volumes
from orchestrator.nn import cycle as cycle_module
from orchestrator.nn.cycle import Cycle, CycleData, CycleJob
from orchestrator.nn.cycle_volumes import Volumes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_job(pool, out_dir, train_rows=range(30), auxiliary=None, model="resnet_tiny",
             **train) -> CycleJob:
    """A short cycle on a tiny model: the shape pool's val and test splits are rows 60..83."""
    train_rows = list(train_rows)
    settings = dict(epochs=2, min_steps=0, batch_size=8, num_workers=0, evaluations=2,
                    calibration_samples=12) | train
    return CycleJob(
        pool=pool.path, out_dir=str(out_dir), num_classes=3,
        train_rows=train_rows, train_labels=[r % 3 for r in train_rows],
        val_rows=list(range(60, 72)), val_labels=[r % 3 for r in range(12)],
        test_rows=list(range(72, 84)), test_labels=[r % 3 for r in range(12)],
        unlabelled_rows=list(range(30, 60)),
        auxiliary=auxiliary, auxiliary_options={"epochs": 1},
        auxiliary_rows=list(range(30, 50, 2)) if auxiliary else [],
        model=config_to_dict(ModelConfig(name=model, width=4, stem="full")),
        train=config_to_dict(TrainConfig(**settings)),
    )


def run_cycle(job: CycleJob) -> dict:
    """Every epoch, validation where planned, the finish; model.pt as saved."""
    with Cycle(job) as cycle:
        for epoch in range(cycle.plan.epochs):
            cycle.train_epoch(epoch)
            if epoch in cycle.plan.evaluate_at:
                cycle.validate(epoch)
        cycle.finish()
    return torch.load(f"{job.out_dir}/model.pt", weights_only=False)


def read_into_memory(monkeypatch):
    """From here on cycles hold their volumes as before the cache: float32 arrays in memory."""
    def in_memory(pool, rows):
        return Volumes(read_volumes(pool, rows))

    monkeypatch.setattr(cycle_module, "cached_volumes", in_memory)
    monkeypatch.setattr(cycle_module, "shared_cached_volumes", in_memory)


@pytest.fixture
def node_tmp(tmp_path, monkeypatch):
    """The node's temporary directory, where the caches go, as a folder of this test's."""
    directory = tmp_path / "node-tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_a_cycle_trained_from_the_cache_ends_with_the_weights_of_one_trained_from_memory(
    shape_pool, tmp_path, monkeypatch
):
    # semi-supervised (the unlabelled stream, two augmented views), an auxiliary fitted after T
    settings = dict(semi_supervised=True, auxiliary="autoencoder")
    cached = run_cycle(tiny_job(shape_pool, tmp_path / "cached", **settings))
    read_into_memory(monkeypatch)
    from_memory = run_cycle(tiny_job(shape_pool, tmp_path / "memory", **settings))
    for part in ("model", "mean", "auxiliary"):
        assert cached[part].keys() == from_memory[part].keys()
        for key, value in cached[part].items():
            assert torch.equal(value, from_memory[part][key]), f"{part}.{key}"


def test_the_caches_are_mapped_while_the_cycle_runs_and_let_go_when_it_ends(shape_pool, tmp_path,
                                                                             node_tmp):
    job = tiny_job(shape_pool, tmp_path, semi_supervised=True)
    with Cycle(job) as cycle:
        cycle.train_epoch(0)
        assert len(mapped_from(node_tmp)) == 3  # labelled, validation, unlabelled
        # labelled and validation: the node's shared entries; the unlabelled cache is the
        # worker's own and has no name, so a killed worker leaves no file of it
        assert list(node_tmp.iterdir()) == [node_tmp / "cryoal-volumes"]
        assert len(list((node_tmp / "cryoal-volumes").glob("*.npy"))) == 2
    assert mapped_from(node_tmp) == []


def test_the_workers_of_a_node_read_the_labelled_and_validation_rows_from_the_pool_once(
    shape_pool, tmp_path, node_tmp, monkeypatch
):
    reads = []

    def counted(path, rows, out=None):
        reads.append(len(rows))
        return read_volumes(path, rows, out=out)

    monkeypatch.setattr(volume_cache, "read_volumes", counted)
    job = tiny_job(shape_pool, tmp_path)
    workers = [CycleData.read(job), CycleData.read(job)]
    next_cycle = CycleData.read(tiny_job(shape_pool, tmp_path, train_rows=range(40)))
    assert reads == [30, 12, 40]  # labelled, validation; the next cycle's labelled set only
    expected = read_volumes(shape_pool.path, job.val_rows)
    for data in (*workers, next_cycle):
        np.testing.assert_array_equal(data.x_val[:].numpy(), expected)
        data.close()
    assert mapped_from(node_tmp) == []


def test_the_caches_are_freed_when_the_cycle_fails(shape_pool, tmp_path, node_tmp):
    job = tiny_job(shape_pool, tmp_path)
    with pytest.raises(RuntimeError, match="a step failed"):
        with Cycle(job) as cycle:
            cycle.train_epoch(0)
            raise RuntimeError("a step failed")
    assert mapped_from(node_tmp) == []  # although the traceback still holds the cycle


def test_the_caches_are_freed_when_the_cycle_cannot_be_built_after_reading_them(
    shape_pool, tmp_path, node_tmp
):
    with pytest.raises(ValueError, match="no_such_net") as failure:
        Cycle(tiny_job(shape_pool, tmp_path, model="no_such_net"))
    assert failure.traceback and mapped_from(node_tmp) == []  # the traceback holds the Cycle


def test_a_row_not_in_the_pool_is_an_error_naming_it_and_frees_what_was_read(shape_pool, tmp_path,
                                                                             node_tmp):
    job = tiny_job(shape_pool, tmp_path)
    job.val_rows = [60, 5000]  # read after the labelled rows
    with pytest.raises(PoolError, match="row 5000 is not in the pool") as failure:
        Cycle(job)
    assert failure.traceback and mapped_from(node_tmp) == []


# -- memory ------------------------------------------------------------------------------------

def noise_pool(path, n, box=16):
    """n random volumes, 32 rows a row group: a read holds one row group, as a real pool's
    1 MB row groups bound it, so the reads' memory does not follow n here either."""
    rng = np.random.default_rng(0)
    with PoolWriter(path, box, class_names=["a", "b", "c"], rows_per_group=32) as writer:
        for i in range(n):
            writer.add(f"v{i}", rng.standard_normal((box,) * 3, dtype=np.float32), source="noise")
    return writer.close()


def peak_traced_bytes(job: CycleJob) -> int:
    """The most memory Python and numpy held at once (tracemalloc) while a cycle read its
    volumes and trained an epoch: counted allocations, not timing, so a loaded machine gives
    the same number. A cache's pages are the kernel's, so they are not counted; an array read
    into memory is."""
    tracemalloc.start()
    try:
        with Cycle(job) as cycle:
            cycle.train_epoch(0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_cycle_on_four_times_the_labels_holds_no_more_memory_with_the_cache(tmp_path,
                                                                              monkeypatch):
    n = 128
    pool = noise_pool(tmp_path / "pool", 4 * n)

    def peak(labelled: int) -> int:
        job = tiny_job(pool, tmp_path, train_rows=range(labelled), epochs=1, batch_size=32,
                       augment=False)
        job.val_rows = job.test_rows = job.unlabelled_rows = []
        return peak_traced_bytes(job)

    peak(8)  # the first cycle of a process also imports and initialises things
    cached = peak(n), peak(4 * n)
    read_into_memory(monkeypatch)
    in_memory = peak(n), peak(4 * n)
    print(f"peak traced bytes, {n} and {4 * n} labelled: cache {cached}, in memory {in_memory}")
    assert cached[1] < 1.5 * cached[0], cached
    assert in_memory[1] > 2.5 * in_memory[0], in_memory  # 16 KB a volume as float32
    assert cached[1] < in_memory[0], (cached, in_memory)
