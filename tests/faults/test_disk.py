"""Faults: a read-only run directory and a full disk. Writing the state, the selection or the
ledger fails with an error naming the file, and what was on disk before is left intact (no
half-written file, no temp file left behind)."""

from __future__ import annotations

import builtins
import errno
import os
import stat
from pathlib import Path

import pytest

from orchestrator.al.labels import LabelLedger, LabelRecord
from orchestrator.data.pool import atomic_write_text

pytestmark = [pytest.mark.faults, pytest.mark.ray, pytest.mark.slow]

IDS = {f"s{i}" for i in range(10)}


def a_run_dir(tmp_path: Path) -> tuple[Path, LabelLedger]:
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_text(run / "state.json", '{"cycles": [{"cycle": 0, "labelled": 2}]}')
    ledger = LabelLedger(run / "labels.csv", known_ids=IDS, num_classes=3)
    ledger.append([LabelRecord("s0", 0, 0, "initial"), LabelRecord("s1", 1, 0, "initial")])
    return run, ledger


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir())}


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory read-only. chmod is enough for an ordinary user; root ignores it, so
    there creating a file in the directory is refused the way a read-only mount refuses it."""
    made: list[Path] = []

    def refuse(path) -> None:
        if any(Path(path).resolve().parent == d for d in made):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_os_open = builtins.open, os.open

    def fake_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse(path)
        return real_open(path, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def make(directory: Path) -> None:
        directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
        made.append(directory.resolve())
        if os.geteuid() == 0:
            monkeypatch.setattr(builtins, "open", fake_open)
            monkeypatch.setattr(os, "open", fake_os_open)

    yield make
    monkeypatch.undo()
    for directory in made:
        directory.chmod(stat.S_IRWXU)


def test_a_read_only_run_directory_is_a_clear_error_and_changes_nothing(tmp_path, read_only):
    run, ledger = a_run_dir(tmp_path)
    before = snapshot(run)
    read_only(run)
    with pytest.raises(OSError, match=f"cannot write {run / 'state.json'}.*intact"):
        atomic_write_text(run / "state.json", '{"cycles": []}')
    with pytest.raises(OSError, match=f"cannot write {run / 'labels.csv'}.*intact"):
        ledger.append([LabelRecord("s2", 2, 1, "simulated_oracle")])
    assert snapshot(run) == before
    assert LabelLedger(run / "labels.csv", known_ids=IDS, num_classes=3).current() == {"s0": 0, "s1": 1}


def test_a_full_disk_mid_write_is_a_clear_error_and_leaves_the_previous_files(tmp_path, monkeypatch):
    run, ledger = a_run_dir(tmp_path)
    before = snapshot(run)

    def disk_full(fd):  # the data went partly to the temp file, then the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=f"cannot write {run / 'state.json'}: No space left.*intact") as err:
        atomic_write_text(run / "state.json", '{"cycles": []}' * 1000)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match=f"cannot write {run / 'labels.csv'}: No space left.*intact"):
        ledger.append([LabelRecord("s2", 2, 1, "simulated_oracle")])
    with pytest.raises(OSError, match="selection.csv"):
        atomic_write_text(run / "selection.csv", "row,subtomo_id,source\n")
    monkeypatch.undo()
    assert snapshot(run) == before  # no temp files, no partial files, same contents
    reopened = LabelLedger(run / "labels.csv", known_ids=IDS, num_classes=3)
    assert reopened.current() == {"s0": 0, "s1": 1}
    reopened.append([LabelRecord("s2", 2, 1, "simulated_oracle")])  # disk freed: it goes on
    assert reopened.current() == {"s0": 0, "s1": 1, "s2": 2}
