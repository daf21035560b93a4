"""Loss, training step, evaluation, the scoring forward pass and RNG state (plain PyTorch)."""

import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.nn.augment import Augmentation
from orchestrator.nn.ema import init_mean_model
from orchestrator.nn.learning import (
    evaluate,
    get_rng_state,
    lr_factor,
    make_optimizer,
    make_scheduler,
    objective,
    regulariser,
    seed_everything,
    set_rng_state,
    sigmoid_rampup,
    train_epoch,
)
from orchestrator.nn.model import build_model
from orchestrator.nn.outputs import OUTPUTS, forward_outputs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(num_classes=3, dropout=0.5, seed=0):
    torch.manual_seed(seed)
    return build_model(
        "resnet_tiny", num_classes=num_classes, width=4, stem="small", dropout=dropout
    )


def separable_problem(n=32, seed=0):
    """Two classes: a bright upper half or a bright lower half of an 8³ volume, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 8, 8, 8, generator=gen)  # [B, D, H, W]: no channel axis on purpose
    x[y == 0, :4] += 1.0
    x[y == 1, 4:] += 1.0
    return x, y


def in_batches(x, y, size=8):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# --- loss -------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["mse_logits", "kl"])
def test_regulariser_is_zero_when_task_and_mean_agree(distance):
    logits = torch.randn(5, 3)
    assert regulariser(logits, logits.clone(), distance).item() == pytest.approx(0.0, abs=1e-7)


def test_mse_is_the_mean_squared_logit_difference():
    t = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    m = torch.zeros(2, 2)
    assert regulariser(t, m, "mse_logits").item() == pytest.approx((1 + 4 + 0 + 1) / 4)


def test_kl_is_of_task_softmax_from_mean_softmax_averaged_over_rows():
    t = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    m = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    kl_row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert regulariser(t, m, "kl").item() == pytest.approx(kl_row0 / 2, rel=1e-5)


def test_kl_is_not_symmetric_so_the_direction_is_task_to_mean():
    t = torch.log(torch.tensor([[0.9, 0.1]]))
    m = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert regulariser(t, m, "kl").item() == pytest.approx(expected, rel=1e-5)


def test_regulariser_sends_no_gradient_to_the_mean_logits():
    t = torch.randn(4, 3, requires_grad=True)
    m = torch.randn(4, 3, requires_grad=True)
    regulariser(t, m, "kl").backward()
    assert m.grad is None
    assert t.grad is not None


def test_unknown_distance_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"\['kl', 'mse_logits'\]"):
        regulariser(torch.zeros(1, 2), torch.zeros(1, 2), "cosine")


def test_objective_is_cross_entropy_plus_lambda_times_regulariser():
    t, m, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, parts = objective(t, m, y, 0.5, "mse_logits")
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(t, y).item())
    assert parts["reg"].item() == pytest.approx(F.mse_loss(t, m).item())
    assert loss.item() == pytest.approx(parts["ce"].item() + 0.5 * parts["reg"].item())


# --- optimiser --------------------------------------------------------------------------------


def test_schedule_cuts_lr_tenfold_at_eighty_percent_of_the_epochs():
    opt = make_optimizer(nn.Linear(2, 2))
    sched = make_scheduler(opt, epochs=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[79] == pytest.approx(0.1)
    assert lrs[80] == pytest.approx(0.01)


def test_schedule_without_decay_keeps_the_lr():
    opt = make_optimizer(nn.Linear(2, 2), lr=0.05)
    sched = make_scheduler(opt, epochs=5, decay_at=None)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_optimizer_has_the_paper_hyperparameters():
    group = make_optimizer(nn.Linear(2, 2)).param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)


# --- training and evaluation ------------------------------------------------------------------


def test_training_loss_decreases_on_a_separable_problem():
    x, y = separable_problem()
    model = tiny_model(num_classes=2, dropout=0.0)
    mean = init_mean_model(model)
    mean_before = mean.fc.weight.clone()
    opt = make_optimizer(model, lr=0.05)
    history = [
        train_epoch(model, mean, in_batches(x, y), opt, lam=0.03, distance="mse_logits", alpha=0.9)
        for _ in range(4)
    ]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert (history[0]["n"], history[0]["steps"]) == (32, 4)
    assert not torch.equal(mean.fc.weight, mean_before)
    assert evaluate(model, in_batches(x, y), 2)["accuracy"] > 0.9


def test_training_steps_the_mean_model_once_per_optimizer_step():
    x, y = separable_problem(n=16)
    model = tiny_model(num_classes=2, dropout=0.0)
    mean = init_mean_model(model)
    opt = make_optimizer(model)
    train_epoch(model, mean, in_batches(x, y), opt, lam=0.03, distance="kl", alpha=0.9)
    assert int(mean.stem[1].num_batches_tracked) == 2


def test_semi_supervised_epoch_pairs_every_labelled_step_with_an_unlabelled_batch():
    x, y = separable_problem(n=24)
    model = tiny_model(num_classes=2, dropout=0.0)
    mean = init_mean_model(model)
    unlabelled = [(x[:4], torch.full((4,), -1))]  # shorter than the labelled set: restarts
    stats = train_epoch(
        model, mean, in_batches(x, y), make_optimizer(model),
        lam=0.03, distance="mse_logits", alpha=0.9, unlabelled_batches=unlabelled,
    )
    assert (stats["steps"], stats["n"]) == (3, 24)
    assert stats["reg_unlabelled"] > 0.0
    assert stats["loss"] == pytest.approx(
        stats["ce"] + 0.03 * (stats["reg"] + stats["reg_unlabelled"]), rel=1e-5
    )


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: holds the model as ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def test_a_wrapped_model_trains_and_its_mean_model_follows():
    x, y = separable_problem(n=8)
    model = tiny_model(num_classes=2, dropout=0.0)
    mean = init_mean_model(Wrapper(model))
    before = mean.fc.weight.clone()
    train_epoch(Wrapper(model), mean, in_batches(x, y), make_optimizer(model),
                lam=0.03, distance="mse_logits", alpha=0.5)
    torch.testing.assert_close(mean.fc.weight, 0.5 * before + 0.5 * model.fc.weight)


def test_lambda_zero_is_plain_cross_entropy():
    x, y = separable_problem(n=8)
    model = tiny_model(num_classes=2, dropout=0.0)
    stats = train_epoch(model, init_mean_model(model), in_batches(x, y), make_optimizer(model),
                        lam=0.0, distance="mse_logits", alpha=0.9)
    assert stats["loss"] == pytest.approx(stats["ce"])


def test_bf16_autocast_epoch_runs_on_cpu():
    x, y = separable_problem(n=8)
    model = tiny_model(num_classes=2, dropout=0.0)
    stats = train_epoch(model, init_mean_model(model), in_batches(x, y), make_optimizer(model),
                        lam=0.03, distance="mse_logits", alpha=0.9, amp_dtype=torch.bfloat16)
    assert math.isfinite(stats["loss"])


class LookupModel(nn.Module):
    """Returns its input as the logits: x of shape [B, 1, 1, 1, C] gives logits [B, C]."""

    def forward(self, x):
        return x.flatten(1)


def test_evaluate_gives_per_class_accuracy_and_nan_for_absent_classes():
    # 4 classes; class 3 never appears. Predictions: class 0 two of two, class 1 one of two,
    # class 2 zero of one.
    preds = torch.tensor([0, 0, 1, 2, 0])
    y = torch.tensor([0, 0, 1, 1, 2])
    logits = F.one_hot(preds, 4).float().view(5, 1, 1, 1, 4)
    result = evaluate(LookupModel(), [(logits[:3], y[:3]), (logits[3:], y[3:])], num_classes=4)
    assert result["per_class_accuracy"][:3] == [1.0, 0.5, 0.0]
    assert math.isnan(result["per_class_accuracy"][3])
    assert (result["accuracy"], result["n"]) == (3 / 5, 5)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits.flatten(1), y).item())
    assert result["confusion"][1] == [0, 1, 1, 0]


def test_evaluate_scores_the_best_real_class_whatever_the_junk_output_says():
    # 2 classes and a junk output (the last), which is the largest logit of every row
    logits = torch.tensor([[2.0, 1.0, 9.0], [0.0, 3.0, 9.0], [1.0, 0.0, 9.0]]).view(3, 1, 1, 1, 3)
    y = torch.tensor([0, 1, 1])
    result = evaluate(LookupModel(), [(logits, y)], num_classes=2)
    assert (result["accuracy"], result["confusion"]) == (2 / 3, [[1, 0], [1, 1]])
    assert result["loss"] == pytest.approx(F.cross_entropy(logits.flatten(1)[:, :2], y).item())


def test_evaluate_leaves_a_training_model_in_training_mode():
    x, y = separable_problem(n=4)
    model = tiny_model(num_classes=2).train()
    evaluate(model, in_batches(x, y), 2)
    assert model.training is True


# --- scoring forward pass ---------------------------------------------------------------------


def scoring_setup(n=6, outputs=3):
    model = tiny_model(num_classes=outputs, dropout=0.5, seed=0)
    mean = init_mean_model(tiny_model(num_classes=outputs, dropout=0.5, seed=1))
    x = torch.randn(n, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    return model, mean, x


def test_forward_outputs_have_the_documented_shapes_and_dtype():
    model, mean, x = scoring_setup(outputs=4)  # 3 classes and a junk output
    out = forward_outputs(model, mean, x, OUTPUTS, mc_passes=5, classes=3)
    shapes = {k: v.shape for k, v in out.items()}
    assert shapes == {
        "logits": (6, 3), "probs": (6, 3), "mean_logits": (6, 3), "mean_probs": (6, 3),
        "embeddings": (6, 8), "grad_embeddings": (6, 24), "mc_probs": (6, 3, 5), "junk_prob": (6,),
    }
    assert {v.dtype for v in out.values()} == {np.dtype(np.float32)}


def test_a_junk_output_is_split_off_and_the_classes_renormalised_among_themselves():
    model, mean, x = scoring_setup(outputs=4)
    out = forward_outputs(model, mean, x, {"logits", "probs", "mean_probs", "junk_prob"}, classes=3)
    with torch.no_grad():
        every = model.eval()(x).softmax(dim=1).numpy()
    np.testing.assert_allclose(out["junk_prob"], every[:, 3], atol=1e-6)
    np.testing.assert_allclose(out["probs"], every[:, :3] / every[:, :3].sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(out["mean_probs"].sum(axis=1), np.ones(6), atol=1e-6)


def test_junk_probability_needs_to_know_where_the_classes_end():
    model, mean, x = scoring_setup(outputs=4)
    with pytest.raises(ValueError, match="junk_prob needs classes"):
        forward_outputs(model, None, x, {"junk_prob"})


def test_forward_outputs_gives_only_what_is_needed():
    model, mean, x = scoring_setup()
    assert set(forward_outputs(model, None, x, {"probs"})) == {"probs"}


def test_probability_rows_sum_to_one():
    model, mean, x = scoring_setup()
    out = forward_outputs(model, mean, x, {"probs", "mean_probs", "mc_probs"}, mc_passes=4)
    np.testing.assert_allclose(out["probs"].sum(axis=1), np.ones(6), atol=1e-6)
    np.testing.assert_allclose(out["mean_probs"].sum(axis=1), np.ones(6), atol=1e-6)
    np.testing.assert_allclose(out["mc_probs"].sum(axis=1), np.ones((6, 4)), atol=1e-6)


def test_mc_passes_differ_from_each_other():
    model, mean, x = scoring_setup()
    mc = forward_outputs(model, None, x, {"mc_probs"}, mc_passes=4)["mc_probs"]
    assert not np.allclose(mc[:, :, 0], mc[:, :, 1])


def test_grad_embedding_is_minus_the_cross_entropy_gradient_of_fc_at_the_predicted_label():
    model, mean, x = scoring_setup(n=3)
    out = forward_outputs(model, None, x, {"grad_embeddings", "probs"})
    model.eval()
    for i in range(3):
        model.zero_grad()
        pseudo_label = torch.tensor([int(out["probs"][i].argmax())])
        F.cross_entropy(model(x[i : i + 1]), pseudo_label).backward()
        np.testing.assert_allclose(
            out["grad_embeddings"][i], -model.fc.weight.grad.flatten().numpy(), atol=1e-6
        )


def test_outputs_of_a_batch_equal_outputs_computed_one_row_at_a_time():
    model, mean, x = scoring_setup()
    batch = forward_outputs(model, mean, x, OUTPUTS, mc_passes=3, seed=7, classes=2)
    rows = [
        forward_outputs(model, mean, x[i : i + 1], OUTPUTS, mc_passes=3, seed=7, classes=2)
        for i in range(6)
    ]
    for key in OUTPUTS:
        np.testing.assert_allclose(
            batch[key], np.concatenate([r[key] for r in rows]), atol=1e-5, err_msg=key
        )


def test_mc_masks_follow_row_keys_not_batch_position():
    model, mean, x = scoring_setup(n=4)
    keys = ["a", "b", "c", "d"]
    forward = forward_outputs(model, None, x, {"mc_probs"}, 3, row_keys=keys)["mc_probs"]
    order = [3, 1, 0, 2]
    shuffled = forward_outputs(
        model, None, x[order], {"mc_probs"}, 3, row_keys=[keys[i] for i in order]
    )["mc_probs"]
    np.testing.assert_allclose(shuffled, forward[order], atol=1e-6)


def test_mc_passes_change_with_the_seed():
    model, mean, x = scoring_setup()
    a = forward_outputs(model, None, x, {"mc_probs"}, 3, seed=0)["mc_probs"]
    b = forward_outputs(model, None, x, {"mc_probs"}, 3, seed=1)["mc_probs"]
    assert not np.allclose(a, b)


def test_forward_outputs_leaves_the_models_in_their_modes():
    model, mean, x = scoring_setup()
    model.train()
    forward_outputs(model, mean, x, {"probs", "mean_probs"})
    assert (model.training, mean.training, model.dropout.training) == (True, False, True)


def test_mc_probs_without_dropout_is_refused():
    model = tiny_model(dropout=0.0)
    with pytest.raises(ValueError, match="dropout > 0"):
        forward_outputs(model, None, torch.randn(2, 8, 8, 8), {"mc_probs"}, mc_passes=2)


def test_mean_outputs_without_a_mean_model_are_refused():
    model, mean, x = scoring_setup()
    with pytest.raises(ValueError, match="mean model"):
        forward_outputs(model, None, x, {"mean_probs"})


def test_unknown_outputs_list_the_valid_ones():
    model, mean, x = scoring_setup()
    with pytest.raises(ValueError, match="grad_embeddings"):
        forward_outputs(model, mean, x, {"entropy"})


# --- randomness -------------------------------------------------------------------------------


def draw_all():
    return (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_rng_state_restores_python_numpy_and_torch_after_a_weights_only_round_trip():
    seed_everything(5)
    buffer = io.BytesIO()
    torch.save(get_rng_state(), buffer)
    first = draw_all()
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert draw_all() == first


def test_seed_everything_returns_a_generator_seeded_alike():
    a = torch.rand(3, generator=seed_everything(11))
    b = torch.rand(3, generator=seed_everything(11))
    assert torch.equal(a, b)


# --- the recipe: AdamW, schedules, ramp-up, augmentation, two views ----------------------------


def test_adamw_decays_conv_and_linear_weights_but_not_batchnorm_or_biases():
    model = tiny_model()
    groups = make_optimizer(model, lr=0.003, weight_decay=0.05, kind="adamw").param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert id(model.fc.weight) in decayed and id(model.stem[0].weight) in decayed
    assert id(model.fc.bias) not in decayed and id(model.stem[1].weight) not in decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_an_unknown_optimizer_or_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match="adamw"):
        make_optimizer(nn.Linear(2, 2), kind="adam")
    with pytest.raises(ValueError, match="onecycle"):
        make_scheduler(make_optimizer(nn.Linear(2, 2)), epochs=3, schedule="linear")


def test_one_cycle_rises_from_a_25th_to_the_peak_at_20_percent_then_falls_to_zero():
    assert lr_factor("onecycle", 0, 100) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 20, 100) == pytest.approx(1.0)
    assert lr_factor("onecycle", 60, 100) == pytest.approx(0.5)
    assert lr_factor("onecycle", 100, 100) == pytest.approx(0.0, abs=1e-12)
    rising = [lr_factor("onecycle", s, 100) for s in range(21)]
    assert rising == sorted(rising)


def test_cosine_halves_at_the_middle_and_step_cuts_at_its_decay_step():
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert (lr_factor("step", 79, 100, decay_step=80), lr_factor("step", 80, 100, decay_step=80)) \
        == (1.0, 0.1)


def test_a_per_step_schedule_reaches_its_end_after_epochs_times_steps():
    opt = make_optimizer(nn.Linear(2, 2), lr=1.0)
    sched = make_scheduler(opt, epochs=2, schedule="cosine", steps_per_epoch=5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def test_the_consistency_ramp_up_starts_near_zero_and_reaches_one():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(100, 100) == 1.0 == sigmoid_rampup(500, 100) == sigmoid_rampup(3, 0)


def test_training_with_augmentation_needs_a_generator():
    x, y = separable_problem(n=8)
    model = tiny_model(num_classes=2, dropout=0.0)
    with pytest.raises(ValueError, match="Generator"):
        train_epoch(model, init_mean_model(model), in_batches(x, y), make_optimizer(model),
                    lam=0.0, augmentation=Augmentation())


def test_augmented_training_is_reproducible_from_its_generator_and_differs_without_it():
    x, y = separable_problem(n=16)

    def trained(augmentation, seed=0):
        model = tiny_model(num_classes=2, dropout=0.0)
        train_epoch(model, init_mean_model(model), in_batches(x, y), make_optimizer(model),
                    lam=0.0, augmentation=augmentation, generator=torch.Generator().manual_seed(seed))
        return model.fc.weight.detach().clone()

    assert torch.equal(trained(Augmentation()), trained(Augmentation()))
    assert not torch.equal(trained(Augmentation()), trained(Augmentation(), seed=1))
    assert not torch.equal(trained(Augmentation()), trained(None))


class RecordingModel(nn.Module):
    """Logits from a linear map of the volume's mean; remembers every input it sees."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(x.mean(dim=(1, 2, 3, 4))[:, None])


