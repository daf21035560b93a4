"""`RUN_DIR/report.html`: one page to read a campaign by, rewritten after every cycle.

    python orchestrator/run.py report RUN_DIR      # rebuild it from the run directory

Self-contained: the plots are PNGs inside the file (data: URIs), the style is inline, there is no
script, and a Content-Security-Policy lets the page load nothing else. It opens the same from a
laptop, a cluster's shared disk or a mail attachment, and sends no request anywhere.

Built from the run directory alone (state.json, config.yaml, labels.csv, each cycle's
selection.csv, learning_curve.png) and the pool (class names, splits, the queried volumes).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.al.labels import JUNK, LabelLedger
from orchestrator.campaign.metrics import number_text
from orchestrator.data.images import slice_views, to_png
from orchestrator.data.pool import PoolError, PoolInfo, atomic_write_text, open_pool, read_index, read_volumes

REPORT = "report.html"
SAMPLE = 8  # queried subtomograms shown per cycle: the first of its selection (highest ranked)
TILES = "tiles"  # in a cycle's folder: its sampled queries' tiles, drawn by the first report showing them
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2430; margin: 0 auto; max-width: 1180px; padding: 18px 24px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d9dee7; }
.muted { color: #667085; } .status { padding: 8px 12px; background: #eef4ff; border-radius: 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d9dee7; padding: 3px 8px; text-align: right; }
th { background: #f5f7fa; } td.name, th.name { text-align: left; }
img.plot { max-width: 100%; border: 1px solid #eef0f4; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; font-size: 12px; max-width: 300px; }
figure img { height: 96px; image-rendering: pixelated; background: #000; display: block; }
details { margin: 4px 0; } summary { cursor: pointer; } pre { background: #f5f7fa; padding: 8px; overflow-x: auto; }
"""


@dataclass
class Run:
    """What the report is made of, read once."""

    run_dir: Path
    state: dict
    config_text: str
    info: PoolInfo | None
    pool_error: str
    labels: dict[str, int]  # the ledger's current label of each id
    cycle_of: dict[str, int]  # the cycle each id was first labelled in
    selections: dict[int, list[dict]] = field(default_factory=dict)  # cycle -> selection.csv rows

    @property
    def cycles(self) -> list[dict]:
        return [c for c in self.state.get("cycles", []) if c.get("trained")]

    @property
    def class_names(self) -> list[str]:
        if self.info is not None:
            return list(self.info.class_names)
        confusion = next((c["confusion"] for c in self.cycles if c.get("confusion")), [])
        return [str(i) for i in range(len(confusion))]


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / REPORT
    atomic_write_text(path, build_report(run_dir))
    return path


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    info, pool_error = None, ""
    try:
        info = open_pool(state.get("pool") or run_dir / "pool")
    except (PoolError, OSError) as err:
        pool_error = str(err)
    ledger = LabelLedger(run_dir / "labels.csv", known_ids=None,
                         num_classes=info.num_classes if info else 10**6)
    cycle_of: dict[str, int] = {}
    for record in ledger.history():
        cycle_of.setdefault(record.subtomo_id, record.cycle)
    run = Run(run_dir, state, config_text, info, pool_error, ledger.current(), cycle_of)
    for number in range(len(state.get("cycles", []))):
        path = run_dir / "cycles" / f"c{number:02d}" / "selection.csv"
        if path.is_file():
            with open(path, newline="") as f:
                run.selections[number] = list(csv.DictReader(f))
    return run


def build_report(run_dir: str | Path) -> str:
    run = load_run(run_dir)
    name = run.state.get("config", {}).get("name", run.run_dir.name)
    sections = [
        f"<h1>cryoal campaign {_e(name)}</h1>",
        f"<p class=muted>{_e(str(run.run_dir.resolve()))} · "
        f"written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        f"<p class=status id=status>{_e(status_text(run))}</p>",
        summary_section(run), curve_section(run), per_class_section(run), confusion_section(run),
        queries_section(run), choosers_section(run), time_section(run), setup_section(run),
    ]
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>cryoal · {_e(name)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(sections) + "</body></html>")


