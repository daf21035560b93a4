"""The mean model: closed-form EMA of T's trajectory, integer buffers, no grads, DDP wrappers."""

import pytest
import torch
from torch import nn

from orchestrator.nn.ema import init_mean_model, reset_mean_model, unwrap, update_mean_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_net() -> nn.Module:
    # A Linear (float params) and a BatchNorm (float running stats + int num_batches_tracked).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: holds the model as ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def take_fake_step(model: nn.Module, step: int) -> None:
    """Move T as an optimiser would (new weights) and update its BN buffers with a forward."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        model.train()
        model(torch.randn(8, 3, generator=gen))


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "wrapped"])
def test_after_k_updates_mean_is_the_closed_form_ema_of_the_trajectory(wrap):
    alpha, k = 0.9, 5
    model = small_net()
    mean = init_mean_model(Wrapper(model) if wrap else model)
    trajectory = [{n: t.clone() for n, t in model.state_dict().items()}]
    for step in range(1, k + 1):
        take_fake_step(model, step)
        trajectory.append({n: t.clone() for n, t in model.state_dict().items()})
        update_mean_model(mean, Wrapper(model) if wrap else model, alpha)

    for name, got in mean.state_dict().items():
        if not got.is_floating_point():
            continue
        expected = alpha**k * trajectory[0][name] + sum(
            (1 - alpha) * alpha ** (k - i) * trajectory[i][name] for i in range(1, k + 1)
        )
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_integer_buffers_are_copied_not_averaged():
    model = small_net()
    mean = init_mean_model(model)
    for step in range(1, 4):
        take_fake_step(model, step)
        update_mean_model(mean, model, 0.999)
    assert int(mean[1].num_batches_tracked) == 3


def test_mean_model_is_a_separate_eval_mode_copy_that_gets_no_gradients():
    model = small_net()
    mean = init_mean_model(model)
    x = torch.randn(8, 3)
    (model(x).sum() + mean(x).sum()).backward()
    assert mean.training is False
    assert [p.grad for p in mean.parameters()] == [None, None, None, None]
    assert all(p.requires_grad is False for p in mean.parameters())
    assert all(p.grad is not None for p in model.parameters())
    assert mean[0].weight.data_ptr() != model[0].weight.data_ptr()


def test_mean_built_from_a_wrapper_has_the_bare_model_keys():
    model = small_net()
    mean = init_mean_model(Wrapper(Wrapper(model)))
    assert list(mean.state_dict()) == list(model.state_dict())
    assert unwrap(Wrapper(model)) is model


def test_update_moves_mean_by_one_minus_alpha_of_the_gap():
    model = small_net()
    mean = init_mean_model(model)
    before = mean[0].weight.clone()
    take_fake_step(model, 1)
    update_mean_model(mean, model, 0.75)
    torch.testing.assert_close(mean[0].weight, 0.75 * before + 0.25 * model[0].weight)


def test_reset_makes_mean_an_exact_copy_of_the_model():
    model = small_net()
    mean = init_mean_model(model)
    take_fake_step(model, 1)
    reset_mean_model(mean, Wrapper(model))
    for (name, m), t in zip(mean.state_dict().items(), model.state_dict().values()):
        assert torch.equal(m, t), name


def test_alpha_outside_zero_one_is_refused():
    model = small_net()
    with pytest.raises(ValueError, match="alpha"):
        update_mean_model(init_mean_model(model), model, 1.5)


def test_models_with_different_keys_are_refused():
    mean = init_mean_model(small_net())
    with pytest.raises(ValueError, match="state-dict keys"):
        update_mean_model(mean, nn.Sequential(nn.Linear(3, 4)), 0.9)


def _ddp_rank(rank: int, init_file: str, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(rank)  # each rank starts from its own init, as Ray Train workers do
        model = DistributedDataParallel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        mean = init_mean_model(model)  # after wrapping: DDP has broadcast rank 0's weights
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(10 + rank)  # each rank sees its own shard
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 3, generator=gen)).pow(2).mean().backward()
            opt.step()
            update_mean_model(mean, model, 0.5)
        # numpy, not tensors: tensors travel through shared memory that dies with this process
        queue.put((rank, {k: v.numpy().copy() for k, v in mean.state_dict().items()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_every_rank_ends_with_the_same_mean_model_buffers_included(tmp_path):
    import torch.multiprocessing as mp

    # spawn, not fork: a fork of pytest's process (threads of earlier tests' Ray and torch) can
    # inherit a lock held by a thread that does not exist in the child, and hang (it did, on CI).
    # Each rank imports torch afresh: tens of seconds on a loaded 2-core box, hence the timeout.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, str(tmp_path / "init"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        states = dict(queue.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for name, tensor in states[0].items():  # exactly equal, not close
        assert tensor.tolist() == states[1][name].tolist(), name
