"""The GPU path's settings, checked without a GPU: what a cycle's worker group and the scoring
actors ask Ray for."""

from __future__ import annotations

import pytest

from orchestrator.config import ScoreConfig, TrainConfig, config_to_dict
from orchestrator.distributed.score import actor_resources
from orchestrator.distributed.train import distributed_setup


def test_a_gpu_training_config_asks_for_one_gpu_per_worker_joined_by_nccl():
    scaling, backend = distributed_setup(config_to_dict(TrainConfig(num_workers=4, use_gpu=True, amp="bf16")))
    assert scaling.use_gpu and scaling.num_workers == 4
    assert (scaling.num_cpus_per_worker, scaling.num_gpus_per_worker) == (1.0, 1)
    assert backend.backend == "nccl"


def test_a_cpu_training_config_asks_for_no_gpu_and_uses_gloo():
    scaling, backend = distributed_setup(config_to_dict(TrainConfig(num_workers=2)))
    assert not scaling.use_gpu
    assert backend.backend == "gloo"


def test_an_unknown_mixed_precision_is_refused_when_the_config_loads():
    with pytest.raises(ValueError, match="train.amp: 'fp8' is not one of"):
        TrainConfig(amp="fp8")


def test_an_unknown_mixed_precision_in_a_job_is_refused_before_any_worker_starts():
    settings = {**config_to_dict(TrainConfig()), "amp": "fp8"}
    with pytest.raises(ValueError, match="train.amp='fp8'"):
        distributed_setup(settings)


def test_scoring_actors_may_share_a_gpu_through_a_fraction():
    assert actor_resources(ScoreConfig(cpus_per_actor=1, gpus_per_actor=0.25)) == {
        "num_cpus": 1, "num_gpus": 0.25}


def test_cpu_scoring_actors_reserve_no_gpu():
    assert actor_resources(ScoreConfig(cpus_per_actor=0.5)) == {"num_cpus": 0.5}
