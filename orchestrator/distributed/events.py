"""How the driver follows work running in other processes: through the files that work writes.

A training run's rank 0 appends one JSON line per epoch to its cycle directory's
`progress.jsonl` (:func:`report_epoch`); a scoring pass writes Parquet files into a partial
folder, renamed to its final name when whole (:func:`partial_dir`). The driver polls both
(``orchestrator/campaign/progress.py`` runs a stage's watcher in a background thread):
:func:`training_watch` and :func:`scoring_watch` turn what the files say into a stage's
progress (anything with ``update(done=, total=, info=)`` and ``elapsed``). Neither needs Ray,
so in-process training and scoring report the same way, and a failed worker leaves nothing
behind to clean up. No Ray imports here: the labelling page and the tests read these too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

__all__ = ["EVENTS", "report_epoch", "EventTail", "training_watch", "partial_dir", "RowCounter",
           "scoring_watch", "scoring_pass_watch"]

EVENTS = "progress.jsonl"  # in a cycle directory: one line per training epoch, from rank 0


def report_epoch(out_dir: str | Path, **event) -> None:
    """Rank 0 of a training run, after each epoch: one JSON line in `out_dir/progress.jsonl`
    (epoch, epochs, loss, and the validation accuracies at validation epochs)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(out_dir) / EVENTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, default=float) + "\n")  # numpy and 0-d torch numbers too


class EventTail:
    """The complete lines a JSON-lines file gained since the last read; lines written before
    this tail was made (an earlier attempt at the same cycle) are skipped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]  # a line being written waits for the next read
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


class RowCounter:
    """Rows in the finished Parquet files of the folders a scoring pass writes (its partial
    folder, renamed to the final one when whole); a file still being written is counted later."""

    def __init__(self, *folders: Path):
        self.folders = [Path(f) for f in folders]
        self.counted: dict[str, int] = {}

    def __call__(self) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for folder in self.folders:
            for path in folder.glob("*.parquet") if folder.is_dir() else ():
                if path.name not in self.counted:
                    try:
                        self.counted[path.name] = pq.read_metadata(path).num_rows
                    except (OSError, pa.ArrowInvalid):
                        pass  # not finished yet (no footer), or renamed away meanwhile
        return sum(self.counted.values())


def training_watch(cycle_dir: Path) -> Callable[[object], None]:
    """Follows rank 0's epoch events of a cycle's training (`report_epoch`): the epoch, its
    loss, and the validation accuracy of the latest validation epoch."""
    tail = EventTail(Path(cycle_dir) / EVENTS)
    latest: dict[str, float] = {}

    def watch(stage) -> None:
        for event in tail.read():
            if "val_accuracy" in event:
                latest["val"] = event["val_accuracy"]
            info = f"loss {event['loss']:.3f}" + (f" · val {latest['val']:.3f}" if latest else "")
            stage.update(done=event["epoch"], total=event["epochs"], info=info)

    return watch


def scoring_watch(counter: RowCounter) -> Callable[[object], None]:
    """Follows a scoring pass by the rows its finished files hold, with the rate so far."""

    def watch(stage) -> None:
        done = counter()
        rate = done / max(stage.elapsed, 1e-9)
        stage.update(done=done, info=f"{rate:,.{0 if rate >= 10 else 1}f} rows/s" if done else "")

    return watch


def partial_dir(out_dir: str | Path) -> Path:
    """Where a scoring pass writes until it is whole (then renamed to `out_dir`)."""
    return Path(out_dir).with_name(Path(out_dir).name + ".partial")


def scoring_pass_watch(out_dir: str | Path) -> Callable[[object], None]:
    """Follows the scoring pass writing `out_dir` by the rows of the files it has finished."""
    return scoring_watch(RowCounter(partial_dir(out_dir), out_dir))