def test_the_mean_teacher_sees_its_own_augmentation_of_every_volume():
    x, y = separable_problem(n=4)
    model, mean = RecordingModel(), RecordingModel()
    train_epoch(model, mean, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), lam=0.1,
                unlabelled_batches=[x[:2]], augmentation=Augmentation(flips=True, shift=1),
                generator=torch.Generator().manual_seed(0))
    (seen_t,), (seen_m,) = model.seen, mean.seen
    assert seen_t.shape == seen_m.shape == (6, 1, 8, 8, 8)
    assert not torch.equal(seen_t, seen_m)


def test_without_unlabelled_data_the_mean_model_judges_the_task_models_own_input():
    x, y = separable_problem(n=4)
    model, mean = RecordingModel(), RecordingModel()
    train_epoch(model, mean, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), lam=0.1,
                augmentation=Augmentation(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.seen[0], mean.seen[0])


def test_plain_cross_entropy_never_runs_the_mean_model():
    x, y = separable_problem(n=4)
    model, mean = RecordingModel(), RecordingModel()
    train_epoch(model, mean, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), lam=0.0)
    assert mean.seen == []


def test_the_unlabelled_weight_may_change_from_step_to_step():
    x, y = separable_problem(n=16)
    model = tiny_model(num_classes=2, dropout=0.0)
    weights = {0: 0.0, 1: 2.0}
    stats = train_epoch(model, init_mean_model(model), in_batches(x, y), make_optimizer(model),
                        lam=0.0, unlabelled_batches=[x[:4]], lam_unlabelled=weights.__getitem__)
    assert stats["steps"] == 2
    assert stats["loss"] > stats["ce"]  # the second step's unlabelled term counted


def test_a_scheduler_given_to_train_epoch_steps_once_per_optimizer_step():
    x, y = separable_problem(n=16)
    model = tiny_model(num_classes=2, dropout=0.0)
    opt = make_optimizer(model)
    sched = make_scheduler(opt, epochs=1, schedule="cosine", steps_per_epoch=4)
    train_epoch(model, init_mean_model(model), in_batches(x, y, size=4), opt, lam=0.0,
                scheduler=sched)
    assert sched.last_epoch == 4
