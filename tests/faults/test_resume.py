"""A campaign whose driver is SIGKILLed mid-training and mid-scoring finishes with `--resume`,
with the same labels as a campaign that was never interrupted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "orchestrator" / "run.py")]


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            RUN + args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches only its tree
        )


def finish(args: list[str], log: Path, timeout: float = 600) -> None:
    process = start(args, log)
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def kill_when(process: subprocess.Popen, condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the campaign ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, no chance to clean up
    process.wait()


def ledger(run_dir: Path) -> list[tuple[str, str, str]]:
    with open(run_dir / "labels.csv", newline="") as f:
        return sorted((r["subtomo_id"], r["label"], r["cycle"]) for r in csv.DictReader(f))


def state(run_dir: Path) -> dict:
    path = run_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cycle_trained(run_dir: Path, cycle: int) -> bool:
    cycles = state(run_dir).get("cycles", [])
    return len(cycles) > cycle and cycles[cycle].get("trained", False)


def test_a_campaign_killed_mid_training_and_mid_scoring_resumes_to_the_same_labels(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    log = tmp_path / "log.txt"
    finish(["--config", "smoke", "--run-dir", str(reference)], log)

    driver = start(["--config", "smoke", "--run-dir", str(interrupted)], log)
    kill_when(driver, lambda: (interrupted / "cycles/c00/ray_train").exists(), "training began")
    assert not cycle_trained(interrupted, 0)

    driver = start(["--resume", str(interrupted)], log)
    kill_when(driver, lambda: cycle_trained(interrupted, 0), "cycle 0 finished training")
    time.sleep(3)  # into the scoring pass that follows
    assert not (interrupted / "cycles/c00/scores").exists()

    finish(["--resume", str(interrupted)], log)
    assert state(interrupted)["done"] is True
    assert ledger(interrupted) == ledger(reference)
    assert (interrupted / "predictions.parquet").is_file()
