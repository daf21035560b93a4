"""The scoring actor: holds T and M on its device and maps pool batches to per-row scores.

Ray Data runs it as a callable class (`map_batches(PoolScorer, compute=ActorPoolStrategy(...))`)
or, through `score_batch`, in task workers that keep it between passes. It returns ids and
scores only, never volumes, so the scored pool never travels to the driver. It scores every row
it is given: the rows a pass skips are filtered in the read (`orchestrator/distributed/score.py`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from orchestrator import faults
from orchestrator.al.strategies import make_strategy
from orchestrator.data.pool import decode_volumes, open_pool
from orchestrator.nn.auxiliary import make_auxiliary
from orchestrator.nn.checkpoint import load_checkpoint, model_from_checkpoint
from orchestrator.nn.outputs import MEAN_OUTPUTS, OUTPUTS, forward_outputs

# Written for every row whatever the strategy, next to the prediction a person sees: the
# prediction's entropy (predictions.parquet carries it; a cycle's mean uncertainty reads it). Nothing else is computed unless the
# strategy needs it: M's forward alone doubles a pass's cost, and only EMA-KL's strategies read M.
REPORTED = {"entropy": {}}


class PoolScorer:
    def __init__(
        self,
        model_path: str,
        pool_path: str,
        strategy: str,
        strategy_options: dict,
        threads: int = 1,
        use_gpu: bool = False,
        seed: int = 0,
    ):
        self.threads = threads
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.info = open_pool(pool_path)
        saved = load_checkpoint(model_path, self.device)
        # channels-last weights: oneDNN's and cuDNN's 3D convolutions run faster with them
        self.strategy = make_strategy(strategy, **strategy_options)
        self.reported = {name: make_strategy(name, **opts) for name, opts in REPORTED.items()}
        # the prediction a person sees comes from the classifier training chose on validation
        self.prediction = "mean_probs" if saved.get("classifier") == "mean" else "probs"
        self.needs = set(self.strategy.needs) | {"probs", self.prediction}
        # a model with a junk output (train.junk_class) says how likely each row is junk: the
        # selection keeps those out of the queries
        self.junk = bool(saved.get("junk_class"))
        if self.junk:
            self.needs.add("junk_prob")
        self.model = model_from_checkpoint(saved, "model", self.device, channels_last=True)
        self.mean = (model_from_checkpoint(saved, "mean", self.device, channels_last=True)
                     if self.needs & MEAN_OUTPUTS else None)  # None: M is neither run nor loaded
        self.aux = load_auxiliary(self.strategy, saved, self.model, self.device)
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], dtype=np.int64)
        volumes = decode_volumes(batch["volume"], self.info)
        outputs = score_volumes(
            self.model, self.mean, volumes, rows, self.strategy, self.needs, self.seed, self.aux,
            classes=self.info.num_classes,
        )
        result = {"row": rows, "subtomo_id": np.asarray(batch["subtomo_id"])}
        result.update(summarise(outputs, self.reported, self.info.num_classes, self.prediction))
        if self.junk:
            result["junk_prob"] = outputs.get("junk_prob", np.zeros(0, np.float32))
        result.update(strategy_columns(self.strategy, outputs))
        faults.maybe_fault("score-batch")  # tests: a batch scored and lost with its process
        return result


# This process's scorer, kept between scoring passes: Ray reuses a task worker for later tasks
# of the same job, so from the second pass on a worker has torch imported and only loads the new
# cycle's weights. One entry: a new model replaces the old one.
_warm: dict[tuple, PoolScorer] = {}


def score_batch(batch: dict[str, np.ndarray], **scorer_kwargs) -> dict[str, np.ndarray]:
    """`PoolScorer(**scorer_kwargs)(batch)` with the scorer built once per process and kept for
    the batches and passes that follow, while the settings and the model file are the same (a
    cycle re-trained after a crash rewrites model.pt: its new weights are loaded)."""
    model = os.stat(scorer_kwargs["model_path"])
    key = (json.dumps(scorer_kwargs, sort_keys=True, default=str), model.st_mtime_ns, model.st_size)
    scorer = _warm.get(key)
    if scorer is None:
        _warm.clear()  # the previous cycle's models go before the next are loaded
        scorer = _warm[key] = PoolScorer(**scorer_kwargs)
    # Ray sets the thread count of a task's worker, and a reused one keeps another task's
    torch.set_num_threads(scorer.threads)
    return scorer(batch)


def score_volumes(
    model, mean, volumes: np.ndarray, rows, strategy, needs, seed: int, aux=None,
    classes: int | None = None,
) -> dict:
    """T's and M's outputs (``forward_outputs``, over the first ``classes`` outputs), plus the
    keys beyond those that the strategy's auxiliary provides (its ``outputs`` hook, with
    ``aux`` its loaded module)."""
    if len(volumes) == 0:
        return {}
    x = torch.from_numpy(volumes)
    outputs = forward_outputs(
        model, mean, x, set(needs) & OUTPUTS,
        mc_passes=getattr(strategy, "mc_passes", 0), seed=seed, row_keys=rows, classes=classes,
    )
    extra = set(needs) - OUTPUTS
    if extra:
        auxiliary = _auxiliary(strategy)
        produced = {} if auxiliary is None else auxiliary.outputs(
            aux, model, x, seed=seed, row_keys=rows
        )
        if missing := extra - set(produced):
            raise ValueError(f"{strategy.name} needs {sorted(missing)}: no auxiliary provides them")
        outputs.update({key: produced[key] for key in extra})
        if "noisy_logits" in extra and classes is not None:  # [N, C(+junk), K]: as T's logits
            outputs["noisy_logits"] = outputs["noisy_logits"][:, :classes]
    return outputs


def load_auxiliary(strategy, saved: dict, model, device) -> torch.nn.Module | None:
    """The strategy's auxiliary module with the weights training saved in model.pt, or None."""
    auxiliary = _auxiliary(strategy)
    if auxiliary is None:
        return None
    aux = auxiliary.build(model, saved["num_classes"])
    if aux is None:
        return None
    if "auxiliary" not in saved:
        raise ValueError(f"{strategy.name}: model.pt has no 'auxiliary' (trained without it?)")
    aux.load_state_dict(saved["auxiliary"])
    return aux.to(device).eval()