# -- sections --------------------------------------------------------------------------------


def status_text(run: Run) -> str:
    state, trained = run.state, run.cycles
    planned = len(state.get("schedule", [])) or len(state.get("cycles", []))
    stopped = state.get("stopped")
    if state.get("done"):
        text = f"Finished: {len(trained)} cycles trained."
        if stopped:
            text += f" Stopped early after cycle {stopped['cycle']}: {stopped['reason']}."
        return text
    text = f"In progress: {len(trained)} of {planned} cycles trained."
    waiting = len(trained)
    if (run.run_dir / "cycles" / f"c{waiting:02d}" / "queries" / "queries.csv").is_file():
        text += f" Cycle {waiting}'s queries wait for a person's labels."
    return text


def summary_section(run: Run) -> str:
    headers = ["cycle", "labelled", "% of train", "val acc", "test acc", "classifier",
               "agreement κ", "uncertainty"]
    rows = [[c["cycle"], c.get("labelled", ""), _pct(c.get("labelled_fraction")),
             number_text(c.get("val_accuracy")), number_text(c.get("test_accuracy")),
             c.get("classifier", ""), number_text(c.get("agreement")), number_text(c.get("uncertainty"))]
            for c in run.cycles]
    return ("<h2>Cycles</h2><p class=muted>Agreement κ: Cohen's kappa between this cycle's and the "
            "previous cycle's predictions on the train subtomograms still unlabelled after this "
            "cycle's labels; uncertainty: their mean entropy over log(classes). Both from the "
            "scoring pass of this cycle's model.</p>" + _table(headers, rows, id="cycles"))


def curve_section(run: Run) -> str:
    parts = ["<h2>Learning curve</h2>"]
    curve = run.run_dir / "learning_curve.png"
    if curve.is_file():
        parts.append(_img(curve.read_bytes(), "test and validation accuracy per cycle"))
    if any(c.get("uncertainty") is not None for c in run.cycles):
        parts.append(_img(stability_plot(run), "agreement and uncertainty per cycle"))
    return "".join(parts) if len(parts) > 1 else ""


def per_class_section(run: Run) -> str:
    names = run.class_names
    rows = [[c["cycle"]] + [_shaded(a) for a in c.get("per_class_accuracy", [])]
            for c in run.cycles if c.get("per_class_accuracy")]
    if not rows:
        return ""
    return ("<h2>Per-class accuracy (test split)</h2>"
            + _table(["cycle"] + names, rows, id="per-class"))


def confusion_section(run: Run) -> str:
    names = run.class_names
    with_matrix = [c for c in run.cycles if c.get("confusion")]
    if not with_matrix:
        return ""
    parts = ["<h2>Confusion matrices (test split; rows: true class, columns: predicted)</h2>"]
    for c in with_matrix:
        open_ = " open" if c is with_matrix[-1] else ""
        parts.append(f"<details{open_}><summary>cycle {c['cycle']}</summary>"
                     f"{confusion_table(c['confusion'], names, c['cycle'])}</details>")
    return "".join(parts)


def confusion_table(matrix: list[list[int]], names: list[str], cycle: int) -> str:
    rows = []
    for i, counts in enumerate(matrix):
        total = sum(counts) or 1
        rows.append([_Name(names[i] if i < len(names) else str(i))]
                    + [_shaded(n / total, str(n)) for n in counts])
    return _table(["true \\ predicted"] + names[:len(matrix)], rows, id=f"confusion-{cycle}")


def queries_section(run: Run) -> str:
    names = run.class_names
    mix = class_mix(run)
    if not mix:
        return ""
    headers = ["cycle", "labelled"] + names + ["junk"]
    rows = [[c, sum(counts.values())] + [counts.get(k, 0) for k in range(len(names))]
            + [counts.get(JUNK, 0)] for c, counts in sorted(mix.items())]
    parts = ["<h2>Queries: the classes each cycle's labels turned out to be</h2>",
             _img(class_mix_plot(mix, names), "class mix of each cycle's queries"),
             _table(headers, rows, id="class-mix"), query_tiles(run)]
    return "".join(parts)


