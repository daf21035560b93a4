"""The labelling page: its JSON API on a real server (ephemeral port, no browser), then a person's
whole cycle driven through headless Chromium. No Ray: runs are built by hand, as FileOracle
leaves them when it waits for a person."""

from __future__ import annotations

import csv
import http.client
import json
import os
import re
import shutil
import struct
import sys
import threading
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ARTIFACTS, make_shape_pool, shape_volume
from orchestrator.al.labels import LabelLedger, LabelRecord, LedgerError, parse_label
from orchestrator.al.oracle import FileOracle, Query, write_queries
from orchestrator.annotate.server import (
    AnnotateError, AnnotateServer, Annotator, main, parse_args, read_slices,
)
from orchestrator.campaign.rundir_lock import RunDirLock
from orchestrator.data.images import slice_views
from orchestrator.data.pool import PoolWriter, read_index, read_volumes

HOSTILE_IDS = ["<script>alert(1)</script>", "quo\"te's", "../../etc/passwd",
               "<img src=x onerror=alert(2)>", "a&amp;b\u00e9"]
HOSTILE_CLASSES = ["<b>ball</b>", "sl\"ab'", "../rod"]


# -- runs as FileOracle leaves them ------------------------------------------------------------


def make_hostile_pool(path: Path):
    rng = np.random.default_rng(1)
    ids = HOSTILE_IDS + [f"plain-{i}" for i in range(7)]
    with PoolWriter(path, 16, class_names=HOSTILE_CLASSES, shard_mb=0.05) as writer:
        for i, sid in enumerate(ids):
            writer.add(sid, shape_volume(i % 3, 16, rng), source="synthetic", label=i % 3, split="train")
    return writer.close()


def build_run(run_dir: Path, info, *, cycle: int, queried: list[str], earlier: list[str],
              predictions: bool) -> list[Query]:
    """A run waiting for a person at `cycle`: ledger labels for `earlier` (true classes), the
    cycle's query files, and (predictions) the previous cycle's scores with per-class probs."""
    index = read_index(info.path, ["row", "subtomo_id", "label"]).sort_by("row")
    row_of = {s: r for r, s in enumerate(index.column("subtomo_id").to_pylist())}
    truth = dict(zip(index.column("subtomo_id").to_pylist(), index.column("label").to_pylist()))
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text(json.dumps({"pool": info.path, "cycles": [], "done": False}))
    ledger = LabelLedger(run_dir, known_ids=set(row_of), num_classes=info.num_classes)
    ledger.append([LabelRecord(s, truth[s], 0, "initial") for s in earlier])
    probs = {}
    for k, sid in enumerate(queried):
        p = np.full(info.num_classes, 0.1, np.float32)
        p[(truth[sid] + (k == 1)) % info.num_classes] = 0.55 + 0.05 * k  # query 1: a wrong guess
        probs[sid] = p / p.sum()
    queries = [
        Query(row_of[s], s, f"{info.path}#row{row_of[s]}",
              int(probs[s].argmax()) if predictions else -1,
              float(probs[s].max()) if predictions else float("nan"))
        for s in queried
    ]
    write_queries(queries, run_dir / "cycles" / f"c{cycle:02d}" / "queries", info)
    if predictions:
        scores = run_dir / "cycles" / f"c{cycle - 1:02d}" / "scores"
        scores.mkdir(parents=True)
        table = pa.table({  # the storage Ray Data's tensor columns have in Parquet
            "row": pa.array([q.row for q in queries], pa.int64()),
            "probs": pa.array([probs[q.subtomo_id].tolist() for q in queries], pa.large_list(pa.float32())),
        })
        pq.write_table(table, scores / "part-00000.parquet")
    return queries


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        # FileOracle's per-query PNGs (matplotlib, ~0.3 s each) are for people; the page renders its own
        patch.setattr("orchestrator.al.oracle._write_slice_pngs", lambda *args: None)
        yield build_templates(tmp_path_factory.mktemp("annotate"))


