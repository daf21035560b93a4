"""The campaign: label, train, score, select, repeat until the budget is spent.

Cycle r (0 … R) first brings the labelled set up to the r-th count of the budget schedule
(cycle 0: a seeded random draw from the train split, or TypiClust's cold start; later cycles:
the strategy's picks from the previous model's scores), then trains model r on it. After the
last cycle the final model predicts every subtomogram of the pool.

Once model r is trained it scores the pool: the next cycle selects from those scores, and after
the last cycle they are the predictions. Its predictions on the still unlabelled subtomograms,
compared with model r−1's, say how much the model still changes (Cohen's κ) and how uncertain it
is; `budget.stop_when_stable` ends the campaign early once κ stays high (orchestrator/al/stopping.py).

Every step is idempotent and recorded in `state.json` only after its outputs are on disk, so a
campaign killed at any point is finished by running it again with `--resume`: labels are in the
ledger (atomic writes), scores and selections are files written whole or not at all, and
training resumes from its last epoch checkpoint. After every cycle `report.html` is rewritten.

The labelled set has one representation here, `LabelledSet` (`labelled.py`): the ledger's
answers as pool rows, built from the ledger whenever a step reads it. What a strategy asks of
training is its `Training` declaration (`orchestrator/al/training.py`), read in `_train` only.
"""

from __future__ import annotations

import ctypes
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.al.budget import budget_schedule
from orchestrator.al.cold_start import typiclust_initial
from orchestrator.al.history import read_history
from orchestrator.al.labels import LabelLedger
from orchestrator.al.oracle import AwaitingLabels, FileOracle, Query, SimulatedOracle, pick_initial
from orchestrator.al.stopping import cohens_kappa, is_stable, mean_uncertainty
from orchestrator.al.strategies import (Candidates, balanced_order, make_strategy, select_with_record,
                                        top_k_merge)
from orchestrator.al.training import auxiliary_sample, strategy_training, unlabelled_for_training
from orchestrator.campaign.export import after_campaign
from orchestrator.campaign.files import (
    SELECTION,
    load_state,
    read_selection,
    save_state,
    write_metrics,
    write_predictions,
    write_selection,
)
from orchestrator.campaign.labelled import UNKNOWN, LabelledSet, PoolView
from orchestrator.campaign.metrics import cycle_line
from orchestrator.campaign.progress import Display
from orchestrator.campaign.report import write_report
from orchestrator.config import CampaignConfig, config_to_dict
from orchestrator.data.pool import PoolInfo
from orchestrator.data.storage import RunMirror
from orchestrator.distributed.events import scoring_pass_watch, training_watch
from orchestrator.distributed.score import (column_array, describe_pool, iter_scores, read_description,
                                            read_scores, score_pool)
from orchestrator.distributed.train import run_training
from orchestrator.faults import maybe_fault
from orchestrator.nn.auxiliary import make_auxiliary
from orchestrator.nn.checkpoint import model_path
from orchestrator.nn.cycle import CycleJob


class CampaignError(RuntimeError):
    pass


def memory_returned_when_freed() -> None:
    """This process's large allocations given back to the system when freed, from here on. A
    campaign's driver reads tables of every pool row (the index, each pass's scores), builds
    arrays from them and drops the tables; both allocators it uses kept those pages mapped:
    - Arrow's mimalloc, at the high-water mark (24 MB after reading a 100,000-row index of
      3 MB, 5 MB with the system's allocator): Arrow uses the system's from here on;
    - glibc's malloc, whose mmap threshold rises to the size of each large block freed, so the
      next ones come from a heap it rarely shrinks: a fixed threshold keeps every block of
      256 KiB or more mmapped. At 10⁶ rows the driver held 309 MB more than at 10,000 after
      loading the pool's index twice (bench/scale.py's two campaigns), 162 MB with this; the
      arrays it keeps are ~110 MB (docs/BENCHMARKS.md, "1,000,000 rows")."""
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    glibc_mmap_threshold(256 * 1024)


def glibc_mmap_threshold(size: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, size): blocks of `size` bytes or more get pages of their own
    (returned on free), and the threshold no longer moves. False where the C library is not
    glibc (macOS, musl): nothing changes there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, size))


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


