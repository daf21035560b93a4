"""The campaign: label, train, score, select, repeat until the budget is spent.

Cycle r (0 … R) first brings the labelled set up to the r-th count of the budget schedule
(cycle 0: a seeded random draw from the train split; later cycles: the strategy's picks from
the previous model's scores), then trains model r on it. After the last cycle the final model
predicts every subtomogram of the pool.

Once model r is trained it scores the pool: the next cycle selects from those scores, and after
the last cycle they are the predictions. Its predictions on the still unlabelled subtomograms,
compared with model r−1's, say how much the model still changes (Cohen's κ) and how uncertain it
is; `budget.stop_when_stable` ends the campaign early once κ stays high (orchestrator/stopping.py).

Every step is idempotent and recorded in `state.json` only after its outputs are on disk, so a
campaign killed at any point is finished by running it again with `--resume`: labels are in the
ledger (atomic writes), scores and selections are files written whole or not at all, and
training resumes from its last epoch checkpoint. After every cycle `report.html` is rewritten.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cold_start import typiclust_initial
from orchestrator.config import BudgetConfig, CampaignConfig, TrainConfig, config_to_dict
from orchestrator.export import after_campaign
from orchestrator.faults import maybe_fault
from orchestrator.history import read_history
from orchestrator.labels import JUNK, LabelLedger
from orchestrator.oracle import AwaitingLabels, FileOracle, Query, SimulatedOracle, pick_initial
from orchestrator.pool import PoolInfo, atomic_write_text, open_pool, read_index
from orchestrator.progress import Display, RowCounter, scoring_watch, training_watch
from orchestrator.report import number_text, write_report
from orchestrator.score import column_array, partial_dir, read_scores, score_pool
from orchestrator.stopping import aligned, cohens_kappa, is_stable, mean_uncertainty
from orchestrator.storage import RunMirror
from orchestrator.strategies import Candidates, make_strategy, select_with_record, top_k
from orchestrator.train import CycleJob, model_path, run_training

STATE = "state.json"
UNKNOWN = -2  # PoolView.truth of a row with no ground truth (JUNK, -1, is a known answer)


class CampaignError(RuntimeError):
    pass


def budget_schedule(cfg: BudgetConfig, n_train: int) -> list[int]:
    """Cumulative labelled counts, one per cycle: the paper's 10% → 40% in 5% steps by default."""
    if cfg.counts:
        counts = [int(c) for c in cfg.counts]
    else:
        if not 0 < cfg.initial <= cfg.final <= 1 or cfg.step <= 0:
            raise CampaignError(
                f"budget: need 0 < initial ≤ final ≤ 1 and step > 0, got {cfg.initial}, "
                f"{cfg.final}, {cfg.step}"
            )
        steps = int(math.floor((cfg.final - cfg.initial) / cfg.step + 1e-9))
        fractions = [cfg.initial + i * cfg.step for i in range(steps + 1)]
        counts = [max(1, round(f * n_train)) for f in fractions]
    if any(b <= a for a, b in zip(counts, counts[1:])):
        raise CampaignError(f"budget: counts must increase, got {counts}")
    if counts[-1] > n_train:
        raise CampaignError(f"budget: {counts[-1]} labels asked but the train split has {n_train}")
    return counts


