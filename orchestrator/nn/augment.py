"""Training-time augmentation of subtomograms that keeps the missing wedge where it is.

Every subtomogram of a tomogram was imaged with the same tilt axis (y here) and beam (z), so
its Fourier transform lacks the same wedge |k_z| > |k_x|·tan θ. A classifier may use the wedge's
orientation as a constant of the data, and an augmentation that moved it would show the model
volumes no microscope produced. The transforms here map that wedge onto itself:

- a flip of any axis (k_i → −k_i; the wedge is symmetric in every k_i) and so the 180° rotations
  about x, y and z, which are pairs of flips: 8 elements in all, each drawn with equal chance;
- a small integer shift, circular (``torch.roll``): a phase ramp in Fourier space, the amplitudes
  and so the wedge unchanged;
- an intensity scale and offset (the offset touches only k = 0, which is inside the sampled
  region).

A 90° rotation about y would swap k_x and k_z and turn the wedge; arbitrary rotations are left
out for that reason. Nothing here runs at scoring or evaluation: only training batches are
augmented.

Each call draws from an explicit ``torch.Generator``, so a seeded epoch augments the same way
every time (a resumed or re-run cycle repeats its training exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Augmentation", "augment"]

SPATIAL_DIMS = (2, 3, 4)  # z, y, x of [B, 1, D, H, W]


@dataclass(frozen=True)
class Augmentation:
    """What a training batch gets. ``shift=0``, ``intensity=0``, ``flips=False``: none."""

    flips: bool = True  # flip each axis with probability 1/2 (and so the 180° rotations)
    shift: int = 2  # circular shift by a whole number of voxels in [−shift, shift] per axis
    intensity: float = 0.1  # scale ~ 1 + N(0, intensity), offset ~ N(0, intensity)

    @property
    def active(self) -> bool:
        return self.flips or self.shift > 0 or self.intensity > 0


def augment(x: torch.Tensor, generator: torch.Generator, how: Augmentation = Augmentation()
            ) -> torch.Tensor:
    """A new ``[B, 1, D, H, W]`` batch, each volume transformed on its own; ``x`` is untouched.

    Random draws come from ``generator`` (a CPU generator) in a fixed order whatever the device.
    """
    if x.dim() != 5:
        raise ValueError(f"augment expects [B, 1, D, H, W], got {tuple(x.shape)}")
    b = x.shape[0]
    flips = torch.rand(b, len(SPATIAL_DIMS), generator=generator) < 0.5
    shifts = torch.randint(-how.shift, how.shift + 1, (b, len(SPATIAL_DIMS)), generator=generator)
    scale = 1.0 + how.intensity * torch.randn(b, generator=generator)
    offset = how.intensity * torch.randn(b, generator=generator)
    out = torch.empty_like(x)
    for i in range(b):
        v = x[i]
        if how.flips:
            dims = [d - 1 for d, flip in zip(SPATIAL_DIMS, flips[i]) if flip]
            if dims:
                v = v.flip(dims)
        if how.shift > 0:
            v = torch.roll(v, shifts=tuple(shifts[i].tolist()), dims=(1, 2, 3))
        out[i] = v
    if how.intensity > 0:
        view = (b, 1, 1, 1, 1)
        out = out * scale.to(out).view(view) + offset.to(out).view(view)
    return out
