"""The campaign's progress display: plain lines off a terminal, a live bar on one, and the files
that training workers and scoring passes report through. No Ray."""

from __future__ import annotations

import io
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.campaign.progress import Display, duration_text
from orchestrator.distributed.events import (
    EVENTS,
    EventTail,
    RowCounter,
    report_epoch,
    scoring_watch,
    training_watch,
)

CONTROL = re.compile(r"\x1b|\r")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_stage_prints_its_start_its_half_way_point_and_its_end_only():
    out = io.StringIO()
    display = Display(out, status_path=None)
    assert display.live is False
    with display.stage("train", cycle=2, unit="epochs", start="300 labelled") as stage:
        for epoch in range(1, 41):
            stage.update(done=epoch, total=40, info=f"loss {1 / epoch:.3f}")
        stage.result = "40 epochs"
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["cycle 2 · train: 300 labelled", "cycle 2 · train: 20/40 epochs · loss 0.050"]
    assert re.fullmatch(r"cycle 2 · train: 40 epochs \(\d+ s\)", lines[2]) and len(lines) == 3
    assert not CONTROL.search(out.getvalue())


def test_on_a_terminal_the_bar_is_drawn_live_and_leaves_the_end_line():
    out = FakeTerminal()
    display = Display(out)
    assert display.live is True
    with display.stage("score", cycle=0, total=100, unit="rows") as stage:
        stage.update(done=50, info="25 rows/s")
        time.sleep(0.3)  # a refresh or two
        stage.result = "100 rows"
    text = out.getvalue()
    assert CONTROL.search(text)  # cursor control: the bar is redrawn in place
    assert re.search(r"cycle 0 · score: 100 rows \(\d+ s\)", text)


def test_an_error_inside_a_stage_propagates_without_an_end_line():
    out = io.StringIO()
    with pytest.raises(KeyError):
        with Display(out).stage("train", cycle=0, start="6 labelled"):
            raise KeyError("boom")
    assert out.getvalue().splitlines() == ["cycle 0 · train: 6 labelled"]


def test_the_status_file_for_the_labelling_page_says_the_stage_and_its_count(tmp_path):
    status = tmp_path / "progress.json"
    with Display(io.StringIO(), status_path=status).stage("train", cycle=1, total=45, unit="epochs") as stage:
        running = json.loads(status.read_text())
        stage.update(done=45)
    done = json.loads(status.read_text())
    assert (running["state"], running["label"], running["total"]) == ("running", "cycle 1 · train", 45)
    assert (done["state"], done["done"]) == ("done", 45)


def test_an_event_tail_reads_only_new_complete_lines(tmp_path):
    path = tmp_path / EVENTS
    path.write_text('{"epoch": 1}\n')  # an earlier attempt's line
    tail = EventTail(path)
    with open(path, "a") as f:
        f.write('{"epoch": 2}\n{"epo')  # the last line is still being written
    assert tail.read() == [{"epoch": 2}]
    with open(path, "a") as f:
        f.write('ch": 3}\n')
    assert tail.read() == [{"epoch": 3}]
    assert EventTail(tmp_path / "absent.jsonl").read() == []


def test_the_training_watch_shows_each_epochs_loss_and_the_latest_validation(tmp_path):
    out = io.StringIO()
    watch = training_watch(tmp_path)
    with Display(out).stage("train", cycle=0, unit="epochs") as stage:
        report_epoch(tmp_path, epoch=1, epochs=4, loss=np.float32(1.5), seconds=0.1)
        report_epoch(tmp_path, epoch=2, epochs=4, loss=1.2, val_accuracy=0.61)
        report_epoch(tmp_path, epoch=3, epochs=4, loss=0.9)
        watch(stage)
        assert (stage.done, stage.total, stage.info) == (3, 4, "loss 0.900 · val 0.610")


def test_the_row_counter_counts_finished_parquet_files_and_follows_the_rename(tmp_path):
    partial, final = tmp_path / "scores.partial", tmp_path / "scores"
    partial.mkdir()
    pq.write_table(pa.table({"row": np.arange(16)}), partial / "part-0.parquet")
    (partial / "part-1.parquet").write_bytes(b"PAR1 not yet whole")
    counter = RowCounter(partial, final)
    assert counter() == 16
    pq.write_table(pa.table({"row": np.arange(8)}), partial / "part-1.parquet")
    partial.rename(final)
    assert counter() == 24
    with Display(io.StringIO()).stage("score", total=24, unit="rows") as stage:
        scoring_watch(RowCounter(final))(stage)
        assert stage.done == 24 and stage.info.endswith("rows/s")


@pytest.mark.parametrize("seconds, text", [(4.2, "4 s"), (119, "119 s"), (185, "3 min 05 s")])
def test_durations_read_as_a_person_would_say_them(seconds, text):
    assert duration_text(seconds) == text