@dataclass
class PoolView:
    """The pool's index, loaded once (no volumes)."""

    info: PoolInfo
    ids: np.ndarray  # str, by row
    split: np.ndarray  # str, by row ("train" where the pool has no split)
    truth: np.ndarray  # int, by row: a class, JUNK (not a particle) or UNKNOWN

    @classmethod
    def load(cls, info: PoolInfo) -> "PoolView":
        index = read_index(info.path, ["row", "subtomo_id", "split", "label"]).sort_by("row")
        split = np.asarray(index.column("split").fill_null("train").to_pylist())
        truth = index.column("label").fill_null(UNKNOWN).to_numpy().astype(np.int64)
        return cls(info, np.asarray(index.column("subtomo_id").to_pylist()), split, truth)

    def rows_of(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def scored_rows_of(self, split: str) -> np.ndarray:
        """The split's rows of a real class: accuracy is measured on particles only (a junk
        row has no class to get right)."""
        return np.flatnonzero((self.split == split) & (self.truth >= 0))

    def row_of(self) -> dict[str, int]:
        return {sid: r for r, sid in enumerate(self.ids)}


class Campaign:
    def __init__(self, cfg: CampaignConfig, run_dir: Path, info: PoolInfo,
                 on_cycle: Callable[[dict], None] | None = None, mirror: RunMirror | None = None,
                 display: Display | None = None):
        """on_cycle: called with each cycle's record once it is trained, in cycle order, also for
        cycles a resumed campaign finds already trained (a sweep reports progress with it).
        mirror: for a run directory at a URI, run_dir is its staging copy and every save
        uploads it (`orchestrator/storage.py`). display: where progress goes (default: stdout,
        live on a terminal, plain lines elsewhere)."""
        self.cfg = cfg
        self.display = display or Display()
        self.on_cycle = on_cycle
        self.mirror = mirror
        self.run_dir = Path(run_dir).resolve()  # its paths go to Ray workers (other cwd)
        self.view = PoolView.load(info)
        self.row_of = self.view.row_of()
        self.train_rows = self.view.rows_of("train")
        self.schedule = budget_schedule(cfg.budget, len(self.train_rows))
        self.ledger = LabelLedger(
            self.run_dir / "labels.csv", known_ids=set(self.row_of), num_classes=info.num_classes
        )
        self.oracle = make_oracle(cfg.oracle, self.view)
        self.state = load_state(self.run_dir) or {
            "config": config_to_dict(cfg), "schedule": self.schedule, "cycles": [],
            "done": False, "pool": info.path,
        }

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        self.display.line(f"campaign {self.cfg.name}: {len(self.train_rows)} train subtomograms, "
                          f"{self.view.info.num_classes} classes, budget {self.schedule}")
        for cycle in range(len(self.schedule)):
            record = self._cycle_record(cycle)
            finished_before = all(record.get(k) for k in ("labelled", "trained", "scored"))
            if not record.get("labelled"):
                try:
                    self._label_up_to(cycle, record)
                except AwaitingLabels:
                    self._upload()  # the person finds the queries where the run is
                    raise
            if not record.get("trained"):
                self._train(cycle, record)
            if not record.get("scored") and not self.state["done"]:
                self._score_model(cycle, record)
            self.display.line(_cycle_line(record))
            if not finished_before:
                self._report()
            if self.on_cycle is not None:
                self.on_cycle(dict(record))
            if self._stops_after(cycle):
                break
        if not self.state["done"]:
            if self.final_cycle() < len(self.schedule) - 1:  # stopped early: predict with this model
                folder = self.cycle_dir(self.final_cycle()) / "predictions"
                with self.display.stage("predict", cycle=self.final_cycle(), total=len(self.view.ids),
                                        unit="rows", watch=_scoring_watch(folder)):
                    write_predictions(self)
            after_campaign(self.run_dir, self.view.info)  # predictions.star; copick picks for a copick pool
            self.state["done"] = True
            self._save()
            self._report()
        return self.state

    def final_cycle(self) -> int:
        """The cycle whose model predicts: the last of the schedule, or the one it stopped at."""
        stopped = self.state.get("stopped")
        return stopped["cycle"] if stopped else len(self.schedule) - 1

    def _stops_after(self, cycle: int) -> bool:
        """budget.stop_when_stable: end after this cycle once each of the last stable_cycles
        agreements reaches stable_kappa. Decided when the cycle ends, before the next starts
        (a campaign already past this cycle goes on), and recorded so a resume stops there too."""
        stopped = self.state.get("stopped")
        if stopped:
            return cycle >= stopped["cycle"]
        budget = self.cfg.budget
        if (not budget.stop_when_stable or cycle >= len(self.schedule) - 1
                or len(self.state["cycles"]) > cycle + 1):
            return False
        kappas = [_float(c.get("agreement")) for c in self.state["cycles"][:cycle + 1]]
        if not is_stable(kappas, budget.stable_kappa, budget.stable_cycles):
            return False
        reason = (f"agreement κ ≥ {budget.stable_kappa} in the last {budget.stable_cycles} cycles "
                  f"({', '.join(f'{k:.3f}' for k in kappas[-budget.stable_cycles:])})")
        self.state["stopped"] = {"cycle": cycle, "reason": reason}
        self._save()
        self.display.line(f"stopping after cycle {cycle}, {self.schedule[cycle]} labels of "
                          f"{self.schedule[-1]} budgeted: {reason}")
        return True

    def _cycle_record(self, cycle: int) -> dict:
        cycles = self.state["cycles"]
        while len(cycles) <= cycle:
            cycles.append({"cycle": len(cycles)})
        return cycles[cycle]

    def _label_up_to(self, cycle: int, record: dict) -> None:
        target = self.schedule[cycle]
        have = len(self.ledger.current())
        if have < target:
            with self.display.stage("select" if cycle else "initial draw", cycle=cycle) as stage:
                started = time.perf_counter()
                queries = self._queries(cycle, target - have, record)
                record["seconds_select"] = time.perf_counter() - started  # the pool was scored before
                chooser = self.cfg.strategy.name if cycle else self.cfg.strategy.initial
                how = "at random" if not cycle and chooser == "random" else f"by {chooser}"
                stage.result = f"{len(queries)} queries {how}"
                self.oracle.answer(queries, cycle, self.ledger, self.run_dir)
                maybe_fault("ledger-written")
                stage.result += f", labelled by the {self.cfg.oracle} oracle"
        labelled = len(self.ledger.current())
        if labelled != target:
            raise CampaignError(f"cycle {cycle}: {labelled} labelled, expected {target}")
        record.update(labelled=labelled, labelled_fraction=labelled / len(self.train_rows))
        self._save()

    def _queries(self, cycle: int, k: int, record: dict) -> list[Query]:
        selection_file = self.cycle_dir(cycle) / "selection.csv"
        if selection_file.exists():  # chosen before a crash: ask the same again
            return _counted(read_selection(selection_file), record)
        labelled_rows = self._labelled_rows()
        if cycle == 0:
            unlabelled = np.setdiff1d(self.train_rows, labelled_rows)
            initial = self.cfg.strategy.initial
            if initial == "typiclust":  # cold start: typical members of clusters, no model yet
                picks = typiclust_initial(self.view.info.path, unlabelled, k, self.cfg.seed,
                                          self.cfg.strategy.initial_options)
            else:
                picks = pick_initial(unlabelled, k, self.cfg.seed)
            queries = [Query(int(r), str(self.view.ids[r]), self._source(r), chosen_by=initial)
                       for r in picks]
        else:
            queries = self._strategy_queries(cycle, k, labelled_rows, record)
        maybe_fault("selection-chosen")
        write_selection(selection_file, queries)
        maybe_fault("selection-written")
        return _counted(queries, record)

    def _strategy_queries(self, cycle: int, k: int, labelled_rows, record: dict) -> list[Query]:
        strategy = make_strategy(self.cfg.strategy.name, **self.cfg.strategy.options)
        scores_dir = self._selection_scores(cycle - 1, strategy, labelled_rows)  # already written
        table = read_scores(scores_dir)
        rows = table.column("row").to_numpy()
        is_labelled = np.isin(rows, labelled_rows)
        rng = np.random.default_rng([self.cfg.seed, cycle])
        candidates = rows[~is_labelled]
        if "score" in table.column_names:
            positions = top_k(table.column("score").to_numpy()[~is_labelled], k, rng)
            chosen_by = (strategy.name,) * len(positions)
        else:
            arrays = {key: column_array(table, key) for key in strategy.needs}
            labelled_arrays = {key: column_array(table, key)[is_labelled] for key in strategy.needs_labelled}
            answers = self.ledger.current()
            selection = select_with_record(
                strategy,
                Candidates(candidates, {key: a[~is_labelled] for key, a in arrays.items()},
                           labelled_arrays,
                           # what only the campaign knows, for the strategies that declare it
                           labelled_answers=np.asarray([answers[self.view.ids[r]] for r in rows[is_labelled]],
                                                       dtype=np.int64) if strategy.needs_answers else None,
                           history=read_history(self.run_dir, self.state, answers, cycle)
                           if strategy.needs_history else None),
                k, rng,
            )
            positions, chosen_by = selection.positions, selection.chosen_by
        pred = table.column("pred").to_numpy()[~is_labelled]
        prob = table.column("pred_prob").to_numpy()[~is_labelled]
        return [
            Query(int(candidates[p]), str(self.view.ids[candidates[p]]),
                  self._source(candidates[p]), int(pred[p]), float(prob[p]), chooser)
            for p, chooser in zip(positions, chosen_by)
        ]

    def _train(self, cycle: int, record: dict) -> None:
        pairs = self.training_pairs()
        val_rows, test_rows = self.view.scored_rows_of("val"), self.view.scored_rows_of("test")
        previous = model_path(self.cycle_dir(cycle - 1)) if cycle > 0 else None
        strategy = make_strategy(self.cfg.strategy.name, **self.cfg.strategy.options)
        train = strategy_training(self.cfg.train, strategy)
        unlabelled = unlabelled_for_training(self.unlabelled_rows(), train, strategy,
                                             [self.cfg.seed, cycle, 7])
        job = CycleJob(
            pool=self.view.info.path, out_dir=str(self.cycle_dir(cycle).resolve()),
            num_classes=self.view.info.num_classes,
            train_rows=[r for r, _ in pairs], train_labels=[int(lab) for _, lab in pairs],
            val_rows=val_rows.tolist(), val_labels=self.view.truth[val_rows].tolist(),
            test_rows=test_rows.tolist(), test_labels=self.view.truth[test_rows].tolist(),
            unlabelled_rows=unlabelled.tolist(),
            mean_model_path=str(previous) if previous else None,
            seed=self.cfg.seed * 1000 + cycle,
            model=config_to_dict(self.cfg.model), train=train,
            strategy=self.cfg.strategy.name, strategy_options=dict(self.cfg.strategy.options),
        )
        workers = self.cfg.train.num_workers
        start = f"{len(pairs)} labelled, " + (f"{workers} Ray Train workers" if workers
                                              else "in this process")
        with self.display.stage("train", cycle=cycle, unit="epochs", start=start,
                                watch=training_watch(self.cycle_dir(cycle))) as stage:
            started = time.perf_counter()
            summary = run_training(job, run_name=f"train-c{cycle:02d}")
            epochs = summary["epochs"]
            stage.result = (f"{epochs} epoch{'s' * (epochs != 1)}, kept epoch {summary['best_epoch'] + 1} "
                            f"(val {_float(summary['val_accuracy']):.3f}, {summary['classifier']} model)")
        record.update(summary, trained=True, seconds_train=time.perf_counter() - started)
        self._save()

    def _score_model(self, cycle: int, record: dict) -> None:
        """Model `cycle` over the pool once it is trained: the scores the next cycle selects
        from or, after the last cycle, the campaign's predictions. Its predictions on the train
        subtomograms still unlabelled (after this cycle's labels) then give the agreement with
        model cycle−1's on the same rows, and the pool's uncertainty."""
        last = cycle == len(self.schedule) - 1
        labelled = self._labelled_rows()
        strategy = make_strategy(self.cfg.strategy.name, **self.cfg.strategy.options)
        folder = self.cycle_dir(cycle) / ("predictions" if last else "scores")
        total = len(self.view.ids) - (0 if last else len(self._score_exclusions(strategy, labelled)))
        purpose = "the predictions" if last else "the next selection"
        with self.display.stage("score", cycle=cycle, total=total, unit="rows",
                                watch=_scoring_watch(folder)) as stage:
            started = time.perf_counter()
            if last:
                write_predictions(self)
            else:
                self._selection_scores(cycle, strategy, labelled)
            record["seconds_score"] = time.perf_counter() - started
            stage.result = f"{total:,} rows, for {purpose}"
        record.update(self._stability(cycle, folder, np.setdiff1d(self.train_rows, labelled)))
        record["scored"] = True
        self._save()

    def _score_exclusions(self, strategy, labelled_rows) -> np.ndarray:
        """Rows a selection pass skips: other splits, and the labelled unless the strategy reads them."""
        not_train = np.setdiff1d(np.arange(len(self.view.ids)), self.train_rows)
        return not_train if strategy.needs_labelled else np.union1d(not_train, labelled_rows)

    def _selection_scores(self, cycle: int, strategy, labelled_rows) -> Path:
        """Model `cycle`'s scores for the next selection (written once; later calls read them)."""
        folder = self.cycle_dir(cycle)
        return score_pool(
            self.view.info.path, str(model_path(folder)), folder / "scores",
            strategy=self.cfg.strategy.name, strategy_options=self.cfg.strategy.options,
            exclude_rows=self._score_exclusions(strategy, labelled_rows), cfg=self.cfg.score,
            seed=self.cfg.seed,
        )

    def _stability(self, cycle: int, folder: Path, unlabelled: np.ndarray) -> dict:
        """κ(model cycle−1, model cycle) and mean uncertainty on the `unlabelled` rows, from the
        two models' scoring passes (model cycle−1's scored these rows for this cycle's selection)."""
        if not folder.exists():
            return {}
        now = read_scores(folder, ["row", "pred", "probs"])
        rows = now.column("row").to_numpy()
        keep = np.isin(rows, unlabelled)
        result = {"uncertainty": mean_uncertainty(column_array(now, "probs")[keep]),
                  "unlabelled": int(keep.sum())}
        before = self.cycle_dir(cycle - 1) / "scores"
        if cycle > 0 and before.exists():
            earlier = read_scores(before, ["row", "pred"])
            a, b = aligned(earlier.column("row").to_numpy(), earlier.column("pred").to_numpy(),
                           rows, now.column("pred").to_numpy(), unlabelled)
            result["agreement"] = cohens_kappa(a, b, self.view.info.num_classes)
        return result

    def training_pairs(self) -> list[tuple[int, int]]:
        """(pool row, class) of every labelled subtomogram, by row; junk answers are left out."""
        labels = self.ledger.current()
        return sorted((self.row_of[sid], lab) for sid, lab in labels.items() if lab != JUNK)

    def unlabelled_rows(self) -> np.ndarray:
        """Train-split rows nobody has answered yet. Junk answers are answered: a volume a
        person called junk is neither a class to learn nor an unlabelled one to learn from."""
        return np.setdiff1d(self.train_rows, self._labelled_rows())

    # -- files -------------------------------------------------------------------------------
    def cycle_dir(self, cycle: int) -> Path:
        return self.run_dir / "cycles" / f"c{cycle:02d}"

    def _labelled_rows(self) -> np.ndarray:
        return np.sort(np.asarray([self.row_of[s] for s in self.ledger.current()], dtype=np.int64))

    def _source(self, row) -> str:
        return f"{self.view.info.path}#row{int(row)}"

    def _save(self) -> None:
        atomic_write_text(self.run_dir / STATE, json.dumps(self.state, indent=2, default=_json))
        write_metrics(self.run_dir, self.state["cycles"], self.view.info.class_names)
        self._upload()

    def _upload(self) -> None:
        if self.mirror is not None:
            self.mirror.upload()

    def _report(self) -> None:
        """report.html, from the files just saved; a failure is said, not fatal to the campaign."""
        try:
            write_report(self.run_dir)
        except Exception as err:  # noqa: BLE001 - hours of training outweigh one page
            self.display.line(f"report.html not written: {type(err).__name__}: {err}")
            return
        self._upload()


def strategy_training(train: TrainConfig, strategy) -> dict:
    """The cycle's training settings for this strategy (a dict, as Ray Train workers get it).

    Each method as its paper trains it: the λ·D_reg(T, M) term only for strategies that use
    M (the EMA-KL family), plain cross-entropy for the rest; ``trainer: shared`` gives every
    strategy the configured λ instead (one trainer for all: a comparison of selection only).
    Semi-supervised training when the config or the strategy asks for it.
    """
    settings = config_to_dict(train)
    if train.trainer == "per_strategy" and not strategy.uses_mean_model:
        settings["lam"] = 0.0
    settings["semi_supervised"] = bool(train.semi_supervised or strategy.semi_supervised)
    return settings


def unlabelled_for_training(unlabelled: np.ndarray, train: dict, strategy, seed) -> np.ndarray:
    """The unlabelled rows a cycle's training may read: all of them (up to unlabelled_max, a
    seeded sample beyond) for semi-supervised batches; the sample an auxiliary model is fitted
    on; none otherwise."""
    wanted = int(train["unlabelled_max"]) if train["semi_supervised"] else 0
    if strategy.auxiliary is not None:
        wanted = max(wanted, strategy.auxiliary.unlabelled_sample)
    if not wanted:
        return unlabelled[:0]
    if len(unlabelled) <= wanted:
        return unlabelled
    return np.sort(np.random.default_rng(seed).choice(unlabelled, size=wanted, replace=False))


def make_oracle(kind: str, view: PoolView):
    if kind == "simulated":
        return SimulatedOracle({sid: int(t) for sid, t in zip(view.ids, view.truth) if t != UNKNOWN})
    if kind == "file":
        return FileOracle(view.info)
    raise CampaignError(f"oracle {kind!r}: valid are 'simulated' and 'file'")


def load_state(run_dir: Path) -> dict | None:
    path = Path(run_dir) / STATE
    return json.loads(path.read_text()) if path.exists() else None


def write_selection(path: Path, queries: list[Query]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "subtomo_id", "source", "pred", "pred_prob", "chosen_by"])
    for q in queries:
        writer.writerow([q.row, q.subtomo_id, q.source, q.pred, q.pred_prob, q.chosen_by])
    atomic_write_text(path, buffer.getvalue())