def build_templates(root: Path):
    shapes = make_shape_pool(root / "shapes", n_train=15, n_val=0, n_test=0, box=32)
    hostile = make_hostile_pool(root / "hostile")
    ids = [f"train-{i:04d}" for i in range(12)]
    runs = {
        "shapes": (shapes, build_run(root / "shapes-run", shapes, cycle=1, queried=ids[:6],
                                     earlier=ids[6:], predictions=True)),
        "cycle0": (shapes, build_run(root / "cycle0-run", shapes, cycle=0, queried=ids[:9],
                                     earlier=[], predictions=False)),
        # one query already in the ledger, as after a partial labels.csv was imported
        "hostile": (hostile, build_run(root / "hostile-run", hostile, cycle=1,
                                       queried=HOSTILE_IDS + ["plain-0"],
                                       earlier=["plain-0", "plain-1", "plain-2", "plain-3"],
                                       predictions=True)),
    }
    return root, runs


@pytest.fixture
def make(templates, tmp_path):
    """make(name) -> (run_dir, pool info, queries): a fresh copy of a template run."""
    root, runs = templates

    def copy(name: str):
        run_dir = tmp_path / name
        shutil.copytree(root / f"{name}-run", run_dir)
        info, queries = runs[name]
        return run_dir, info, queries

    return copy


@contextmanager
def serving(run_dir: Path, **options):
    app = Annotator(run_dir, **options)
    server = AnnotateServer(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        app.close()
        thread.join(5)


def call(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    with closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)) as conn:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()


def post(server, path: str, payload) -> tuple[int, dict]:
    status, _, data = call(server, "POST", path, json.dumps(payload).encode(),
                           {"Content-Type": "application/json"})
    return status, json.loads(data)


def state(server) -> dict:
    status, _, data = call(server, "GET", "/api/state")
    assert status == 200
    return json.loads(data)


def draft_rows(run_dir: Path, cycle: int = 1) -> list[list[str]]:
    path = run_dir / "cycles" / f"c{cycle:02d}" / "queries" / "labels.csv"
    with open(path, newline="") as f:
        return list(csv.reader(f))


# -- the API -----------------------------------------------------------------------------------


def test_the_waiting_cycle_is_served_grouped_by_predicted_class_with_its_top3(make):
    run_dir, info, queries = make("shapes")
    with serving(run_dir) as server:
        s = state(server)
    assert (s["cycle"], s["total"], s["labelled"]) == (1, 6, 0)
    top1 = [q["top3"][0]["class"] for q in s["queries"]]
    assert top1 == sorted(top1)
    assert [q["group"] for q in s["queries"]] == [f"predicted {info.class_names[c]}" for c in top1]
    asked = {q.subtomo_id: q for q in queries}
    for q in s["queries"]:
        probs = [t["prob"] for t in q["top3"]]
        assert probs == sorted(probs, reverse=True)
        assert q["top3"][0]["class"] == asked[q["subtomo_id"]].pred
    assert [c["key"] for c in s["classes"]] == ["1", "2", "3"]


def test_cycle_0_has_no_predictions_and_groups_look_alike_subtomograms(make):
    run_dir, _, queries = make("cycle0")
    with serving(run_dir) as server:
        s = state(server)
    assert s["cycle"] == 0 and all(q["top3"] == [] for q in s["queries"])
    truth = {q.subtomo_id: int(q.subtomo_id[-4:]) % 3 for q in queries}  # make_shape_pool: i % 3
    groups: dict[str, set[int]] = {}
    for q in s["queries"]:
        groups.setdefault(q["group"], set()).add(truth[q["subtomo_id"]])
    assert sorted(map(sorted, groups.values())) == [[0], [1], [2]]


