"""Connecting to Ray: the one place that calls ``ray.init`` for the commands.

`connect()` joins the cluster of `ray job submit` (RAY_ADDRESS) or ``address``; otherwise it
starts a local Ray for the duration of the block, whose workers get the project on their
PYTHONPATH (``orchestrator.config.PROJECT_ROOT``: a local Ray's workers start in another
directory) and Ray Train's faster defaults (:data:`RAY_ENV_DEFAULTS`, also set in this process
for Ray Train's in-process mode). A cluster's workers have the project from its image or
``--working-dir``, so nothing is passed to them. The campaign, the sweep and the tests' local
Ray all come through here.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from orchestrator.config import PROJECT_ROOT

__all__ = ["RAY_ENV_DEFAULTS", "set_env_defaults", "pythonpath", "local_runtime_env", "local_system_config",
           "connect"]

# Ray Train's defaults poll slowly and watch for preemption; on one machine both only add
# seconds to every cycle's start and stop. Ray Data reads a Parquet pool's footers in 32 actors
# of their own, a process each, whatever the cluster; a pool has a few hundred shards at most
# (254 of 256 MB for 10⁶ subtomograms of 32³), which one reader's 128 IO threads read at once.
# Read in the driver's environment when a pass is planned. Measured on 2 cores, a pass over a
# 79-shard pool: 13.0 → 5.1 s, peak memory of all processes halved (docs/BENCHMARKS.md).
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}


def set_env_defaults() -> None:
    """RAY_ENV_DEFAULTS in this process's environment, where not set already."""
    for key, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def pythonpath() -> str:
    """The project first, then this process's PYTHONPATH."""
    existing = os.environ.get("PYTHONPATH")
    return f"{PROJECT_ROOT}{os.pathsep}{existing}" if existing else str(PROJECT_ROOT)


# A local Ray kills idle worker processes once it runs more than one a CPU, and a cycle's Ray
# Train workers push it over: the scoring workers kept warm between passes
# (`score.warm_below_rows`) would be killed during every training. Keeping this many idle ones
# beyond that keeps them (measured: one after a pass of 9,000 rows, 0.47 GB PSS with torch
# and its models).
IDLE_WORKERS_KEPT = 8


def local_system_config(num_cpus: float | None) -> dict:
    """Ray's settings for a local cluster started here: the idle-worker limit above."""
    cpus = int(num_cpus) if num_cpus else (os.cpu_count() or 1)
    return {"num_workers_soft_limit": cpus + IDLE_WORKERS_KEPT}


def local_runtime_env() -> dict:
    """What every worker of a local Ray gets: the project importable, Ray Train's defaults."""
    return {"env_vars": {**RAY_ENV_DEFAULTS, "PYTHONPATH": pythonpath()}}


@contextmanager
def connect(address: str | None = None, *, output=None, log_level: str | None = None,
            **init_kwargs) -> Iterator[bool]:
    """Ray for the block: yields whether it is a local Ray started here; shut down after.

    ``output`` (a `raylogs.RayOutput`, already entered) sends Ray's own output to the run's
    logs; else ``log_level`` sets the driver's Ray log level. ``address="local"`` always starts
    a new local Ray; other ``init_kwargs`` go to ``ray.init`` (the tests: ``num_cpus``).
    """
    import ray

    set_env_defaults()
    local = address == "local" or not (address or os.environ.get("RAY_ADDRESS"))
    kwargs = output.init_kwargs() if output is not None else {}
    if output is None and log_level:
        kwargs["logging_config"] = ray.LoggingConfig(log_level=log_level)
    if local:
        kwargs.update(runtime_env=local_runtime_env(),
                      _system_config=local_system_config(init_kwargs.get("num_cpus")))
    ray.init(address=address, **kwargs, **init_kwargs)
    try:
        if output is not None:
            output.started(local)
        yield local
    finally:
        ray.shutdown()
