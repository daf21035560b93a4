"""Test-only fault injection: `CRYOAL_FAULT=<point>[#n][@scope]` SIGKILLs the process the n-th
time (default: the first) it reaches that named point; with `@scope`, only in a process whose
scope (`set_scope`) is that name: a sweep's trial sets its grid point's name (lam=0.1), so one
trial's process can be killed while the others run.

Used by tests/faults to kill the driver at moments too short to hit from outside (selection,
ledger writes), and one Tune trial mid-campaign. Unset (always, outside those tests),
`maybe_fault` does nothing. The count is per process: a restarted process counts from zero.

Points: ``selection-chosen`` (queries chosen, selection.csv not yet written),
``selection-written`` (selection.csv written, no label asked yet), ``ledger-temp-written``
(the new ledger is in its temp file, labels.csv not yet replaced), ``ledger-written``
(labels.csv replaced, state.json not yet updated).
"""

from __future__ import annotations

import os
import signal

ENV = "CRYOAL_FAULT"
_reached: dict[str, int] = {}
_scope: str | None = None


def set_scope(name: str | None) -> None:
    """Name what this process runs, for `CRYOAL_FAULT=…@name`."""
    global _scope
    _scope = name


def maybe_fault(point: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    wanted, _, scope = wanted.partition("@")
    name, _, nth = wanted.partition("#")
    if name != point or (scope and scope != _scope):
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
