"""A real local Ray cluster: `ray start --head`, `ray job submit` of the smoke campaign, stop.

The cluster runs in subprocesses only, beside (not inside) the in-process Ray of the `ray_local`
fixture, which may be up for the whole session: its own ports, its own `--temp-dir` (so no
`ray.init()` finds and joins it) and its own token. It is stopped by the process id of
`ray start --block`, never with `ray stop`, which would end every Ray on the machine, the
session's included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator.config import PROJECT_ROOT
from orchestrator.distributed.connect import RAY_ENV_DEFAULTS

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = PROJECT_ROOT
RAY = Path(sys.executable).with_name("ray")
JOB_TIMEOUT_S = 900
# Uploaded with --working-dir: Ray already skips what .gitignore lists (.venv/, runs/, pools/).
RUNTIME_ENV = {
    "excludes": [".git", ".hypothesis", ".pytest_cache"],
    "env_vars": {"PYTHONUNBUFFERED": "1", **RAY_ENV_DEFAULTS},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, process: subprocess.Popen, dashboard: str, env: dict, log: Path):
        self.process, self.dashboard, self.env, self.log = process, dashboard, env, log

    def get(self, path: str):
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
        return json.loads(body) if body.lstrip().startswith(("{", "[")) else body

    def wait_until_up(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ray start exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                self.get("/api/jobs/")
                return
            except OSError:
                time.sleep(1)
        pytest.fail(f"the Ray dashboard did not answer within {timeout_s} s:\n{self.log.read_text()}")

    def wait_for_job(self, submission_id: str, timeout_s: float) -> dict:
        deadline, info = time.monotonic() + timeout_s, {"status": "not yet seen"}
        while time.monotonic() < deadline:
            info = self.get(f"/api/jobs/{submission_id}")
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(2)
        pytest.fail(f"job {submission_id} still {info['status']} after {timeout_s} s:\n{self.logs(submission_id)}")

    def logs(self, submission_id: str) -> str:
        return self.get(f"/api/jobs/{submission_id}/logs")["logs"]

    def stop(self) -> None:
        """End `ray start --block` (it ends its Ray processes), then anything left in its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only its children
        except ProcessLookupError:
            pass
        self.process.wait()


def cluster_env(token: str) -> dict:
    """This process's environment without the Ray connection state an in-process ray.init left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k.startswith("RAY_TRAIN_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once, not after a 30 s drain
    return env


@pytest.fixture
def local_cluster():
    # Short: Ray's socket paths below the temp dir must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="cryoal-ray-", dir="/tmp"))
    log = temp_dir / "ray-start.log"
    env = cluster_env(secrets.token_hex(32))
    dashboard_port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
             f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={temp_dir}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    cluster = LocalCluster(process, f"http://127.0.0.1:{dashboard_port}", env, log)
    try:
        cluster.wait_until_up()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_smoke_campaign_to_the_end(local_cluster, tmp_path):
    run_dir = tmp_path / "run"
    submission_id = f"cryoal-smoke-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [str(RAY), "job", "submit", "--address", local_cluster.dashboard, "--no-wait",
         "--submission-id", submission_id, "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(RUNTIME_ENV), "--",
         sys.executable, "orchestrator/run.py", "--config", "smoke",
         "--set", f"run_root={tmp_path}", "--run-dir", str(run_dir)],
        env=local_cluster.env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr

    info = local_cluster.wait_for_job(submission_id, JOB_TIMEOUT_S)
    logs = local_cluster.logs(submission_id)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs}"

    state = json.loads((run_dir / "state.json").read_text())
    assert state["done"] is True
    assert [c["labelled"] for c in state["cycles"]] == [6, 9]
    labels = (run_dir / "labels.csv").read_text().splitlines()
    assert len(labels) == 1 + 9  # header + the budget's 9 labels
    assert pq.read_table(run_dir / "predictions.parquet").num_rows > 0
    assert str(run_dir) in logs  # the driver's own output reached the job log
    # ... and only the driver's: Ray's own output (Train reports, Data's operator tables) went
    # to the run directory's logs/, leaving a short plain log with no control codes
    assert "TrainingReport(" not in logs and "\x1b" not in logs and "\r" not in logs, logs
    assert len(logs.splitlines()) <= 40, logs