class Campaign:
    def __init__(self, cfg: CampaignConfig, run_dir: Path, info: PoolInfo,
                 on_cycle: Callable[[dict], None] | None = None, mirror: RunMirror | None = None,
                 display: Display | None = None):
        """on_cycle: called with each cycle's record once it is trained, in cycle order, also for
        cycles a resumed campaign finds already trained (a sweep reports progress with it).
        mirror: for a run directory at a URI, run_dir is its staging copy and every save
        uploads it (`orchestrator/data/storage.py`). display: where progress goes (default:
        stdout, live on a terminal, plain lines elsewhere)."""
        self.cfg = cfg
        self.display = display or Display()
        self.on_cycle = on_cycle
        self.mirror = mirror
        self.run_dir = Path(run_dir).resolve()  # its paths go to Ray workers (other cwd)
        memory_returned_when_freed()  # before the first table of every row is read
        self.view = PoolView.load(info)
        self.train_rows = self.view.rows_of("train")
        self.schedule = budget_schedule(cfg.budget, len(self.train_rows))
        self.strategy = make_strategy(cfg.strategy.name, **cfg.strategy.options)
        # its auxiliary's options fail here, not in a Train worker hours later
        make_auxiliary(self.strategy.training.auxiliary, self.strategy.training.auxiliary_options)
        self.ledger = LabelLedger(
            self.run_dir / "labels.csv", known_ids=self.view.known_ids(), num_classes=info.num_classes
        )
        self.oracle = make_oracle(cfg.oracle, self.view)
        self.state = load_state(self.run_dir) or {
            "config": config_to_dict(cfg), "schedule": self.schedule, "cycles": [],
            "done": False, "pool": info.path,
        }

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict:
        threading.Thread(target=warm_plotting, name="warm-plotting", daemon=True).start()
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
            self.display.line(cycle_line(record))
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
                                        unit="rows", watch=scoring_pass_watch(folder)):
                    self.write_predictions()
            after_campaign(self.run_dir, self.view.info)  # predictions.star; copick picks for a copick pool
            self.state["done"] = True
            self._save()
            self._report()
        return self.state

    def final_cycle(self) -> int:
        """The cycle whose model predicts: the last of the schedule, or the one it stopped at."""
        stopped = self.state.get("stopped")
        return stopped["cycle"] if stopped else len(self.schedule) - 1

    def labelled(self) -> LabelledSet:
        """The labelled set now, from the ledger: what every step below reads."""
        return LabelledSet.of(self.ledger.current(), self.view)

    def training_pairs(self) -> list[tuple[int, int]]:
        """(pool row, class) of every labelled subtomogram, by row; junk answers are left out,
        or with train.junk_class learnt as the output after the real classes."""
        return self.labelled().training_pairs(self._junk_label())

    def _junk_label(self) -> int | None:
        """The model's junk output (train.junk_class): the one after the real classes."""
        return self.view.info.num_classes if self.cfg.train.junk_class else None

    def unlabelled_rows(self) -> np.ndarray:
        """Train-split rows nobody has answered yet (a junk answer is an answer)."""
        return self.labelled().unlabelled

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

    # -- label ---------------------------------------------------------------------------------
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
                if set(record.get("chosen_by", {})) - {chooser}:  # a strategy that delegates: to whom
                    how += " (" + ", ".join(f"{arm} {n}" for arm, n in sorted(
                        record["chosen_by"].items(), key=lambda item: -item[1])) + ")"
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
        selection_file = self.cycle_dir(cycle) / SELECTION
        if selection_file.exists():  # chosen before a crash: ask the same again
            return _counted(read_selection(selection_file), record)
        labelled = self.labelled()
        if cycle == 0:
            initial = self.cfg.strategy.initial
            if initial == "typiclust":  # cold start: typical members of clusters, no model yet
                picks = typiclust_initial(self.view.info.path, labelled.unlabelled, k, self.cfg.seed,
                                          self.cfg.strategy.initial_options, describe=self._describe)
            else:
                picks = pick_initial(labelled.unlabelled, k, self.cfg.seed)
            queries = [Query(int(r), str(self.view.ids[r]), self._source(r), chosen_by=initial)
                       for r in picks]
        else:
            queries = self._strategy_queries(cycle, k, labelled, record)
        maybe_fault("selection-chosen")
        write_selection(selection_file, queries)
        maybe_fault("selection-written")
        return _counted(queries, record)

    def _describe(self, rows: np.ndarray, embedding: str) -> np.ndarray:
        """The cold start's features of `rows`, described over Ray Data into cycle 0's folder
        (once: a campaign resumed after a crash reads them back)."""
        folder = describe_pool(self.view.info.path, rows, self.cycle_dir(0) / f"description-{embedding}",
                               embedding=embedding, cfg=self.cfg.score)
        return read_description(folder, rows)

    def _strategy_queries(self, cycle: int, k: int, labelled: LabelledSet, record: dict) -> list[Query]:
        """The strategy's k picks from model cycle−1's scores (written when that model was
        trained), with the model's guess for each: what the person sees. What the strategy
        measured to choose them (its notes: albl's credits) goes into the cycle's record."""
        strategy = self.strategy
        folder = self._selection_scores(cycle - 1, labelled)
        rng = np.random.default_rng([self.cfg.seed, cycle])
        validation = self._scored_validation()
        skip = predicted_junk(folder, labelled, k, self.cfg.strategy.junk_threshold, not_candidates=validation)
        if len(skip):
            self.display.line(f"cycle {cycle}: {len(skip):,} candidates the model calls junk "
                              f"(p ≥ {self.cfg.strategy.junk_threshold:g}) are not queried")
        if hasattr(strategy, "score"):  # row-wise: scored in the pass, ranked here file by file
            best = best_scored(folder, labelled, k, rng, per_class=getattr(strategy, "per_class", False),
                               skip=skip)
            return [Query(int(r), str(self.view.ids[r]), self._source(r), int(p), float(q), strategy.name)
                    for r, p, q in zip(best["row"], best["pred"], best["pred_prob"])]
        history = (read_history(self.run_dir, self.state, self.ledger.current(), cycle)
                   if strategy.needs_history else None)
        # the pass's arrays memory-mapped from the cycle's folder, gone once the picks are made
        self.cycle_dir(cycle).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cycle_dir(cycle), prefix="selecting-") as scratch:
            candidates = candidates_of(folder, labelled, strategy, history, scratch=Path(scratch),
                                       skip=skip, validation=(validation, self.view.truth[validation]))
            selection = select_with_record(strategy, candidates, k, rng)
            if selection.notes:
                record["selection_notes"] = selection.notes
            rows = candidates.rows[selection.positions]
            del candidates
        pred, prob = picked_predictions(folder, rows)
        return [Query(int(r), str(self.view.ids[r]), self._source(r), int(p), float(q), chooser)
                for r, p, q, chooser in zip(rows, pred, prob, selection.chosen_by)]

    # -- train ---------------------------------------------------------------------------------
    def _train(self, cycle: int, record: dict) -> None:
        labelled = self.labelled()
        pairs = labelled.training_pairs(self._junk_label())
        val_rows, test_rows = self.view.scored_rows_of("val"), self.view.scored_rows_of("test")
        previous = model_path(self.cycle_dir(cycle - 1)) if cycle > 0 else None
        settings = strategy_training(self.cfg.train, self.strategy)
        seed = self.cfg.seed * 1000 + cycle
        unlabelled = unlabelled_for_training(labelled.unlabelled, settings, self.strategy,
                                             [self.cfg.seed, cycle, 7])
        declared = self.strategy.training
        job = CycleJob(
            pool=self.view.info.path, out_dir=str(self.cycle_dir(cycle).resolve()),
            num_classes=self.view.info.num_classes, junk_class=self.cfg.train.junk_class,
            train_rows=[r for r, _ in pairs], train_labels=[int(lab) for _, lab in pairs],
            val_rows=val_rows.tolist(), val_labels=self.view.truth[val_rows].tolist(),
            test_rows=test_rows.tolist(), test_labels=self.view.truth[test_rows].tolist(),
            unlabelled_rows=unlabelled.tolist(),
            mean_model_path=str(previous) if previous else None,
            seed=seed, model=config_to_dict(self.cfg.model), train=settings,
            auxiliary=declared.auxiliary, auxiliary_options=dict(declared.auxiliary_options),
            auxiliary_rows=auxiliary_sample(unlabelled, self.strategy, [seed, 23]).tolist(),
        )
        workers = self.cfg.train.num_workers
        start = f"{len(pairs)} labelled, " + (f"{workers} Ray Train workers" if workers
                                              else "in this process")
        with self.display.stage("train", cycle=cycle, unit="epochs", start=start,
                                watch=training_watch(self.cycle_dir(cycle))) as stage:
            started = time.perf_counter()
            summary = run_training(job, run_name=f"train-c{cycle:02d}")
            maybe_fault("train-returned")
            epochs = summary["epochs"]
            stage.result = (f"{epochs} epoch{'s' * (epochs != 1)}, kept epoch {summary['best_epoch'] + 1} "
                            f"(val {_float(summary['val_accuracy']):.3f}, {summary['classifier']} model)")
        record.update(summary, trained=True, seconds_train=time.perf_counter() - started)
        self._save()

    # -- score ---------------------------------------------------------------------------------
    def _score_model(self, cycle: int, record: dict) -> None:
        """Model `cycle` over the pool once it is trained: the scores the next cycle selects
        from or, after the last cycle, the campaign's predictions. Its predictions on the train
        subtomograms still unlabelled (after this cycle's labels) then give the agreement with
        model cycle−1's on the same rows, and the pool's uncertainty."""
        last = cycle == len(self.schedule) - 1
        labelled = self.labelled()
        folder = self.cycle_dir(cycle) / ("predictions" if last else "scores")
        total = len(self.view.ids) - (0 if last else len(self._score_exclusions(labelled)))
        purpose = "the predictions" if last else "the next selection"
        with self.display.stage("score", cycle=cycle, total=total, unit="rows",
                                watch=scoring_pass_watch(folder)) as stage:
            started = time.perf_counter()
            if last:
                self.write_predictions()
            else:
                self._selection_scores(cycle, labelled)
            record["seconds_score"] = time.perf_counter() - started
            stage.result = f"{total:,} rows, for {purpose}"
        record.update(self._stability(cycle, folder, labelled.unlabelled))
        record["scored"] = True
        self._save()

    def _score_exclusions(self, labelled: LabelledSet) -> np.ndarray:
        """Rows a selection pass skips: other splits (but validation's particles if the strategy
        reads them), and the labelled unless the strategy reads them."""
        return skipped_rows(self.view.in_split("train"), labelled.rows, skip_labelled=not self.strategy.needs_labelled,
                            keep=self._scored_validation())

    def _scored_validation(self) -> np.ndarray:
        """The validation rows a selection pass scores: its particles, for a strategy that reads them."""
        return self.view.scored_rows_of("val") if self.strategy.needs_validation else np.zeros(0, np.int64)

    def _selection_scores(self, cycle: int, labelled: LabelledSet) -> Path:
        """Model `cycle`'s scores for the next selection (written once; later calls read them)."""
        folder = self.cycle_dir(cycle)
        return score_pool(
            self.view.info.path, str(model_path(folder)), folder / "scores",
            strategy=self.cfg.strategy.name, strategy_options=self.cfg.strategy.options,
            exclude_rows=self._score_exclusions(labelled), cfg=self.cfg.score, seed=self.cfg.seed,
        )

    def write_predictions(self) -> Path:
        """The final model's class and probability for every subtomogram of the pool."""
        final = self.cycle_dir(self.final_cycle())
        scores = score_pool(
            self.view.info.path, str(model_path(final)), final / "predictions",
            strategy="entropy", strategy_options={}, exclude_rows=(), cfg=self.cfg.score,
            seed=self.cfg.seed,
        )
        return write_predictions(self.run_dir, scores, self.view.info.class_names, self.labelled())

    def _stability(self, cycle: int, folder: Path, unlabelled: np.ndarray) -> dict:
        """κ(model cycle−1, model cycle) and mean uncertainty on the `unlabelled` rows, from the
        two models' scoring passes (model cycle−1's scored these rows for this cycle's selection)."""
        if not folder.exists():
            return {}
        before = self.cycle_dir(cycle - 1) / "scores" if cycle > 0 else None
        return stability(folder, before, unlabelled, self.view.info.num_classes)

    # -- files -------------------------------------------------------------------------------
    def cycle_dir(self, cycle: int) -> Path:
        return self.run_dir / "cycles" / f"c{cycle:02d}"

    def _source(self, row) -> str:
        return f"{self.view.info.path}#row{int(row)}"

    def _save(self) -> None:
        save_state(self.run_dir, self.state)
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


