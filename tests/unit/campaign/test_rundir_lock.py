"""One writer per run directory: a campaign, a resume and the labelling page exclude each other;
a holder that was killed does not block the resume that finishes its work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.config import PROJECT_ROOT

from orchestrator.campaign.rundir_lock import LOCK_FILE, RunDirBusy, RunDirLock
from orchestrator.run import main as run_main

ROOT = PROJECT_ROOT
HOLD = """
import sys, time
from orchestrator.campaign.rundir_lock import RunDirLock
RunDirLock(sys.argv[1], "a campaign").acquire()
print("held", flush=True)
time.sleep(600)
"""
TRY = """
import sys
from orchestrator.campaign.rundir_lock import RunDirBusy, lock_run_dir
try:
    lock_run_dir(sys.argv[1])
except RunDirBusy as err:
    print(err)
    sys.exit(3)
"""


def try_lock(run_dir: Path, **options) -> int:
    """Exit status of another process that tries to lock run_dir: 0 got it, 3 refused."""
    return subprocess.run([sys.executable, "-c", TRY, str(run_dir)], cwd=ROOT, capture_output=True,
                          timeout=60, **options).returncode


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path's lock as a campaign."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    with process:
        assert process.stdout.readline() == "held\n"
        yield process
        process.kill()


@pytest.mark.slow  # another process holds or tries the lock
def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path, holder):
    started = time.monotonic()
    with pytest.raises(RunDirBusy) as err:
        RunDirLock(tmp_path, "a campaign").acquire()
    assert time.monotonic() - started < 1  # refused, not queued
    assert f"is in use by a campaign (pid {holder.pid} on {socket.gethostname()}, since " in str(err.value)


@pytest.mark.slow  # another process holds or tries the lock
def test_a_resume_is_refused_while_the_campaign_runs(tmp_path, holder, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert run_main(["--resume", str(tmp_path)]) == 2  # refused before Ray or the config is touched
    assert f"in use by a campaign (pid {holder.pid}" in capsys.readouterr().err


@pytest.mark.slow  # another process holds or tries the lock
def test_a_holder_killed_outright_leaves_no_lock_behind(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # its file stays, naming the dead holder
    with RunDirLock(tmp_path, "a campaign") as lock:
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()
        assert lock.fd is not None


def test_the_lock_is_free_again_after_release(tmp_path):
    RunDirLock(tmp_path, "a campaign").acquire().release()
    RunDirLock(tmp_path, "a campaign").acquire().release()


def test_a_run_directory_that_cannot_hold_a_lock_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / LOCK_FILE).mkdir()  # as unwritable as a read-only disk, even for root
    assert run_main(["--resume", str(tmp_path)]) == 2
    assert f"error: cannot lock the run directory: {tmp_path / LOCK_FILE}: Is a directory" in capsys.readouterr().err


@pytest.mark.slow  # another process holds or tries the lock
def test_a_child_handed_the_lock_writes_in_its_holders_stead_and_no_one_else_does(tmp_path):
    with RunDirLock(tmp_path, "the labelling page") as lock:
        assert try_lock(tmp_path) == 3  # a stranger is refused
        env, fds = lock.handoff()
        assert try_lock(tmp_path, env=env, pass_fds=fds) == 0  # the page's resume is not
        with pytest.raises(RunDirBusy):  # and after the child, the lock is still the page's
            RunDirLock(tmp_path, "a campaign").acquire()


@pytest.mark.slow  # another process holds or tries the lock
def test_a_forged_handoff_variable_gives_no_lock(tmp_path):
    with RunDirLock(tmp_path, "the labelling page"):
        with open(tmp_path / "other", "w") as other:
            env = {**os.environ, "CRYOAL_RUNDIR_LOCK_FD": str(other.fileno())}
            assert try_lock(tmp_path, env=env, pass_fds=(other.fileno(),)) == 3


@pytest.mark.ray  # run.py goes on to start a local Ray; it is killed once checked
def test_a_running_campaign_refuses_a_resume_and_a_page_on_its_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    log = open(tmp_path / "log.txt", "wb")
    campaign = subprocess.Popen(
        [sys.executable, "orchestrator/run.py", "--config", "smoke", "--run-dir", str(run_dir),
         "--set", "train.num_workers=0", "--set", "score.actors=0"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {campaign.pid}' not in _read(run_dir / LOCK_FILE):
            assert campaign.poll() is None, (tmp_path / "log.txt").read_text()[-2000:]
            assert time.monotonic() < deadline, "the campaign never took its lock"
            time.sleep(0.2)
        for args in (["--resume", str(run_dir)], ["annotate", str(run_dir)]):
            second = subprocess.run([sys.executable, "orchestrator/run.py", *args], cwd=ROOT,
                                    capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stderr
            assert f"in use by a campaign (pid {campaign.pid} on {socket.gethostname()}" in second.stderr
            assert "Traceback" not in second.stderr
    finally:
        os.killpg(campaign.pid, signal.SIGKILL)
        campaign.wait()
        log.close()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
