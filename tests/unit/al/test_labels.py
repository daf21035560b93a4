"""The label ledger: append-only, validated as a whole batch, atomic on disk, loud when damaged."""

import os
from datetime import datetime, timedelta

import numpy as np
import pytest

import orchestrator.al.labels as labels_module
from orchestrator.al.labels import JUNK, LabelLedger, LabelRecord, LedgerError

IDS = {"a", "b", "c", "d"}


def ledger(run_dir, num_classes=3):
    return LabelLedger(run_dir / "labels.csv", known_ids=IDS, num_classes=num_classes)


def rec(sid, label, cycle=1, source="person", **kwargs):
    return LabelRecord(sid, label, cycle, source, **kwargs)


def write_import(path, text):
    path.write_text(text)
    return path


# -- basics


def test_new_ledger_is_empty_and_creates_no_file_until_the_first_append(tmp_path):
    book = ledger(tmp_path)
    assert book.history() == []
    assert not (tmp_path / "labels.csv").exists()


def test_appended_labels_survive_reopening(tmp_path):
    ledger(tmp_path).append([rec("a", 0), rec("b", 2, source="simulated_oracle", annotator="oracle")])
    reopened = ledger(tmp_path)
    assert reopened.current() == {"a": 0, "b": 2}
    assert reopened.labelled_ids() == {"a", "b"}
    assert [(r.subtomo_id, r.source, r.annotator) for r in reopened.history()] == [
        ("a", "person", ""), ("b", "simulated_oracle", "oracle")
    ]


def test_a_run_directory_holds_its_ledger_as_labels_csv(tmp_path):
    LabelLedger(tmp_path, known_ids=IDS, num_classes=3).append([rec("a", 1)])
    assert (tmp_path / "labels.csv").read_text().splitlines()[0] == "subtomo_id,label,cycle,source,annotator,time"


def test_time_is_filled_with_now_in_utc(tmp_path):
    before = datetime.now().astimezone()
    ledger(tmp_path).append([rec("a", 0)])
    stamp = datetime.fromisoformat(ledger(tmp_path).history()[0].time)
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp - before) < timedelta(minutes=1)


def test_numpy_integers_are_accepted_as_labels(tmp_path):
    ledger(tmp_path).append([rec("a", np.int64(2), cycle=np.int32(0))])
    assert ledger(tmp_path).current() == {"a": 2}


def test_a_bool_is_not_a_label():
    with pytest.raises(TypeError, match="label must be an int"):
        rec("a", True)


def test_junk_is_a_label_that_marks_the_item_as_answered(tmp_path):
    ledger(tmp_path).append([rec("a", JUNK)])
    assert ledger(tmp_path).current() == {"a": JUNK}
    assert ledger(tmp_path).labelled_ids() == {"a"}


# -- refusals: nothing written


@pytest.mark.parametrize(
    "record, reason",
    [
        (rec("zz", 0), "unknown subtomo_id 'zz'"),
        (rec("a", 3), r"label 3 outside 0\.\.2"),
        (rec("a", -2), r"label -2 outside 0\.\.2"),
        (rec("a", 0, source="guess"), "source 'guess'"),
        (rec("a", 0, cycle=-1), "cycle -1 is negative"),
        (rec("a", 0, time="yesterday"), "not an ISO-8601 UTC time"),
        (rec("a", 0, time="2025-01-01T10:00:00+02:00"), "not an ISO-8601 UTC time"),
        (rec(" ", 0), "blank subtomo_id"),
    ],
)
def test_invalid_record_is_refused_and_nothing_is_written(tmp_path, record, reason):
    book = ledger(tmp_path)
    with pytest.raises(LedgerError, match=reason):
        book.append([rec("b", 1), record])
    assert ledger(tmp_path).history() == []
    assert book.history() == []


def test_every_problem_of_a_batch_is_reported_at_once(tmp_path):
    with pytest.raises(LedgerError) as caught:
        ledger(tmp_path).append([rec("zz", 0), rec("a", 1), rec("b", 9), rec("yy", 0)])
    assert [p.split(":")[0] for p in caught.value.problems] == ["record 1", "record 3", "record 4"]


def test_relabelling_to_a_different_class_is_refused_without_override(tmp_path):
    ledger(tmp_path).append([rec("a", 0)])
    with pytest.raises(LedgerError, match="'a' is already labelled 0; refusing 1"):
        ledger(tmp_path).append([rec("a", 1, cycle=2)])
    assert ledger(tmp_path).current() == {"a": 0}


def test_override_keeps_both_entries_and_the_latest_wins(tmp_path):
    ledger(tmp_path).append([rec("a", 0)])
    assert ledger(tmp_path).append([rec("a", JUNK, cycle=2)], override=True) == 1
    reopened = ledger(tmp_path)
    assert [(r.label, r.cycle) for r in reopened.history()] == [(0, 1), (JUNK, 2)]
    assert reopened.current() == {"a": JUNK}


def test_restating_an_identical_label_is_a_no_op(tmp_path):
    ledger(tmp_path).append([rec("a", 0)])
    assert ledger(tmp_path).append([rec("a", 0, cycle=5)]) == 0
    assert len(ledger(tmp_path).history()) == 1


def test_one_id_given_two_labels_in_one_batch_is_refused(tmp_path):
    with pytest.raises(LedgerError, match="'a' labelled 2 but record 1 labels it 0"):
        ledger(tmp_path).append([rec("a", 0), rec("b", 1), rec("a", 2)], override=True)
    assert ledger(tmp_path).history() == []


