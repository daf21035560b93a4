"""Test-only fault injection: the one module where the code may be made to die on purpose.

`CRYOAL_FAULT=<point>[#n][@scope]` SIGKILLs the process the n-th time (default: the first) it
reaches that named point; with `@scope`, only in a process (or at a call) whose scope is that
name. Unset (always, outside the tests in tests/faults), `maybe_fault` returns at once: one
dictionary lookup, nothing else. The count is per process: a restarted process counts from zero.

`CRYOAL_FAULT_ONCE=<path>` makes the fault fire at most once in all processes together: the
process that creates that file (atomically) dies, every later one goes on. Without it a worker
that Ray restarts would reach the same point again and die again.

Scopes: a sweep's trial names its process after its grid point (`set_scope("lam=0.1")`), so
one trial's process can be killed while the others run; a Train worker passes its rank
(`train-checkpointed@rank1`).

Where the variables reach: a process inherits them from its parent, and a local Ray started by
`run.py` passes them to every worker. A Ray Data pass and a Ray Train run also hand them to
their actors and workers explicitly (:func:`runtime_env`), so a test can set them for one pass
on a Ray that was started without them.

Points, in the order a cycle reaches them:

- ``selection-chosen`` (driver: queries chosen, selection.csv not yet written);
- ``selection-written`` (driver: selection.csv written, no label asked yet);
- ``ledger-temp-written`` (driver: the new ledger in its temp file, labels.csv not yet replaced);
- ``ledger-written`` (driver: labels.csv replaced, state.json not yet updated);
- ``train-checkpointed`` (each Train worker, scope ``rank<r>``: an epoch's checkpoint reported
  to Ray Train; ``#n`` counts checkpoints);
- ``train-returned`` (driver: the cycle's training has returned, state.json does not know yet);
- ``score-started`` (driver: a scoring pass set up, nothing of it written whole);
- ``score-batch`` (the scoring actor, or the driver when it scores in-process: a batch scored,
  not yet handed back; ``#n`` counts batches).
"""

from __future__ import annotations

import os
import signal

ENV = "CRYOAL_FAULT"
ONCE_ENV = "CRYOAL_FAULT_ONCE"
_reached: dict[str, int] = {}
_scope: str | None = None


def set_scope(name: str | None) -> None:
    """Name what this process runs, for `CRYOAL_FAULT=…@name`."""
    global _scope
    _scope = name


def maybe_fault(point: str, scope: str | None = None) -> None:
    """SIGKILL this process if `CRYOAL_FAULT` names this point (and this call's scope, else
    the process's) and this is the n-th time here."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    wanted, _, wanted_scope = wanted.partition("@")
    name, _, nth = wanted.partition("#")
    if name != point or (wanted_scope and wanted_scope != (scope or _scope)):
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == int(nth or 1) and _first_to_fire():
        os.kill(os.getpid(), signal.SIGKILL)


def runtime_env() -> dict | None:
    """The fault variables of this process as a Ray runtime environment for the actors and
    workers it starts (None when no fault is set: production runs pass nothing)."""
    env = {key: os.environ[key] for key in (ENV, ONCE_ENV) if os.environ.get(key)}
    return {"env_vars": env} if ENV in env else None


def _first_to_fire() -> bool:
    marker = os.environ.get(ONCE_ENV)
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    return True
