"""Simulated subtomograms the way the literature makes them (docs/SIMULATOR.md).

    density (map, atomic model or built-in class) → voxel size, centred on its mass
    → uniform random rotation + shift (+ crowding neighbours), on a zero-padded box
    → s = F⁻¹[W·CTF·F(ρ)]                   (the spec's CTF, missing wedge W about y)
    → n = F⁻¹[W·(CTF·a₁·N̂₁ + a₂·N̂₂)], Var(n) = Var(s)/SNR
    → crop to the box, z-score              (or: tilt series + weighted back-projection)

Arrays are [z, y, x]; the beam is z and the tilt axis y. Densities are protein-bright with a
background of 0; the CTF of the spec is negative at low frequency, so protein comes out dark,
as in real tomograms.

Every sample draws from its own generator, seeded by (seed, sample index), so the worker count
never changes the result and the same seed gives a byte-identical pool.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy.fft as sfft
import yaml
from scipy import ndimage
from scipy.spatial.transform import Rotation

from orchestrator.config import CONFIG_DIR, PROJECT_ROOT
from orchestrator.data.pool import JUNK, PoolInfo, PoolWriter
from orchestrator.data.volumes import MRC_SUFFIXES, read_sections

log = logging.getLogger("cryoal.simulate")

PRESET_DIR = CONFIG_DIR
MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
MAP_SUFFIXES = (".mrc", ".map")  # a folder of structures: single-volume maps (plus models)
EXTENT_THRESHOLD = 0.05  # a structure's extent: voxels above 5% of its maximum
SPLITS = ("train", "val", "test")
PLAUSIBLE_VOXEL_A = (2.0, 30.0)  # header voxel sizes outside this are likely a tool's default
# Peak bytes per voxel of a resampled map while it is prepared (zoom output, the float64
# coordinate grids of structure_extent, masks): 46.8 measured with tracemalloc on a 160³ map.
PREPARE_BYTES_PER_VOXEL = 48
# Non-particles a picker also returns (docs/SIMULATOR.md, "Junk"): noise with no particle,
# a carbon or ice edge, a fragment of a structure, a particle far off-centre.
JUNK_KINDS = ("empty", "edge", "fragment", "off_centre")
JUNK_NOISE = ("particle", "own")  # SimulationConfig.junk_noise


class SimulationError(ValueError):
    """An input the simulator cannot use; the message names the file or value and the reason."""


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SimulationConfig:
    structures: str = "builtin:10"  # folder of maps, .pdb/.cif file(s), or builtin:N (no files)
    box: int = 32  # output edge in voxels; the papers use 32³–40³
    voxel_size_A: float = 10.0  # ~1 nm voxels as in the papers; maps and models are resampled
    snr: float = 0.1  # Var(signal)/Var(noise) of the output; inf = noise-free
    per_class: int = 60  # subtomograms simulated per class
    # Real pools are long-tailed (ribosomes outnumber the rare complexes by far): the first
    # class's train subtomograms over the last's, the classes between on a geometric profile.
    # Validation and test stay per_class-balanced, so accuracy weighs every class the same.
    class_imbalance: float = 1.0
    val_fraction: float = 0.1  # of each class, for model selection during active learning
    test_fraction: float = 0.1  # of each class, held out (paper: 1,000 of 25,000 → 0.04)
    tilt_range_deg: float = 60.0  # tilts ±60° leave a missing wedge of 2×30° about y
    tilt_step_deg: float = 3.0  # tilt increment, only used by reconstruction="wbp"
    voltage_kv: float = 300.0  # sets the electron wavelength λ
    cs_mm: float = 2.7  # spherical aberration of a typical Krios objective
    defocus_um: tuple[float, float] = (3.0, 5.0)  # underfocus range, drawn uniformly per sample
    amplitude_contrast: float = 0.07  # fraction of amplitude contrast in the CTF
    envelope_fraction: float = 0.4  # CTF envelope exp(−(k/(f·k_Nyquist))²); inf = none
    noise_ctf_weight: float = 0.5  # w₁: share of the noise variance behind the CTF (w₂ = 1 − w₁)
    max_shift_fraction: float = 0.1  # shift up to ±this × box per axis (kept inside the box)
    crowding_neighbours: int = 0  # other particles packed around the target (0 = isolated)
    pad: int = 8  # zero padding per side so FFT wrap-around stays outside the crop
    reconstruction: str = "fourier"  # fourier (exact CTF·wedge filter) | wbp (tilt series)
    pdb_resolution_A: float | None = None  # Gaussian blur of atomic models (2σ); None = 2 voxels
    input_voxel_size_A: float | None = None  # for maps whose header has no voxel size
    seed: int = 0  # everything random derives from (seed, sample index)
    dtype: str = "float16"  # volume storage in the pool
    # Real picks hold non-particles that uncertainty strategies love to query: this share of
    # the pool's subtomograms is junk (label JUNK, answered "junk" by the simulated oracle).
    junk_fraction: float = 0.0
    junk_kinds: tuple[str, ...] = JUNK_KINDS  # which non-particles, in turn
    # What sets a fragment's and an off-centre pick's noise: "particle", the noise its whole
    # structure would have centred in the box (a tomogram's noise does not shrink with what a
    # pick holds), or "own", the asked SNR of its own smaller signal (pools before 2026-11-28).
    junk_noise: str = "particle"

    def __post_init__(self) -> None:
        object.__setattr__(self, "defocus_um", tuple(float(v) for v in self.defocus_um))
        object.__setattr__(self, "snr", float(self.snr))
        object.__setattr__(self, "junk_kinds", tuple(str(k) for k in self.junk_kinds))
        fractions_ok = (self.val_fraction >= 0 and self.test_fraction >= 0
                        and self.val_fraction + self.test_fraction < 1)
        low, high = (self.defocus_um + (0.0, 0.0))[:2]

        def unset_or_positive(value):
            return value is None or value > 0

        rules = [  # (holds, setting, what it must be)
            (self.box >= 8, "box", "≥ 8 voxels"),
            (self.voxel_size_A > 0, "voxel_size_A", "> 0"),
            (self.snr > 0, "snr", "> 0 (it is Var(signal)/Var(noise); use inf for noise-free)"),
            (self.per_class >= 1, "per_class", "≥ 1"),
            (self.class_imbalance >= 1, "class_imbalance", "≥ 1 (the most common class's train "
             "count over the rarest's; 1 = balanced)"),
            (fractions_ok, "val_fraction", "≥ 0, as test_fraction, with val + test < 1"),
            (fractions_ok, "test_fraction", "≥ 0, as val_fraction, with val + test < 1"),
            (0 < self.tilt_range_deg <= 90, "tilt_range_deg", "in (0, 90]"),
            (self.tilt_step_deg > 0, "tilt_step_deg", "> 0"),
            (self.voltage_kv > 0, "voltage_kv", "> 0"),
            (self.cs_mm >= 0, "cs_mm", "≥ 0"),
            (len(self.defocus_um) == 2 and 0 < low <= high, "defocus_um",
             "[low, high], 0 < low ≤ high"),
            (0 <= self.amplitude_contrast < 1, "amplitude_contrast", "in [0, 1)"),
            (self.envelope_fraction > 0, "envelope_fraction", "> 0"),
            (0 <= self.noise_ctf_weight <= 1, "noise_ctf_weight", "in [0, 1]"),
            (0 <= self.max_shift_fraction < 0.5, "max_shift_fraction", "in [0, 0.5)"),
            (0 <= self.crowding_neighbours <= 8, "crowding_neighbours", "in 0..8"),
            (self.pad >= 0, "pad", "≥ 0"),
            (self.reconstruction in ("fourier", "wbp"), "reconstruction", "'fourier' or 'wbp'"),
            (unset_or_positive(self.pdb_resolution_A), "pdb_resolution_A", "> 0 or None"),
            (unset_or_positive(self.input_voxel_size_A), "input_voxel_size_A", "> 0 or None"),
            (self.dtype in ("float16", "float32"), "dtype", "'float16' or 'float32'"),
            (0 <= self.junk_fraction < 1, "junk_fraction", "in [0, 1)"),
            (len(self.junk_kinds) > 0 and set(self.junk_kinds) <= set(JUNK_KINDS), "junk_kinds",
             f"a non-empty list of {', '.join(JUNK_KINDS)}"),
            (self.junk_noise in JUNK_NOISE, "junk_noise", " or ".join(map(repr, JUNK_NOISE))),
        ]
        for holds, name, rule in rules:  # `holds` is False for NaN, which fails every rule
            if not holds:
                raise SimulationError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    def split_sizes(self, count: int | None = None) -> dict[str, int]:
        """Per class (or of `count` subtomograms): how many go to train / val / test."""
        count = self.per_class if count is None else count
        n_val = round(count * self.val_fraction)
        n_test = round(count * self.test_fraction)
        return {"train": count - n_val - n_test, "val": n_val, "test": n_test}

    def train_count(self, c: int, n_classes: int) -> int:
        """Train subtomograms of class c (of n_classes): per_class's train share, thinned by
        class_imbalance^(c / (n_classes − 1)), so the last class has 1/class_imbalance of the
        first's (at least 1)."""
        full = self.split_sizes()["train"]
        if n_classes < 2 or self.class_imbalance == 1:
            return full
        return max(1, round(full * self.class_imbalance ** (-c / (n_classes - 1))))

    def particle_counts(self, n_classes: int) -> dict[str, int]:
        """Particles (junk not included) per split, over all n_classes classes."""
        sizes = self.split_sizes()
        train = sum(self.train_count(c, n_classes) for c in range(n_classes))
        return {"train": train, "val": sizes["val"] * n_classes, "test": sizes["test"] * n_classes}

    def junk_count(self, n_classes: int) -> int:
        """Junk subtomograms beside the n_classes' particles: junk_fraction of the pool."""
        particles = sum(self.particle_counts(n_classes).values())
        return round(self.junk_fraction * particles / (1 - self.junk_fraction))


