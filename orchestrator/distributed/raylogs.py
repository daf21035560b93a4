"""Where Ray's own output goes: `RUN_DIR/logs/` by default, the terminal with `run.py -v`.

For a small campaign Ray prints hundreds of lines around the few that matter: its workers' and
actors' output forwarded to the driver, Ray Train's reports, Ray Data's execution tables, and
warnings about token authentication or an actor's constructor arguments. A quiet run keeps
all of it, in files:

- the driver's Python loggers (`ray` and its children: Train, Data, Tune) → `logs/driver.log`;
- workers' and actors' output is not forwarded (`ray.init(log_to_driver=False)`). It is in
  Ray's session folder, whose `logs/` is copied to `logs/ray/` when a Ray this run started
  stops (a cluster keeps its own: `ray job logs`, or its session folder on each node);
- the core worker of this process (C++) writes its warnings to file descriptor 2 directly, past
  Python's logging: fd 2 goes to `logs/native.log`, while Python's `sys.stderr` keeps the
  terminal, so tracebacks and error messages still reach it in full;
- Ray Data's progress bars are off: the campaign shows its own (`orchestrator/campaign/progress.py`);
- the raylet's messages reach the driver on a channel of their own, printed to stdout whatever
  `log_to_driver` says (`ray._private.worker.listen_error_messages`). The routine ones
  (`ROUTINE_RAYLET_MESSAGES`: on 2 cores, "N PYTHON worker processes have been started ... Nx
  the maximum expected startup concurrency", after a few Train worker groups and scoring
  actors) go to driver.log; every other one (a worker killed, memory running out) still
  reaches the terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

DRIVER_LOG = "driver.log"
NATIVE_LOG = "native.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d -- %(message)s"
ROUTINE_RAYLET_MESSAGES = ("PYTHON worker processes have been started",)


class RayOutput:
    """Use as `with RayOutput(run_dir / "logs", verbose) as output: ray.init(**output.init_kwargs());
    output.started(...)`. Verbose changes nothing: Ray prints as it always does."""

    def __init__(self, log_dir: Path, verbose: bool = False):
        self.log_dir = Path(log_dir)
        self.verbose = verbose
        self.handler: logging.Handler | None = None
        self.saved_fd: int | None = None
        self.saved_stderr = None
        self.session_logs: Path | None = None
        self.printer = None  # Ray's print_to_stdstream while ours stands in for it

    def init_kwargs(self) -> dict:
        import ray

        if self.verbose:  # as before this module: warnings and up, workers' output forwarded
            return {"logging_config": ray.LoggingConfig(log_level="WARNING")}
        # no logging_config: it would add a terminal handler to the driver's loggers
        return {"log_to_driver": False}

    def __enter__(self) -> "RayOutput":
        if not self.verbose:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.log_dir / DRIVER_LOG, encoding="utf-8")
            self.handler.setFormatter(logging.Formatter(FORMAT))
            self.handler.setLevel(logging.INFO)  # Ray Data logs DEBUG; its own file keeps that
            self.quiet_loggers()
            self._redirect_native_stderr()
        return self

    def started(self, local: bool) -> None:
        """After ray.init: Ray Data's and Ray Train's loggers exist now (they configure
        themselves on import), and, for a Ray this process started, its session folder."""
        import ray._private.worker as ray_worker
        import ray.data
        import ray.train  # noqa: F401 - configures its loggers on import

        if self.verbose:
            return
        ray.data.DataContext.get_current().enable_progress_bars = False
        self.quiet_loggers()
        self.printer = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = raylet_messages_to(logging.getLogger("ray"), self.printer)
        if local:
            try:  # no public API names the session folder
                self.session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
            except AttributeError:
                self.session_logs = None

    def quiet_loggers(self) -> None:
        """Every `ray*` logger that writes to the terminal writes to driver.log instead."""
        if self.handler is None:
            return
        names = ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]
        for name in names:
            logger = logging.getLogger(name)
            terminal = [h for h in logger.handlers if _writes_to_terminal(h)]
            for h in terminal:
                logger.removeHandler(h)
            if (terminal or name == "ray") and self.handler not in logger.handlers:
                logger.addHandler(self.handler)
        logging.getLogger("ray").setLevel(logging.INFO)

    def __exit__(self, *exc) -> None:
        if self.verbose:
            return
        self._restore_native_stderr()
        if self.printer is not None:
            import ray._private.worker as ray_worker

            ray_worker.print_to_stdstream, self.printer = self.printer, None
        if self.session_logs is not None and self.session_logs.is_dir():
            shutil.copytree(self.session_logs, self.log_dir / "ray", dirs_exist_ok=True,
                            ignore_dangling_symlinks=True,
                            copy_function=_copy_quietly)
        if self.handler is not None:
            for name in ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]:
                logging.getLogger(name).removeHandler(self.handler)
            self.handler.close()

    def _redirect_native_stderr(self) -> None:
        sys.stderr.flush()
        self.saved_fd = os.dup(2)
        self.saved_stderr = sys.stderr
        with open(self.log_dir / NATIVE_LOG, "ab") as native:
            os.dup2(native.fileno(), 2)
        # Python's own stderr (tracebacks, warnings, error lines) stays on the terminal
        sys.stderr = os.fdopen(os.dup(self.saved_fd), "w", buffering=1, encoding="utf-8",
                               errors="backslashreplace")

    def _restore_native_stderr(self) -> None:
        if self.saved_fd is None:
            return
        sys.stderr.flush()
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        sys.stderr.close()
        sys.stderr = self.saved_stderr
        self.saved_fd = None


def raylet_messages_to(logger: logging.Logger, printer):
    """Ray's `print_to_stdstream(data, ignore_prefix)`, except that a routine raylet message
    (`ROUTINE_RAYLET_MESSAGES`) is logged to `logger` instead of printed."""
    def print_or_log(data: dict, ignore_prefix: bool):
        lines = data.get("lines", [])
        if data.get("pid") == "raylet" and any(m in line for line in lines for m in ROUTINE_RAYLET_MESSAGES):
            for line in lines:
                logger.warning("(raylet) %s", line)
            return None
        return printer(data, ignore_prefix)
    return print_or_log


def _writes_to_terminal(handler: logging.Handler) -> bool:
    """Stream handlers on stdout/stderr, and Ray's console handlers (which look up sys.stderr
    when they write); file handlers are StreamHandlers too, but not these."""
    if isinstance(handler, logging.FileHandler):
        return False
    stream = getattr(handler, "stream", None)
    return isinstance(handler, logging.StreamHandler) and (
        stream in (None, sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
        or type(handler).__name__ == "PlainRayHandler")


def _copy_quietly(source, target):
    """Copy one log file; a socket or a file that vanished meanwhile is skipped."""
    try:
        return shutil.copy2(source, target)
    except OSError:
        return target