def stability(folder: Path, before: Path | None, unlabelled: np.ndarray, num_classes: int) -> dict:
    """The mean uncertainty of pass `folder` on the `unlabelled` rows and, when the previous
    model's pass `before` exists, Cohen's κ between the two passes' predictions on them."""
    # the scorer's entropy column, not the probabilities: one number a row to read, not C
    now = read_scores(folder, ["row", "pred", "entropy"], sort=False)
    rows = now.column("row").to_numpy()
    # rows looked up by number (a byte a pool row), not sorted and searched: O(N) at 10⁶ rows
    keep = row_mask(unlabelled, rows)[rows]
    result = {"uncertainty": mean_uncertainty(now.column("entropy").to_numpy()[keep], num_classes),
              "unlabelled": int(keep.sum())}
    if before is not None and before.exists():
        earlier = read_scores(before, ["row", "pred"], sort=False)
        earlier_rows = earlier.column("row").to_numpy()
        earlier_pred = np.full(max(rows.max(initial=-1), earlier_rows.max(initial=-1)) + 1, -1, np.int64)
        earlier_pred[earlier_rows] = earlier.column("pred").to_numpy()
        rows, pred = rows[keep], now.column("pred").to_numpy()[keep]
        both = earlier_pred[rows] >= 0  # the unlabelled rows the earlier pass scored too
        result["agreement"] = cohens_kappa(earlier_pred[rows[both]], pred[both], num_classes)
    return result


