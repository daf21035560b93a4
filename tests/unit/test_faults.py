"""The fault-injection points (orchestrator/faults.py): which call fires, and that a fault fires
once in all processes when asked. The kill itself is replaced by a record here; tests/faults
kill for real."""

from __future__ import annotations

import os
import signal

import pytest

from orchestrator import faults


@pytest.fixture
def kills(monkeypatch):
    killed: list[int] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(faults, "_reached", {})
    monkeypatch.setattr(faults, "_scope", None)
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.delenv(faults.ONCE_ENV, raising=False)
    return killed


def test_unset_nothing_fires_and_nothing_is_passed_to_workers(kills):
    faults.maybe_fault("score-batch")
    assert kills == [] and faults.runtime_env() is None


def test_the_nth_arrival_at_the_named_point_fires(kills, monkeypatch):
    monkeypatch.setenv(faults.ENV, "score-batch#3")
    for _ in range(5):
        faults.maybe_fault("score-batch")
        faults.maybe_fault("score-started")
    assert kills == [(os.getpid(), signal.SIGKILL)]  # the third, only


def test_a_scope_limits_the_fault_to_the_call_or_process_named_so(kills, monkeypatch):
    monkeypatch.setenv(faults.ENV, "train-checkpointed@rank1")
    faults.maybe_fault("train-checkpointed", scope="rank0")
    assert kills == []
    faults.maybe_fault("train-checkpointed", scope="rank1")
    assert len(kills) == 1
    monkeypatch.setenv(faults.ENV, "ledger-written@lam=0.1")
    faults.set_scope("lam=0")
    faults.maybe_fault("ledger-written")
    faults.set_scope("lam=0.1")
    faults.maybe_fault("ledger-written")
    assert len(kills) == 2


def test_once_lets_only_the_first_process_at_the_point_die(kills, monkeypatch, tmp_path):
    marker = tmp_path / "fired"
    monkeypatch.setenv(faults.ENV, "score-batch")
    monkeypatch.setenv(faults.ONCE_ENV, str(marker))
    faults.maybe_fault("score-batch")
    assert marker.read_text() == f"{os.getpid()}\n" and len(kills) == 1
    monkeypatch.setattr(faults, "_reached", {})  # as a restarted process: counts from zero
    faults.maybe_fault("score-batch")
    assert len(kills) == 1  # the marker is there: it goes on


def test_the_variables_travel_to_ray_workers_only_when_a_fault_is_set(kills, monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ONCE_ENV, str(tmp_path / "fired"))
    assert faults.runtime_env() is None
    monkeypatch.setenv(faults.ENV, "score-batch#3")
    assert faults.runtime_env() == {"env_vars": {faults.ENV: "score-batch#3",
                                                 faults.ONCE_ENV: str(tmp_path / "fired")}}
