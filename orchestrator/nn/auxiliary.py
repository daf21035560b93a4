"""What a query strategy trains or computes besides T: plain PyTorch hooks, no Ray.

A strategy declares the auxiliary it needs by name in its training declaration
(``strategy.training.auxiliary`` and ``.auxiliary_options``, ``orchestrator/al/training.py``);
:func:`make_auxiliary` builds it from :data:`AUXILIARIES`, so the strategies stay numpy and
this module never imports them. Training and scoring never look at which strategy they run;
the same four hooks are called for every auxiliary:

- ``build(model, num_classes) -> nn.Module | None``: the auxiliary module (architecture from T's
  shape only, so the scorer rebuilds it and loads its weights from ``model.pt["auxiliary"]``);
- ``joint_loss(aux, model, x, y, logits, stages, progress) -> tensor | None``: added to T's loss
  in every training step (``learning.train_epoch(extra_loss=...)``) when ``joint`` is True, whose
  parameters then join T's optimiser (LL4AL); ``progress`` is the share of the cycle's epochs
  already done, in [0, 1);
- ``fit_after(aux, model, labelled_x, unlabelled_x, *, device, seed)``: once after T's training,
  on rank 0, with the kept T (VAAL's VAE + discriminator, HAL's discriminator, two-stream's
  autoencoder). ``unlabelled_x`` is the seeded sample of unlabelled volumes the campaign drew
  for it (``Training.unlabelled_sample`` of them);
- ``outputs(aux, model, x, *, seed, row_keys) -> {key: [N, ...] float32}``: the extra per-row
  keys of the scoring pass (``provides`` ⊆ ``strategies.OUTPUT_KEYS``), which the strategy's
  ``utility``/``select`` then reads. Pure and row-wise like ``learning.forward_outputs``: eval
  mode, and any noise is seeded independently of the batch.

Defaults are CPU-sized (small nets, few epochs); the options are the strategies' options.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.nn.ema import unwrap
from orchestrator.nn.tensors import as_volumes, device_of, eval_mode

__all__ = [
    "AUXILIARIES",
    "make_auxiliary",
    "Auxiliary",
    "LearningLoss",
    "NoisePerturbation",
    "VAAL",
    "FeatureDiscriminator",
    "Autoencoder",
    "margin_ranking_loss",
    "stage_channels",
]

# Volumes per step when an auxiliary model is fitted or scored.
BATCH = 32


class Auxiliary:
    """Every hook a no-op: a subclass overrides what its strategy needs."""

    provides: frozenset[str] = frozenset()  # keys outputs() adds to the scoring pass
    joint: bool = False  # joint_loss trains build()'s module along with T

    def build(self, model: nn.Module, num_classes: int) -> nn.Module | None:
        return None

    def joint_loss(self, aux, model, x, y, logits, stages, progress: float = 0.0
                   ) -> torch.Tensor | None:
        return None

    def fit_after(self, aux, model, labelled_x, unlabelled_x, *, device, seed: int) -> None:
        return None

    def outputs(self, aux, model, x, *, seed: int = 0, row_keys=None) -> dict[str, np.ndarray]:
        return {}


def stage_channels(model: nn.Module) -> list[int]:
    """Channels of each of T's stage outputs (the last BatchNorm of each stage)."""
    net = unwrap(model)
    return [
        [m for m in stage.modules() if isinstance(m, nn.BatchNorm3d)][-1].num_features
        for stage in net.stages
    ]


def _seed(*parts) -> int:
    h = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float32, copy=False)