def choosers_section(run: Run) -> str:
    """For a strategy that delegates (albl): which base strategy chose how many of each
    cycle's queries, with the probability and credit it had then (the cycle's selection notes)."""
    records = [c for c in run.state.get("cycles", []) if c.get("cycle", 0) > 0 and c.get("chosen_by")]
    own = run.state.get("config", {}).get("strategy", {}).get("name")
    arms = sorted({arm for c in records for arm in c["chosen_by"]} | {
        arm for c in records for arm in c.get("selection_notes", {}).get("probabilities", {})})
    if not records or arms == [own]:
        return ""

    def cell(record: dict, arm: str) -> str:
        notes = record.get("selection_notes", {})
        text = str(record["chosen_by"].get(arm, 0))
        if arm in notes.get("probabilities", {}):
            text += f" · p {notes['probabilities'][arm]:.2f}"
        if arm in notes.get("credit", {}):
            text += f" · credit {notes['credit'][arm]:.2f}"
        return text

    rows = [[c["cycle"]] + [cell(c, arm) for arm in arms] for c in records]
    return ("<h2>Which strategy chose the queries</h2><p class=muted>Queries each base strategy "
            "chose per cycle; p: the probability it had of choosing each query, credit: what it "
            "was credited with before the cycle (docs/ARCHITECTURE.md, albl).</p>"
            + _table(["cycle"] + arms, rows, id="choosers"))


def query_tiles(run: Run) -> str:
    """Central XY/XZ/YZ slices of each cycle's first queries, with the label they got and
    (after cycle 0) what the model predicted when it chose them."""
    if run.info is None:
        return f"<p class=muted>No slices: the pool cannot be opened ({_e(run.pool_error)}).</p>"
    sample = {c: rows[:SAMPLE] for c, rows in sorted(run.selections.items()) if rows}
    try:
        tiles = tile_pngs(run, sample)
    except (PoolError, OSError, ValueError) as err:
        return f"<p class=muted>No slices: {_e(str(err))}</p>"
    names = run.class_names
    parts = [f"<h3>Queried subtomograms (the first {SAMPLE} of each cycle's selection)</h3>"]
    for cycle, rows in sample.items():
        figures = []
        for r in rows:
            caption = f"{r['subtomo_id']} · labelled {_label_name(run.labels.get(r['subtomo_id']), names)}"
            if int(r.get("pred", -1)) >= 0:
                caption += f" · model: {_label_name(int(r['pred']), names)} ({float(r['pred_prob']):.2f})"
            figures.append(f"<figure>{_img(tiles[int(r['row'])], 'XY, XZ, YZ slices', cls='')}"
                           f"<figcaption>{_e(caption)}</figcaption></figure>")
        parts.append(f"<p>cycle {cycle}</p><div class=tiles>{''.join(figures)}</div>")
    return "".join(parts)


def tile_pngs(run: Run, sample: dict[int, list[dict]]) -> dict[int, bytes]:
    """The PNG of each sampled row's tile, drawn once and kept in its cycle's folder
    (tiles/ROW.png): a report reads from the pool only the rows no report drew before, not
    every cycle's rows again each cycle (scattered reads: at 10⁶ rows each costs its shard's
    footer, ~20 ms a row)."""
    tiles, missing = {}, []
    for cycle, rows in sample.items():
        folder = run.run_dir / "cycles" / f"c{cycle:02d}" / TILES
        for r in rows:
            row = int(r["row"])
            kept = folder / f"{row}.png"
            png = kept.read_bytes() if kept.is_file() else b""
            if png.startswith(PNG_SIGNATURE):
                tiles[row] = png
            else:
                missing.append(kept)
    wanted = sorted({int(kept.stem) for kept in missing})
    volumes = dict(zip(wanted, read_volumes(run.info.path, wanted))) if wanted else {}
    for kept in missing:
        tiles[int(kept.stem)] = _tile(volumes[int(kept.stem)])
        _keep(kept, tiles[int(kept.stem)])
    return tiles


