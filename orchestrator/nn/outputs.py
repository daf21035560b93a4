"""The scoring forward pass: what the strategies read about each volume, from T and M.

One function, ``forward_outputs``, used by the scoring actor (`actors/scorer.py`) and by
anything else that needs T's or M's view of volumes: probabilities and logits of both models,
T's embeddings, BADGE's gradient embeddings and MC-dropout probabilities. Pure and row-wise, so
Ray Data may batch the pool any way it likes. Plain PyTorch, no Ray.

Shape conventions: logits/probs ``[N, C]``, MC-dropout probs ``[N, C, K]``, embeddings ``[N, E]``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.nn.ema import unwrap
from orchestrator.nn.tensors import as_volumes, autocast, device_of, eval_mode

__all__ = ["OUTPUTS", "forward_outputs"]

_T_OUTPUTS = {"logits", "probs", "embeddings", "grad_embeddings", "mc_probs", "junk_prob"}
_M_OUTPUTS = {"mean_logits", "mean_probs"}
OUTPUTS = frozenset(_T_OUTPUTS | _M_OUTPUTS)
MEAN_OUTPUTS = frozenset(_M_OUTPUTS)  # what needs M's forward


def _row_generators(x: torch.Tensor, seed: int, row_keys) -> list[torch.Generator]:
    """One generator per row, seeded from (seed, the row's key or its bytes): batch-independent.
    ``x`` must be on the CPU when ``row_keys`` is None."""
    gens = []
    for i in range(len(x)):
        h = hashlib.blake2b(str(int(seed)).encode(), digest_size=8)
        if row_keys is None:
            h.update(x[i].numpy().tobytes())
        else:
            h.update(b"key:" + str(row_keys[i]).encode())
        gens.append(torch.Generator().manual_seed(int.from_bytes(h.digest(), "little") >> 1))
    return gens


def forward_outputs(
    model: nn.Module,
    mean_model: nn.Module | None,
    x,
    needs: Iterable[str],
    mc_passes: int = 0,
    *,
    seed: int = 0,
    row_keys=None,
    amp_dtype: torch.dtype | None = None,
    classes: int | None = None,
) -> dict[str, np.ndarray]:
    """What the scorers need for a batch of volumes, as float32 numpy; the one scoring forward.

    ``needs`` ⊆ OUTPUTS: "logits", "probs" [N, C] (T); "mean_logits", "mean_probs" [N, C] (M);
    "embeddings" [N, E] (T's penultimate features); "grad_embeddings" [N, C*E] (BADGE:
    (onehot(argmax p) − p) ⊗ embedding, class-major like ``fc.weight``, i.e. minus the gradient
    of CE at the predicted label w.r.t. ``fc.weight``); "mc_probs" [N, C, K], K = ``mc_passes``.

    Pure and row-wise: both models run in eval mode (BatchNorm on running statistics), so a
    row's outputs do not depend on the rest of its batch. MC dropout is applied where the
    model's only dropout is, before ``fc``: features are computed once and K dropout masks
    applied to them (K× cheaper than K full passes, same distribution). Each row's masks come
    from a generator seeded by (``seed``, ``row_keys[i]``) — pass stable ids such as pool ids —
    or, without keys, by the row's float32 bytes; so MC outputs are reproducible and
    independent of batching too. Models are left in the mode they came in.

    ``classes``: the real classes, when the models have a junk output after them
    (``train.junk_class``). Every output above is then over the real classes only (probs
    renormalised among them: what the model says a particle is), and "junk_prob" [N] is T's
    probability of junk over all outputs.
    """
    needs = set(needs)
    if unknown := needs - OUTPUTS:
        raise ValueError(f"unknown outputs {sorted(unknown)}; valid: {sorted(OUTPUTS)}")
    if needs & _M_OUTPUTS and mean_model is None:
        raise ValueError(f"{sorted(needs & _M_OUTPUTS)} need a mean model, got None")
    if "junk_prob" in needs and classes is None:
        raise ValueError("junk_prob needs classes: the real classes before the junk output")
    if "mc_probs" in needs and mc_passes < 1:
        raise ValueError(f"mc_probs needs mc_passes >= 1, got {mc_passes}")
    net = unwrap(model)
    device = device_of(net)
    x = as_volumes(x, device)
    out: dict[str, torch.Tensor] = {}

    with torch.inference_mode(), eval_mode(net, mean_model):
        if needs & _T_OUTPUTS:
            with autocast(device, amp_dtype):
                feats = net.features(x)
            feats = feats.float()  # the head runs in float32 whatever the autocast
            every = net.classify(feats)
            logits = every[:, :classes]
            probs = logits.softmax(dim=1)
            out.update(logits=logits, probs=probs, embeddings=feats)
            if "junk_prob" in needs:
                out["junk_prob"] = every.softmax(dim=1)[:, classes:].sum(dim=1)
            if "grad_embeddings" in needs:
                onehot = F.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)
                outer = (onehot - probs)[:, :, None] * feats[:, None, :]  # [N, C, E]
                out["grad_embeddings"] = outer.flatten(1)
            if "mc_probs" in needs:
                gens = _row_generators(x if row_keys is not None else x.cpu(), seed, row_keys)
                out["mc_probs"] = _mc_probs(net, feats, mc_passes, gens, classes)
        if needs & _M_OUTPUTS:
            with autocast(device, amp_dtype):
                mean_logits = unwrap(mean_model)(x)
            mean_logits = mean_logits[:, :classes].float()
            out.update(mean_logits=mean_logits, mean_probs=mean_logits.softmax(dim=1))
    return {k: out[k].cpu().numpy().astype(np.float32, copy=False) for k in needs}


def _mc_probs(
    net: nn.Module, feats: torch.Tensor, k: int, gens: list[torch.Generator], classes: int | None
) -> torch.Tensor:
    dropout = getattr(net, "dropout", None)
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    if p <= 0.0:
        raise ValueError("mc_probs needs a model built with dropout > 0 (all passes would agree)")
    u = torch.stack([torch.rand(k, feats.shape[1], generator=g) for g in gens])  # [N, K, E]
    keep = (u >= p).to(device=feats.device, dtype=feats.dtype) / (1.0 - p)
    logits = net.fc(feats[:, None, :] * keep)[:, :, :classes]  # [N, K, C]
    return logits.softmax(dim=2).permute(0, 2, 1).contiguous()  # [N, C, K]