def test_an_answer_is_saved_to_the_labels_file_that_resume_imports_and_survives_a_restart(make):
    run_dir, info, queries = make("shapes")
    a, b, c = (q.subtomo_id for q in queries[:3])
    with serving(run_dir) as server:
        assert post(server, "/api/label", {"subtomo_id": a, "label": 2, "expect": None})[0] == 200
        assert post(server, "/api/label", {"subtomo_id": b, "label": "junk", "expect": None})[0] == 200
        status, s = post(server, "/api/label", {"subtomo_id": c, "label": "unsure", "expect": None})
    assert status == 200 and (s["labelled"], s["unsure"]) == (2, 1)
    assert draft_rows(run_dir) == [["subtomo_id", "label"], [a, "rod"], [b, "junk"]]
    with serving(run_dir) as server:  # a reload, even of the server, loses nothing
        answers = {q["subtomo_id"]: q["label"] for q in state(server)["queries"]}
    assert (answers[a], answers[b], answers[c]) == (2, "junk", "unsure")


def test_undo_clears_an_answer_and_relabelling_needs_the_answer_the_page_saw(make):
    run_dir, _, queries = make("shapes")
    a = queries[0].subtomo_id
    with serving(run_dir) as server:
        post(server, "/api/label", {"subtomo_id": a, "label": 0, "expect": None})
        assert post(server, "/api/label", {"subtomo_id": a, "label": 1, "expect": 0})[0] == 200
        stale, answer = post(server, "/api/label", {"subtomo_id": a, "label": 2, "expect": 0})
        assert stale == 409 and "now 'slab'" in answer["error"]
        assert post(server, "/api/label", {"subtomo_id": a, "label": 1, "expect": 0})[0] == 200  # already so
        assert post(server, "/api/label", {"subtomo_id": a, "label": None, "expect": 1})[0] == 200
    assert draft_rows(run_dir) == [["subtomo_id", "label"]]


def test_unknown_ids_bad_classes_and_ledger_conflicts_are_refused_with_a_message(make):
    run_dir, _, _ = make("hostile")
    ledger_before = (run_dir / "labels.csv").read_bytes()
    refused = [
        ({"subtomo_id": "plain-6", "label": 0}, 422, "not a query of cycle 1"),
        ({"subtomo_id": "nope", "label": 0}, 422, "unknown subtomo_id 'nope'"),
        ({"subtomo_id": "../../etc/passwd", "label": 3}, 422, "label 3 is not a class"),
        ({"subtomo_id": "../../etc/passwd", "label": True}, 400, "label must be"),
        ({"subtomo_id": "../../etc/passwd", "label": "ball"}, 400, "label must be"),
        ({"subtomo_id": ["x"], "label": 0}, 400, "subtomo_id must be a string"),
        ({"subtomo_id": "plain-0", "label": 1, "expect": 0}, 422, "already labelled"),
        ({"subtomo_id": "../../etc/passwd", "label": 1, "cycle": 7}, 409, "reload"),
    ]
    with serving(run_dir) as server:
        for payload, status, words in refused:
            got, answer = post(server, "/api/label", payload)
            assert (got, words in answer["error"]) == (status, True), answer
        assert state(server)["labelled"] == 1  # plain-0, from the ledger
    assert not (run_dir / "cycles" / "c01" / "queries" / "labels.csv").exists()
    assert (run_dir / "labels.csv").read_bytes() == ledger_before


@pytest.mark.parametrize("body, headers, status", [
    (b"{" + b" " * (70 * 1024) + b"}", {"Content-Type": "application/json"}, 413),
    (b'{"subtomo_id": ', {"Content-Type": "application/json"}, 400),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400),
    (b'{"subtomo_id": "\xff"}', {"Content-Type": "application/json"}, 400),
    (b'{"subtomo_id": "plain-1", "label": 0}', {"Content-Type": "text/plain"}, 415),
    (b'{"subtomo_id": "plain-1", "label": 0}', {"Content-Type": "application/json",
                                                "Origin": "http://evil.example"}, 403),
    (b'{"subtomo_id": "plain-1", "label": 0}', {"Content-Type": "application/json",
                                                "Host": "evil.example:8765"}, 403),
])
def test_oversized_malformed_and_foreign_posts_are_refused_and_change_nothing(make, body, headers, status):
    run_dir, _, _ = make("hostile")
    with serving(run_dir) as server:
        got, _, data = call(server, "POST", "/api/label", body, headers)
        after = state(server)
    assert (got, "error" in json.loads(data)) == (status, True)
    assert after["labelled"] == 1
    assert not (run_dir / "cycles" / "c01" / "queries" / "labels.csv").exists()


