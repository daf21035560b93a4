"""Helpers of the fault-injection suite."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "orchestrator" / "run.py")]


def run_cli(args: list[str], log: Path, fault: str | None = None, timeout: float = 600) -> int:
    """`orchestrator/run.py ARGS` in a session of its own (its own local Ray, which passes
    CRYOAL_FAULT=fault, unset without one, on to its workers), output appended to `log`;
    returns its exit code."""
    env = dict(os.environ)
    for key in ("CRYOAL_FAULT", "CRYOAL_FAULT_ONCE", "RAY_ADDRESS"):
        env.pop(key, None)
    if fault:
        env["CRYOAL_FAULT"] = fault
    with open(log, "ab") as out:
        process = subprocess.Popen(RUN + args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        code = process.wait(timeout=timeout)
    if code != 0:  # a SIGKILLed driver leaves its local Ray behind: end that group too
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code


def ledger(run_dir: Path) -> list[tuple[str, str, str]]:
    """labels.csv as sorted (subtomo_id, label, cycle): what must equal an undisturbed run's
    (the time column differs from run to run)."""
    with open(run_dir / "labels.csv", newline="") as f:
        return sorted((r["subtomo_id"], r["label"], r["cycle"]) for r in csv.DictReader(f))
