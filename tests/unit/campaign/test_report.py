"""report.html: built from a run directory made by hand (no Ray), read as HTML and in headless
Chromium (every section there, nothing requested beyond the file), rebuilt by `run.py report`;
then written by a real (in-process) campaign after every cycle, one that stops early."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import ARTIFACTS, make_shape_pool
from orchestrator.al.labels import LabelLedger, LabelRecord
from orchestrator.al.oracle import Query
from orchestrator.al.stopping import cohens_kappa
from orchestrator.campaign.files import write_metrics, write_selection
from orchestrator.campaign.loop import Campaign
from orchestrator.campaign.report import REPORT, build_report, write_report
from orchestrator.config import config_to_dict, load_config, save_config
from orchestrator.data.pool import read_volumes
from orchestrator.distributed.score import read_scores
from orchestrator.run import main

COUNTS = [6, 12, 18]  # labelled after each of three cycles


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Three trained cycles as the campaign leaves them: state, config, ledger, selections,
    metrics and learning curve, over a pool of balls, slabs and rods."""
    root = tmp_path_factory.mktemp("report")
    pool = make_shape_pool(root / "pool", n_train=30, n_val=6, n_test=9, box=16)
    run = root / "run"
    run.mkdir()
    cfg = load_config(None, [f"data.pool={pool.path}", f"budget.counts={COUNTS}", "strategy.name=entropy"])
    save_config(cfg, run / "config.yaml")
    ledger = LabelLedger(run / "labels.csv", known_ids=None, num_classes=3)
    cycles = []
    for c, (start, end) in enumerate(zip([0] + COUNTS, COUNTS)):
        rows = list(range(start, end))
        queries = [Query(r, f"train-{r:04d}", f"{pool.path}#row{r}", -1 if c == 0 else (r + c) % 3, 0.5)
                   for r in rows]
        write_selection(run / "cycles" / f"c{c:02d}" / "selection.csv", queries)
        ledger.append([LabelRecord(q.subtomo_id, -1 if r == 5 else r % 3, c, "simulated_oracle")
                       for q, r in zip(queries, rows)])  # row 5: junk
        accuracy = 0.5 + 0.15 * c
        cycles.append({
            "cycle": c, "labelled": end, "labelled_fraction": end / 30, "trained": True, "scored": True,
            "val_accuracy": accuracy + 0.02, "test_accuracy": accuracy, "classifier": "task",
            "per_class_accuracy": [accuracy, accuracy - 0.1, accuracy + 0.1],
            "confusion": [[2 + c, 1, 0], [1, 2, 0], [0, 1 - c // 2, 3]],
            "uncertainty": 0.8 - 0.2 * c, **({"agreement": 0.4 + 0.25 * c} if c else {}),
            "seconds_train": 30.0 + c, "seconds_score": 5.0, "seconds_select": 0.1,
        })
    state = {"config": config_to_dict(cfg), "schedule": COUNTS, "cycles": cycles, "done": True,
             "pool": pool.path}
    (run / "state.json").write_text(json.dumps(state))
    write_metrics(run, cycles, pool.class_names)
    write_report(run)
    return run


def table_rows(page: str, table_id: str) -> int:
    match = re.search(rf"<table id={table_id}>(.*?)</table>", page, flags=re.S)
    assert match, f"no table {table_id}"
    return match.group(1).split("<tbody>")[1].count("<tr>")


def test_the_report_has_a_row_per_cycle_and_each_section_a_person_reads(run_dir):
    page = (run_dir / REPORT).read_text()
    assert table_rows(page, "cycles") == 3
    assert table_rows(page, "per-class") == 3
    assert all(table_rows(page, f"confusion-{c}") == 3 for c in range(3))  # rows: true class
    assert table_rows(page, "class-mix") == 3 and table_rows(page, "times") == 3
    assert "Finished: 3 cycles trained." in page
    assert "strategy:\n  name: entropy" in page  # the configuration, as config.yaml says it
    assert "<td class=name>train 30, val 6, test 9</td>" in page  # the pool's splits


def test_the_class_mix_counts_each_cycles_labels_by_class_and_junk(run_dir):
    page = (run_dir / REPORT).read_text()
    body = re.search(r"<table id=class-mix>.*?<tbody>(.*?)</tbody>", page, flags=re.S).group(1)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in body.split("<tr>")[1:]]
    # cycle 0 labels rows 0-5 (row 5 junk): ball 0,3 · slab 1,4 · rod 2 · junk 5
    assert cells[0] == ["0", "6", "2", "2", "1", "1"]
    assert cells[1] == ["1", "6", "2", "2", "2", "0"]


def test_the_report_names_the_queried_subtomograms_with_their_labels_and_predictions(run_dir):
    page = (run_dir / REPORT).read_text()
    assert "train-0000 · labelled ball" in page
    assert "train-0005 · labelled junk" in page
    assert "train-0006 · labelled ball · model: slab (0.50)" in page  # cycle 1 predicted (6+1)%3


def test_a_later_report_shows_the_tiles_drawn_before_without_reading_the_pool_again(run_dir, tmp_path, monkeypatch):
    import shutil

    import orchestrator.campaign.report as report

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "cycles" / "c01" / "tiles")  # cycle 1's never drawn
    read = []

    def counting(path, rows):
        read.append(list(rows))
        return read_volumes(path, rows)

    monkeypatch.setattr(report, "read_volumes", counting)
    first = build_report(run)
    second = build_report(run)

    assert read == [list(range(6, 12))[:report.SAMPLE]]  # cycle 1's sample only, and once
    assert {p.name for p in (run / "cycles" / "c01" / "tiles").iterdir()} == {f"{r}.png" for r in range(6, 12)}
    def tiles(page):
        return re.findall(r'<img class="" alt="XY, XZ, YZ slices" src="([^"]+)"', page)

    assert len(tiles(first)) == 18 and tiles(first) == tiles(second)
    (run / "cycles" / "c00" / "tiles" / "3.png").write_bytes(b"cut short")  # not a PNG: drawn again
    assert tiles(build_report(run)) == tiles(second) and read[-1] == [3]