def test_no_request_can_name_a_file(make):
    run_dir, _, _ = make("hostile")
    with serving(run_dir) as server:
        for path, status in [("/../../etc/passwd", 404), ("/api/slices/../../labels.csv", 404),
                             ("/api/slices/%2e%2e%2flabels.csv", 404), ("/api/slices/99.png", 404),
                             ("/api/slices/0.png?view=../x", 400), ("/labels.csv", 404),
                             ("/cycles/c01/queries/queries.csv", 404)]:
            assert call(server, "GET", path)[0] == status, path


def test_hostile_ids_and_class_names_travel_as_data_never_as_markup(make):
    run_dir, info, _ = make("hostile")
    with serving(run_dir) as server:
        status, headers, page = call(server, "GET", "/")
        s = state(server)
        for sid in HOSTILE_IDS:
            assert post(server, "/api/label", {"subtomo_id": sid, "label": 1, "expect": None})[0] == 200
    assert status == 200 and "unsafe-inline" not in headers["Content-Security-Policy"]
    assert not any(name.encode() in page for name in HOSTILE_IDS + HOSTILE_CLASSES)  # data is never templated
    assert {q["subtomo_id"] for q in s["queries"]} == set(HOSTILE_IDS) | {"plain-0"}
    assert [c["name"] for c in s["classes"]] == HOSTILE_CLASSES
    ledger = LabelLedger(run_dir, known_ids=None, num_classes=3)
    ledger.import_labels(run_dir / "cycles/c01/queries/labels.csv", cycle=1, class_names=HOSTILE_CLASSES)
    assert {s: ledger.current()[s] for s in HOSTILE_IDS} == {s: 1 for s in HOSTILE_IDS}


def test_two_tabs_answering_at_once_keep_every_answer_and_never_overwrite_each_other(make):
    run_dir, info, queries = make("shapes")
    ids = [q.subtomo_id for q in queries]
    results: dict[str, list[int]] = {"left": [], "right": []}
    with serving(run_dir) as server:
        def tab(name: str, mine: list[str], label: int):
            for sid in mine + [ids[-1]]:  # both answer the last query, each without seeing the other
                results[name].append(post(server, "/api/label", {"subtomo_id": sid, "label": label})[0])

        tabs = [threading.Thread(target=tab, args=("left", ids[0:5:2], 0)),
                threading.Thread(target=tab, args=("right", ids[1:5:2], 1))]
        for t in tabs:
            t.start()
        for t in tabs:
            t.join()
    assert sorted(results["left"][-1:] + results["right"][-1:]) == [200, 409]
    assert results["left"][:-1] + results["right"][:-1] == [200] * 5
    rows = dict(draft_rows(run_dir)[1:])
    expected = {sid: "ball" if i % 2 == 0 else "slab" for i, sid in enumerate(ids[:5])}
    assert {sid: rows[sid] for sid in ids[:5]} == expected
    assert rows[ids[-1]] in ("ball", "slab")


def test_finish_checks_the_labels_as_resume_will_import_them_and_says_how_to_continue(make):
    run_dir, _, queries = make("shapes")
    with serving(run_dir) as server:
        early, answer = post(server, "/api/finish", {})
        assert early == 409 and "6 of 6 queries are still unanswered" in answer["error"]
        for q in queries:
            post(server, "/api/label", {"subtomo_id": q.subtomo_id, "label": "junk", "expect": None})
        status, s = post(server, "/api/finish", {})
    assert (status, s["complete"], s["checked"]) == (200, True, True)
    assert s["resume_command"] == f"python orchestrator/run.py --resume {run_dir}"
    assert s["resume"]["state"] == "idle"  # without --continue the person runs it


FAKE_RESUME = """
import shutil, sys
from orchestrator.al.labels import LabelLedger
from orchestrator.campaign.rundir_lock import lock_run_dir
run, nxt = sys.argv[1], sys.argv[2]
lock = lock_run_dir(run)  # as run.py does: the page hands its lock over, so this is not refused
LabelLedger(run, known_ids=None, num_classes=3).import_labels(
    run + "/cycles/c01/queries/labels.csv", cycle=1, class_names=["ball", "slab", "rod"])
shutil.copytree(nxt, run + "/cycles/c02/queries")
print("cycle 2: 3 subtomograms to label")
"""