# Presets are tune_configs/data_<name>.yaml; a dict literal so an unknown name lists the valid ones.
PRESETS = {
    "default": "data_default.yaml",  # CPU-sized embedded run: 10 built-in classes, SNR 0.1
    "paper": "data_paper.yaml",  # 50 built-in classes, SNR 0.05, 24,000 train / 1,000 test
    "shrec21": "data_shrec21.yaml",  # the 13 SHREC'21 maps in ../shared/data/structures_10A
}


def _coerce(name: str, value):
    """YAML and CLI values → the field's type (snr: inf, defocus lists → tuples)."""
    if value is None:
        return None
    if name in ("snr", "voxel_size_A", "val_fraction", "test_fraction", "tilt_range_deg",
                "tilt_step_deg", "voltage_kv", "cs_mm", "amplitude_contrast",
                "envelope_fraction", "noise_ctf_weight", "max_shift_fraction",
                "pdb_resolution_A", "input_voxel_size_A", "junk_fraction", "class_imbalance"):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SimulationError(f"{name} must be a number, got {value!r}") from None
    if name in ("box", "per_class", "crowding_neighbours", "pad", "seed"):
        if isinstance(value, bool) or not float(value).is_integer():
            raise SimulationError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if name == "defocus_um":
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            message = f"defocus_um must be two numbers [low, high], got {value!r}"
            raise SimulationError(message) from None
    if name == "junk_kinds":
        return tuple(value.replace(",", " ").split()) if isinstance(value, str) else tuple(value)
    return str(value)


def _preset_path(path_or_name: str | Path) -> Path:
    name = str(path_or_name)
    key = name.removeprefix("data_").removesuffix(".yaml")
    if key in PRESETS and not Path(name).is_file():
        return PRESET_DIR / PRESETS[key]
    path = Path(name)
    if path.is_file():
        return path
    raise SimulationError(
        f"{name}: neither a YAML file nor a preset; presets: {', '.join(sorted(PRESETS))}"
    )


def load_simulation_config(
    path_or_name: str | Path | None = None, overrides: dict | None = None
) -> SimulationConfig:
    """A preset name (default, paper, shrec21) or a YAML path, then `overrides` on top.

    Unknown keys are an error. A relative `structures` folder is taken relative to the current
    directory if it exists there, else relative to the project root (where presets point).
    """
    return SimulationConfig(**_settings(path_or_name, overrides))