def test_one_id_given_the_same_label_twice_in_one_batch_is_written_once(tmp_path):
    assert ledger(tmp_path).append([rec("a", 1), rec("a", 1)]) == 1
    assert len(ledger(tmp_path).history()) == 1


# -- crashes and damage


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_crash_mid_write_leaves_the_previous_ledger_intact(tmp_path, monkeypatch, step):
    ledger(tmp_path).append([rec("a", 0), rec("b", 1)])
    before = (tmp_path / "labels.csv").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk pulled out")

    monkeypatch.setattr(labels_module.os, step, crash)
    with pytest.raises(OSError, match="disk pulled out"):
        ledger(tmp_path).append([rec("c", 2)])
    monkeypatch.undo()
    assert (tmp_path / "labels.csv").read_bytes() == before
    assert ledger(tmp_path).current() == {"a": 0, "b": 1}
    assert sorted(os.listdir(tmp_path)) == ["labels.csv"]  # the half-written temp file is gone


def test_a_stale_temp_file_from_a_killed_writer_is_ignored(tmp_path):
    ledger(tmp_path).append([rec("a", 0)])
    (tmp_path / ".labels.csv.abc123.tmp").write_text("subtomo_id,label,cycle,source,annotator,time\nb,1,1,per")
    book = ledger(tmp_path)
    assert book.current() == {"a": 0}
    book.append([rec("b", 2)])
    assert ledger(tmp_path).current() == {"a": 0, "b": 2}


def test_a_damaged_ledger_is_refused_naming_the_line(tmp_path):
    ledger(tmp_path).append([rec("a", 0), rec("b", 1), rec("c", 2)])
    lines = (tmp_path / "labels.csv").read_text().splitlines()
    lines[2] = "b,one,1,person,,2025-01-01T00:00:00Z"
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="line 3: label 'one'"):
        ledger(tmp_path)


def test_a_ledger_cut_short_mid_row_is_refused_naming_the_line(tmp_path):
    ledger(tmp_path).append([rec("a", 0), rec("b", 1)])
    text = (tmp_path / "labels.csv").read_text()
    (tmp_path / "labels.csv").write_text(text[: text.rindex("\n", 0, -1) + len("\nb,1,1,pe")])  # "b,1,1,pe": 4 fields
    with pytest.raises(LedgerError, match="line 3: 4 fields, expected 6"):
        ledger(tmp_path)


def test_a_ledger_written_by_another_writer_is_reread_before_appending(tmp_path):
    first, second = ledger(tmp_path), ledger(tmp_path)
    first.append([rec("a", 0)])
    with pytest.raises(LedgerError, match="already labelled 0"):
        second.append([rec("a", 1)])
    assert second.current() == {"a": 0}


# -- imports


def test_import_reads_indices_names_and_junk(tmp_path):
    path = write_import(tmp_path / "in.csv", "subtomo_id,label\na,1\nb,proteasome\nc,junk\nd,-1\n")
    n = ledger(tmp_path).import_labels(path, cycle=2, annotator="kim", class_names=["ribosome", "proteasome", "tric"])
    assert n == 4
    book = ledger(tmp_path)
    assert book.current() == {"a": 1, "b": 1, "c": JUNK, "d": JUNK}
    assert {(r.cycle, r.source, r.annotator) for r in book.history()} == {(2, "person", "kim")}


def test_import_refuses_a_class_name_without_class_names(tmp_path):
    path = write_import(tmp_path / "in.csv", "subtomo_id,label\na,ribosome\n")
    with pytest.raises(LedgerError, match="line 2: label 'ribosome' is not a class index"):
        ledger(tmp_path).import_labels(path, cycle=1)


def test_import_is_all_or_nothing_and_names_every_bad_line(tmp_path):
    path = write_import(
        tmp_path / "in.csv",
        "subtomo_id,label\n"
        "a,1\n"            # line 2: fine
        "b,1.5\n"          # line 3: non-integer
        ",2\n"             # line 4: blank id
        "c,1,extra\n"      # line 5: extra field
        "d\n"              # line 6: missing field
        "zz,0\n"           # line 7: unknown id
        "a,2\n",           # line 8: conflicts with line 2
    )
    with pytest.raises(LedgerError) as caught:
        ledger(tmp_path).import_labels(path, cycle=1)
    lines = [p.split(":")[0].rsplit(" ", 1)[-1] for p in caught.value.problems]
    assert sorted(lines, key=int) == ["3", "4", "5", "6", "7", "8"]
    assert "in.csv line 5: extra fields" in str(caught.value)
    assert not (tmp_path / "labels.csv").exists()


def test_import_without_a_label_column_is_refused(tmp_path):
    path = write_import(tmp_path / "in.csv", "subtomo_id,class\na,1\n")
    with pytest.raises(LedgerError, match="line 1: .*lacks column"):
        ledger(tmp_path).import_labels(path, cycle=1)


def test_import_conflicting_with_the_ledger_needs_override(tmp_path):
    ledger(tmp_path).append([rec("a", 0)])
    path = write_import(tmp_path / "in.csv", "subtomo_id,label\na,2\n")
    with pytest.raises(LedgerError, match="in.csv line 2: 'a' is already labelled 0"):
        ledger(tmp_path).import_labels(path, cycle=2)
    assert ledger(tmp_path).import_labels(path, cycle=2, override=True) == 1
    assert ledger(tmp_path).current() == {"a": 2}
