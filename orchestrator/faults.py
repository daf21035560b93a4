"""Test-only fault injection: `CRYOAL_FAULT=<point>[#n]` SIGKILLs the process the n-th time
(default: the first) it reaches that named point.

Used by tests/faults to kill the driver at moments too short to hit from outside (selection,
ledger writes). Unset (always, outside those tests), `maybe_fault` does nothing.

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


def maybe_fault(point: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    name, _, nth = wanted.partition("#")
    if name != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
