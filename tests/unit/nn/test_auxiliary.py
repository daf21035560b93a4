"""Strategies' auxiliary models: the hooks on tiny models and volumes, no Ray."""

import numpy as np
import pytest
import torch

from orchestrator.al.strategies import OUTPUT_KEYS, STRATEGIES, make_strategy
from orchestrator.nn import auxiliary
from orchestrator.nn.cycle_volumes import Volumes
from orchestrator.nn.ema import init_mean_model
from orchestrator.nn.learning import make_optimizer, train_epoch
from orchestrator.nn.model import build_model


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet_tiny", num_classes=3, width=4, stem="small").eval()


def volumes(n, seed=0, box=8):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, box, box, box),
                                                                          dtype=np.float32))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def in_chunks(fn, x, bounds):
    parts = [fn(x[a:b]) for a, b in bounds]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_every_auxiliary_provides_only_known_output_keys():
    for name in STRATEGIES:
        training = make_strategy(name).training
        aux = auxiliary.make_auxiliary(training.auxiliary, training.auxiliary_options)
        if aux is not None:
            assert aux.provides <= OUTPUT_KEYS
            assert make_strategy(name).needs - {"probs", "logits", "embeddings"} <= aux.provides


def test_stage_outputs_come_from_the_same_forward_as_the_logits():
    model = tiny_model()
    x = volumes(3)[:, None]
    with torch.no_grad():
        logits, stages = model(x, return_stages=True)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    assert [s.shape[1] for s in stages] == auxiliary.stage_channels(model) == [4, 8]


# --- noise stability --------------------------------------------------------------------------


def test_noise_stability_leaves_the_weights_bit_identical():
    model = tiny_model()
    before = snapshot(model)
    out = auxiliary.NoisePerturbation(passes=3, scale=0.05).outputs(None, model, volumes(5), seed=1)
    assert out["noisy_logits"].shape == (5, 3, 3)
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
        assert before[key].numpy().tobytes() == after[key].numpy().tobytes(), key


def test_noise_stability_restores_the_weights_when_the_forward_fails():
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError):
        auxiliary.NoisePerturbation(passes=2).outputs(None, model, torch.zeros(2, 3), seed=0)
    bad = torch.zeros(2, 2, 4, 4, 4)  # two channels: the stem fails after the perturbation
    with pytest.raises(RuntimeError):
        auxiliary.NoisePerturbation(passes=2).outputs(None, model, bad, seed=0)
    for key, value in snapshot(model).items():
        assert torch.equal(before[key], value), key


def test_noise_stability_does_not_depend_on_the_batch_and_is_seeded():
    model = tiny_model()
    hook = auxiliary.NoisePerturbation(passes=3, scale=0.05)
    x = volumes(7)
    whole = hook.outputs(None, model, x, seed=4)["noisy_logits"]
    chunked = in_chunks(lambda b: hook.outputs(None, model, b, seed=4), x, [(0, 2), (2, 7)])
    np.testing.assert_allclose(chunked["noisy_logits"], whole, rtol=1e-5, atol=1e-6)
    other = hook.outputs(None, model, x, seed=5)["noisy_logits"]
    assert not np.allclose(other, whole)


def test_noise_stability_moves_the_logits_in_proportion_to_the_scale():
    model = tiny_model()
    x = volumes(6)
    with torch.no_grad():
        clean = model(x[:, None]).numpy()
    deviation = {}
    for scale in (0.01, 0.1):
        noisy = auxiliary.NoisePerturbation(passes=4, scale=scale).outputs(None, model, x)
        deviation[scale] = make_strategy("noise_stability", passes=4).utility(
            {"logits": clean, **noisy}).mean()
    assert 0 < deviation[0.01] < deviation[0.1]


# --- LL4AL ------------------------------------------------------------------------------------


def test_margin_ranking_loss_counts_pairs_in_the_wrong_order():
    target = torch.tensor([3.0, 2.0, 0.0, 1.0])  # pairs (3.0, 1.0) and (2.0, 0.0)
    right = torch.tensor([5.0, 4.0, 0.0, 1.0])  # both pairs ordered with a margin of 3
    wrong = torch.tensor([0.0, 0.0, 0.0, 0.0])  # ties: each pair costs the margin
    assert auxiliary.margin_ranking_loss(right, target).item() == 0.0
    assert auxiliary.margin_ranking_loss(wrong, target).item() == 1.0
    assert auxiliary.margin_ranking_loss(torch.tensor([1.0]), torch.tensor([2.0])) is None


def test_learning_loss_trains_jointly_through_train_epochs_extra_loss():
    model = tiny_model()
    model.train()
    hook = auxiliary.LearningLoss()
    torch.manual_seed(0)
    aux = hook.build(model, 3)
    start = snapshot(aux)
    x, y = volumes(16, seed=1)[:, None], torch.arange(16) % 3
    optimizer = make_optimizer(torch.nn.ModuleList([model, aux]), lr=0.01)

    def extra(xb, yb, logits, stages):
        return hook.joint_loss(aux, model, xb, yb, logits, stages, progress=0.9)

    stats = train_epoch(model, init_mean_model(model), [(x[:8], y[:8]), (x[8:], y[8:])],
                        optimizer, lam=0.0, extra_loss=extra)
    assert stats["extra"] > 0
    assert any(not torch.equal(start[k], v) for k, v in snapshot(aux).items())
    out = hook.outputs(aux, model, volumes(5))
    assert out["predicted_loss"].shape == (5,)