def row_mask(rows: np.ndarray, looked_up: np.ndarray) -> np.ndarray:
    """A bool a pool row, True at ``rows``, long enough to index with any of ``looked_up``."""
    rows = np.asarray(rows, dtype=np.int64)
    mask = np.zeros(max(rows.max(initial=-1), np.max(looked_up, initial=-1)) + 1, dtype=bool)
    mask[rows] = True
    return mask


def predicted_junk(folder: Path, labelled: LabelledSet, k: int, threshold: float,
                   not_candidates: np.ndarray = np.zeros(0, np.int64)) -> np.ndarray:
    """The candidates (scored rows neither labelled nor in ``not_candidates``) that a model with
    a junk output (train.junk_class) calls junk with probability at least ``threshold``,
    sorted: rows the selection skips. If skipping them all would leave fewer than ``k``, only
    the likeliest junk. None from a pass without a junk output."""
    files = sorted(Path(folder).glob("*.parquet"))
    if not files or "junk_prob" not in pq.read_schema(files[0]).names:
        return np.zeros(0, np.int64)
    table = read_scores(folder, ["row", "junk_prob"])
    rows, junk = table.column("row").to_numpy(), table.column("junk_prob").to_numpy()
    candidate = ~labelled.contains(rows) & ~np.isin(rows, not_candidates)
    rows, junk = rows[candidate], junk[candidate]
    flagged = np.flatnonzero(junk >= threshold)
    room = max(len(rows) - k, 0)
    if len(flagged) > room:
        flagged = flagged[np.argsort(-junk[flagged], kind="stable")[:room]]
    return np.sort(rows[flagged]).astype(np.int64)


