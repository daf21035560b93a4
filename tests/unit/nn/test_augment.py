"""Training-time augmentation keeps the missing wedge, is seeded, and leaves its input alone."""

import numpy as np
import pytest
import torch

from orchestrator.nn.augment import Augmentation, augment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BOX = 24


def wedge_mask(box: int, tilt_deg: float = 60.0) -> np.ndarray:
    """Where tilts of ±tilt_deg about y (beam along z) sample Fourier space: |kz| ≤ |kx|·tan θ."""
    k = np.fft.fftfreq(box)
    kz, _, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.abs(kz) <= np.abs(kx) * np.tan(np.radians(tilt_deg)) + 1e-9


def wedged_volumes(n: int, seed: int = 0) -> torch.Tensor:
    """Noise with the wedge cut out of its Fourier transform: [n, 1, BOX, BOX, BOX]."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, BOX, BOX, BOX))
    volumes = np.fft.ifftn(np.fft.fftn(noise, axes=(1, 2, 3)) * wedge_mask(BOX), axes=(1, 2, 3))
    return torch.from_numpy(volumes.real.astype(np.float32))[:, None]


def missing_power(volume: torch.Tensor) -> float:
    """Share of the volume's Fourier power that lies in the missing wedge."""
    power = np.abs(np.fft.fftn(volume.squeeze(0).double().numpy())) ** 2
    return float(power[~wedge_mask(BOX)].sum() / power.sum())


def test_augmented_volumes_keep_the_missing_wedge_where_it_was():
    x = wedged_volumes(16)
    out = augment(x, torch.Generator().manual_seed(0), Augmentation(shift=3, intensity=0.2))
    assert max(missing_power(v) for v in x) < 1e-12
    assert max(missing_power(v) for v in out) < 1e-12
    assert not torch.allclose(out, x)  # it did transform them


def test_a_ninety_degree_turn_about_y_would_move_the_wedge_so_the_check_can_fail():
    turned = wedged_volumes(1)[0].transpose(1, 3)  # swaps z and x: a 90° rotation about y
    assert missing_power(turned) > 0.1


def test_each_volume_gets_its_own_flips_covering_all_eight_combinations():
    base = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    out = augment(base.repeat(64, 1, 1, 1, 1), torch.Generator().manual_seed(1),
                  Augmentation(shift=0, intensity=0.0))
    combinations = [tuple(d for d in range(3) if mask >> d & 1) for mask in range(8)]
    seen = {dims for v in out[:, 0] for dims in combinations
            if torch.equal(v, base.flip(dims) if dims else base)}
    assert seen == set(combinations)


def test_the_same_seed_augments_the_same_way_and_the_input_is_not_modified():
    x = wedged_volumes(4)
    before = x.clone()
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(x, before)


def test_shifts_stay_within_the_configured_voxels():
    x = torch.zeros(32, 1, 9, 9, 9)
    x[:, 0, 4, 4, 4] = 1.0
    out = augment(x, torch.Generator().manual_seed(3), Augmentation(flips=False, shift=2,
                                                                      intensity=0.0))
    peaks = torch.stack([torch.tensor(np.unravel_index(int(v.argmax()), (9, 9, 9))) for v in out])
    offsets = peaks - 4
    assert offsets.abs().max().item() == 2
    assert len({tuple(o.tolist()) for o in offsets}) > 10


def test_augment_refuses_a_batch_without_its_channel_axis():
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        augment(torch.zeros(2, 8, 8, 8), torch.Generator())