def read_selection(path: Path) -> list[Query]:
    with open(path, newline="") as f:
        return [  # chosen_by: absent from runs written before it existed
            Query(int(r["row"]), r["subtomo_id"], r["source"], int(r["pred"]), float(r["pred_prob"]),
                  r.get("chosen_by") or "")
            for r in csv.DictReader(f)
        ]


def _counted(queries: list[Query], record: dict) -> list[Query]:
    """The queries, after noting in the cycle's record how many each strategy chose (for
    albl: its base strategies; state.json keeps it, selection.csv has it per query)."""
    counts: dict[str, int] = {}
    for q in queries:
        counts[q.chosen_by] = counts.get(q.chosen_by, 0) + 1
    record["chosen_by"] = counts
    return queries


METRIC_COLUMNS = [
    "cycle", "labelled", "labelled_fraction", "val_accuracy", "test_accuracy",
    "seconds_train", "seconds_score", "seconds_select", "best_epoch", "classifier",
    "agreement", "uncertainty",
]


def write_metrics(run_dir: Path, cycles: list[dict], class_names) -> None:
    """metrics.csv (one row per trained cycle) and learning_curve.png, rebuilt from the state."""
    trained = [c for c in cycles if c.get("trained")]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(METRIC_COLUMNS + [f"accuracy_{name}" for name in class_names])
    for c in trained:
        per_class = list(c.get("per_class_accuracy") or []) + [float("nan")] * len(class_names)
        writer.writerow([_fmt(c.get(k, "")) for k in METRIC_COLUMNS]
                        + [_fmt(a) for a in per_class[:len(class_names)]])
    atomic_write_text(Path(run_dir) / "metrics.csv", buffer.getvalue())
    if trained:
        plot_learning_curve(trained, Path(run_dir) / "learning_curve.png")


