"""Where Ray's own output goes in a quiet run (orchestrator/distributed/raylogs.py)."""

from __future__ import annotations

from orchestrator.distributed.raylogs import raylet_messages_to

STARTUP = ("WARNING: 10 PYTHON worker processes have been started on node: abc with address: "
           "192.0.2.2, which is 5x the maximum expected startup concurrency (2).")


class ListLogger:
    """What the routing logs, whatever the logging module's state in this process."""

    def __init__(self):
        self.lines: list[str] = []

    def warning(self, message: str, *args):
        self.lines.append(message % args)


def routed(data: dict) -> tuple[list, list[str]]:
    printed, logger = [], ListLogger()
    raylet_messages_to(logger, lambda d, ignore_prefix: printed.append(d))(data, False)
    return printed, logger.lines


def test_the_raylets_routine_startup_warning_goes_to_the_log_not_the_terminal():
    printed, logged = routed({"lines": [STARTUP], "pid": "raylet", "is_err": False})
    assert printed == [] and logged == [f"(raylet) {STARTUP}"]


def test_any_other_raylet_message_still_reaches_the_terminal():
    data = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet", "is_err": False}
    assert routed(data) == ([data], [])


def test_a_workers_output_is_printed_as_ray_prints_it():
    data = {"lines": [STARTUP], "pid": 1234, "is_err": False}  # a worker printing those words
    assert routed(data) == ([data], [])
