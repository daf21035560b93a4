"""connect(): the one ray.init. What a local Ray's workers get, without starting Ray."""

from __future__ import annotations

import os

from orchestrator.config import PROJECT_ROOT
from orchestrator.distributed import connect as c


def test_a_local_rays_workers_get_the_project_and_ray_trains_defaults(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = c.local_runtime_env()["env_vars"]
    assert env["PYTHONPATH"] == f"{PROJECT_ROOT}{os.pathsep}/elsewhere"
    assert {k: env[k] for k in c.RAY_ENV_DEFAULTS} == c.RAY_ENV_DEFAULTS
    monkeypatch.delenv("PYTHONPATH")
    assert c.local_runtime_env()["env_vars"]["PYTHONPATH"] == str(PROJECT_ROOT)


def test_the_defaults_never_override_what_is_set(monkeypatch):
    key = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    monkeypatch.setenv(key, "5")
    c.set_env_defaults()
    assert os.environ[key] == "5"
    monkeypatch.delenv(key)
    c.set_env_defaults()
    assert os.environ[key] == c.RAY_ENV_DEFAULTS[key]


def test_a_local_ray_keeps_idle_workers_beyond_one_a_cpu():
    assert c.local_system_config(2) == {"num_workers_soft_limit": 2 + c.IDLE_WORKERS_KEPT}
    assert c.local_system_config(None)["num_workers_soft_limit"] == os.cpu_count() + c.IDLE_WORKERS_KEPT


def test_ray_init_gets_a_runtime_env_and_settings_only_for_a_ray_started_here(monkeypatch):
    calls = []

    class FakeRay:
        @staticmethod
        def init(**kwargs):
            calls.append(kwargs)

        @staticmethod
        def shutdown():
            calls.append("shutdown")

        @staticmethod
        def LoggingConfig(log_level):  # noqa: N802 - Ray's name
            return ("logging", log_level)

    monkeypatch.setitem(__import__("sys").modules, "ray", FakeRay)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with c.connect(log_level="ERROR", num_cpus=2) as local:
        assert local is True
    assert calls[0]["runtime_env"] == c.local_runtime_env()
    assert calls[0]["_system_config"] == c.local_system_config(2)
    assert calls[0]["logging_config"] == ("logging", "ERROR") and calls[0]["num_cpus"] == 2
    assert calls[-1] == "shutdown"
    monkeypatch.setenv("RAY_ADDRESS", "ray://cluster:10001")  # the cluster of ray job submit
    with c.connect() as local:
        assert local is False
    assert calls[2]["address"] is None  # a cluster's settings are its own
    assert "runtime_env" not in calls[2] and "_system_config" not in calls[2]
