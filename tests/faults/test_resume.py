"""Fault: a campaign's driver SIGKILLed at the two ends of a cycle's training and scoring, at
fixed points (orchestrator/faults.py): right after cycle 0's training returned, before
state.json records it (`train-returned`), and then, in the resume, right as cycle 0's scoring
pass starts (`score-started`). `--resume` then finishes the campaign with the same labels as a
campaign that was never interrupted. (Kills during selection and ledger writes:
test_driver.py.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from faultutil import ledger, run_cli as run

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]


def state(run_dir: Path) -> dict:
    path = run_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cycle_trained(run_dir: Path, cycle: int) -> bool:
    cycles = state(run_dir).get("cycles", [])
    return len(cycles) > cycle and cycles[cycle].get("trained", False)


def test_a_campaign_killed_after_training_and_mid_scoring_resumes_to_the_same_labels(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    log = tmp_path / "log.txt"
    assert run(["--config", "smoke", "--run-dir", str(reference)], log) == 0, log.read_text()[-3000:]

    code = run(["--config", "smoke", "--run-dir", str(interrupted)], log, fault="train-returned#1")
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert (interrupted / "cycles/c00/model.pt").is_file()  # trained ...
    assert not cycle_trained(interrupted, 0)  # ... but not recorded

    code = run(["--resume", str(interrupted)], log, fault="score-started#1")
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert cycle_trained(interrupted, 0)
    assert not (interrupted / "cycles/c00/scores").exists()

    assert run(["--resume", str(interrupted)], log) == 0, log.read_text()[-3000:]
    assert state(interrupted)["done"] is True
    assert ledger(interrupted) == ledger(reference)
    assert (interrupted / "predictions.parquet").is_file()