def _tile(volume: np.ndarray) -> bytes:
    views = slice_views(volume)
    return to_png(np.concatenate([_pad(views["xy"]), _pad(views["xz"]), views["yz"]], axis=1))


def _keep(path: Path, png: bytes) -> None:
    """Write a tile for the next report (whole or not at all); a folder that cannot take it
    (read-only, full) only means the next report draws it again."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(png)
        tmp.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def time_section(run: Run) -> str:
    keys = [("seconds_select", "select + label"), ("seconds_train", "train"), ("seconds_score", "score")]
    rows = [[c["cycle"]] + [number_text(c.get(k), 0) for k, _ in keys] for c in run.cycles]
    if not rows:
        return ""
    return ("<h2>Time per stage (seconds)</h2><p class=muted>score: this cycle's model over the pool "
            "(the next cycle's selection scores, or the final predictions).</p>"
            + _img(time_plot(run.cycles, keys), "seconds per stage per cycle")
            + _table(["cycle"] + [label for _, label in keys], rows, id="times"))


def setup_section(run: Run) -> str:
    parts = ["<h2>Pool</h2>"]
    if run.info is None:
        parts.append(f"<p>{_e(run.pool_error)}</p>")
    else:
        parts.append(pool_table(run.info))
    parts.append(f"<h2>Configuration</h2><pre id=config>{_e(run.config_text)}</pre>")
    return "".join(parts)


def pool_table(info: PoolInfo) -> str:
    tally = read_index(info.path, ["split"]).column("split").fill_null("train").value_counts()
    found = dict(zip(tally.field("values").to_pylist(), tally.field("counts").to_pylist()))  # not a string a row
    order = {"train": 0, "val": 1, "test": 2}
    counts = {s: found[s] for s in sorted(found, key=lambda s: (order.get(s, 3), s))}
    description = info.description
    text, _, settings = description.partition("; {")
    try:  # a simulated pool: its settings as JSON after the text
        description = f"{text}: " + ", ".join(f"{k} {v}" for k, v in json.loads("{" + settings).items())
    except ValueError:
        pass
    rows = [[_Name("path"), _Name(info.path)], [_Name("subtomograms"), info.n_rows],
            [_Name("splits"), _Name(", ".join(f"{s} {n}" for s, n in counts.items()))],
            [_Name("box"), _Name(" × ".join(map(str, info.box)) + f" voxels, {info.dtype}")],
            [_Name("classes"), _Name(", ".join(info.class_names))],
            [_Name("description"), _Name(description)]]
    return _table([], rows, id="pool")


# -- data and plots --------------------------------------------------------------------------


def class_mix(run: Run) -> dict[int, dict[int, int]]:
    """cycle -> label -> how many of the ids first labelled in that cycle have that label now."""
    mix: dict[int, dict[int, int]] = {}
    for sid, label in run.labels.items():
        counts = mix.setdefault(run.cycle_of[sid], {})
        counts[label] = counts.get(label, 0) + 1
    return mix


def stability_plot(run: Run) -> bytes:
    plt, figure, axis = _figure()
    cycles = run.cycles
    x = [100 * c.get("labelled_fraction", math.nan) for c in cycles]
    axis.plot(x, [_float(c.get("agreement")) for c in cycles], marker="o",
              label="agreement κ with the previous cycle")
    axis.plot(x, [_float(c.get("uncertainty")) for c in cycles], marker="s",
              label="mean uncertainty of the unlabelled pool")
    budget = run.state.get("config", {}).get("budget", {})
    if budget.get("stop_when_stable"):
        axis.axhline(budget["stable_kappa"], color="grey", linestyle="--", label="stop threshold")
    axis.set_xlabel("labelled (% of the train split)")
    kappas = [k for k in (_float(c.get("agreement")) for c in cycles) if not math.isnan(k)]
    axis.set_ylim(min([0.0] + kappas) - 0.05, 1.05)  # κ < 0: the models disagree more than chance
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(plt, figure)


def class_mix_plot(mix: dict[int, dict[int, int]], names: list[str]) -> bytes:
    plt, figure, axis = _figure()
    cycles = sorted(mix)
    bottom = np.zeros(len(cycles))
    for label, name in [(k, n) for k, n in enumerate(names)] + [(JUNK, "junk")]:
        heights = np.array([mix[c].get(label, 0) for c in cycles], dtype=float)
        if heights.any():
            axis.bar([str(c) for c in cycles], heights, bottom=bottom, label=name)
            bottom += heights
    axis.set_xlabel("cycle")
    axis.set_ylabel("labels")
    axis.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(plt, figure)


def time_plot(cycles: list[dict], keys: list[tuple[str, str]]) -> bytes:
    plt, figure, axis = _figure()
    labels = [str(c["cycle"]) for c in cycles]
    left = np.zeros(len(cycles))
    for key, name in keys:
        widths = np.array([_float(c.get(key), 0.0) for c in cycles])
        axis.barh(labels, widths, left=left, label=name)
        left += widths
    axis.set_xlabel("seconds")
    axis.set_ylabel("cycle")
    axis.invert_yaxis()
    axis.legend(fontsize=8)
    return _png(plt, figure)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.2))
    return plt, figure, axis


def _png(plt, figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


# -- HTML helpers ----------------------------------------------------------------------------


class _Name(str):
    """A table cell that is text (left-aligned), not a number."""


@dataclass
class _Cell:
    text: str
    shade: float  # 0..1: how strongly the cell is tinted


def _shaded(value, text: str | None = None) -> _Cell:
    value = _float(value)
    return _Cell(text if text is not None else number_text(value), 0.0 if math.isnan(value) else value)


def _table(headers: list, rows: list[list], id: str = "") -> str:
    head = "".join(f"<th>{_e(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return (f"<table id={id}>" + (f"<thead><tr>{head}</tr></thead>" if headers else "")
            + f"<tbody>{body}</tbody></table>")


def _td(value) -> str:
    if isinstance(value, _Cell):
        tint = f"rgba(36, 86, 199, {0.08 + 0.6 * min(max(value.shade, 0.0), 1.0):.2f})"
        return f'<td style="background:{tint}">{_e(value.text)}</td>'
    cls = " class=name" if isinstance(value, _Name) else ""
    return f"<td{cls}>{_e(str(value))}</td>"


def _img(png: bytes, alt: str, cls: str = "plot") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _pad(image: np.ndarray) -> np.ndarray:
    """A slice with a 2-pixel gap on its right, in its lowest value (shows as black)."""
    gap = np.full((image.shape[0], 2), float(np.min(image)), dtype=np.float32)
    return np.concatenate([image, gap], axis=1)


def _label_name(label, names: list[str]) -> str:
    if label is None:
        return "(none)"
    if label == JUNK:
        return "junk"
    return names[label] if 0 <= label < len(names) else str(label)


def _float(value, default: float = math.nan) -> float:
    return default if value is None or value == "" else float(value)


def _pct(value) -> str:
    value = _float(value)
    return "–" if math.isnan(value) else f"{100 * value:.1f}%"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def main(argv=None) -> int:
    """`run.py report RUN_DIR`: rebuild RUN_DIR/report.html and print its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="orchestrator/run.py report",
                                     description="Rebuild a run directory's report.html.")
    parser.add_argument("run_dir", help="a run directory (holding state.json)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "state.json").is_file():
        print(f"error: {run_dir}: not a run directory (no state.json)", file=sys.stderr)
        return 2
    print(write_report(run_dir))
    return 0
