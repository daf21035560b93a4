"""Campaign configuration: frozen dataclasses, loaded from YAML with `key=value` overrides.

Every field says why it exists. Unknown keys are an error (a typo must not silently fall back
to a default). The defaults are the CPU-sized embedded run; `tune_configs/paper.yaml` holds the
paper's full-size settings for GPU clusters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The project's checkout: tune_configs/ lives here, and Ray workers of a local cluster get it on
# their PYTHONPATH (orchestrator/distributed/connect.py). The one place that knows where it is.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "tune_configs"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    pool: str | None = None  # an ingested or simulated pool; None = simulate one into the run dir
    simulate: str = "data_default"  # simulator preset (tune_configs/data_*.yaml) when pool is None
    simulate_overrides: dict = field(default_factory=dict)  # e.g. {snr: 0.03, per_class: 40}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet10"  # the paper uses resnet18; resnet10 keeps the CPU demo within minutes
    width: int = 16  # channels of the first stage (64 in the paper's ResNet-18)
    stem: str = "full"  # 7³ stride-2 conv + max-pool; "small" keeps full resolution (~20× the cost)
    dropout: float = 0.0  # before the classifier; >0 is needed by MC-dropout strategies


@dataclass(frozen=True)
class TrainConfig:
    # The CPU default recipe (docs/BENCHMARKS.md, "The training recipe"): AdamW with a one-cycle
    # schedule, wedge-preserving augmentation, class-balanced batches, model selection on the
    # validation split. tune_configs/paper.yaml keeps the paper's SGD with step decay.
    epochs: int = 30  # per cycle (paper: 100 on simulated data)
    min_steps: int = 300  # ... but at least this many optimiser steps: a 5% labelled set
    #                       gets more epochs, or it would stop after a few dozen steps
    batch_size: int = 32
    optimizer: str = "adamw"  # sgd | adamw
    schedule: str = "onecycle"  # step (×0.1 at decay_at) | onecycle | cosine | constant
    lr: float = 0.003  # peak lr (the paper's SGD: 0.1)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.05  # decoupled for AdamW (conv/linear weights only); SGD: 5e-4
    decay_at: float = 0.8  # "step" schedule: lr ×0.1 at this fraction of the epochs (paper: 80/100)
    augment: bool = True  # flips, 180° rotations, shifts, intensity: all keep the missing wedge
    augment_shift: int = 2  # voxels, per axis
    augment_intensity: float = 0.1  # std of the intensity scale and offset
    balanced: bool = True  # class-balanced batches when the labelled classes are unequal
    classifier: str = "best"  # what a cycle reports and predicts with: task (T), mean (M), or
    #                           best = whichever scores higher on the validation split
    evaluations: int = 5  # validation checks per cycle, spread over its second half
    calibration_samples: int = 256  # labelled volumes that set BatchNorm statistics for eval
    lam: float = 0.03  # λ, weight of the T–M consistency term
    regulariser: str = "mse_logits"  # D_reg ∈ {mse_logits, kl}
    trainer: str = "per_strategy"  # per_strategy: λ only for strategies that use M (EMA-KL),
    #                                the rest plain cross-entropy; shared: λ for every strategy
    ema_alpha: float = 0.99  # θ_M ← α·θ_M + (1−α)·θ_T per step; the paper's 0.999 suits its
    #                          100-epoch cycles, a few hundred CPU steps barely move M at 0.999
    semi_supervised: bool = False  # also apply the consistency term on unlabelled batches
    lam_unlabelled: float = 1.0  # weight of the unlabelled consistency term (after ramp-up)
    rampup: float = 0.3  # share of the cycle's steps over which that weight ramps up from 0
    unlabelled_max: int = 20000  # unlabelled volumes a semi-supervised cycle draws from
    reset_mean_model: bool = False  # re-initialise M each cycle instead of carrying it over
    channels_last: bool = True  # 3D channels-last weights: 1.2-1.5x faster on CPUs here
    num_workers: int = 2  # Ray Train workers (DDP); 0 = in the calling process (not in
    #                       a Tune trial: Ray refuses ray.train calls there)
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    amp: str = "none"  # mixed precision on GPU: none | bf16 | fp16
    max_failures: int = 2  # a failed worker group restarts from the last epoch checkpoint
    junk_class: bool = False  # learn "not a particle" from the junk answers as one more output,
    #                           whose probability keeps predicted junk out of the queries
    #                           (strategy.junk_threshold); accuracy stays over the real classes

    def __post_init__(self):
        choices = {"optimizer": ("sgd", "adamw"),
                   "schedule": ("step", "onecycle", "cosine", "constant"),
                   "classifier": ("task", "mean", "best"), "trainer": ("per_strategy", "shared"),
                   "regulariser": ("mse_logits", "kl"), "amp": ("none", "bf16", "fp16")}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"train.{name}: {getattr(self, name)!r} is not one of {list(valid)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("evaluations", 1),
                          ("calibration_samples", 1), ("min_steps", 0), ("augment_shift", 0),
                          ("unlabelled_max", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"train.{name}: must be at least {low}, got {getattr(self, name)}")
        if not 0.0 <= self.ema_alpha <= 1.0 or not 0.0 <= self.rampup <= 1.0:
            raise ConfigError(f"train.ema_alpha and train.rampup must be in [0, 1], got "
                              f"{self.ema_alpha} and {self.rampup}")


@dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 64  # subtomograms per scoring batch
    actors: int = 2  # scoring workers running at once (Ray Data); 0 = in the calling process
    cpus_per_actor: float = 0.5  # leave headroom: actors taking every CPU deadlock read_parquet
    gpus_per_actor: float = 0.0  # fractional GPUs are fine for scoring
    # A pass of fewer rows scores in Ray task workers that keep their scorer between passes (a
    # process that has scored imports nothing and loads only the new weights next cycle: ~7 s
    # less a pass here); a larger one in a Ray Data actor pool started for the pass, whose
    # steady state is ~1.5x faster here (docs/BENCHMARKS.md, "Labels in -> next queries").
    # 0: always the actor pool. CPU scoring only: Ray does not reuse GPU task workers.
    warm_below_rows: int = 4000
    # Object-store memory Ray Data may fill with blocks in flight during a pass; without a cap
    # it buffers up to a share of the whole object store (GBs), and a longer pass fills more.
    buffer_mb: int = 256
    # Rows of a score file, at most: the driver reads a pass back file by file (selection, the
    # agreement κ), ~1.3 ms a file, and a file per batch made 1,170 of them at 300,000 rows.
    # A smaller pass writes smaller files, ~50 of them (its progress counts finished files).
    rows_per_file: int = 8192

    def __post_init__(self):
        # checked here, not when the first scoring pass starts after minutes of training
        for name, low in (("batch_size", 1), ("actors", 0), ("buffer_mb", 1), ("warm_below_rows", 0),
                          ("rows_per_file", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"score.{name}: must be at least {low}, got {getattr(self, name)}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ConfigError("score.cpus_per_actor must be > 0 and score.gpus_per_actor >= 0, "
                              f"got {self.cpus_per_actor} and {self.gpus_per_actor}")


@dataclass(frozen=True)
class BudgetConfig:
    initial: float = 0.1  # random labels before the first cycle, fraction of the train split
    step: float = 0.1  # labels added per cycle, fraction of the train split (paper: 0.05)
    final: float = 0.5  # stop when this fraction is labelled (paper: 0.4)
    counts: tuple[int, ...] = ()  # absolute cumulative counts per cycle; overrides the fractions
    # Stabilising predictions (Bloodgood & Vijay-Shanker 2009): end before the budget is spent
    # once consecutive models agree on the unlabelled pool (orchestrator/al/stopping.py).
    stop_when_stable: bool = False  # off: the whole budget schedule runs, as before
    stable_kappa: float = 0.99  # Cohen's κ between cycle c−1's and c's predictions that counts as stable
    stable_cycles: int = 3  # ... in this many consecutive cycles (one unstable cycle starts over)

    def __post_init__(self):
        if not -1.0 <= self.stable_kappa <= 1.0 or self.stable_cycles < 1:
            raise ConfigError(f"budget: stable_kappa must be in [-1, 1] and stable_cycles at least 1, "
                              f"got {self.stable_kappa} and {self.stable_cycles}")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "albl"  # never measurably below random; above it on long-tailed pools (default.yaml)
    options: dict = field(default_factory=dict)  # e.g. {distance: js, order: lowest}
    # cycle 0: a seeded random draw, or typiclust (typical members of clusters of a label-free
    # embedding of the volumes: TypiClust's cold start for tiny budgets, al/cold_start.py)
    initial: str = "random"
    # {embedding: density | radial} and typiclust's own, e.g. {max_clusters: 200}
    initial_options: dict = field(default_factory=dict)
    # with train.junk_class: a candidate the model calls junk with at least this probability is
    # not queried (while k others remain); 1.0 queries them as any other
    junk_threshold: float = 0.5

    def __post_init__(self):
        if self.initial not in ("random", "typiclust"):
            raise ConfigError(f"strategy.initial: {self.initial!r} is not one of ['random', 'typiclust']")
        embedding = self.initial_options.get("embedding", "density")
        if embedding not in ("density", "radial"):  # al/cold_start.py's EMBEDDINGS
            raise ConfigError(f"strategy.initial_options.embedding: {embedding!r} is not one of "
                              "['density', 'radial']")
        if not 0.0 < self.junk_threshold <= 1.0:
            raise ConfigError(f"strategy.junk_threshold: must be in (0, 1], got {self.junk_threshold}")


@dataclass(frozen=True)
class CampaignConfig:
    name: str = "demo"
    seed: int = 0  # one seed drives the initial labels, every model init and every selection
    run_root: str = "runs"  # run directories are created under this
    oracle: str = "simulated"  # simulated (pool ground truth) | file (a person, via files)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value, default, where: str):
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if isinstance(default, tuple):
        return tuple(int(v) for v in value)
    if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=3` → (["train", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"config {name_or_path!r}: no such file (nor {candidate})")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> CampaignConfig:
    values: dict = {}
    if path is not None:
        config_path = resolve_config_path(path)
        values = yaml.safe_load(config_path.read_text()) or {}
        where = str(config_path)
    else:
        where = "config"
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return _build(CampaignConfig, values, where)


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: CampaignConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