@pytest.mark.slow  # runs the resume as a subprocess
def test_continue_runs_the_resume_and_then_serves_the_next_cycle(make, tmp_path):
    run_dir, info, queries = make("shapes")
    following = tmp_path / "next-queries"
    write_queries([Query(r, f"train-{r:04d}", "synthetic") for r in (12, 13, 14)], following, info)
    command = [sys.executable, "-c", FAKE_RESUME, str(run_dir), str(following)]
    with serving(run_dir, continue_campaign=True, command=command) as server:
        for q in queries:
            post(server, "/api/label", {"subtomo_id": q.subtomo_id, "label": 0, "expect": None})
        status, s = post(server, "/api/finish", {})
        assert (status, s["resume"]["state"]) == (200, "running")
        for _ in range(400):
            s = state(server)
            if s["resume"]["state"] != "running":
                break
            threading.Event().wait(0.05)
    assert s["resume"]["state"] == "done", s["resume"]
    assert "now waits for cycle 2" in s["resume"]["message"]
    assert (s["cycle"], s["total"], s["labelled"]) == (2, 3, 0)


def test_slices_and_class_references_are_pngs_of_the_box(make):
    run_dir, info, _ = make("shapes")
    with serving(run_dir) as server:
        images = {}
        for path in ("/api/slices/0.png?view=xy", "/api/slices/0.png?view=yz&avg=1",
                     "/api/reference/2.png?view=xz&cycle=1"):
            status, headers, data = call(server, "GET", path)
            assert (status, headers["Content-Type"], data[:8]) == (200, "image/png", b"\x89PNG\r\n\x1a\n")
            images[path] = struct.unpack(">II", data[16:24])
        assert call(server, "GET", "/api/reference/3.png")[0] == 404
        assert call(server, "GET", "/api/slices/0.png?cycle=0")[0] == 404  # not the cycle shown
    assert set(images.values()) == {(32, 32)}


def test_slices_are_read_from_every_shard_as_the_campaign_reads_volumes(templates):
    _, runs = templates
    info = runs["shapes"][0]
    assert len(info.shards) > 1  # rows in several shards and row groups
    rows = [info.n_rows - 1, 0, 7]
    slices = read_slices(info, rows)
    assert sorted(slices) == sorted(rows)
    for row, volume in zip(rows, read_volumes(info.path, rows)):
        expected = slice_views(volume)
        assert all(np.array_equal(slices[row][view], expected[view]) for view in expected)


def test_slices_of_a_row_the_pool_lacks_are_refused_naming_it(templates):
    info = templates[1]["shapes"][0]
    with pytest.raises(AnnotateError, match=rf"row {info.n_rows + 3} is not in the pool"):
        read_slices(info, [0, info.n_rows + 3])


def test_a_second_server_on_the_same_run_is_refused(make):
    run_dir, _, _ = make("shapes")
    with serving(run_dir):
        with pytest.raises(AnnotateError, match=rf"in use by the labelling page \(pid {os.getpid()} on "):
            Annotator(run_dir)


def test_a_page_is_refused_while_a_campaign_holds_the_run_directory(make):
    run_dir, _, _ = make("shapes")
    with RunDirLock(run_dir, "a campaign"):
        with pytest.raises(AnnotateError, match=r"in use by a campaign \(pid \d+ on .*since"):
            Annotator(run_dir)
    Annotator(run_dir).close()  # and welcome once it is gone


def test_a_damaged_labels_file_is_reported_not_overwritten(make):
    run_dir, _, _ = make("shapes")
    draft = run_dir / "cycles/c01/queries/labels.csv"
    draft.write_text("subtomo_id,label\ntrain-0000,ball\ntrain-0001,blob\n")
    with pytest.raises(AnnotateError, match="line 3: label 'blob'"):
        Annotator(run_dir)
    assert draft.read_text().endswith("train-0001,blob\n")