def _in_batches(x: torch.Tensor, fn, batch: int = BATCH) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def _rows_end_to_end(first, second, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``first`` and ``second`` placed end to end, in ``index``'s order, read
    from each (tensors or cycle volumes) without joining them: only the batch is copied."""
    in_first = index < len(first)
    parts = torch.cat([torch.as_tensor(first[index[in_first]]),
                       torch.as_tensor(second[index[~in_first] - len(first)])])
    placed = torch.cat([torch.nonzero(in_first).flatten(), torch.nonzero(~in_first).flatten()])
    rows = torch.empty_like(parts)
    rows[placed] = parts
    return rows


# --- LL4AL ------------------------------------------------------------------------------------


class LossPredictor(nn.Module):
    """Yoo & Kweon's loss-prediction module: per stage GAP → Linear → ReLU, concat → Linear."""

    def __init__(self, channels: list[int], hidden: int = 128):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(c, hidden) for c in channels)
        self.out = nn.Linear(hidden * len(channels), 1)

    def forward(self, stages: list[torch.Tensor]) -> torch.Tensor:
        h = [
            F.relu(head(torch.flatten(F.adaptive_avg_pool3d(s.float(), 1), 1)))
            for head, s in zip(self.heads, stages)
        ]
        return self.out(torch.cat(h, dim=1)).squeeze(1)


def margin_ranking_loss(pred: torch.Tensor, target: torch.Tensor, margin: float = 1.0):
    """LL4AL's pairwise loss: the first half of the batch against the second half reversed;
    a pair costs max(0, margin − sign(l_i − l_j)(p_i − p_j)). None for fewer than 2 rows."""
    n = len(pred) // 2 * 2
    if n < 2:
        return None
    half = n // 2
    p_i, p_j = pred[:half], pred[half:n].flip(0)
    l_i, l_j = target[:half], target[half:n].flip(0)
    sign = 2.0 * (l_i > l_j).to(pred.dtype) - 1.0
    return torch.clamp(margin - sign * (p_i - p_j), min=0.0).mean()


class LearningLoss(Auxiliary):
    """Learning loss (LL4AL): a module predicting T's per-sample loss from T's stage outputs,
    trained in every step of T's training with the margin ranking loss (weight ``weight``).

    As Yoo & Kweon train it: the loss module's gradient reaches T's features (so T learns
    features that make its loss predictable) until ``detach_after`` of the cycle's epochs (their
    120 of 200 epochs: 0.6), then T's features are detached on their way in, so the module keeps
    learning without disturbing T's last epochs. ``detach_after=0`` makes it a probe of T's
    features that never changes how T trains.
    """

    provides = frozenset({"predicted_loss"})
    joint = True

    def __init__(self, weight: float = 1.0, margin: float = 1.0, hidden: int = 128,
                 detach_after: float = 0.6):
        if not 0.0 <= detach_after <= 1.0:
            raise ValueError(f"detach_after must be in [0, 1], got {detach_after}")
        self.weight, self.margin, self.hidden = float(weight), float(margin), int(hidden)
        self.detach_after = float(detach_after)

    def build(self, model, num_classes):
        return LossPredictor(stage_channels(model), self.hidden)

    def joint_loss(self, aux, model, x, y, logits, stages, progress=0.0):
        target = F.cross_entropy(logits.float(), y, reduction="none").detach()
        if progress >= self.detach_after:
            stages = [s.detach() for s in stages]
        pred = aux(stages)
        loss = margin_ranking_loss(pred, target, self.margin)
        if loss is None:  # one row: no pair, but every parameter stays in the graph (DDP)
            loss = 0.0 * pred.sum()
        return self.weight * loss

    def outputs(self, aux, model, x, *, seed=0, row_keys=None):
        net = unwrap(model)
        x = as_volumes(x, device_of(net))
        with torch.inference_mode(), eval_mode(net, aux):
            return {"predicted_loss": _numpy(aux(net.stage_outputs(x)))}


# --- noise stability --------------------------------------------------------------------------


