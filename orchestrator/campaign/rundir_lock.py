"""One writer per run directory: an exclusive lock that a campaign (new or resumed) and the
labelling page each hold while they work on it.

The lock is flock(2) on RUN_DIR/.rundir.lock. The kernel drops it when its holder exits, however
it exits (a SIGKILL included), so a killed campaign never blocks the resume that finishes it. The
file also says who holds the lock (pid, host, role, since when, command): a refused second writer
names the holder. The file is never deleted (a process waiting on the old file while another
created a new one would let two writers in).

The labelling page with --continue runs the resume itself: it hands its lock to that child
process (the open file is inherited, its number passed in CRYOAL_RUNDIR_LOCK_FD), so the page
and the resume it started are one writer, and nobody else gets in between.

flock works across processes on one machine and, on Linux, across NFS clients; for a run
directory at a URI it guards the local staging copy (two machines resuming the same URI are not
stopped).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = ".rundir.lock"
HANDOFF_ENV = "CRYOAL_RUNDIR_LOCK_FD"


class RunDirLockError(RuntimeError):
    """The run directory cannot be locked; the message says why."""


class RunDirBusy(RunDirLockError):
    """Another process holds the run directory; the message names it."""


class RunDirLock:
    def __init__(self, run_dir: str | Path, role: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.role = role
        self.fd: int | None = None

    def acquire(self) -> "RunDirLock":
        """Take the lock, or raise RunDirBusy at once (never waits); RunDirLockError when the
        directory cannot hold the lock file."""
        try:
            fd = self._inherited() or os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only or full disk: no writer could work here anyway
            raise RunDirLockError(f"cannot lock the run directory: {self.path}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(f"{self.run_dir} is in use by {describe_holder(self.path)}; one process "
                             "at a time may write a run directory (a holder that was killed leaves "
                             "no lock behind)") from None
        self.fd = fd
        self.write_holder()
        return self

    def write_holder(self) -> None:
        """Say who holds the lock (again, after a child handed it back)."""
        holder = {
            "pid": os.getpid(), "host": socket.gethostname(), "role": self.role,
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)

    def handoff(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """(environment, pass_fds) for a child process that is to hold this lock while it runs."""
        return {**os.environ, HANDOFF_ENV: str(self.fd)}, (self.fd,)

    def release(self) -> None:
        # Only close, never LOCK_UN: a child handed this lock shares it, and unlocking here
        # would unlock it for the child too.
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _inherited(self) -> int | None:
        """The lock file a parent handed over, if it is this very file."""
        value = os.environ.pop(HANDOFF_ENV, None)  # once: not for our own children
        if value is None or not value.isdigit():
            return None
        try:
            mine, theirs = os.fstat(int(value)), os.stat(self.path)
        except OSError:
            return None
        return int(value) if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino) else None


def describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return (f"{holder['role']} (pid {holder['pid']} on {holder['host']}, since {holder['since']}: "
                f"{holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not yet said which)"


def lock_run_dir(run_dir: str | Path, role: str = "a campaign") -> RunDirLock | None:
    """The lock of a run directory that exists; None when it does not (yet): whoever opens
    it next says why it is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    return RunDirLock(run_dir, role).acquire()