def best_scored(folder: Path, labelled: LabelledSet, k: int, rng: np.random.Generator,
                per_class: bool = False, skip: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A row-wise strategy's k picks among a pass's candidates (the scored rows neither labelled
    nor in ``skip``), best first, with the model's guess for each ("row", "score", "pred",
    "pred_prob").

    Exactly `top_k(candidate scores, k, rng)` on the whole table (the same tiebreak draw, over
    the candidates in row order), but read file by file through `top_k_merge`: the driver holds
    the scored rows' ids and k + one file of rows, not every row's scores and probabilities.
    With ``per_class``, `balanced_top_k` over the predicted classes instead: a running top-k
    per class (k × classes rows), then round-robin over them."""
    names = ["row", "score", "pred", "pred_prob"]
    rows = read_scores(folder, ["row"], sort=False).column("row").to_numpy()
    # by pool row, not searched for: a lookup a row, where np.isin and searchsorted on each file
    # took half of this function's second at 10⁶ rows (1 + 1 + 8 bytes a pool row, for a moment)
    excluded = np.zeros(int(rows.max(initial=-1)) + 1, dtype=bool)
    excluded[labelled.rows[labelled.rows < len(excluded)]] = True
    if skip is not None:
        skip = np.asarray(skip, dtype=np.int64)
        excluded[skip[skip < len(excluded)]] = True
    candidates = np.flatnonzero(row_mask(rows, rows) & ~excluded)  # in row order, as top_k's positions are
    tiebreak = np.zeros(len(excluded), dtype=np.int64)
    tiebreak[candidates] = rng.permutation(len(candidates))  # top_k's draw: same size, same generator
    best: dict = {}  # per predicted class with per_class, else under None
    for table in iter_scores(folder, names):
        is_candidate = ~excluded[table.column("row").to_numpy()]
        block = {name: table.column(name).to_numpy()[is_candidate] for name in names}
        block["tiebreak"] = tiebreak[block["row"]]
        for c in np.unique(block["pred"]) if per_class else [None]:
            part = block if c is None else {name: v[block["pred"] == c] for name, v in block.items()}
            best[c] = top_k_merge(best.get(c), part, k)
    if not best:
        return {name: np.zeros(0) for name in names}
    if not per_class:
        return best[None]
    merged = {name: np.concatenate([b[name] for b in best.values()]) for name in best[next(iter(best))]}
    order = balanced_order(merged["score"], merged["pred"], merged["tiebreak"])[:k]
    return {name: value[order] for name, value in merged.items()}


def candidates_of(source: pa.Table | Path, labelled: LabelledSet, strategy, history=None,
                  scratch: Path | None = None, skip: np.ndarray | None = None,
                  validation: tuple[np.ndarray, np.ndarray] | None = None) -> Candidates:
    """What a set-based strategy selects from, out of a scoring pass (its table, or its folder
    read file by file): the rows neither labelled, nor in ``skip``, nor validation rows, with the
    arrays the strategy declared (``needs``), the labelled rows' arrays (``needs_labelled``)
    and, if declared, their answers and the campaign's history; and the arrays of
    ``needs_validation`` for ``validation`` (its rows and their classes, all in the pass).
    Rows keep the source's order (a folder's: by row).

    With ``scratch``, every array goes to a ``.npy`` file there, memory-mapped: the driver then
    holds the rows and one file of the pass, not N × the arrays' width (BADGE's gradient
    embeddings are C·E floats a row); the geometric strategies read them in row chunks."""
    keys = sorted(strategy.needs | strategy.needs_labelled | strategy.needs_validation)
    if isinstance(source, pa.Table):
        rows, blocks = source.column("row").to_numpy(), [source]
    else:
        rows, blocks = read_scores(source, ["row"]).column("row").to_numpy(), iter_scores(source, ["row", *keys])
    skip = np.zeros(0, np.int64) if skip is None else skip
    val_rows, val_answers = validation if validation is not None else (np.zeros(0, np.int64), None)
    if strategy.needs_validation and not np.isin(val_rows, rows).all():
        raise ValueError("the scoring pass lacks validation rows the strategy reads (scored without them?)")

    def part_of(some_rows: np.ndarray) -> np.ndarray:
        """0: a candidate, 1: labelled, 2: validation, 3: skipped."""
        part = np.where(labelled.contains(some_rows), 1, 0)
        part[np.isin(some_rows, val_rows)] = 2
        part[(part == 0) & np.isin(some_rows, skip)] = 3
        return part

    in_part = part_of(rows)
    parts = {"outputs": (rows[in_part == 0], strategy.needs),
             "labelled": (rows[in_part == 1], strategy.needs_labelled),
             "validation": (rows[in_part == 2], strategy.needs_validation)}
    arrays: dict[str, dict[str, np.ndarray]] = {part: {} for part in parts}
    for block in blocks:
        block_rows = block.column("row").to_numpy()
        block_part = part_of(block_rows)
        values = {key: column_array(block, key) for key in keys}
        for number, (part, (part_rows, wanted)) in enumerate(parts.items()):
            mask = block_part == number
            at = _positions(part_rows, block_rows[mask])
            for key in wanted:
                if key not in arrays[part]:
                    shape = (len(part_rows), *values[key].shape[1:])
                    arrays[part][key] = _new_array(shape, values[key].dtype, scratch, f"{part}-{key}")
                arrays[part][key][at] = values[key][mask]
    labelled_rows, validation_rows = parts["labelled"][0], parts["validation"][0]
    return Candidates(
        parts["outputs"][0], arrays["outputs"], arrays["labelled"],
        labelled_answers=labelled.answers_of(labelled_rows) if strategy.needs_answers else None,
        history=history, labelled_rows=labelled_rows,
        validation=arrays["validation"] if strategy.needs_validation else {},
        validation_answers=(val_answers[_positions(val_rows, validation_rows)]
                            if strategy.needs_validation else None),
    )


def _positions(order: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where each of ``rows`` sits in ``order`` (every one of them is there)."""
    sorter = np.argsort(order, kind="stable")
    return sorter[np.searchsorted(order, rows, sorter=sorter)]