def test_a_delegating_strategy_says_which_base_strategy_chose_each_cycles_queries(run_dir, tmp_path):
    import shutil

    assert "id=choosers" not in (run_dir / REPORT).read_text()  # entropy chose all its own
    albl = tmp_path / "albl"
    shutil.copytree(run_dir, albl)
    state = json.loads((albl / "state.json").read_text())
    state["config"]["strategy"]["name"] = "albl"
    state["cycles"][0]["chosen_by"] = {"random": 6}  # the initial draw: not a bandit cycle
    state["cycles"][1].update(chosen_by={"random": 4, "entropy": 2}, selection_notes={
        "credit": {"random": 0.0, "entropy": 0.0}, "probabilities": {"random": 0.5, "entropy": 0.5}})
    state["cycles"][2].update(chosen_by={"random": 6}, selection_notes={
        "credit": {"random": 0.97, "entropy": 0.41}, "probabilities": {"random": 0.9, "entropy": 0.1}})
    (albl / "state.json").write_text(json.dumps(state))
    page = build_report(albl)
    assert table_rows(page, "choosers") == 2
    body = re.search(r"<table id=choosers>(.*?)</table>", page, flags=re.S).group(1)
    assert "<th>entropy</th><th>random</th>" in body
    assert "<td>0 · p 0.10 · credit 0.41</td><td>6 · p 0.90 · credit 0.97</td>" in body


def test_the_report_is_one_file_that_loads_with_no_request_leaving_it(run_dir, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    url = (run_dir / REPORT).as_uri()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    images = page.evaluate("() => [...document.images].map(i => i.naturalWidth)")
    tables = page.evaluate("() => [...document.querySelectorAll('table')].map(t => t.id)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.close()
    assert [r for r in requests if r != url and not r.startswith("data:")] == []
    assert len(images) == 4 + 3 * 6 and all(w > 0 for w in images)  # 4 plots, 6 queries a cycle
    assert {"cycles", "per-class", "confusion-2", "class-mix", "times", "pool"} <= set(tables)


def test_run_py_report_rebuilds_the_page_and_refuses_a_folder_that_is_no_run(run_dir, tmp_path, capsys):
    (run_dir / REPORT).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / REPORT)
    assert (run_dir / REPORT).read_text() .startswith("<!doctype html>")
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: not a run directory (no state.json)"


def test_text_from_the_run_reaches_the_page_as_text_never_as_markup(run_dir, tmp_path):
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    state = json.loads((run_dir / "state.json").read_text())
    state["config"]["name"] = "<script>alert(1)</script>"
    (hostile / "state.json").write_text(json.dumps(state))
    page = build_report(hostile)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# -- written by a campaign ------------------------------------------------------------------

TINY = [
    "model.width=4", "model.stem=small", "train.epochs=1", "train.min_steps=0", "train.batch_size=8",
    "train.num_workers=0", "score.batch_size=32", "score.actors=0", "budget.counts=[12, 18, 24, 30]",
]


@pytest.mark.ray
@pytest.mark.slow
def test_a_campaign_writes_the_report_every_cycle_and_stops_once_its_predictions_are_stable(
        ray_local, shape_pool, tmp_path):
    # κ ≥ −1 always holds: the rule is met at the first cycle that has a previous model
    cfg = load_config(None, TINY + [f"data.pool={shape_pool.path}", "budget.stop_when_stable=true",
                                    "budget.stable_kappa=-1", "budget.stable_cycles=1"])
    seen = []

    def on_cycle(record):
        page = (tmp_path / REPORT).read_text()
        seen.append((record["cycle"], table_rows(page, "cycles")))

    state = Campaign(cfg, tmp_path, shape_pool, on_cycle=on_cycle).run()

    assert seen == [(0, 1), (1, 2)]  # the report after each cycle, holding it
    assert state["stopped"]["cycle"] == 1 and state["done"]
    assert [c["labelled"] for c in state["cycles"]] == [12, 18]  # 24 and 30 never asked
    assert "Stopped early after cycle 1" in (tmp_path / REPORT).read_text()
    with open(tmp_path / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    assert metrics[0]["agreement"] == "" and float(metrics[1]["agreement"]) == pytest.approx(
        state["cycles"][1]["agreement"], abs=1e-4)
    assert all(0 <= float(m["uncertainty"]) <= 1 for m in metrics)

    # the agreement is κ between model 0's and model 1's predictions on the 42 rows unlabelled
    before, after = (read_scores(tmp_path / f"cycles/c0{c}/scores", ["row", "pred"]) for c in (0, 1))
    labelled = {int(sid.split("-")[1]) for sid in LabelLedger(tmp_path / "labels.csv", known_ids=None,
                                                               num_classes=3).current()}
    unlabelled = np.setdiff1d(np.arange(60), sorted(labelled))
    before_pred, after_pred = ({r: p for r, p in zip(t.column("row").to_pylist(), t.column("pred").to_pylist())}
                               for t in (before, after))
    both = [r for r in unlabelled if r in before_pred and r in after_pred]
    a, b = [before_pred[r] for r in both], [after_pred[r] for r in both]
    assert len(a) == state["cycles"][1]["unlabelled"] == 42
    assert state["cycles"][1]["agreement"] == pytest.approx(cohens_kappa(a, b, 3))
    assert (tmp_path / "predictions.parquet").is_file()  # predicted by model 1, where it stopped