class NoisePerturbation(Auxiliary):
    """Noise stability (Li et al.): T's logits under ``passes`` Gaussian weight perturbations,
    "noisy_logits" [N, C, K]. Each parameter tensor W gets noise n·scale·‖W‖/‖n‖.

    T is perturbed in place (no second copy of the weights: 1× their size in saved originals)
    and restored by copying the saved originals back in a ``finally``: bit-identical after.
    Pass k's noise comes from a generator seeded by (seed, k) only, so every batch and every
    scoring actor sees the same K perturbed models: a row's output does not depend on its batch.
    The noise is drawn on the CPU each batch (K× T's parameter count of draws, cheap next to K
    forwards) rather than held for the whole pass (K× T's memory).
    """

    provides = frozenset({"noisy_logits"})

    def __init__(self, passes: int = 10, scale: float = 0.001):
        if int(passes) < 1 or not scale > 0:
            raise ValueError(f"noise stability needs passes >= 1 and scale > 0, got {passes}, {scale}")
        self.passes, self.scale = int(passes), float(scale)

    def outputs(self, aux, model, x, *, seed=0, row_keys=None):
        net = unwrap(model)
        x = as_volumes(x, device_of(net))
        params = list(net.parameters())
        originals = [p.detach().clone() for p in params]
        norms = [float(p.norm()) for p in originals]
        logits = []
        try:
            with torch.no_grad(), eval_mode(net):
                for k in range(self.passes):
                    generator = torch.Generator().manual_seed(_seed(seed, k))
                    for p, original, norm in zip(params, originals, norms):
                        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
                        size = float(noise.norm())
                        noise *= (self.scale * norm / size) if size > 0 else 0.0
                        p.copy_(original + noise.to(device=p.device, dtype=p.dtype))
                    logits.append(net(x).float())
        finally:
            with torch.no_grad():
                for p, original in zip(params, originals):
                    p.copy_(original)
        return {"noisy_logits": _numpy(torch.stack(logits, dim=2))}


# --- volume autoencoders: VAAL and two-stream -------------------------------------------------


class ConvAutoencoder(nn.Module):
    """A small 3D conv (V)AE for volumes of any size (pooled to 2³ inside; the decoder's output
    is interpolated back to the input's size). ``encode`` → (mu, logvar or None)."""

    def __init__(self, latent: int = 16, channels: int = 8, variational: bool = False):
        super().__init__()
        c = channels
        self.variational = variational
        self.encoder = nn.Sequential(
            nn.Conv3d(1, c, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(2), nn.Flatten(),
            nn.Linear(2 * c * 8, latent * (2 if variational else 1)),
        )
        self.expand = nn.Linear(latent, 2 * c * 64)
        self.decoder = nn.Sequential(
            nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),
            nn.Conv3d(2 * c, c, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv3d(c, 1, 3, padding=1),
        )
        self.channels = c

    def encode(self, x):
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z, size):
        h = self.expand(z).view(len(z), 2 * self.channels, 4, 4, 4)
        return F.interpolate(self.decoder(h), size=size, mode="trilinear", align_corners=False)


class VAALModule(nn.Module):
    def __init__(self, latent: int, channels: int):
        super().__init__()
        self.vae = ConvAutoencoder(latent, channels, variational=True)
        self.discriminator = nn.Sequential(
            nn.Linear(latent, 64), nn.ReLU(inplace=True), nn.Linear(64, 1)
        )

    def labelledness_logit(self, x):
        return self.discriminator(self.vae.encode(x)[0]).squeeze(1)


def _pairs(n_l: int, n_u: int, batch: int, generator: torch.Generator):
    """Epoch of (labelled index, unlabelled index) batches: one pass over the unlabelled
    sample, the labelled set cycled alongside (it is usually the smaller)."""
    u = torch.randperm(n_u, generator=generator)
    l_order = torch.randperm(n_l, generator=generator)
    for i, start in enumerate(range(0, n_u, batch)):
        ub = u[start : start + batch]
        lb = l_order[(torch.arange(len(ub)) + i * batch) % n_l]
        yield lb, ub