def task_gradient_of_learning_loss(progress: float, detach_after: float = 0.6) -> float:
    """The size of the gradient LL4AL's loss alone sends into T's parameters."""
    model = tiny_model().train()
    hook = auxiliary.LearningLoss(detach_after=detach_after)
    torch.manual_seed(0)
    aux = hook.build(model, 3)
    x, y = volumes(8, seed=2)[:, None], torch.arange(8) % 3
    logits, stages = model(x, return_stages=True)
    hook.joint_loss(aux, model, x, y, logits, stages, progress=progress).backward()
    return sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)


def test_learning_loss_trains_t_features_until_detach_after_then_only_itself():
    assert task_gradient_of_learning_loss(progress=0.3) > 0.0
    assert task_gradient_of_learning_loss(progress=0.6) == 0.0
    assert task_gradient_of_learning_loss(progress=0.0, detach_after=0.0) == 0.0


def test_learning_loss_refuses_a_detach_point_outside_the_cycle():
    with pytest.raises(ValueError, match="detach_after"):
        auxiliary.LearningLoss(detach_after=1.5)


def test_train_epoch_without_extra_loss_reports_no_extra():
    model = tiny_model().train()
    x, y = volumes(4)[:, None], torch.arange(4) % 3
    stats = train_epoch(model, init_mean_model(model), [(x, y)], make_optimizer(model), lam=0.0)
    assert "extra" not in stats


# --- fitted after T: VAAL, HAL's discriminator, two-stream's autoencoder ----------------------

FITTED = [
    (auxiliary.VAAL(epochs=2, latent=4, channels=2), "labelledness", ()),
    (auxiliary.FeatureDiscriminator(epochs=2, channels=4), "labelledness", ()),
    (auxiliary.Autoencoder(epochs=2, latent=4, channels=2), "ae_embeddings", (4,)),
]


@pytest.mark.parametrize(("hook", "key", "shape"), FITTED, ids=["vaal", "hal", "autoencoder"])
def test_fit_after_changes_the_module_and_outputs_are_row_wise(hook, key, shape):
    model = tiny_model()
    torch.manual_seed(0)
    aux = hook.build(model, 3)
    start = snapshot(aux)
    labelled, unlabelled = volumes(6, seed=1), volumes(20, seed=2) + 1.0
    hook.fit_after(aux, model, labelled, unlabelled, device=torch.device("cpu"), seed=0)
    assert any(not torch.equal(start[k], v) for k, v in snapshot(aux).items())
    x = volumes(7, seed=3)
    whole = hook.outputs(aux, model, x)[key]
    assert whole.shape == (7, *shape) and whole.dtype == np.float32
    chunked = in_chunks(lambda b: hook.outputs(aux, model, b), x, [(0, 3), (3, 7)])[key]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    if key == "labelledness":
        assert ((0 <= whole) & (whole <= 1)).all()


@pytest.mark.parametrize(("hook", "key", "shape"), FITTED, ids=["vaal", "hal", "autoencoder"])
def test_fit_after_is_seeded(hook, key, shape):
    model = tiny_model()
    fitted = []
    for _ in range(2):
        torch.manual_seed(0)
        aux = hook.build(model, 3)
        hook.fit_after(aux, model, volumes(4, 1), volumes(9, 2), device=torch.device("cpu"),
                       seed=3)
        fitted.append(snapshot(aux))
    for k in fitted[0]:
        assert torch.equal(fitted[0][k], fitted[1][k]), k


@pytest.mark.parametrize(("hook", "key", "shape"), FITTED, ids=["vaal", "hal", "autoencoder"])
def test_fit_after_fits_the_same_from_a_cycles_volumes_as_from_tensors(hook, key, shape):
    model = tiny_model()
    labelled, unlabelled = volumes(5, 1), volumes(9, 2)
    fitted = []
    for source in (lambda x: x, lambda x: Volumes(x.numpy())):
        torch.manual_seed(0)
        aux = hook.build(model, 3)
        hook.fit_after(aux, model, source(labelled), source(unlabelled),
                       device=torch.device("cpu"), seed=3)
        fitted.append(snapshot(aux))
    for k in fitted[0]:
        assert torch.equal(fitted[0][k], fitted[1][k]), k


def test_rows_of_two_sources_end_to_end_are_the_rows_of_their_concatenation():
    first, second = volumes(3, 1), volumes(4, 2)
    index = torch.tensor([6, 0, 3, 2, 3, 5])
    expected = torch.cat([first, second])[index]
    assert torch.equal(auxiliary._rows_end_to_end(first, second, index), expected)
    from_volumes = auxiliary._rows_end_to_end(Volumes(first.numpy()), Volumes(second.numpy()), index)
    assert torch.equal(from_volumes, expected)


def test_hal_discriminator_tells_labelled_from_unlabelled_volumes():
    model = tiny_model()
    hook = auxiliary.FeatureDiscriminator(epochs=30, channels=4)
    torch.manual_seed(0)
    aux = hook.build(model, 3)
    labelled, unlabelled = volumes(16, seed=1) + 2.0, volumes(16, seed=2) - 2.0
    hook.fit_after(aux, model, labelled, unlabelled, device=torch.device("cpu"), seed=0)
    new_labelled = hook.outputs(aux, model, volumes(8, seed=3) + 2.0)["labelledness"]
    new_unlabelled = hook.outputs(aux, model, volumes(8, seed=4) - 2.0)["labelledness"]
    assert new_labelled.mean() > new_unlabelled.mean()