def test_the_command_line_binds_localhost_by_default_and_explains_what_it_cannot_serve(
        make, tmp_path, capsys):
    args = parse_args(["runs/x"])
    assert (args.host, args.port, args.continue_campaign) == ("127.0.0.1", 8765, False)
    from orchestrator.run import main as run_main

    assert run_main(["annotate", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    run_dir, info, queries = make("shapes")
    LabelLedger(run_dir, known_ids=None, num_classes=3).append(
        [LabelRecord(q.subtomo_id, 0, 1, "person") for q in queries])
    assert main([str(run_dir)]) == 1
    assert f"--resume {run_dir}" in capsys.readouterr().out


def test_ledger_check_reports_what_append_would_refuse_and_writes_nothing(tmp_path):
    ledger = LabelLedger(tmp_path, known_ids={"a", "b", " c"}, num_classes=2)
    ledger.append([LabelRecord("a", 0, 0, "initial")])
    batch = [LabelRecord("a", 1, 1, "person"), LabelRecord("zz", 0, 1, "person"),
             LabelRecord(" c", 0, 1, "person"), LabelRecord("b", 5, 1, "person")]
    problems = ledger.check(batch)
    with pytest.raises(LedgerError) as refused:
        ledger.append(batch)
    assert problems == refused.value.problems and len(problems) == 4
    assert (ledger.check([LabelRecord("b", -1, 1, "person")]), len(ledger)) == ([], 1)


@pytest.mark.parametrize("text, label", [("junk", -1), (" Slab ", 1), ("0", 0), ("-1", -1), ("rod", None)])
def test_parse_label_reads_a_cell_as_the_import_does(text, label):
    assert parse_label(text, ["ball", "slab"]) == label


# A resume that takes its time: its training stage (progress.json, as run.py's display writes
# it) lasts until the test creates the file `go`; then it opens cycle 2.
SLOW_RESUME = FAKE_RESUME.replace('shutil.copytree(', """from orchestrator.campaign.progress import STATUS, Display
import time
from pathlib import Path
with Display(open(os.devnull, "w"), status_path=Path(run) / STATUS).stage(
        "train", cycle=1, total=40, unit="epochs") as stage:
    stage.update(done=12, info="loss 0.612 · val 0.781")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
shutil.copytree(""").replace("import shutil, sys", "import os, shutil, sys")


def test_the_page_shows_the_retraining_then_the_next_queries_and_how_long_they_took(make, browser,
                                                                                   tmp_path):
    run_dir, info, queries = make("shapes")
    following, go = tmp_path / "next-queries", tmp_path / "go"
    write_queries([Query(r, f"train-{r:04d}", "synthetic") for r in (12, 13, 14)], following, info)
    command = [sys.executable, "-c", SLOW_RESUME, str(run_dir), str(following), str(go)]
    with serving(run_dir, continue_campaign=True, command=command) as server:
        for q in queries:
            post(server, "/api/label", {"subtomo_id": q.subtomo_id, "label": 0, "expect": None})
        page = browser.new_page()
        page.goto(server.url)
        wait_progress(page, "6 of 6 labelled")
        page.click("#finish")
        page.wait_for_function("() => document.getElementById('retrain-text').textContent"
                               ".startsWith('cycle 1 · train · 12/40 epochs · loss 0.612 · val 0.781')",
                               timeout=20_000)
        assert page.is_visible("#retrain-bar") and "waiting" in page.text_content("#retrain-text")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "annotate-retraining.png"))
        go.touch()
        wait_progress(page, "0 of 3 labelled")  # cycle 2, with no reload
        done_text = page.text_content("#done-text")
        page.close()
    assert re.search(r"now waits for cycle 2: its queries were ready \d+ s after you pressed Finish",
                     done_text), done_text


# -- a person in a browser -------------------------------------------------------------------


def wait_progress(page, text: str) -> None:
    page.wait_for_function("t => document.getElementById('progress').textContent === t", arg=text,
                           timeout=10_000)