def _settings(path_or_name: str | Path | None, overrides: dict | None) -> dict:
    """The settings a preset/YAML and overrides name explicitly, checked and coerced."""
    values: dict = {}
    if path_or_name is not None:
        path = _preset_path(path_or_name)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise SimulationError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise SimulationError(f"{path}: expected a mapping of settings, got {kind}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    valid = {f.name for f in dataclasses.fields(SimulationConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise SimulationError(
            f"unknown simulation setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    values = {k: _coerce(k, v) for k, v in values.items()}
    if "structures" in values:
        values["structures"] = _resolve_structures(values["structures"])
    return values


def _resolve_structures(source: str) -> str:
    if source.startswith("builtin") or Path(source).is_absolute() or Path(source).exists():
        return source
    in_project = PROJECT_ROOT / source
    return str(in_project.resolve()) if in_project.exists() else source


# ----------------------------------------------------------------------------- built-in classes
# Each class is a set of Gaussian blobs (centres and widths in nm) from one family builder, a
# target extent, and a generator seeded by the class name, so a class looks the same on every
# machine. Subunits are random asymmetric lumps, so two rings of 7 from different classes differ.

# The first ten span ten families, so builtin:10 (the CPU default) is varied, not ten rings.
_BUILTIN = [  # name, family, extent (nm), parameters
    ("ring7", "ring", 14, {"n": 7}),
    ("barrel7x2", "barrel", 15, {"n": 7, "rings": 2}),
    ("cage_o24", "cage", 14, {"group": "O"}),
    ("helix_long", "helix", 28, {"per_turn": 6.5, "n": 20, "starts": 1}),
    ("dumbbell", "dumbbell", 20, {"stalk": 0.35}),
    ("tripod", "branched", 20, {"arms": 3, "planar": False}),
    ("glob_l", "glob", 16, {"n": 12, "aspect": (1.0, 1.0, 1.0)}),
    ("ribosome_like", "two_body", 26, {"small": 0.6}),
    ("trimer_c3", "oligomer", 13, {"group": "C3"}),
    ("rod_curved", "rod", 24, {"curvature": 1.2}),
    ("ring5", "ring", 10, {"n": 5}),
    ("ring6", "ring", 12, {"n": 6}),
    ("ring8", "ring", 16, {"n": 8}),
    ("ring9", "ring", 17, {"n": 9}),
    ("ring11", "ring", 20, {"n": 11}),
    ("barrel6x2", "barrel", 13, {"n": 6, "rings": 2}),
    ("barrel8x2", "barrel", 16, {"n": 8, "rings": 2}),
    ("barrel9x2", "barrel", 20, {"n": 9, "rings": 2}),
    ("barrel12x2", "barrel", 24, {"n": 12, "rings": 2}),
    ("barrel7x4", "barrel", 20, {"n": 7, "rings": 4}),
    ("cage_t12", "cage", 11, {"group": "T"}),
    ("cage_i60_small", "cage", 19, {"group": "I"}),
    ("cage_i60", "cage", 27, {"group": "I"}),
    ("helix_short", "helix", 16, {"per_turn": 5.5, "n": 9, "starts": 1}),
    ("helix_2start", "helix", 22, {"per_turn": 5.0, "n": 9, "starts": 2}),
    ("helix_tube", "helix", 24, {"per_turn": 10.0, "n": 28, "starts": 1}),
    ("helix_thin", "helix", 20, {"per_turn": 2.5, "n": 12, "starts": 1}),
    ("rod_straight", "rod", 22, {"curvature": 0.0}),
    ("dumbbell_long", "dumbbell", 28, {"stalk": 0.55}),
    ("l_shape", "bent", 20, {"angle": 90}),
    ("v_shape", "bent", 22, {"angle": 45}),
    ("cross4", "branched", 22, {"arms": 4, "planar": True}),
    ("star5", "branched", 24, {"arms": 5, "planar": False}),
    ("fork", "fork", 22, {}),
    ("tree", "tree", 26, {"depth": 2}),
    ("antenna", "tree", 24, {"depth": 1}),
    ("glob_s", "glob", 8, {"n": 4, "aspect": (1.0, 1.0, 1.0)}),
    ("glob_m", "glob", 12, {"n": 7, "aspect": (1.0, 1.0, 1.0)}),
    ("glob_xl", "glob", 22, {"n": 22, "aspect": (1.0, 1.0, 1.0)}),
    ("glob_oblate", "glob", 16, {"n": 12, "aspect": (1.0, 1.0, 0.45)}),
    ("glob_prolate", "glob", 18, {"n": 12, "aspect": (0.6, 0.6, 1.6)}),
    ("two_lobe", "two_body", 16, {"small": 0.9}),
    ("three_lobe", "three_body", 18, {}),
    ("clamp", "arc", 16, {"span": 200, "n": 7}),
    ("horseshoe", "arc", 20, {"span": 280, "n": 9}),
    ("dimer_c2", "oligomer", 12, {"group": "C2"}),
    ("tetramer_d2", "oligomer", 14, {"group": "D2"}),
    ("hexamer_d3", "oligomer", 16, {"group": "D3"}),
    ("cone_c5", "cone", 15, {"n": 5}),
    ("disc", "disc", 18, {}),
]
BUILTIN_CLASS_COUNT = len(_BUILTIN)
BUILTIN_CLASS_NAMES = tuple(entry[0] for entry in _BUILTIN)


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _lump(rng: np.random.Generator, size: float, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric subunit: n blobs grown from a seed, about `size` nm across, centred at 0."""
    centres = [np.zeros(3)]
    for _ in range(n - 1):
        base = centres[rng.integers(len(centres))]
        centres.append(base + _unit(rng) * size * rng.uniform(0.25, 0.42))
    centres = np.array(centres)
    return centres - centres.mean(0), size * rng.uniform(0.17, 0.27, n)


def _chain(points: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Blobs every ~σ along a polyline, so the segment reads as a continuous rod."""
    out = []
    for a, b in zip(points[:-1], points[1:]):
        steps = max(2, int(np.ceil(np.linalg.norm(b - a) / sigma)) + 1)
        out.append(a + np.linspace(0, 1, steps)[:, None] * (b - a))
    centres = np.unique(np.round(np.concatenate(out), 6), axis=0)
    return centres, np.full(len(centres), sigma)


def _symmetrise(centres, sigmas, rotations: Rotation) -> tuple[np.ndarray, np.ndarray]:
    copies = [rotations[i].apply(centres) for i in range(len(rotations))]
    return np.concatenate(copies), np.tile(sigmas, len(rotations))


def _join(*parts) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _shifted(part, offset) -> tuple[np.ndarray, np.ndarray]:
    return part[0] + np.asarray(offset, dtype=float), part[1]


def _random_rotation(rng: np.random.Generator) -> Rotation:
    """Uniform on SO(3): a normalised 4-D Gaussian is a uniform unit quaternion."""
    q = rng.standard_normal(4)
    return Rotation.from_quat(q / np.linalg.norm(q))


def _family_ring(rng, n):
    radius = 5.0
    lump = _lump(rng, 1.1 * 2 * np.pi * radius / n, 3)  # neighbouring subunits touch
    lump = (_random_rotation(rng).apply(lump[0]) + [radius, 0, 0], lump[1])
    return _symmetrise(*lump, Rotation.create_group(f"C{n}"))


def _family_barrel(rng, n, rings):
    radius = 5.0
    size = 1.1 * 2 * np.pi * radius / n
    outer = _lump(rng, size, 3)
    outer = (_random_rotation(rng).apply(outer[0]) + [radius, 0, 0.45 * size], outer[1])
    parts = [outer]
    if rings == 4:  # α₇β₇β₇α₇, like the proteasome core
        inner = _lump(rng, size, 3)
        inner = (_random_rotation(rng).apply(inner[0]) + [0.85 * radius, 0, 0.45 * size], inner[1])
        parts = [_shifted(outer, [0, 0, 0.9 * size]), inner]
    half = _join(*parts)
    return _symmetrise(*half, Rotation.create_group(f"D{n}"))


def _family_cage(rng, group):
    radius, copies = 6.0, {"T": 12, "O": 24, "I": 60}[group]
    lump = _lump(rng, 0.95 * np.sqrt(4 * np.pi * radius**2 / copies), 4)
    lump = (_random_rotation(rng).apply(lump[0]) + _unit(rng) * radius, lump[1])
    return _symmetrise(*lump, Rotation.create_group(group))


def _family_helix(rng, per_turn, n, starts):
    lump = _lump(rng, 3.0, 3)
    lump = (_random_rotation(rng).apply(lump[0]) + [3.0, 0, 0], lump[1])
    rise = 3.0 * starts / per_turn * 1.6
    parts = []
    for s in range(starts):
        for i in range(n):
            turn = Rotation.from_euler("z", 360.0 * (i / per_turn + s / starts), degrees=True)
            parts.append(_shifted((turn.apply(lump[0]), lump[1]), [0, 0, rise * i]))
    return _join(*parts)


def _family_rod(rng, curvature):
    t = np.linspace(-1, 1, 9)
    wobble = rng.normal(0, 0.08, (len(t), 3))
    path = np.stack([t * 10, curvature * 4 * (t**2 - 0.5), np.zeros_like(t)], 1) + wobble * 10
    core = _chain(path, 1.3)
    knobs = [
        _shifted(_lump(rng, 2.5, 2), path[i] + _unit(rng) * 1.5)
        for i in rng.choice(len(t), 4, replace=False)
    ]
    return _join(core, *knobs)


def _family_dumbbell(rng, stalk):
    a, b = _lump(rng, 6.0, 6), _lump(rng, 5.0, 5)
    length = 6.0 + stalk * 20
    stick = _chain(np.array([[0, 0, 2.5], [0.8, 0, length / 2], [0, 0, length - 2.0]]), 0.9)
    return _join(a, _shifted(b, [0, 0, length]), stick)


def _family_bent(rng, angle):
    arm = 10.0
    direction = np.array([np.cos(np.radians(angle)), np.sin(np.radians(angle)), 0])
    one = _chain(np.array([[0, 0, 0], [arm, 0, 0]]), 1.2)
    two = _chain(np.array([[0, 0, 0], direction * arm * 0.8]), 1.0)
    head = _shifted(_lump(rng, 4.0, 4), [arm, 0, 0])
    return _join(one, two, head, _lump(rng, 3.5, 3))


def _family_branched(rng, arms, planar):
    parts = [_lump(rng, 4.0, 4)]
    for i in range(arms):
        if planar:
            phi = 2 * np.pi * i / arms + rng.normal(0, 0.15)
            d = np.array([np.cos(phi), np.sin(phi), rng.normal(0, 0.1)])
        else:
            d = _unit(rng) + [0, 0, 0.6]  # splayed to one side, like a tripod
        d /= np.linalg.norm(d)
        length = rng.uniform(7.0, 10.0)
        parts.append(_chain(np.array([[0, 0, 0], d * length]), 0.9))
        parts.append(_shifted(_lump(rng, 2.8, 2), d * (length + 1.0)))
    return _join(*parts)


def _family_fork(rng):
    stem = _chain(np.array([[0, 0, -8], [0, 0, 0]]), 1.1)
    left = _chain(np.array([[0, 0, 0], [-5, 0.5, 6]]), 1.0)
    right = _chain(np.array([[0, 0, 0], [5, -0.5, 5]]), 1.0)
    ends = [_shifted(_lump(rng, 3.0, 3), p) for p in ([0, 0, -9], [-5.5, 0.5, 7], [5.5, -0.5, 6])]
    return _join(stem, left, right, *ends)


def _family_tree(rng, depth):
    parts = []

    def grow(start, direction, length, level):
        end = start + direction * length
        parts.append(_chain(np.array([start, end]), 0.8 + 0.25 * level))
        if level == 0:
            parts.append(_shifted(_lump(rng, 2.4, 2), end))
            return
        for _ in range(2 if level < depth else 3):
            child = direction + 0.9 * _unit(rng)
            grow(end, child / np.linalg.norm(child), length * 0.65, level - 1)

    grow(np.zeros(3), np.array([0, 0, 1.0]), 8.0, depth)
    return _join(*parts)


def _family_glob(rng, n, aspect):
    centres, sigmas = _lump(rng, 3.0 * n ** (1 / 3) * 1.2, n)
    centres = centres * np.asarray(aspect)
    return centres, sigmas * (0.9 if n > 8 else 1.0)


def _family_two_body(rng, small):
    big = _lump(rng, 9.0, 12)
    little = _lump(rng, 9.0 * small, 8)
    offset = _unit(rng) * 9.0 * (0.6 + small * 0.45)  # a cleft between the two bodies
    return _join(big, _shifted(little, offset))


def _family_three_body(rng):
    parts = [_lump(rng, 5.0, 5)]
    for angle, dist in ((0, 6.0), (rng.uniform(100, 140), 5.0)):
        a = np.radians(angle)
        offset = [dist * np.cos(a), dist * np.sin(a), rng.normal(0, 1)]
        parts.append(_shifted(_lump(rng, 4.0, 4), offset))
    return _join(*parts)


def _family_arc(rng, span, n):
    lump = _lump(rng, 3.0, 3)
    parts = []
    for i in range(n):
        phi = np.radians(-span / 2 + span * i / (n - 1))
        subunit = _random_rotation(rng).apply(lump[0]) * 0.6 + [5.0, 0, 0]
        turned = Rotation.from_euler("z", phi).apply(subunit)
        parts.append((turned, lump[1] * rng.uniform(0.9, 1.3)))
    return _join(*parts)


def _family_oligomer(rng, group):
    lump = _lump(rng, 6.0, 5)
    lump = (lump[0] + [3.0, 1.0, 1.0], lump[1])
    return _symmetrise(*lump, Rotation.create_group(group))


def _family_cone(rng, n):
    lump = _lump(rng, 4.0, 3)
    tilt = Rotation.from_euler("y", 35, degrees=True)
    lump = (tilt.apply(_random_rotation(rng).apply(lump[0]) * [1, 1, 1.8]) + [3.5, 0, 0], lump[1])
    return _symmetrise(*lump, Rotation.create_group(f"C{n}"))


def _family_disc(rng):
    r = np.sqrt(rng.uniform(0, 1, 26)) * 8.0
    phi = rng.uniform(0, 2 * np.pi, 26)
    centres = np.stack([r * np.cos(phi), r * np.sin(phi), rng.normal(0, 0.6, 26)], 1)
    return centres, rng.uniform(1.0, 1.6, 26)


_FAMILIES = {
    "ring": _family_ring, "barrel": _family_barrel, "cage": _family_cage, "helix": _family_helix,
    "rod": _family_rod, "dumbbell": _family_dumbbell, "bent": _family_bent,
    "branched": _family_branched, "fork": _family_fork, "tree": _family_tree, "glob": _family_glob,
    "two_body": _family_two_body, "three_body": _family_three_body, "arc": _family_arc,
    "oligomer": _family_oligomer, "cone": _family_cone, "disc": _family_disc,
}
_MIN_SIGMA_NM = 0.6  # finer blobs would alias on 1 nm voxels
_TAIL = 2.7  # a blob reaches the 5%-of-maximum extent threshold about 2.7σ from its centre


def _builtin_blobs(class_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob centres [n, 3] (x, y, z; nm, centred on their mean) and σ [n] for one class."""
    name, family, extent_nm, params = _BUILTIN[class_index]
    rng = np.random.default_rng([20240917, zlib.crc32(name.encode())])  # by name: order-free
    centres, sigmas = _FAMILIES[family](rng, **params)
    centres = centres - centres.mean(0)
    for _ in range(3):  # scale to the class's extent; σ has a floor, so iterate to settle
        radius = np.max(np.linalg.norm(centres, axis=1) + _TAIL * sigmas)
        scale = extent_nm / 2 / radius
        centres, sigmas = centres * scale, np.maximum(sigmas * scale, _MIN_SIGMA_NM)
    return centres, sigmas


@functools.lru_cache(maxsize=256)
def _builtin_density_cached(class_index: int, voxel_size_A: float) -> np.ndarray:
    centres, sigmas = _builtin_blobs(class_index)
    voxel_nm = voxel_size_A / 10.0
    radius = np.max(np.linalg.norm(centres, axis=1) + 3.5 * sigmas)
    n = 2 * int(np.ceil(radius / voxel_nm)) + 2
    axis = (np.arange(n) - (n - 1) / 2) * voxel_nm
    field = np.zeros((n, n, n), dtype=np.float64)
    for (x, y, z), s in zip(centres, sigmas):  # each blob on its ±4σ window only
        lo = np.searchsorted(axis, np.array([z, y, x]) - 4 * s)
        hi = np.searchsorted(axis, np.array([z, y, x]) + 4 * s)
        gz, gy, gx = (
            np.exp(-((axis[a:b] - c) ** 2) / (2 * s * s)) for c, a, b in zip((z, y, x), lo, hi)
        )
        window = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        field[window] += gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    # Overlapping blobs saturate instead of adding up: subunits read as solid protein.
    density = 1.0 - np.exp(-1.5 * field)
    density /= density.max()
    density[density < 1e-4] = 0.0
    density.setflags(write=False)
    return density.astype(np.float32)


def builtin_structure(class_index: int, voxel_size_A: float = 10.0) -> np.ndarray:
    """The density of built-in class `class_index` (0 ≤ i < BUILTIN_CLASS_COUNT), [z, y, x].

    Deterministic; protein bright (max 1), background 0; sampled at `voxel_size_A`.
    """
    if not 0 <= int(class_index) < BUILTIN_CLASS_COUNT:
        raise SimulationError(
            f"built-in class index must be in 0..{BUILTIN_CLASS_COUNT - 1}, got {class_index}"
        )
    if voxel_size_A <= 0:
        raise SimulationError(f"voxel_size_A must be > 0, got {voxel_size_A}")
    return _builtin_density_cached(int(class_index), float(voxel_size_A)).copy()


# ----------------------------------------------------------------------------- loading structures


def _structure_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in MODEL_SUFFIXES + MAP_SUFFIXES + MRC_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _is_structure_file(path: Path) -> bool:
    return path.is_file() and _structure_suffix(path) in MODEL_SUFFIXES + MAP_SUFFIXES


def _structure_name(path: Path) -> str:
    return path.name[: len(path.name) - len(_structure_suffix(path))]


def resample(density: np.ndarray, from_A: float, to_A: float) -> np.ndarray:
    """Resample a density from `from_A` to `to_A` Å voxels, low-passing first when coarsening."""
    factor = from_A / to_A  # output voxels per input voxel
    shape = _resampled_shape(density.shape, from_A, to_A)
    if shape == density.shape:
        return density.astype(np.float32, copy=False)
    density = density.astype(np.float32)
    if factor < 1:  # anti-alias: Gaussian whose width matches the coarser grid
        density = ndimage.gaussian_filter(density, sigma=0.5 * math.sqrt(1 / factor**2 - 1))
    zoom = np.array(shape) / density.shape
    return ndimage.zoom(density, zoom, order=1, grid_mode=True, mode="grid-constant")


def _read_map(path: Path, voxel_size_A: float, input_voxel_size_A: float | None) -> np.ndarray:
    try:
        contents = read_sections(path)
    except ValueError as err:  # VolumeError names the file already
        raise SimulationError(f"cannot read structure file: {err}") from err
    if len(contents.sections) != 1:
        raise SimulationError(f"structure file {path}: holds {len(contents.sections)} volumes; expected one map")
    density, header_voxel = contents.sections[0], contents.voxel_size_A
    for fault in contents.header_faults:
        log.warning("structure file %s: read despite a header fault (%s)", path, fault)
    source_voxel = header_voxel or input_voxel_size_A
    if source_voxel is None:
        raise SimulationError(
            f"structure file {path}: the header has no voxel size; set input_voxel_size_A "
            f"(CLI: --input-voxel-size)"
        )
    shape = _resampled_shape(density.shape, source_voxel, voxel_size_A)
    _check_fits_memory(path, density.shape, shape, source_voxel, voxel_size_A)
    _warn_if_implausible(path, density, source_voxel, voxel_size_A, shape, from_header=header_voxel is not None)
    return resample(density, source_voxel, voxel_size_A)


def _resampled_shape(shape, from_A: float, to_A: float) -> tuple[int, ...]:
    factor = from_A / to_A
    return tuple(shape) if abs(factor - 1.0) < 1e-3 else tuple(max(1, round(n * factor)) for n in shape)


def _check_fits_memory(path: Path, shape, resampled, from_A: float, to_A: float) -> None:
    """Refuse, before allocating anything, a map whose resampled copy this machine cannot prepare."""
    need = math.prod(resampled) * PREPARE_BYTES_PER_VOXEL
    free = _available_memory()
    if free is not None and need > free / 2:
        raise SimulationError(
            f"structure file {path}: {'x'.join(map(str, shape))} voxels of {from_A:g} Å, resampled to "
            f"{to_A:g} Å, become {'x'.join(map(str, resampled))} voxels, which need ~{need / 2**30:.1f} GiB to "
            f"prepare; this machine has {free / 2**30:.1f} GiB free. Is the header's voxel size ({from_A:g} Å) "
            "right? Otherwise crop the map around the particle or use a coarser voxel_size_A"
        )


def _available_memory() -> int | None:
    """Bytes of memory free for a new allocation (MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _warn_if_implausible(path: Path, density: np.ndarray, from_A: float, to_A: float, resampled,
                         from_header: bool) -> None:
    low, high = PLAUSIBLE_VOXEL_A
    if from_header and not low <= from_A <= high:
        log.warning(
            "structure file %s: header voxel size %g Å is outside the usual %g–%g Å of maps for "
            "subtomograms (a tool's default?); resampled to %g Å its %s voxels become %s. If the header "
            "is wrong, correct it (e.g. mrcfile: mrc.voxel_size = …)", path, from_A, low, high, to_A,
            "x".join(map(str, density.shape)), "x".join(map(str, resampled)),
        )
    low_value, high_value = float(density.min()), float(density.max())
    if low_value != high_value and np.all((density == low_value) | (density == high_value)):
        log.warning(
            "structure file %s: holds only the values %g and %g: it looks like a mask, not a density, "
            "yet it becomes the class %r; move it out of the structure folder if it is a mask",
            path, low_value, high_value, _structure_name(path),
        )


def _read_model(path: Path, voxel_size_A: float, resolution_A: float | None) -> np.ndarray:
    """Atomic model → density: atoms weighted by atomic number, splatted trilinearly on the
    grid, then a Gaussian blur for the resolution (pdb2vol: resolution = 2σ)."""
    try:
        import gemmi
    except ImportError as err:  # a dependency, but say what to do if an install lacks it
        raise SimulationError(f"reading {path} needs gemmi (pip install gemmi)") from err
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as err:
        raise SimulationError(f"cannot read structure file {path}: {err}") from err
    if len(structure) == 0:
        raise SimulationError(f"structure file {path}: no models (no atoms)")
    structure.remove_waters()  # ordered solvent is not part of the particle
    xyz, weight = [], []
    for chain in structure[0]:
        for residue in chain:
            for atom in residue:
                xyz.append((atom.pos.x, atom.pos.y, atom.pos.z))
                weight.append(max(1, atom.element.atomic_number))
    if not xyz:
        raise SimulationError(f"structure file {path}: no atoms")
    xyz = np.asarray(xyz, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    resolution_A = resolution_A or 2.0 * voxel_size_A
    sigma_vox = resolution_A / 2.0 / voxel_size_A
    centre = (xyz * weight[:, None]).sum(0) / weight.sum()
    grid = (xyz - centre) / voxel_size_A  # x, y, z in voxels about the centre of mass
    half = int(np.ceil(np.abs(grid).max() + 4 * sigma_vox)) + 2
    n = 2 * half
    pos = grid[:, ::-1] + (n - 1) / 2  # → z, y, x array coordinates
    base = np.floor(pos).astype(np.int64)
    frac = pos - base
    density = np.zeros(n**3, dtype=np.float64)
    for corner in np.ndindex(2, 2, 2):
        c = np.array(corner)
        w = weight * np.prod(np.where(c, frac, 1 - frac), axis=1)
        idx = base + c
        density += np.bincount(np.ravel_multi_index(idx.T, (n, n, n)), weights=w, minlength=n**3)
    density = ndimage.gaussian_filter(density.reshape(n, n, n), sigma_vox)
    return density.astype(np.float32)


def _builtin_selection(text: str) -> list[int]:
    """"builtin" (all), "builtin:N" (the first N) or "builtin:ring7,glob_m,…" → class indices."""
    if text == "builtin":
        return list(range(BUILTIN_CLASS_COUNT))
    prefix, _, rest = text.partition(":")
    if prefix != "builtin" or not rest:
        raise SimulationError(
            f"built-in structures are builtin, builtin:N or builtin:NAME,NAME…; got {text!r}"
        )
    if rest.isdigit():
        count = int(rest)
        if not 1 <= count <= BUILTIN_CLASS_COUNT:
            raise SimulationError(f"builtin:N needs 1 ≤ N ≤ {BUILTIN_CLASS_COUNT}, got {count}")
        return list(range(count))
    names = [n.strip() for n in rest.split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_CLASS_NAMES]
    if unknown:
        raise SimulationError(
            f"unknown built-in class(es) {', '.join(unknown)}; "
            f"valid: {', '.join(BUILTIN_CLASS_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise SimulationError(f"a built-in class is named twice in {text!r}")
    return [BUILTIN_CLASS_NAMES.index(n) for n in names]


def load_structures(
    source: str | Path | Sequence[str | Path],
    *,
    voxel_size_A: float = 10.0,
    input_voxel_size_A: float | None = None,
    pdb_resolution_A: float | None = None,
) -> tuple[list[str], list[np.ndarray]]:
    """Class names and densities ([z, y, x] float32 at `voxel_size_A`, protein bright).

    `source`: "builtin:N" (the first N built-in classes; "builtin" = all; or builtin:NAME,NAME),
    a folder of maps (.mrc/.map) and atomic models (.pdb/.cif, optionally .gz), one such file,
    or a list of files.
    Files in a folder are taken in name order; other files there (LICENSE, …) are ignored.
    """
    if isinstance(source, (str, Path)) and str(source).startswith("builtin"):
        indices = _builtin_selection(str(source))
        names = [BUILTIN_CLASS_NAMES[i] for i in indices]
        return names, [builtin_structure(i, voxel_size_A) for i in indices]

    if isinstance(source, (str, Path)):
        root = Path(source)
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if _is_structure_file(p))
            if not files:
                raise SimulationError(
                    f"{root}: no structure files in the folder (looked for "
                    f"{', '.join(MAP_SUFFIXES + MODEL_SUFFIXES[:4])})"
                )
        elif root.exists():
            files = [root]
        else:
            raise SimulationError(f"{root}: no such file or folder (nor builtin:N)")
    else:
        files = [Path(p) for p in source]
        if not files:
            raise SimulationError("no structure files given")

    names, densities = [], []
    for path in files:
        suffix = _structure_suffix(path)
        if not path.is_file():
            raise SimulationError(f"{path}: no such structure file")
        if suffix in MODEL_SUFFIXES:
            density = _read_model(path, voxel_size_A, pdb_resolution_A)
        elif suffix in MAP_SUFFIXES + MRC_SUFFIXES:
            density = _read_map(path, voxel_size_A, input_voxel_size_A)
        else:
            expected = ", ".join(MAP_SUFFIXES + MODEL_SUFFIXES[:4])
            raise SimulationError(f"{path}: not a structure file (expected {expected})")
        if not np.isfinite(density).all():
            raise SimulationError(f"structure file {path}: has NaN or Inf voxels")
        if not density.max() > 0:
            raise SimulationError(f"structure file {path}: no positive (protein-bright) density")
        names.append(_structure_name(path))
        densities.append(density)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SimulationError(
            f"two structure files give the same class name: {', '.join(duplicates)}"
        )
    return names, densities


# ----------------------------------------------------------------------------- one subtomogram


@dataclass(frozen=True)
class PreparedStructure:
    """A density ready to be posed: cropped to its support, with its centre of mass and extent."""

    name: str
    density: np.ndarray  # float32 [z, y, x]
    centre: np.ndarray  # centre of mass, array coordinates (z, y, x)
    extent: float  # diameter in voxels of the centred sphere holding every voxel > 5% of max
    support: float  # radius in voxels holding every stored (> 0.1% of max) voxel

    @property
    def radius(self) -> float:
        return self.extent / 2


def structure_extent(density: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre of mass, extent): the extent is the diameter, in voxels, of the sphere about the
    centre of mass that holds every voxel above 5% of the maximum (+1 for the voxel width), i.e.
    the room the structure needs in any orientation."""
    density = np.asarray(density, dtype=np.float32)
    peak = float(density.max()) if density.size else 0.0
    if not np.isfinite(density).all() or not peak > 0:
        raise SimulationError("a structure needs finite, positive (protein-bright) density")
    idx = np.argwhere(density > EXTENT_THRESHOLD * peak).astype(np.float64)
    positive = np.clip(density, 0, None)
    grids = np.indices(density.shape, dtype=np.float64)
    centre = np.array([(g * positive).sum() for g in grids]) / positive.sum()
    extent = 2 * float(np.sqrt(((idx - centre) ** 2).sum(1)).max()) + 1.0
    return centre, extent


def fitting_box(densities: Sequence[np.ndarray], at_least: int = 32) -> int:
    """The smallest box (a multiple of 8, ≥ at_least) that holds every structure in any pose."""
    largest = max(structure_extent(d)[1] for d in densities)
    return max(at_least, 8 * math.ceil(largest / 8))


def prepare_structure(density: np.ndarray, box: int, name: str = "structure") -> PreparedStructure:
    """Check that the structure fits the box in any orientation; crop it to its support."""
    try:
        centre, extent = structure_extent(density)
    except SimulationError as err:
        raise SimulationError(f"structure {name}: {err}") from None
    if extent > box:
        raise SimulationError(
            f"structure {name} spans {extent:.1f} voxels (sphere holding its density above 5% "
            f"of max), larger than the box of {box}: use a larger box or a coarser voxel size"
        )
    density = np.asarray(density, dtype=np.float32)
    keep = np.argwhere(density > 1e-3 * density.max())
    lo = np.maximum(keep.min(0) - 2, 0)
    hi = np.minimum(keep.max(0) + 3, density.shape)
    cropped = np.ascontiguousarray(density[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    support = float(np.sqrt(((keep - centre) ** 2).sum(1)).max()) + 1.0
    return PreparedStructure(name, cropped, centre - lo, extent, support)


@functools.lru_cache(maxsize=16)
def _fourier_grids(n: int, voxel_size_A: float, tilt_range_deg: float, envelope_fraction: float):
    """rfft half-grid of size n³: |k|² (1/Å²), envelope, wedge W, Hermitian weights for means."""
    kz = sfft.fftfreq(n, d=voxel_size_A).astype(np.float32)[:, None, None]
    ky = sfft.fftfreq(n, d=voxel_size_A).astype(np.float32)[None, :, None]
    kx = sfft.rfftfreq(n, d=voxel_size_A).astype(np.float32)[None, None, :]
    k2 = kz**2 + ky**2 + kx**2
    nyquist = 0.5 / voxel_size_A
    envelope = np.exp(-k2 / (envelope_fraction * nyquist) ** 2).astype(np.float32)
    # Tilts ±θ about y with the beam along z sample |k_z| ≤ |k_x|·tan θ (the rest is the wedge).
    wedge = (np.abs(kz) <= np.abs(kx) * np.float32(math.tan(math.radians(tilt_range_deg))) + 1e-12)
    if tilt_range_deg >= 90:
        wedge = np.ones_like(wedge)
    wedge = np.broadcast_to(wedge, k2.shape).astype(np.float32)
    # A full-grid mean of |H|² from the half grid: inner x-frequencies stand for two.
    weights = np.full(k2.shape[-1], 2.0, dtype=np.float32)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    for shared in (k2, envelope, wedge, weights):  # cached: nobody may write into them
        shared.setflags(write=False)
    return k2, envelope, wedge, weights


def electron_wavelength_A(voltage_kv: float) -> float:
    """Relativistic electron wavelength λ in Å (0.01969 Å at 300 kV)."""
    volts = voltage_kv * 1e3
    return 12.2643 / math.sqrt(volts * (1 + 0.978466e-6 * volts))


def ctf(k2: np.ndarray, defocus_A: float, cfg: SimulationConfig) -> np.ndarray:
    """CTF(k) = −[√(1−A²)·sin χ + A·cos χ] with χ = π·λ·Δf·k² − (π/2)·Cs·λ³·k⁴ (no envelope).

    Written as −sin(χ + φ), sin φ = A: the same function with one transcendental call."""
    lam = electron_wavelength_A(cfg.voltage_kv)
    cs_A = cfg.cs_mm * 1e7
    a = np.float32(math.pi * lam * defocus_A)
    b = np.float32(0.5 * math.pi * cs_A * lam**3)
    phase = np.float32(math.asin(cfg.amplitude_contrast))
    return -np.sin(a * k2 - b * k2 * k2 + phase)


@dataclass(frozen=True)
class SimulatedParts:
    """A subtomogram with its parts kept apart, for tests and diagnostics (crop, before z-score)."""

    volume: np.ndarray  # the output: z-scored signal + noise, float32 [box]³
    signal: np.ndarray  # clean signal s (W·CTF filtered density), cropped, not normalised
    noise: np.ndarray  # noise n, cropped, same scale as `signal`
    rotation: np.ndarray  # 3×3 matrix acting on (x, y, z) coordinates
    shift: np.ndarray  # voxels, (z, y, x)
    defocus_um: float


def _pose(structure: PreparedStructure, rotation: Rotation, centre_out: np.ndarray, n: int,
          out: np.ndarray | None = None) -> np.ndarray:
    """Add the structure, rotated about its centre of mass and placed at `centre_out`, to an n³
    grid (new if `out` is None). Only the cube around its support is interpolated: most of the
    padded box is empty, and this is the costliest step."""
    if out is None:
        out = np.zeros((n, n, n), dtype=np.float32)
    lo = np.clip(np.floor(centre_out - structure.support).astype(int), 0, n)
    hi = np.clip(np.ceil(centre_out + structure.support).astype(int) + 1, 0, n)
    if np.any(hi <= lo):
        return out  # wholly outside (a crowding neighbour far off)
    inverse = rotation.as_matrix()[::-1, ::-1].T  # (x, y, z) → (z, y, x), output → input
    offset = structure.centre - inverse @ (centre_out - lo)
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += ndimage.affine_transform(
        structure.density, inverse, offset=offset, output_shape=tuple(hi - lo), order=1,
        mode="constant", cval=0.0, prefilter=False,
    )
    return out


def _crop(volume: np.ndarray, box: int) -> np.ndarray:
    start = (volume.shape[0] - box) // 2
    return volume[start:start + box, start:start + box, start:start + box]


def _zscore(volume: np.ndarray) -> np.ndarray:
    mean = volume.mean(dtype=np.float64)
    std = volume.std(dtype=np.float64)
    return ((volume - mean) / std).astype(np.float32)


def simulate_subtomogram(
    density: np.ndarray | PreparedStructure,
    cfg: SimulationConfig,
    rng: np.random.Generator,
    return_parts: bool = False,
    neighbours: Sequence[PreparedStructure] | None = None,
) -> np.ndarray | SimulatedParts:
    """One subtomogram [box]³ float32, z-scored (protein dark). With return_parts, a
    SimulatedParts holding the clean signal and the noise separately as well.

    `density` is a raw density at cfg.voxel_size_A or a PreparedStructure (faster when reused);
    crowding neighbours are drawn from `neighbours` (default: the target itself).
    """
    target = density
    if not isinstance(target, PreparedStructure):
        target = prepare_structure(density, cfg.box)
    box, n = cfg.box, cfg.box + 2 * cfg.pad
    centre = np.full(3, (n - 1) / 2)

    # The order of draws is fixed: rotation, shift, defocus, neighbours, noise.
    rotation = _random_rotation(rng)
    room = min(cfg.max_shift_fraction * box, max(0.0, (box - target.extent) / 2))
    shift = rng.uniform(-room, room, 3)
    defocus_um = float(rng.uniform(*cfg.defocus_um))
    volume = _pose(target, rotation, centre + shift, n)
    if cfg.crowding_neighbours:
        _crowd(volume, target, centre + shift, neighbours or [target], cfg.crowding_neighbours, rng)

    if cfg.reconstruction == "wbp":
        signal, noise = _tilt_series_reconstruction(volume, cfg, defocus_um * 1e4, rng)
    else:
        signal, noise = _fourier_imaging(volume, cfg, defocus_um * 1e4, rng)
    out = _zscore(signal + noise)
    if not return_parts:
        return out
    return SimulatedParts(out, signal, noise, rotation.as_matrix(), shift, defocus_um)


def _crowd(volume, target, where, pool, count, rng) -> None:
    """Add `count` neighbours touching the target from random directions (they may overlap a
    little, and may reach past the crop, as in a crowded cytoplasm)."""
    for _ in range(count):
        other = pool[rng.integers(len(pool))]
        distance = (target.radius + other.radius) * rng.uniform(0.8, 1.0)
        place = where + _unit(rng) * distance
        _pose(other, _random_rotation(rng), place, volume.shape[0], out=volume)


def _noise_power(signal: np.ndarray, given: float | None) -> float:
    """The power the noise is scaled to: ``given``, or the signal's own variance."""
    power = float(signal.var(dtype=np.float64)) if given is None else float(given)
    if not power > 0:
        raise SimulationError("the simulated signal is empty (structure outside the box?)")
    return power


def _fourier_imaging(volume, cfg, defocus_A, rng, noise_power: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """s = F⁻¹[W·CTF·F(ρ)], n = F⁻¹[W·(CTF·a₁·N̂₁ + a₂·N̂₂)], both cropped; Var(n) = S/SNR with
    S = Var(s), or ``noise_power`` when given (another signal's power: junk imaged in the noise
    of a whole particle).

    The signal is filtered on the padded grid (no wrap-around into the crop). Cropping spreads
    ~2% of its power back into the wedge, so W is applied once more on the box grid. The noise is
    stationary, so it is made on the box grid directly (periodic is fine for noise)."""
    n, box = volume.shape[0], cfg.box
    optics = (cfg.voxel_size_A, cfg.tilt_range_deg, cfg.envelope_fraction)
    k2, envelope, wedge, _ = _fourier_grids(n, *optics)
    h_padded = wedge * envelope * ctf(k2, defocus_A, cfg)
    filtered = _crop(sfft.irfftn(h_padded * sfft.rfftn(volume), s=volume.shape), box)
    k2, envelope, wedge, weights = _fourier_grids(box, *optics)
    shape = (box, box, box)
    signal = sfft.irfftn(wedge * sfft.rfftn(filtered), s=shape)
    power = _noise_power(signal, noise_power)
    if math.isinf(cfg.snr):
        return signal, np.zeros_like(signal)
    # a_i² = w_i·S / (SNR·mean|H_i|²), means over the full FFT grid; H₁ = W·CTF, H₂ = W.
    h1 = wedge * envelope * ctf(k2, defocus_A, cfg)
    spectrum = np.zeros(k2.shape, dtype=np.complex64)
    for weight, h in ((cfg.noise_ctf_weight, h1), (1 - cfg.noise_ctf_weight, wedge)):
        white = rng.standard_normal(shape, dtype=np.float32)  # drawn even if unused: fixed stream
        if weight == 0:
            continue
        mean_h2 = float(np.einsum("zyx,x->", h * h, weights, dtype=np.float64)) / box**3
        amplitude = math.sqrt(weight * power / (cfg.snr * mean_h2))
        spectrum += (np.float32(amplitude) * h) * sfft.rfftn(white)
    return signal, sfft.irfftn(spectrum, s=shape)


# Junk: what a picker returns that is not a particle ---------------------------------------


def simulate_junk(
    kind: str,
    structures: Sequence[PreparedStructure],
    cfg: SimulationConfig,
    rng: np.random.Generator,
    return_parts: bool = False,
) -> np.ndarray | SimulatedParts:
    """One non-particle [box]³ float32, z-scored, imaged like a particle: the same CTF (defocus
    drawn the same way), missing wedge and two noise terms (docs/SIMULATOR.md, "Junk").

    - ``empty``: the noise a particle's subtomogram would have, without the particle (the
      particle only sets the noise level; at SNR ∞ the noise of SNR 1: an empty, noise-free box
      is constant);
    - ``edge``: a carbon or ice film 4–12 voxels thick, tilted up to 30° from the x-y plane
      (the grid), ending in a straight edge that passes within a quarter box of the centre;
    - ``fragment``: 25–60% of a structure's density, cut off by a random plane, posed like a
      particle;
    - ``off_centre``: a whole structure centred 30–45% of the box away from the box centre (a
      pick beside a particle), partly cropped away.

    A fragment and an off-centre pick are imaged in the noise their whole structure would have,
    centred in the box (``cfg.junk_noise = "particle"``): less signal in the same noise, as in a
    tomogram; ``"own"`` scales the noise to their own signal instead (the asked SNR, as a
    particle's).

    `structures` are the pool's prepared structures; one is drawn for every kind but ``edge``.
    Draw order: structure, geometry, defocus, noise.
    """
    if kind not in JUNK_KINDS:
        raise SimulationError(f"junk kind {kind!r} is not one of {', '.join(JUNK_KINDS)}")
    box, n = cfg.box, cfg.box + 2 * cfg.pad
    centre = np.full(3, (n - 1) / 2)
    rotation, shift = Rotation.identity(), np.zeros(3)
    if kind == "edge":
        volume = _film_edge(n, box, rng)
    else:
        target = whole = structures[rng.integers(len(structures))]
        rotation = _random_rotation(rng)
        if kind == "fragment":
            target = _fragment(whole, box, rng)
        if kind == "off_centre":
            shift = _unit(rng) * rng.uniform(0.3, 0.45) * box
        elif kind == "fragment":
            room = min(cfg.max_shift_fraction * box, max(0.0, (box - target.extent) / 2))
            shift = rng.uniform(-room, room, 3)
        volume = _pose(target, rotation, centre + shift, n)
    defocus_um = float(rng.uniform(*cfg.defocus_um))
    imaging_cfg = cfg
    if kind == "empty" and math.isinf(cfg.snr):
        imaging_cfg = dataclasses.replace(cfg, snr=1.0)
    imaging = _tilt_series_reconstruction if cfg.reconstruction == "wbp" else _fourier_imaging
    noise_power = None  # the junk's own signal's
    if kind in ("fragment", "off_centre") and cfg.junk_noise == "particle" and not math.isinf(cfg.snr):
        noise_power = _whole_particle_power(whole, rotation, imaging, cfg, defocus_um * 1e4)
    signal, noise = imaging(volume, imaging_cfg, defocus_um * 1e4, rng, noise_power)
    if kind == "empty":  # the particle set the noise level only
        signal = np.zeros_like(signal)
    out = _zscore(signal + noise)
    if not return_parts:
        return out
    return SimulatedParts(out, signal, noise, rotation.as_matrix(), shift, defocus_um)


def _whole_particle_power(structure, rotation, imaging, cfg, defocus_A) -> float:
    """The signal power of `structure` posed at the box centre and imaged at `defocus_A`: the
    noise level a whole particle of it would have. A generator of its own, so the sample's
    draws stay what they were (the tilt series draws its noise before it is left out)."""
    n = cfg.box + 2 * cfg.pad
    posed = _pose(structure, rotation, np.full(3, (n - 1) / 2), n)
    noise_free = dataclasses.replace(cfg, snr=math.inf)
    signal, _ = imaging(posed, noise_free, defocus_A, np.random.default_rng(0))
    return float(signal.var(dtype=np.float64))


def _film_edge(n: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """A film (density 1) tilted up to 30° from the x-y plane, 4–12 voxels thick, ending in a
    straight edge; soft (0.75 voxel) borders, tapered to 0 over the padding so that the periodic
    filtering sees no cut at the grid's border."""
    tilt, turn = math.radians(rng.uniform(0.0, 30.0)), rng.uniform(0.0, 2 * math.pi)
    normal = np.array([math.cos(tilt), math.sin(tilt) * math.sin(turn),
                       math.sin(tilt) * math.cos(turn)])  # (z, y, x)
    along = _unit(rng)
    along -= (along @ normal) * normal
    along /= np.linalg.norm(along)
    thickness = rng.uniform(4.0, 12.0)
    offset = rng.uniform(-0.15, 0.15) * box
    edge = rng.uniform(-0.25, 0.25) * box
    r = np.indices((n, n, n), dtype=np.float32) - np.float32((n - 1) / 2)
    height = np.tensordot(normal.astype(np.float32), r, axes=1)
    across = np.tensordot(along.astype(np.float32), r, axes=1)
    width = np.float32(0.75)
    film = _sigmoid((thickness / 2 - np.abs(height - offset)) / width)
    film *= _sigmoid((across - edge) / width)
    margin = max((n - box) // 2, 1)
    ramp = np.clip(np.minimum(np.arange(n), n - 1 - np.arange(n)) / margin, 0.0, 1.0)
    taper = np.sin(0.5 * math.pi * ramp).astype(np.float32) ** 2
    return (film * taper[:, None, None] * taper[None, :, None] * taper[None, None, :]).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # tanh: no overflow warnings


def _fragment(structure: PreparedStructure, box: int, rng: np.random.Generator) -> PreparedStructure:
    """The part of `structure` beyond a random plane holding 25–60% of its mass, re-centred."""
    density = structure.density
    direction = _unit(rng)
    keep_share = rng.uniform(0.25, 0.6)
    r = np.indices(density.shape, dtype=np.float64).reshape(3, -1).T - structure.centre
    along = r @ direction
    order = np.argsort(along)[::-1]  # farthest along the direction first
    mass = np.cumsum(density.ravel()[order], dtype=np.float64)
    cut = along[order][min(np.searchsorted(mass, keep_share * mass[-1]), len(order) - 1)]
    piece = np.where((along >= cut).reshape(density.shape), density, 0.0).astype(np.float32)
    # A cap's rim can lie farther from the cap's own centre than the whole structure's radius
    # (a hemisphere of a shell: 1.12 radii), so a structure that fits the box may have a
    # fragment that does not: keep the part of it within a ball that fits (junk has no shape
    # to preserve), shrinking the ball until the re-centred piece fits.
    name = f"{structure.name} fragment"
    grid = np.indices(piece.shape, dtype=np.float64).reshape(3, -1).T
    for radius in np.arange(box / 2 - 1, 1, -1.0):
        try:
            return prepare_structure(piece, box, name)
        except SimulationError:
            centre, _ = structure_extent(piece)
            inside = (((grid - centre) ** 2).sum(1) <= radius**2).reshape(piece.shape)
            piece = np.where(inside, piece, 0.0).astype(np.float32)
    return prepare_structure(piece, box, name)


# Weighted back-projection of a real tilt series -------------------------------------------


@functools.lru_cache(maxsize=4)
def _tilt_geometry(n: int, tilt_range_deg: float, tilt_step_deg: float):
    """Per tilt: detector bin (floor) and fraction for every (z, x) of an n² slice."""
    count = int(math.floor(2 * tilt_range_deg / tilt_step_deg + 1e-6)) + 1
    angles = np.radians(-tilt_range_deg + tilt_step_deg * np.arange(count))
    width = 2 * int(math.ceil(n * 0.75)) + 2  # holds the slice's footprint at any tilt ≤ 90°
    c = (n - 1) / 2
    z, x = np.meshgrid(np.arange(n) - c, np.arange(n) - c, indexing="ij")
    bins, fracs = [], []
    for a in angles:
        u = x * math.cos(a) - z * math.sin(a) + (width - 1) / 2
        b = np.floor(u).astype(np.int64)
        bins.append(b)
        fracs.append((u - b).astype(np.float32))
    return angles, width, np.stack(bins), np.stack(fracs)


def _tilt_series_reconstruction(volume, cfg, defocus_A, rng, noise_power: float | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Project at each tilt (−θ:step:θ about y), apply the CTF (constant defocus) and the two noise
    terms per projection, ramp-filter, back-project; signal and noise are reconstructed apart
    (WBP is linear) and the noise is scaled so the cropped output has the asked SNR (of
    ``noise_power`` instead of the signal's own power, when given)."""
    n = volume.shape[0]
    angles, width, bins, fracs = _tilt_geometry(n, cfg.tilt_range_deg, cfg.tilt_step_deg)
    vol_yzx = np.ascontiguousarray(volume.transpose(1, 0, 2))  # the tilt axis y first
    rows = (np.arange(n) * width)[:, None, None]
    projections = np.empty((len(angles), n, width), dtype=np.float32)
    for t in range(len(angles)):
        index = (rows + bins[t][None]).ravel()
        f = fracs[t][None]
        projections[t] = (
            np.bincount(index, (vol_yzx * (1 - f)).ravel(), minlength=n * width)
            + np.bincount(index + 1, (vol_yzx * f).ravel(), minlength=n * width)
        ).reshape(n, width)

    ky = sfft.fftfreq(n, d=cfg.voxel_size_A).astype(np.float32)[:, None]
    ku = sfft.rfftfreq(width, d=cfg.voxel_size_A).astype(np.float32)[None, :]
    k2 = ky**2 + ku**2
    nyquist = 0.5 / cfg.voxel_size_A
    h1 = ctf(k2, defocus_A, cfg) * np.exp(-k2 / (cfg.envelope_fraction * nyquist) ** 2)
    ramp = np.abs(ku) / nyquist  # the back-projection weighting
    signal_ft = h1 * ramp * sfft.rfft2(projections)
    n1 = rng.standard_normal(projections.shape, dtype=np.float32)
    n2 = rng.standard_normal(projections.shape, dtype=np.float32)
    mean_h1 = float(np.mean(h1 * h1))  # half-grid mean: close enough, the noise is rescaled below
    noise_ft = ramp * (
        np.float32(math.sqrt(cfg.noise_ctf_weight / mean_h1)) * h1 * sfft.rfft2(n1)
        + np.float32(math.sqrt(1 - cfg.noise_ctf_weight)) * sfft.rfft2(n2)
    )
    both = np.stack([sfft.irfft2(signal_ft, s=(n, width)), sfft.irfft2(noise_ft, s=(n, width))])
    # Back-project into the crop only: the padding is never looked at again.
    box, start = cfg.box, (n - cfg.box) // 2
    inner = slice(start, start + box)
    rows = (np.arange(start, start + box) * width)[:, None, None]
    recon = np.zeros((2, box, box, box), dtype=np.float32)  # [signal|noise, y, z, x]
    for t in range(len(angles)):
        flat = both[:, t].reshape(2, -1)
        index = rows + bins[t][None, inner, inner]
        f = fracs[t][None, inner, inner]
        recon += flat[:, index] * (1 - f) + flat[:, index + 1] * f
    signal = recon[0].transpose(1, 0, 2)
    noise = recon[1].transpose(1, 0, 2)
    power = _noise_power(signal, noise_power)
    if math.isinf(cfg.snr):
        return np.ascontiguousarray(signal), np.zeros_like(signal)
    scale = math.sqrt(power / (cfg.snr * float(noise.var(dtype=np.float64))))
    return np.ascontiguousarray(signal), np.ascontiguousarray(noise * np.float32(scale))


# ----------------------------------------------------------------------------- the pool


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: independent of how samples are spread over workers."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _as_structures(structures, cfg: SimulationConfig) -> tuple[list[str], list[np.ndarray]]:
    if structures is None:
        structures = cfg.structures
    if isinstance(structures, (str, Path)):
        return load_structures(
            structures, voxel_size_A=cfg.voxel_size_A,
            input_voxel_size_A=cfg.input_voxel_size_A, pdb_resolution_A=cfg.pdb_resolution_A,
        )
    names, densities = structures
    if len(names) != len(densities) or not names:
        raise SimulationError("structures must be (names, densities) of equal, non-zero length")
    return list(names), list(densities)


def _plan(cfg: SimulationConfig, n_classes: int) -> list[tuple[int, int, int, str]]:
    """Rows in pool order: (sample index, class, index within class, split). Sample indices are
    class-major; the pool order is a seeded shuffle so any prefix of the pool mixes classes.
    Junk rows (class JUNK, index within the junk) come after the particles' sample indices and
    are split like a class; without junk the plan is what it was before junk existed. With
    class_imbalance a class keeps the first cfg.train_count of its train indices: its
    subtomograms, validation and test included, are those of the balanced pool's."""
    sizes = cfg.split_sizes()
    split_of = [s for s in SPLITS for _ in range(sizes[s])]
    rows = [
        (c * cfg.per_class + j, c, j, split_of[j])
        for c in range(n_classes) for j in range(cfg.per_class)
        if split_of[j] != "train" or j < cfg.train_count(c, n_classes)
    ]
    n_junk = cfg.junk_count(n_classes)
    junk_sizes = cfg.split_sizes(n_junk)
    junk_split = [s for s in SPLITS for _ in range(junk_sizes[s])]
    rows += [(len(rows) + j, JUNK, j, junk_split[j]) for j in range(n_junk)]
    shuffle = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2**31,)))
    order = shuffle.permutation(len(rows))
    return [rows[i] for i in order]


_WORKER: dict = {}


def _init_worker(prepared: list[PreparedStructure], cfg: SimulationConfig) -> None:
    _WORKER["prepared"], _WORKER["cfg"] = prepared, cfg


def _simulate_chunk(tasks: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Worker: (sample index, class, index within class) → volumes, z-scored float32."""
    prepared, cfg = _WORKER["prepared"], _WORKER["cfg"]
    return [
        simulate_junk(junk_kind(cfg, j), prepared, cfg, sample_rng(cfg.seed, i)) if c == JUNK
        else simulate_subtomogram(prepared[c], cfg, sample_rng(cfg.seed, i), neighbours=prepared)
        for i, c, j in tasks
    ]


def junk_kind(cfg: SimulationConfig, index: int) -> str:
    """The kind of the index-th junk subtomogram: cfg.junk_kinds in turn, so each is as common."""
    return cfg.junk_kinds[index % len(cfg.junk_kinds)]


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _default_progress(done: int, total: int, started: float) -> None:
    rate = done / max(time.perf_counter() - started, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    print(f"simulate: {done}/{total} subtomograms ({rate:.0f}/s, {eta:.0f} s left)",
          file=sys.stderr, flush=True)


def simulate_pool(
    structures,
    cfg: SimulationConfig,
    out_path: str | Path,
    workers: int = 2,
    *,
    overwrite: bool = False,
    progress: bool | Callable[[int, int, float], None] = True,
    chunk_size: int = 32,
) -> PoolInfo:
    """Simulate cfg.per_class subtomograms of every class (with cfg.class_imbalance, fewer train
    ones of all but the first) into a pool at `out_path`.

    `structures`: (names, densities) as load_structures returns, a source string for it, or None
    (= cfg.structures). Rows carry label, class names and a split ("train"/"val"/"test"),
    stratified per class; with cfg.junk_fraction, junk rows (label JUNK, id
    ``junk-<kind>-<index>``) too, split the same way. The same cfg gives byte-identical files
    for any `workers`.
    """
    names, densities = _as_structures(structures, cfg)
    prepared = [prepare_structure(d, cfg.box, name) for name, d in zip(names, densities)]
    plan = _plan(cfg, len(names))
    report = _default_progress if progress is True else (progress or None)
    description = "simulated subtomograms; " + json.dumps(
        {**dataclasses.asdict(cfg), "snr": "inf" if math.isinf(cfg.snr) else cfg.snr},
        sort_keys=True,
    )
    chunks = list(_chunks([(i, c, j) for i, c, j, _ in plan], chunk_size))
    started, last_report, done = time.perf_counter(), time.perf_counter(), 0

    with PoolWriter(out_path, cfg.box, dtype=cfg.dtype, class_names=names,
                    description=description, overwrite=overwrite) as writer:
        rows = iter(plan)

        def write(volumes):
            nonlocal done, last_report
            for volume in volumes:
                _, c, j, split = next(rows)
                if c == JUNK:
                    kind = junk_kind(cfg, j)
                    sid, source = f"junk-{kind}-{j:06d}", f"simulated:junk:{kind}"
                else:
                    sid, source = f"{names[c]}-{j:06d}", f"simulated:{names[c]}"
                writer.add(sid, volume, source=source, voxel_size_A=cfg.voxel_size_A, label=c,
                           split=split)
            done += len(volumes)
            if report and (time.perf_counter() - last_report > 5 or done == len(plan)):
                report(done, len(plan), started)
                last_report = time.perf_counter()

        if workers <= 1:
            _init_worker(prepared, cfg)
            try:
                for chunk in chunks:
                    write(_simulate_chunk(chunk))
            finally:
                _WORKER.clear()
        else:
            # spawn: safe whatever threads the parent holds (Ray, torch); a bounded window of
            # chunks in flight keeps memory flat for pools of any size.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(prepared, cfg)) as executor:
                pending = deque()
                for chunk in chunks:
                    pending.append(executor.submit(_simulate_chunk, chunk))
                    if len(pending) >= 3 * workers:
                        write(pending.popleft().result())
                while pending:
                    write(pending.popleft().result())
    return writer.close()


# ----------------------------------------------------------------------------- preview


def write_preview(
    structures, cfg: SimulationConfig, png_path: str | Path, *, max_classes: int = 60
) -> Path:
    """A PNG montage, one row per class: central XY / XZ / YZ slices at cfg.snr, then at SNR ∞.

    Each class is shown unrotated and unshifted at mid defocus, so rows compare like with like;
    the noisy and clean columns share the pose (XZ and YZ show the missing wedge's elongation).
    With cfg.junk_fraction, one more row per junk kind, posed at random as in the pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, densities = _as_structures(structures, cfg)
    names, densities = names[:max_classes], densities[:max_classes]
    fixed = dataclasses.replace(cfg, max_shift_fraction=0.0, crowding_neighbours=0)
    imaging = _tilt_series_reconstruction if cfg.reconstruction == "wbp" else _fourier_imaging
    n = cfg.box + 2 * cfg.pad
    columns = []
    for c, (name, density) in enumerate(zip(names, densities)):
        target = prepare_structure(density, cfg.box, name)
        posed = _pose(target, Rotation.identity(), np.full(3, (n - 1) / 2), n)
        defocus_A = float(np.mean(cfg.defocus_um)) * 1e4
        signal, noise = imaging(posed, fixed, defocus_A, sample_rng(cfg.seed, 2**40 + c))
        columns.append((_zscore(signal + noise), _zscore(signal)))
    if cfg.junk_fraction:
        prepared = [prepare_structure(d, cfg.box, name) for name, d in zip(names, densities)]
        for i, kind in enumerate(cfg.junk_kinds):
            parts = simulate_junk(kind, prepared, cfg, sample_rng(cfg.seed, 2**41 + i), True)
            clean = _zscore(parts.signal) if parts.signal.any() else parts.signal
            columns.append((parts.volume, clean))
            names = [*names, f"junk: {kind}"]
    c = cfg.box // 2
    snr_text = "∞" if math.isinf(cfg.snr) else f"{cfg.snr:g}"
    titles = [f"{plane} SNR {text}" for text in (snr_text, "∞") for plane in ("XY", "XZ", "YZ")]
    size = (6 * 1.3, len(names) * 1.3 + 0.4)
    fig, axes = plt.subplots(len(names), 6, figsize=size, squeeze=False)
    for r, (name, (noisy, clean)) in enumerate(zip(names, columns)):
        for k, vol in enumerate((noisy, clean)):
            slices = (vol[c], vol[:, c, :], vol[:, :, c])  # XY (z = c), XZ (y = c), YZ (x = c)
            for j, image in enumerate(slices):
                ax = axes[r, 3 * k + j]
                ax.imshow(image, cmap="gray", vmin=-3, vmax=3, origin="lower",
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(titles[3 * k + j], fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cryoal-simulate",
        description="Simulate labelled subtomograms into a pool (see docs/SIMULATOR.md).",
    )
    p.add_argument("--structures",
                   help="folder of .mrc/.map/.pdb/.cif files, one file, or builtin:N")
    p.add_argument("--out", help="pool directory to write")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="tune_configs/data_<preset>.yaml")
    source.add_argument("--config", help="a YAML file of SimulationConfig settings")
    p.add_argument("--snr", type=float, help="Var(signal)/Var(noise); inf = noise-free")
    p.add_argument("--per-class", type=int, help="subtomograms per class")
    p.add_argument("--box", type=int, help="output box edge in voxels")
    p.add_argument("--voxel-size", type=float, dest="voxel_size_A", help="Å per voxel")
    p.add_argument("--input-voxel-size", type=float, dest="input_voxel_size_A",
                   help="Å per voxel of maps whose header lacks it")
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other SimulationConfig setting, e.g. --set crowding_neighbours=2")
    p.add_argument("--preview", help="write a PNG montage of the classes here")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pool at --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {
            "structures": args.structures, "snr": args.snr, "per_class": args.per_class,
            "box": args.box, "voxel_size_A": args.voxel_size_A,
            "input_voxel_size_A": args.input_voxel_size_A, "seed": args.seed,
        }
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise SimulationError(f"--set expects KEY=VALUE, got {item!r}")
            overrides[key.strip()] = yaml.safe_load(value)
        if not args.out and not args.preview:
            raise SimulationError("nothing to do: give --out POOL_DIR and/or --preview PNG")
        settings = _settings(args.preset or args.config, overrides)
        cfg = SimulationConfig(**settings)
        structures = _as_structures(None, cfg)
        if "box" not in settings:  # nobody chose a box: grow the default one to fit, and say so
            box = fitting_box(structures[1], cfg.box)
            if box != cfg.box:
                print(f"cryoal-simulate: the largest structure needs a box of {box} "
                      f"(default {cfg.box}); using {box}. Pass --box to choose.", file=sys.stderr)
                cfg = dataclasses.replace(cfg, box=box)
        if args.preview:
            path = write_preview(structures, cfg, args.preview)
            print(f"preview: {path}", file=sys.stderr)
        if args.out:
            info = simulate_pool(structures, cfg, args.out, workers=args.workers,
                                 overwrite=args.overwrite)
            particles = cfg.particle_counts(info.num_classes)
            junk = cfg.split_sizes(cfg.junk_count(info.num_classes))
            counts = ", ".join(f"{particles[s] + junk[s]} {s}" for s in SPLITS)
            of_which = f", {sum(junk.values())} of them junk" if sum(junk.values()) else ""
            print(f"wrote {info.n_rows} subtomograms of {info.num_classes} classes ({counts}"
                  f"{of_which}) to {info.path}", file=sys.stderr)
    except ValueError as err:  # SimulationError, and the pool's and volume reader's errors
        print(f"cryoal-simulate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