def summarise(outputs: dict, reported: dict, num_classes: int, prediction: str = "probs"
              ) -> dict[str, np.ndarray]:
    """Prediction, its probability, all probabilities (from ``prediction``: T's "probs" or M's
    "mean_probs"), and the reported scores, per row."""
    probs = outputs.get(prediction)
    if probs is None:  # an empty batch
        empty = np.zeros(0, np.float32)
        return {"pred": np.zeros(0, np.int64), "pred_prob": empty,
                "probs": np.zeros((0, num_classes), np.float32), **{name: empty for name in reported}}
    shown = {**outputs, "probs": probs}  # the reported scores describe the prediction shown
    return {
        "pred": probs.argmax(axis=1).astype(np.int64),
        "pred_prob": probs.max(axis=1).astype(np.float32),
        "probs": probs.astype(np.float32),
        **{name: s.score(shown).astype(np.float32) for name, s in reported.items()},
    }


def strategy_columns(strategy, outputs: dict) -> dict[str, np.ndarray]:
    """A row-wise strategy's score is computed here, next to the data; a set-based strategy
    (core-set, BADGE, …) gets the arrays it declared it needs, to select from afterwards."""
    if hasattr(strategy, "score"):
        n = len(outputs.get("probs", ()))
        return {"score": strategy.score(outputs).astype(np.float64) if n else np.zeros(0)}
    return {key: outputs[key] for key in strategy.needs if key in outputs}


def _auxiliary(strategy):
    """The hooks of the auxiliary the strategy declared for training (or None)."""
    return make_auxiliary(strategy.training.auxiliary, strategy.training.auxiliary_options)

