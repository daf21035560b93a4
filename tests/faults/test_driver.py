"""Faults: the driver SIGKILLed during selection and while writing the ledger (the moments
too short to hit from outside are reached through `CRYOAL_FAULT`, orchestrator/faults.py).
`--resume` then finishes the campaign with the same ledger as an undisturbed run.
(Driver kills mid-training and mid-scoring: tests/faults/test_resume.py.)"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from faultutil import ledger, run_cli as run

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]


def campaign(pool, run_dir: Path) -> list[str]:
    return ["--config", "smoke", "--run-dir", str(run_dir), "--set", f"data.pool={pool.path}",
            "--set", "train.num_workers=0"]


@pytest.fixture(scope="module")
def reference(shape_pool, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = run_dir.parent / "log.txt"
    assert run(campaign(shape_pool, run_dir), log) == 0, log.read_text()[-3000:]
    return run_dir


# One campaign, killed twice in a row (the resume is killed at the next point), then resumed
# to the end: each point is hit once, and the whole costs about two campaigns.
CHAIN = [
    "selection-chosen#2",  # cycle 1: pool scored, queries chosen, selection.csv not written
    "ledger-temp-written#1",  # cycle 1 (0 is labelled): new ledger in its temp file only
]


def test_a_driver_killed_mid_selection_and_mid_ledger_write_resumes_to_the_same_ledger(
    shape_pool, reference, tmp_path
):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    for i, fault in enumerate(CHAIN):
        args = campaign(shape_pool, run_dir) if i == 0 else ["--resume", str(run_dir)]
        assert run(args, log, fault=fault) == -signal.SIGKILL, f"{fault}: {log.read_text()[-3000:]}"
        if fault.startswith("ledger-temp-written"):
            assert list(run_dir.glob(".labels.csv.*.tmp")), "killed before the temp ledger existed"
            assert len(ledger(run_dir)) == 6  # the old ledger, whole
    assert run(["--resume", str(run_dir)], log) == 0, log.read_text()[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["done"] is True
    assert ledger(run_dir) == ledger(reference)
    assert (run_dir / "predictions.parquet").is_file()