def test_a_person_labels_a_whole_cycle_in_the_browser_and_the_campaign_resumes_from_it(make, browser):
    run_dir, info, queries = make("shapes")
    given: dict[str, int] = {}
    with serving(run_dir) as server:
        page = browser.new_page(viewport={"width": 1180, "height": 860})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.url)
        wait_progress(page, "0 of 6 labelled")

        def shown() -> str:
            return page.text_content("#qid")

        def truth() -> int:  # the person knows a ball from a rod (make_shape_pool: class i % 3)
            return int(shown()[-4:]) % 3

        def label(how: str) -> None:
            """Give the shown query its true class, by its key or by clicking its button."""
            sid, c = shown(), truth()
            if how == "key":
                page.keyboard.press(str(c + 1))
            else:
                page.click(f"#classes button >> nth={c}")
            given[sid] = c

        label("key")
        wait_progress(page, "1 of 6 labelled")
        label("click")
        wait_progress(page, "2 of 6 labelled")
        given[shown()] = -1
        page.keyboard.press("j")  # junk
        wait_progress(page, "3 of 6 labelled")
        unsure = shown()
        page.click("#unsure")  # stays unanswered
        wait_progress(page, "3 of 6 labelled · 1 unsure")
        label("key")
        wait_progress(page, "4 of 6 labelled · 1 unsure")
        mistake = shown()
        page.click("#junk")  # a slip...
        wait_progress(page, "5 of 6 labelled · 1 unsure")
        page.keyboard.press("z")  # ...undone
        wait_progress(page, "4 of 6 labelled · 1 unsure")
        assert shown() == mistake
        label("key")
        wait_progress(page, "5 of 6 labelled · 1 unsure")

        page.reload()  # nothing is lost
        wait_progress(page, "5 of 6 labelled · 1 unsure")
        assert (shown(), page.is_enabled("#undo")) == (unsure, True)  # undo survives too
        page.keyboard.press("r")  # the reference view
        page.wait_for_selector("#refs img")
        ARTIFACTS.mkdir(exist_ok=True)
        page.wait_for_function("() => [...document.images].every(i => i.complete)")
        page.screenshot(path=str(ARTIFACTS / "annotate.png"), full_page=True)
        label("click")
        wait_progress(page, "6 of 6 labelled")
        assert page.is_visible("#done") and f"--resume {run_dir}" in page.text_content("#done-command")
        page.click("#finish")
        page.wait_for_function("() => document.getElementById('message').textContent.includes('checked')")
        page.screenshot(path=str(ARTIFACTS / "annotate-finished.png"))
        page.close()
    assert errors == []

    ledger = LabelLedger(run_dir, known_ids=None, num_classes=info.num_classes)
    before = len(ledger)
    assert FileOracle(info).answer(queries, 1, ledger, run_dir) == 6  # what --resume does
    assert {r.subtomo_id: r.label for r in ledger.history()[before:]} == given
    assert len(ledger) == before + 6  # the undone junk never reached the ledger


def test_hostile_ids_and_class_names_render_as_text_in_the_browser(make, browser):
    run_dir, _, _ = make("hostile")
    with serving(run_dir) as server:
        page = browser.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(server.url)
        wait_progress(page, "1 of 6 labelled")
        seen = set()
        for _ in range(6):
            seen.add(page.text_content("#qid"))
            page.keyboard.press("ArrowRight")
        buttons = page.eval_on_selector_all("#classes button", "bs => bs.map(b => b.textContent)")
        injected = page.evaluate("""() => [document.scripts.length,
            document.querySelectorAll('img[src="x"], #classes b, #queue script').length]""")
        target = HOSTILE_IDS[0]
        while page.text_content("#qid") != target:
            page.keyboard.press("ArrowRight")
        page.click("#classes button >> nth=2")
        wait_progress(page, "2 of 6 labelled")
        page.close()
    assert seen == set(HOSTILE_IDS) | {"plain-0"}
    assert buttons == [f"{k} {name}" for k, name in zip("123", HOSTILE_CLASSES)]
    assert (injected, dialogs) == ([1, 0], [])
    assert [target, "../rod"] in draft_rows(run_dir)
