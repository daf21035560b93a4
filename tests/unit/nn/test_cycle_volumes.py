"""A cycle's volumes by position: batches gathered as float32, the same from a float16 cache
as from float32 in memory."""

import numpy as np
import pytest
import torch

from orchestrator.nn.cycle_volumes import Volumes


def stored(n=6, dtype=np.float16):
    return np.random.default_rng(0).standard_normal((n, 2, 3, 4)).astype(dtype)


def test_a_batch_is_gathered_in_the_asked_order_as_float32():
    array = stored()
    batch = Volumes(array).gather([4, 0, 4, 2])
    assert batch.dtype == torch.float32 and batch.shape == (4, 2, 3, 4)
    np.testing.assert_array_equal(batch.numpy(), array[[4, 0, 4, 2]].astype(np.float32))


def test_float16_storage_gathers_what_float32_storage_of_the_same_values_gathers():
    array = stored()
    index = torch.tensor([5, 1, 3])
    assert torch.equal(Volumes(array).gather(index), Volumes(array.astype(np.float32)).gather(index))


def test_a_gathered_batch_is_a_copy_so_changing_it_leaves_the_volumes_alone():
    array = stored(dtype=np.float32)
    Volumes(array).gather([1])[0].fill_(7.0)
    Volumes(array)[1:2].fill_(7.0)
    assert not (array == 7.0).any()


def test_indexing_reads_like_a_tensor_slices_included():
    volumes = Volumes(stored())
    assert len(volumes) == 6
    assert torch.equal(volumes[1:5:2], volumes.gather([1, 3]))
    assert torch.equal(volumes[torch.tensor([2, 0])], volumes.gather([2, 0]))
    assert volumes[:0].shape == (0, 2, 3, 4)


def test_closed_volumes_refuse_to_gather_but_keep_their_length():
    with Volumes(stored()) as volumes:
        pass
    assert len(volumes) == 6
    with pytest.raises(ValueError, match="closed"):
        volumes.gather([0])