def _reconstruction(model: ConvAutoencoder, x, generator=None):
    mu, logvar = model.encode(x)
    z = mu
    kl = torch.zeros((), device=x.device)
    if logvar is not None:
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        z = mu + eps * (0.5 * logvar).exp()
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
    return F.mse_loss(model.decode(z, x.shape[2:]), x), kl, mu


class VAAL(Auxiliary):
    """VAAL (Sinha et al.): a VAE on volumes and a discriminator on its latent means, fitted
    each cycle on labelled vs unlabelled volumes (the VAE also tries to make every latent look
    labelled). "labelledness" = the discriminator's probability that a volume is labelled."""

    provides = frozenset({"labelledness"})

    def __init__(self, epochs: int = 5, latent: int = 16, channels: int = 8,
                 lr: float = 5e-4, beta: float = 1.0, adversary: float = 1.0):
        self.epochs, self.latent, self.channels = int(epochs), int(latent), int(channels)
        self.lr = float(lr)
        self.beta, self.adversary = float(beta), float(adversary)

    def build(self, model, num_classes):
        return VAALModule(self.latent, self.channels)

    def fit_after(self, aux, model, labelled_x, unlabelled_x, *, device, seed):
        if len(labelled_x) == 0 or len(unlabelled_x) == 0:
            return
        aux.to(device).train()
        generator = torch.Generator().manual_seed(_seed(seed, 11))
        vae_opt = torch.optim.Adam(aux.vae.parameters(), lr=self.lr)
        d_opt = torch.optim.Adam(aux.discriminator.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            for lb, ub in _pairs(len(labelled_x), len(unlabelled_x), BATCH, generator):
                xl, xu = as_volumes(labelled_x[lb], device), as_volumes(unlabelled_x[ub], device)
                rec_l, kl_l, mu_l = _reconstruction(aux.vae, xl, generator)
                rec_u, kl_u, mu_u = _reconstruction(aux.vae, xu, generator)
                d_all = aux.discriminator(torch.cat([mu_l, mu_u])).squeeze(1)
                fool = F.binary_cross_entropy_with_logits(d_all, torch.ones_like(d_all))
                loss = rec_l + rec_u + self.beta * (kl_l + kl_u) + self.adversary * fool
                vae_opt.zero_grad(set_to_none=True)
                loss.backward()
                vae_opt.step()
                d_l = aux.discriminator(mu_l.detach()).squeeze(1)
                d_u = aux.discriminator(mu_u.detach()).squeeze(1)
                d_loss = F.binary_cross_entropy_with_logits(d_l, torch.ones_like(d_l)) + \
                    F.binary_cross_entropy_with_logits(d_u, torch.zeros_like(d_u))
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
        aux.eval()

    def outputs(self, aux, model, x, *, seed=0, row_keys=None):
        x = as_volumes(x, device_of(aux))
        with torch.inference_mode(), eval_mode(aux):
            return {"labelledness": _numpy(aux.labelledness_logit(x).sigmoid())}


# --- HAL: a discriminator on T's intermediate features ----------------------------------------


class _StageDiscriminator(nn.Module):
    def __init__(self, in_channels: int, channels: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(channels, 1),
        )

    def forward(self, h):
        return self.net(h.float()).squeeze(1)


class FeatureDiscriminator(Auxiliary):
    """HAL's discriminator: a small 3D CNN on T's stage-``stage`` output (default: the one
    before last) telling labelled from unlabelled volumes, fitted after T with T frozen
    (balanced batches, BCE). "labelledness" = its probability that a volume is labelled."""

    provides = frozenset({"labelledness"})

    def __init__(self, epochs: int = 5, stage: int = -2, channels: int = 16,
                 lr: float = 1e-3):
        self.epochs, self.stage, self.channels = int(epochs), int(stage), int(channels)
        self.lr = float(lr)

    def _index(self, model) -> int:
        n = len(unwrap(model).stages)
        return min(max(self.stage + n if self.stage < 0 else self.stage, 0), n - 1)

    def build(self, model, num_classes):
        return _StageDiscriminator(stage_channels(model)[self._index(model)], self.channels)

    def _features(self, model, x, device):
        net, i = unwrap(model), self._index(model)
        with torch.inference_mode(), eval_mode(net):
            return _in_batches(x, lambda b: net.stage_outputs(as_volumes(b, device))[i].float())

    def fit_after(self, aux, model, labelled_x, unlabelled_x, *, device, seed):
        if len(labelled_x) == 0 or len(unlabelled_x) == 0:
            return
        h_l = self._features(model, labelled_x, device).clone()  # out of inference mode
        h_u = self._features(model, unlabelled_x, device).clone()
        aux.to(device).train()
        generator = torch.Generator().manual_seed(_seed(seed, 13))
        optimizer = torch.optim.Adam(aux.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            for lb, ub in _pairs(len(h_l), len(h_u), BATCH, generator):
                d_l, d_u = aux(h_l[lb.to(device)]), aux(h_u[ub.to(device)])
                loss = F.binary_cross_entropy_with_logits(d_l, torch.ones_like(d_l)) + \
                    F.binary_cross_entropy_with_logits(d_u, torch.zeros_like(d_u))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        aux.eval()

    def outputs(self, aux, model, x, *, seed=0, row_keys=None):
        h = self._features(model, x, device_of(unwrap(model)))
        with torch.inference_mode(), eval_mode(aux):
            return {"labelledness": _numpy(aux(h).sigmoid())}


# --- two-stream: an autoencoder on every volume -----------------------------------------------


class Autoencoder(Auxiliary):
    """The unsupervised stream of two-stream selection: a small 3D conv autoencoder fitted
    after T on the labelled volumes and a seeded sample of unlabelled ones (reconstruction
    MSE); "ae_embeddings" [N, latent] = its code."""

    provides = frozenset({"ae_embeddings"})

    def __init__(self, epochs: int = 5, latent: int = 16, channels: int = 8,
                 lr: float = 1e-3):
        self.epochs, self.latent, self.channels = int(epochs), int(latent), int(channels)
        self.lr = float(lr)

    def build(self, model, num_classes):
        return ConvAutoencoder(self.latent, self.channels, variational=False)

    def fit_after(self, aux, model, labelled_x, unlabelled_x, *, device, seed):
        n = len(labelled_x) + len(unlabelled_x)
        if n == 0:
            return
        aux.to(device).train()
        generator = torch.Generator().manual_seed(_seed(seed, 17))
        optimizer = torch.optim.Adam(aux.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, BATCH):
                picked = _rows_end_to_end(labelled_x, unlabelled_x, order[start : start + BATCH])
                batch = as_volumes(picked, device)
                loss = _reconstruction(aux, batch)[0]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        aux.eval()

    def outputs(self, aux, model, x, *, seed=0, row_keys=None):
        x = as_volumes(x, device_of(aux))
        with torch.inference_mode(), eval_mode(aux):
            return {"ae_embeddings": _numpy(aux.encode(x)[0])}


# --- registry ---------------------------------------------------------------------------------

AUXILIARIES: dict[str, type[Auxiliary]] = {
    "learning_loss": LearningLoss,
    "noise_perturbation": NoisePerturbation,
    "vaal": VAAL,
    "feature_discriminator": FeatureDiscriminator,
    "autoencoder": Autoencoder,
}


def make_auxiliary(name: str | None, options=None) -> Auxiliary | None:
    """The auxiliary a strategy declared (``Training.auxiliary``, ``.auxiliary_options``), or
    None when it declared none."""
    if name is None:
        return None
    if name not in AUXILIARIES:
        raise ValueError(f"unknown auxiliary {name!r}; valid: {sorted(AUXILIARIES)}")
    return AUXILIARIES[name](**dict(options or {}))