def _new_array(shape: tuple, dtype, scratch: Path | None, name: str) -> np.ndarray:
    """An array to fill: in memory, or memory-mapped from a new ``.npy`` file under ``scratch``."""
    if scratch is None:
        return np.empty(shape, dtype)
    return np.lib.format.open_memmap(Path(scratch) / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


def picked_predictions(folder: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pass's prediction and its probability for ``rows`` (aligned), read file by file."""
    pred, prob = np.zeros(len(rows), np.int64), np.zeros(len(rows), np.float32)
    for block in iter_scores(folder, ["row", "pred", "pred_prob"]):
        block_rows = block.column("row").to_numpy()
        hit = np.isin(block_rows, rows)
        at = _positions(rows, block_rows[hit])
        pred[at] = block.column("pred").to_numpy()[hit]
        prob[at] = block.column("pred_prob").to_numpy()[hit]
    return pred, prob


def make_oracle(kind: str, view: PoolView):
    if kind == "simulated":
        return SimulatedOracle({sid: int(t) for sid, t in zip(view.ids, view.truth) if t != UNKNOWN})
    if kind == "file":
        return FileOracle(view.info)
    raise CampaignError(f"oracle {kind!r}: valid are 'simulated' and 'file'")


def _counted(queries: list[Query], record: dict) -> list[Query]:
    """The queries, after noting in the cycle's record how many each strategy chose (for
    albl: its base strategies; state.json keeps it, selection.csv has it per query)."""
    counts: dict[str, int] = {}
    for q in queries:
        counts[q.chosen_by] = counts.get(q.chosen_by, 0) + 1
    record["chosen_by"] = counts
    return queries


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def skipped_rows(in_train: np.ndarray, labelled_rows: np.ndarray, skip_labelled: bool,
                 keep: np.ndarray = np.zeros(0, np.int64)) -> np.ndarray:
    """The sorted rows a selection pass skips: every row outside the train split (``in_train``,
    a mask by row) but `keep`, and the labelled ones if `skip_labelled`. A mask, not set
    arithmetic: numpy's setdiff1d took ~0.5 s for a 300,000-row pool (bench/scale.py
    --py-spy), a mask milliseconds."""
    skipped = ~np.asarray(in_train, dtype=bool)
    skipped[np.asarray(keep, dtype=np.int64)] = False
    if skip_labelled:
        skipped[np.asarray(labelled_rows, dtype=np.int64)] = True
    return np.flatnonzero(skipped)


def warm_plotting() -> None:
    """Import matplotlib (~0.7 s) in a thread of its own while the campaign's first stage waits
    on Ray, so the plots drawn between stages (the learning curve, the report) do not: a person
    resuming a campaign each cycle would otherwise wait for it between their labels and the
    next queries (bench/scale.py --py-spy). Python's import lock makes a plot drawn meanwhile
    wait for this import rather than run it twice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
