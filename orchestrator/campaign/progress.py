"""What a person watching a campaign sees.

A `Display` shows one stage at a time (simulate, label, train, score). On a terminal it is a
live progress bar (rich) that gives way to one result line when the stage ends. Anywhere else
(a file, a pipe, CI, the log of `ray job submit`) it prints plain lines without control codes:
one when a stage starts, one when it is half done, one when it ends. It also keeps
`RUN_DIR/progress.json` current, which the labelling page reads to show a retraining.

Work in other processes is followed through the files it writes: a stage's ``watch`` is polled
by a background thread. The watchers of a training run and of a scoring pass are
`orchestrator/distributed/events.py`'s, beside the code that writes those files.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

STATUS = "progress.json"  # in the run directory: the stage running now, for the labelling page
POLL_S = 0.5  # how often a stage's watcher looks at the files (and so how often it updates)


@dataclass
class Stage:
    """One stage's progress, updated by the code running it or by its watcher."""

    name: str
    cycle: int | None
    total: float | None
    unit: str
    done: float = 0
    info: str = ""  # what the bar shows beside the count, e.g. "loss 0.61 · val 0.78"
    result: str = ""  # the end line, set by the code running the stage
    started: float = field(default_factory=time.monotonic)
    on_change: Callable[["Stage"], None] | None = None

    @property
    def label(self) -> str:
        return self.name if self.cycle is None else f"cycle {self.cycle} · {self.name}"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, done: float | None = None, total: float | None = None, info: str | None = None):
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        if self.on_change is not None:
            self.on_change(self)

    def count_text(self) -> str:
        total = "?" if self.total is None else f"{self.total:,.0f}"
        return f"{self.done:,.0f}/{total} {self.unit}".strip()


class Display:
    """The campaign's terminal output: `line` for lasting lines, `stage` for work in progress."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 status_path: Path | None = None):
        self.stream = stream or sys.stdout
        self.live = _is_terminal(self.stream) if live is None else live
        self.status_path = Path(status_path) if status_path else None
        self._console = None
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            if self.live:
                self.console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                print(text, file=self.stream, flush=True)

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream)
        return self._console

    @contextmanager
    def stage(self, name: str, *, cycle: int | None = None, total: float | None = None,
              unit: str = "", start: str = "", watch: Callable[[Stage], None] | None = None
              ) -> Iterator[Stage]:
        """Run a stage: `start` describes it, `watch(stage)` (if given) is polled in the
        background to update it, and `stage.result` is its end line. On an error the stage
        just closes: the error itself is what the person needs to see."""
        stage = Stage(name, cycle, total, unit)
        stage.info = start if self.live else ""  # on the bar until the first update
        view = _LiveView(self.console, stage) if self.live else _PlainView(self, stage, start)

        def changed(s: Stage) -> None:
            view.changed()
            self._status(s)

        stage.on_change = changed
        self._status(stage)
        poller = _Poller(watch, stage) if watch else None
        try:
            yield stage
        except BaseException:
            view.close()
            raise
        finally:
            if poller is not None:
                poller.stop()
        view.close()
        self.line(f"{stage.label}: {stage.result or 'done'} ({duration_text(stage.elapsed)})")
        self._status(stage, state="done")

    def _status(self, stage: Stage, state: str = "running") -> None:
        """progress.json for the labelling page, rewritten at each update (a stage's watcher
        updates at most every POLL_S); replaced whole, so a reader never sees half of it."""
        if self.status_path is None:
            return
        status = {"state": state, "cycle": stage.cycle, "stage": stage.name, "label": stage.label,
                  "done": stage.done, "total": stage.total, "unit": stage.unit, "info": stage.info,
                  "elapsed": round(stage.elapsed, 1), "updated": time.time()}
        tmp = self.status_path.with_name(f".{self.status_path.name}.{os.getpid()}")
        try:  # no fsync: a courtesy to the page, not a record
            tmp.write_text(json.dumps(status), encoding="utf-8")
            os.replace(tmp, self.status_path)
        except OSError:
            pass  # never worth stopping the campaign for


class _PlainView:
    """Plain lines: the start, once at half way, and (by the Display) the end."""

    def __init__(self, display: Display, stage: Stage, start: str):
        self.display, self.stage, self.halfway_shown = display, stage, False
        if start:
            display.line(f"{stage.label}: {start}")

    def changed(self) -> None:
        s = self.stage
        if not self.halfway_shown and s.total and s.done >= s.total / 2 and s.done < s.total:
            self.halfway_shown = True
            self.display.line(f"{s.label}: {s.count_text()}" + (f" · {s.info}" if s.info else ""))

    def close(self) -> None:
        pass


class _LiveView:
    """A transient rich progress bar: description, bar, count, what the stage reports, time."""

    def __init__(self, console, stage: Stage):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.stage = stage
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=28),
            TextColumn("{task.fields[count]}"), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=console, transient=True, refresh_per_second=4,
        )
        self.task = self.progress.add_task(stage.label, total=stage.total, count="", info="")
        self.progress.start()
        self.changed()

    def changed(self) -> None:
        s = self.stage
        self.progress.update(self.task, completed=s.done, total=s.total, info=s.info,
                             count=s.count_text() if s.total or s.done else "")

    def close(self) -> None:
        self.progress.stop()


class _Poller:
    """Calls watch(stage) every POLL_S seconds in a daemon thread, and once more at the end."""

    def __init__(self, watch: Callable[[Stage], None], stage: Stage):
        self.watch, self.stage = watch, stage
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="progress-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        try:
            self.watch(self.stage)
        except Exception:  # noqa: BLE001 - a display glitch must never stop a campaign
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        self._poll()


def duration_text(seconds: float) -> str:
    """"42 s", or "3 min 05 s" from two minutes on."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