def plot_learning_curve(cycles: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * c["labelled_fraction"] for c in cycles]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for key, label in (("test_accuracy", "test"), ("val_accuracy", "validation")):
        axis.plot(x, [c.get(key, float("nan")) for c in cycles], marker="o", label=label)
    axis.set_xlabel("labelled (% of the train split)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_predictions(campaign: Campaign) -> Path:
    """The final model's class and probability for every subtomogram of the pool."""
    final = campaign.cycle_dir(campaign.final_cycle())
    scores_dir = score_pool(
        campaign.view.info.path, str(model_path(final)), final / "predictions",
        strategy="entropy", strategy_options={}, exclude_rows=(), cfg=campaign.cfg.score,
        seed=campaign.cfg.seed,
    )
    labels = campaign.ledger.current()
    names = campaign.view.info.class_names
    out = campaign.run_dir / "predictions.parquet"
    tmp = out.with_name(".predictions.parquet.tmp")
    writer = None
    for part in sorted(Path(scores_dir).glob("*.parquet")):
        table = pq.read_table(part, columns=["row", "subtomo_id", "pred", "pred_prob", "entropy"])
        if not table.num_rows:
            continue
        ids = table.column("subtomo_id").to_pylist()
        pred = table.column("pred").to_numpy()
        table = table.append_column("pred_class", pa.array([names[p] for p in pred]))
        table = table.append_column(
            "label", pa.array([labels.get(s) for s in ids], type=pa.int32())
        )
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()
        tmp.replace(out)
    return out


def _cycle_line(c: dict) -> str:
    """The cycle's summary: accuracy, then whether the model still changes (κ with the previous
    cycle's predictions on the unlabelled pool) and how unsure it is of that pool."""
    return (
        f"cycle {c['cycle']}: {c['labelled']} labelled ({100 * c['labelled_fraction']:.1f}%)  "
        f"val {_float(c.get('val_accuracy')):.3f}  test {_float(c.get('test_accuracy')):.3f}  "
        f"κ {number_text(c.get('agreement'))}  uncertainty {number_text(c.get('uncertainty'))}"
        f"  (train {c.get('seconds_train', 0):.0f} s, score {c.get('seconds_score', 0):.0f} s)"
    )


def accuracy_table(cycles: list[dict]) -> str:
    lines = ["| cycle | labelled | fraction | val acc | test acc | κ | uncertainty |",
             "|---|---|---|---|---|---|---|"]
    for c in cycles:
        lines.append(
            f"| {c['cycle']} | {c['labelled']} | {100 * c['labelled_fraction']:.1f}% | "
            f"{_float(c.get('val_accuracy')):.3f} | {_float(c.get('test_accuracy')):.3f} | "
            f"{number_text(c.get('agreement'))} | {number_text(c.get('uncertainty'))} |"
        )
    return "\n".join(lines)


def _scoring_watch(folder: Path):
    """Follows a scoring pass into `folder` by the rows of the files it has finished."""
    return scoring_watch(RowCounter(partial_dir(folder), folder))


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _json(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
