"""Label efficiency: every strategy against random and full supervision, with seeds to tell.

For each data set one pool is simulated (the 13 SHREC'21 structures at SNR 0.05, then 0.03 and
noise-free, and the built-in 50 classes; then long-tailed pools of both, `class_imbalance` 10
and 100), with train, validation and test splits. On it every
strategy runs a simulated-oracle campaign per seed over the budgets 5, 10, 15, 20, 30 and 40%
of the train split, and "full supervision" trains once on the whole train split with the same
recipe. Cycle 0 of a seed is the same random draw for every strategy, and so are T's initial
weights: differences are paired by seed. Model selection uses the validation split only.

Campaigns run in-process (`train.num_workers=0`, `score.actors=0`: on 2 cores Ray's per-cycle
start-up would cost more than the training), `--jobs` at a time, one torch thread each. Each
finished campaign adds its cycles to `docs/results/label_efficiency.csv`
(`dataset,strategy,seed,labelled,fraction,val_accuracy,test_accuracy`; full supervision is
strategy `full` at fraction 1.0) and every table and plot is computed from that file alone:

    python bench/label_efficiency.py                         # the planned campaigns, resumable
    python bench/label_efficiency.py --report-only           # tables and plots from the CSV
    python bench/label_efficiency.py --datasets shrec13_snr0.05 --strategies random ema_kl --seeds 0 1

Per data set: accuracy per budget (mean and 95% CI over seeds), AUBC, accuracy at 20% as a
share of full supervision, the labels needed to reach 95% and 98% of it, and each strategy's
AUBC minus random's, paired by seed, with its 95% CI. Run directories stay under --out, so an
interrupted benchmark resumes where it stopped (a campaign resumes mid-way too).

The last wave (issue 17) adds the automatic choice (`albl`), multiple criteria, junk-aware
selection (`poal`) and TypiClust's cold start: `typiclust_start` rows begin with it, the
`cold_*` rows are one-cycle campaigns at 1–4% (their 5% point is cycle 0 of `random` and of
`typiclust_start`), reported paired by seed. Every campaign's queries go to
`docs/results/label_efficiency_queries.csv` (`dataset,strategy,seed,cycle,chosen_by,queried,junk`,
from each run's selection.csv and ledger), which gives the junk table (the share of each
campaign's queries answered junk, on the `_junk0.2` data set whose pool is 20% junk) and the
arms `albl` chose per cycle:

    python bench/label_efficiency.py --datasets shrec13_snr0.05 \
        --strategies albl multi_criteria poal typiclust_start ema_kl_typiclust_start \
        cold_random_1pct cold_random_2pct cold_random_3pct cold_random_4pct \
        cold_typiclust_1pct cold_typiclust_2pct cold_typiclust_3pct cold_typiclust_4pct
    python bench/label_efficiency.py --datasets shrec13_snr0.05_junk0.2 \
        --strategies random entropy ema_kl poal albl multi_criteria
    python bench/label_efficiency.py --datasets shrec13_snr0.05_junk0.2 \
        --strategies poal_entropy random_junk_class entropy_junk_class poal_junk_class

Across the data sets reported, one more table says what choosing per task is worth: on each,
`albl_balance` and its arms minus the best arm's AUBC (paired by seed), and each one's worst and
mean gap (`across_sets_table`; seeds rerun under one code version, in
`label_efficiency_rerun.csv` beside the results, replace their first runs there).

`poal_entropy` is POAL with its paper's informativeness (maximum entropy); the `*_junk_class`
rows train with `train.junk_class=true` (junk answers train one output more, and what it calls
junk is not queried); `bench/junk_detection.py` then says which junk kinds each detector sees.

No strategy reaches 95% of full supervision by 40%; `random_to80` and `albl_to80` run on to 60
and 80% (their own table), to say how many labels random needs for it:

    python bench/label_efficiency.py --strategies random_to80 albl_to80
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.campaign.metrics import aubc  # noqa: E402

# CRYOAL_SHREC_MAPS: the maps elsewhere (a machine without ../shared, e.g. bench/gpu.sh)
SHREC_MAPS = Path(os.environ.get("CRYOAL_SHREC_MAPS", ROOT.parent / "shared" / "data" / "structures_10A"))
RESULTS = ROOT / "docs" / "results" / "label_efficiency.csv"
QUERY_COLUMNS = ["dataset", "strategy", "seed", "cycle", "chosen_by", "queried", "junk"]
CLASS_COLUMNS = ["dataset", "strategy", "seed", "label", "count"]  # the labelled set at the end
# the simulator's junk kind of each query answered junk (its id: junk-<kind>-<index>)
JUNK_KIND_COLUMNS = ["dataset", "strategy", "seed", "cycle", "kind", "queried"]
JUNK_ID = re.compile(r"junk-(.+)-\d+")
# the training code a campaign ran with: the same seed gives the same cycle 0 only under the
# same code, so seeds are paired only where both rows ran it (see `code_version`)
CODE_COLUMNS = ["dataset", "strategy", "seed", "code"]
CODE_FILE = "code_version.txt"
COLUMNS = ["dataset", "strategy", "seed", "labelled", "fraction", "val_accuracy", "test_accuracy"]
DETAIL_COLUMNS = ["dataset", "strategy", "seed", "labelled", "classifier", "val_accuracy_task",
                  "val_accuracy_mean", "test_accuracy_task", "test_accuracy_mean", "epochs",
                  "seconds_train", "seconds_score"]

# 13 maps at 12.5 Å in a 32³ box (400 Å: the largest SHREC'21 structures exceed 320 Å, i.e. a
# 32³ box at 10 Å). 200 a class: 150 train (1,950 in all), 20 validation, 30 test.
SHREC = {"structures": str(SHREC_MAPS), "box": 32, "voxel_size_A": 12.5, "per_class": 200,
         "val_fraction": 0.1, "test_fraction": 0.15, "seed": 0}
DATASETS = {
    "shrec13_snr0.05": {**SHREC, "snr": 0.05},
    "shrec13_snr0.03": {**SHREC, "snr": 0.03},
    "shrec13_noise_free": {**SHREC, "snr": float("inf")},
    "builtin50_snr0.05": {"structures": "builtin:50", "box": 32, "voxel_size_A": 10.0,
                          "per_class": 60, "val_fraction": 0.1, "test_fraction": 0.2,
                          "snr": 0.05, "seed": 0},
    # the same 50 structures long-tailed: 42 train of the first down to 4 of the last (827 in all)
    "builtin50_snr0.05_imbalance10": {"structures": "builtin:50", "box": 32, "voxel_size_A": 10.0,
                                      "per_class": 60, "val_fraction": 0.1, "test_fraction": 0.2,
                                      "snr": 0.05, "seed": 0, "class_imbalance": 10.0},
    # the same particles plus 20% junk (650 non-particles: empty, edge, fragment, off-centre),
    # answered "junk" by the simulated oracle; accuracy stays on the 13 real classes
    # (fragments and off-centre picks at the asked SNR of their own signal, as simulated before
    # 2026-11-28: a fragment got less noise than its whole structure would have)
    "shrec13_snr0.05_junk0.2": {**SHREC, "snr": 0.05, "junk_fraction": 0.2, "junk_noise": "own"},
    # the same with every fragment and off-centre pick in its whole structure's noise, as in a
    # tomogram (the simulator's default since 2026-11-28)
    "shrec13_snr0.05_junk0.2_particle_noise": {**SHREC, "snr": 0.05, "junk_fraction": 0.2,
                                               "junk_noise": "particle"},
    # a long-tailed pool: the same particles, 150 train of the first structure down to 15 of the
    # last (geometric; 788 in all), validation and test the balanced set's, volume for volume
    "shrec13_snr0.05_imbalance10": {**SHREC, "snr": 0.05, "class_imbalance": 10.0},
    # as a cell's pool: the first structure 100× the last (540 train down to 5; 1,683 in all),
    # 30 validation and 30 test a class
    "shrec13_snr0.05_imbalance100": {**SHREC, "snr": 0.05, "per_class": 600, "val_fraction": 0.05,
                                     "test_fraction": 0.05, "class_imbalance": 100.0},
}

FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)  # labelled share of the train split, per cycle

# The CPU default recipe (tune_configs/default.yaml) for every campaign; dropout for the
# MC-dropout strategy (BALD), kept for all so that training is the same for every strategy.
CAMPAIGN = ["model.dropout=0.2", "train.num_workers=0", "score.actors=0", "score.batch_size=64"]

FULL = "full"
RANDOM = "random"
# (row name, strategy, options, extra settings), in the order they run: the first wave is the
# headline comparison, each later wave runs only once every seed of the one before is done.
WAVES = [
    [("random", "random", {}, []),
     ("ema_kl", "ema_kl", {"distance": "kl"}, []),
     ("ema_kl_reverse", "ema_kl", {"distance": "reverse_kl"}, [])],
    [("entropy", "entropy", {}, []),
     ("badge", "badge", {}, []),
     ("bald", "bald", {"mc_passes": 10}, []),
     ("hal", "hal", {"epochs": 8}, []),
     ("ema_kl_semi", "ema_kl_semi", {"distance": "kl"}, []),
     # the same scores queried in equal shares of the predicted classes (why: the balance table)
     ("ema_kl_class_balanced", "class_balanced", {"base": "ema_kl", "base_options": {"distance": "kl"}}, []),
     ("entropy_class_balanced", "class_balanced", {"base": "entropy"}, []),
     # the paper's semi-supervised variant: the same λ on unlabelled volumes as on labelled ones
     # (ema_kl_semi weighs the unlabelled term 1, as Tarvainen & Valpola's ramped-up weight)
     ("ema_kl_semi_lam0.03", "ema_kl_semi", {"distance": "kl"}, ["train.lam_unlabelled=0.03"])],
    [("ema_kl_selection_only", "ema_kl", {"distance": "kl"}, ["train.lam=0"]),
     ("margin", "margin", {}, []),
     ("coreset", "coreset", {}, []),
     ("ll4al", "ll4al", {}, []),
     ("vaal", "vaal", {"epochs": 8}, []),
     ("noise_stability", "noise_stability", {"passes": 8}, []),
     ("two_stream", "two_stream", {"epochs": 8}, [])],
]

# Issue 17. A row may carry its own budgets (a fifth element): the cold-start rows are one-cycle
# campaigns, the labels of cycle 0 alone, drawn at random or chosen by TypiClust.
# 5% as one-cycle campaigns too, so both draws of a seed run side by side on one machine (the
# campaigns' cycle 0s may not: the same draw and weights gave 0.354 and 0.441 on two machines)
COLD_FRACTIONS = (0.01, 0.02, 0.03, 0.04, 0.05)
# TypiClust over the radial features (the first cold start; its rows' names predate the choice)
TYPICLUST_START = ["strategy.initial=typiclust", "strategy.initial_options={embedding: radial}"]
# and over the low-passed density's quantiles (the cold start's default since 2026-11-27)
TYPICLUST_DENSITY = ["strategy.initial=typiclust", "strategy.initial_options={embedding: density}"]
JUNK_CLASS = ["train.junk_class=true"]
COLD_METHODS = (("random", []), ("typiclust", TYPICLUST_START), ("typiclust_density", TYPICLUST_DENSITY))
COLD_START = [(f"cold_{method}_{round(100 * f)}pct", "random", {}, extra, (f,))
              for method, extra in COLD_METHODS for f in COLD_FRACTIONS]
WAVES.append([
    # the batch's one validation gain shared by its arms (EXP3), as first run
    ("albl", "albl", {"arms": ["random", "entropy", "ema_kl", "coreset"], "credit": "batch", "eta": 10.0}, []),
    # the same four arms in fixed equal shares (η = 0: the bandit never moves): is albl's gain
    # its choosing, or the mixed batch?
    ("albl_uniform", "albl", {"arms": ["random", "entropy", "ema_kl", "coreset"], "credit": "batch",
                              "eta": 0.0}, []),
    # one credit per arm (a linear probe on the embeddings, with and without each arm's
    # queries, scored on validation) instead of the batch's one reward shared by every arm;
    # η = 30: a lead of 0.05 validation accuracy per batch weighs an arm e^1.5 ≈ 4.5× more
    ("albl_probe", "albl", {"arms": ["random", "entropy", "ema_kl", "coreset"], "credit": "probe",
                            "eta": 30.0}, []),
    # one credit per arm from the labels it bought: how evenly they cover the classes, less
    # junk (the class balance that ranks every row's AUBC); η = 20: a lead of 0.1 is e² ≈ 7×
    ("albl_balance", "albl", {"arms": ["random", "entropy", "ema_kl", "coreset"], "credit": "balance",
                              "eta": 20.0}, []),
    # the balance credit judged against as many even draws, not log C: an arm is not credited
    # for having been given more queries (with `balance`, 20 even answers of 13 classes score
    # 0.95 and 80 score 0.99; 26 of 50 classes 0.83)
    ("albl_per_size", "albl", {"arms": ["random", "entropy", "ema_kl", "coreset"],
                               "credit": "balance_per_size", "eta": 20.0}, []),
    ("multi_criteria", "multi_criteria", {"informativeness": "ema_kl"}, []),
    ("poal", "poal", {"informativeness": "ema_kl"}, []),
    # POAL as its paper runs it (Zhan et al.: maximum entropy against Mahalanobis in-distribution)
    ("poal_entropy", "poal", {"informativeness": "entropy"}, []),
    # a junk output learnt from the junk answers; candidates it calls junk are not queried
    ("random_junk_class", "random", {}, JUNK_CLASS),
    ("entropy_junk_class", "entropy", {}, JUNK_CLASS),
    ("poal_junk_class", "poal", {"informativeness": "ema_kl"}, JUNK_CLASS),
    ("typiclust_start", "random", {}, TYPICLUST_START),
    ("typiclust_density_start", "random", {}, TYPICLUST_DENSITY),
    ("ema_kl_typiclust_start", "ema_kl", {"distance": "kl"}, TYPICLUST_START),
    *COLD_START,
])
# Beyond the budgets: no strategy reaches 95% of full supervision by 40%, so how many
# labels random needs for it (the target's "half the labels random needs") takes budgets past 40%.
BEYOND_FRACTIONS = FRACTIONS + (0.6, 0.8)
WAVES.append([
    ("random_to80", "random", {}, [], BEYOND_FRACTIONS),
    ("albl_to80", "albl", {"arms": ["random", "entropy", "ema_kl", "coreset"], "credit": "batch",
                           "eta": 10.0}, [], BEYOND_FRACTIONS),
])
RUNS = [run for wave in WAVES for run in wave]
# rows with budgets of their own: not curves over FRACTIONS, reported in their own table
OWN_BUDGETS = {run[0] for run in RUNS if len(run) > 4}


# --- running the campaigns ---------------------------------------------------------------------


def simulate(name: str, out: Path):
    """The data set's pool, simulated once and reused by every run."""
    from orchestrator.data.pool import open_pool
    from orchestrator.data.simulate import SimulationConfig, simulate_pool

    path = out / "pools" / name
    if (path / "pool.json").exists():
        return open_pool(path)
    if DATASETS[name]["structures"] == str(SHREC_MAPS) and not SHREC_MAPS.is_dir():
        raise SystemExit(f"{name}: needs the SHREC'21 maps in {SHREC_MAPS} (../shared/data)")
    started = time.perf_counter()
    info = simulate_pool(None, SimulationConfig(**DATASETS[name]), path, workers=os.cpu_count() or 2,
                         progress=False)
    print(f"{name}: pool of {info.n_rows} simulated in {time.perf_counter() - started:.0f} s",
          flush=True)
    return info


def run_one(pool: str, run_dir: str, sets: list[str]) -> dict:
    """One campaign in this (worker) process; returns its state (a finished one is not rerun)."""
    import torch

    torch.set_num_threads(1)
    from orchestrator.config import load_config
    from orchestrator.campaign.loop import Campaign
    from orchestrator.data.pool import open_pool

    info = open_pool(pool)
    cfg = load_config(None, CAMPAIGN + [f"data.pool={pool}", "train.cpus_per_worker=1"] + sets)
    started = time.perf_counter()
    with open(Path(f"{run_dir}.log"), "a") as log:  # not with_suffix: row names may hold a dot
        stdout = sys.stdout
        sys.stdout = log  # one campaign's progress lines in its own log, not interleaved
        try:
            state = Campaign(cfg, Path(run_dir), info).run()
        except Exception:
            traceback.print_exc(file=log)  # the driver prints only the error's repr
            raise
        finally:
            sys.stdout = stdout
    state["seconds"] = time.perf_counter() - started
    return state


def campaign_sets(run: tuple, seed: int, n_train: int) -> list[str]:
    _, strategy, options, extra, *fractions = run
    return [f"seed={seed}", f"strategy.name={strategy}", f"strategy.options={json.dumps(options)}",
            f"budget.counts={budget_counts(n_train, *fractions)}", *extra]


def budget_counts(n_train: int, fractions=FRACTIONS) -> list[int]:
    return [max(1, round(f * n_train)) for f in fractions]


def full_supervision_sets(seed: int, n_train: int) -> list[str]:
    return [f"seed={seed}", "strategy.name=random", f"budget.counts=[{n_train}]"]


def run_dir_of(out: Path, name: str, row: str, seed: int) -> Path:
    return out / "runs" / name / f"{row}-seed{seed}"


def planned(datasets: list[str], seeds: list[int], rows: list[str],
            full: bool = True) -> list[tuple[str, str, int]]:
    """(data set, row, seed) in the order they run: the first data set wave by wave (full
    supervision with the first wave, unless ``full`` is off), each wave seed by seed, so a
    stopped run leaves complete seeds for pairing; then the other data sets the same way."""
    order = []
    for dataset in datasets:
        for i, wave in enumerate(WAVES):
            names = ([FULL] if i == 0 and full else []) + [run[0] for run in wave if run[0] in rows]
            order += [(dataset, row, seed) for seed in seeds for row in names]
    return order


def finished_state(run_dir: Path) -> dict | None:
    path = run_dir / "state.json"
    state = json.loads(path.read_text()) if path.exists() else None
    return state if state and state.get("done") else None


def code_version() -> str:
    """The campaign code this checkout runs: the last commit that changed `orchestrator/`, and
    "+changes" when it has uncommitted ones ("unknown" outside git). Two runs of one seed give
    the same cycle 0 only under the same code (a change to BatchNorm's recalibration on
    2026-11-27 moved one seed's cycle 0 from 0.354 to 0.441), so pairs across it are not pairs."""
    import subprocess

    def git(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True)

    last = git("log", "-1", "--format=%h", "--", "orchestrator")
    if last.returncode or not last.stdout.strip():
        return "unknown"
    changed = git("diff", "--quiet", "HEAD", "--", "orchestrator").returncode != 0
    return last.stdout.strip() + ("+changes" if changed else "")


def record_code(run_dir: Path, code: str) -> None:
    """Append the code a campaign (re)starts under to its run directory: a campaign resumed
    under other code keeps both."""
    path = run_dir / CODE_FILE
    seen = path.read_text().split() if path.exists() else []
    if not seen or seen[-1] != code:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(code + "\n")


def run_all(args, rows: list[str]) -> None:
    """Every planned campaign not yet finished, `--jobs` at a time; the CSV after each."""
    pools = {name: simulate(name, args.out) for name in args.datasets}
    code = code_version()
    runs = {run[0]: run for run in RUNS}
    recorded = recorded_campaigns(args.results)  # finished in an earlier checkout: not rerun
    tasks = {}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as executor:
        for name, row, seed in planned(args.datasets, args.seeds, rows, not args.no_full):
            run_dir = run_dir_of(args.out, name, row, seed)
            if finished_state(run_dir) or (name, row, seed) in recorded:
                continue
            n_train = _train_count(pools[name])
            sets = (full_supervision_sets(seed, n_train) if row == FULL
                    else campaign_sets(runs[row], seed, n_train)) + args.set
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            record_code(run_dir, code)
            tasks[executor.submit(run_one, pools[name].path, str(run_dir), sets)] = (name, row, seed)
        for done, future in enumerate(as_completed(tasks), 1):
            name, row, seed = tasks[future]
            try:
                state = future.result()
            except Exception as error:  # one failed campaign must not stop the others
                print(f"[{done}/{len(tasks)}] {name} {row} seed {seed}: FAILED {error!r}", flush=True)
                continue
            last = state["cycles"][-1]
            print(f"[{done}/{len(tasks)} {time.perf_counter() - started:.0f} s] {name} {row} "
                  f"seed {seed}: test {last.get('test_accuracy', float('nan')):.3f} at "
                  f"{100 * last['labelled_fraction']:.0f}% ({state['seconds']:.0f} s)", flush=True)
            write_results(args.out, args.results)


def recorded_campaigns(path: Path) -> set[tuple[str, str, int]]:
    """(data set, row, seed) of every campaign already in a results CSV."""
    if not path.exists():
        return set()
    with open(path, newline="") as f:
        return {(r["dataset"], r["strategy"], int(r["seed"])) for r in csv.DictReader(f)}


def write_results(out: Path, path: Path) -> None:
    """Every finished campaign under `out` as CSV rows (one per cycle), sorted; the models'
    details (T or M, both accuracies, epochs, seconds) beside it, and its queries (per cycle
    and choosing strategy: how many, how many answered junk) and the class counts of its
    labelled set at its last budget. Campaigns already in the files but not under `out` (run
    in another checkout, whose run directories are gone) keep their rows."""
    rows, details, queries, kinds, classes, codes = [], [], [], [], [], []
    for state_file in sorted((out / "runs").glob("*/*/state.json")):
        run_dir = state_file.parent
        state = finished_state(run_dir)
        if not state:
            continue
        row, _, seed = run_dir.name.rpartition("-seed")
        for c in state["cycles"]:
            key = [run_dir.parent.name, row, int(seed), int(c["labelled"])]
            fraction = 1.0 if row == FULL else c["labelled_fraction"]
            rows.append(key + [round(fraction, 6), c.get("val_accuracy"), c.get("test_accuracy")])
            details.append(key + [c.get(k) for k in DETAIL_COLUMNS[4:]])
        queries += [[run_dir.parent.name, row, int(seed), *q] for q in run_queries(run_dir)]
        kinds += [[run_dir.parent.name, row, int(seed), *k] for k in run_junk_kinds(run_dir)]
        if row != FULL:
            classes += [[run_dir.parent.name, row, int(seed), label, n]
                        for label, n in sorted(class_counts(run_dir).items())]
        if (run_dir / CODE_FILE).exists():
            codes.append([run_dir.parent.name, row, int(seed),
                          " then ".join((run_dir / CODE_FILE).read_text().split())])
    for file, columns, new_rows, sort_width in (
            (path, COLUMNS, rows, 4), (beside(path, "models"), DETAIL_COLUMNS, details, 4),
            (beside(path, "queries"), QUERY_COLUMNS, queries, 5),
            (beside(path, "junk_kinds"), JUNK_KIND_COLUMNS, kinds, 5),
            (beside(path, "classes"), CLASS_COLUMNS, classes, 4),
            (beside(path, "code"), CODE_COLUMNS, codes, 3)):
        merged = _kept_rows(file, columns, {tuple(r[:3]) for r in rows}) + new_rows
        _write_csv(file, columns, sorted(merged, key=lambda r: [_sort_key(v) for v in r[:sort_width]]))


def _kept_rows(path: Path, columns: list[str], rewritten: set[tuple]) -> list[list]:
    """A result file's rows of campaigns not among `rewritten` (data set, row, seed), typed as
    the new rows are (seed and counts as ints) so that they sort together."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        if next(reader, None) != columns:
            raise SystemExit(f"{path}: its header is not {columns}; move it aside to rewrite it")
        kept = [[_typed(v) for v in r] for r in reader]
    return [r for r in kept if (r[0], r[1], r[2]) not in rewritten]


def _typed(text: str):
    """A CSV cell back as the value it was written from (int, float, None or text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text in ("", "None") else text


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, "" if value is None else str(value))


def beside(results: Path, what: str) -> Path:
    """The file of the models' details or of the queries that goes with a results CSV
    (label_efficiency.csv → label_efficiency_models.csv): two result files in one folder
    keep their own."""
    return results.with_name(f"{results.stem}_{what}.csv")


def run_queries(run_dir: Path) -> list[list]:
    """(cycle, chosen_by, queried, junk) per cycle and choosing strategy of a run directory,
    from each cycle's selection.csv and the ledger's current answers (junk: -1)."""
    answers = latest_answers(run_dir)
    counts: dict[tuple[int, str], list[int]] = {}
    for cycle, r in selected(run_dir):
        tally = counts.setdefault((cycle, r.get("chosen_by") or ""), [0, 0])
        tally[0] += 1
        tally[1] += answers.get(r["subtomo_id"]) == -1
    return [[cycle, chooser, n, junk] for (cycle, chooser), (n, junk) in sorted(counts.items())]


def run_junk_kinds(run_dir: Path) -> list[list]:
    """(cycle, kind, queried) of a run's queries answered junk, by the simulator's junk kind in
    their ids ("unnamed" for a junk answer on another id)."""
    answers = latest_answers(run_dir)
    counts: dict[tuple[int, str], int] = {}
    for cycle, r in selected(run_dir):
        if answers.get(r["subtomo_id"]) == -1:
            named = JUNK_ID.fullmatch(r["subtomo_id"])
            key = (cycle, named.group(1) if named else "unnamed")
            counts[key] = counts.get(key, 0) + 1
    return [[cycle, kind, n] for (cycle, kind), n in sorted(counts.items())]


def latest_answers(run_dir: Path) -> dict[str, int]:
    """The ledger's current answer per subtomogram (the latest line wins; junk: -1)."""
    with open(run_dir / "labels.csv", newline="") as f:
        return {r["subtomo_id"]: int(r["label"]) for r in csv.DictReader(f)}


def selected(run_dir: Path):
    """(cycle, selection.csv row) of every query a run selected, cycle by cycle."""
    for selection in sorted(run_dir.glob("cycles/c*/selection.csv")):
        cycle = int(selection.parent.name[1:])
        with open(selection, newline="") as f:
            for r in csv.DictReader(f):
                yield cycle, r


def class_counts(run_dir: Path) -> dict[int, int]:
    """How many of a run's labels (latest answer per subtomogram; junk left out) each class has."""
    with open(run_dir / "labels.csv", newline="") as f:
        answers = {r["subtomo_id"]: int(r["label"]) for r in csv.DictReader(f)}
    counts: dict[int, int] = {}
    for label in answers.values():
        if label >= 0:
            counts[label] = counts.get(label, 0) + 1
    return counts


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([[_cell(v) for v in r] for r in rows])
    tmp.replace(path)


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _train_count(info) -> int:
    from orchestrator.data.pool import read_index

    split = read_index(info.path, ["split"]).column("split").fill_null("train").to_pylist()
    return split.count("train")


# --- statistics, from the CSV alone ------------------------------------------------------------


def read_results(path: Path) -> dict:
    """{dataset: {strategy: {seed: (fractions, val, test)}}}, cycles in order."""
    curves: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            seeds = curves.setdefault(r["dataset"], {}).setdefault(r["strategy"], {})
            fractions, val, test = seeds.setdefault(int(r["seed"]), ([], [], []))
            fractions.append(float(r["fraction"]))
            val.append(_float(r["val_accuracy"]))
            test.append(_float(r["test_accuracy"]))
    return curves


def _float(text: str) -> float:
    return float(text) if text not in ("", "None") else float("nan")


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t over the n finite
    values; NaN half-width for n < 2)."""
    from scipy.stats import t

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def labels_to_reach(fractions, accuracies, target: float) -> float:
    """The smallest labelled fraction at which the (linearly interpolated) curve reaches
    `target`; NaN when it never does."""
    x, y = np.asarray(fractions, float), np.asarray(accuracies, float)
    for i in range(len(x)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            return float(x[i - 1] + (target - y[i - 1]) / (y[i] - y[i - 1]) * (x[i] - x[i - 1]))
    return float("nan")


def accuracy_at(fractions, accuracies, fraction: float) -> float:
    x, y = np.asarray(fractions, float), np.asarray(accuracies, float)
    if not len(x) or fraction < x[0] or fraction > x[-1]:
        return float("nan")
    return float(np.interp(fraction, x, y))


def summarise_strategy(seeds: dict, random_seeds: dict | None, fractions=FRACTIONS) -> dict:
    """One strategy over its seeds: mean and CI per budget, AUBC, and the AUBC difference from
    random over the seeds both have (paired; over the issue's budgets only)."""
    complete = {s: c for s, c in seeds.items() if len(c[0]) == len(fractions)}
    fractions = list(fractions)
    per_budget = [mean_ci([c[2][i] for c in complete.values()]) for i in range(len(fractions))]
    aubcs = {s: aubc(c[0], c[2]) for s, c in complete.items()}
    paired = [aubcs[s] - aubc(random_seeds[s][0], random_seeds[s][2])
              for s in aubcs if random_seeds and s in random_seeds
              and len(random_seeds[s][0]) == len(fractions)]
    return {
        "n": len(complete), "seeds": sorted(complete), "fractions": fractions,
        "accuracy": [m for m, _ in per_budget], "ci": [h for _, h in per_budget],
        "aubc": mean_ci(aubcs.values()), "vs_random": mean_ci(paired), "n_paired": len(paired),
    }


def full_accuracy(curves: dict) -> tuple[float, float]:
    return mean_ci([c[2][-1] for c in curves.get(FULL, {}).values()])


def table(name: str, summaries: dict, full: tuple[float, float]) -> str:
    """The data set's table, strategies by AUBC, best first. Besides the issue's columns, the
    labels each strategy's mean curve needs to reach random's accuracy at the last budget: the
    saving in labels within the budgets run (reaching 95% of full supervision may lie beyond them)."""
    full_mean = full[0]
    random_last = summaries[RANDOM]["accuracy"][-1] if RANDOM in summaries else float("nan")
    head = (["strategy", "seeds"] + [f"{100 * f:g}%" for f in FRACTIONS]
            + ["AUBC", "AUBC − random (paired)", "acc@20% / full", "labels to 95% of full",
               "labels to 98% of full", f"labels to random's {100 * FRACTIONS[-1]:g}%"])
    lines = [f"### {name}", "",
             f"Full supervision (all train labels): {_pm(*full)} (mean ± 95% CI).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranked = sorted(summaries.items(), key=lambda kv: -np.nan_to_num(kv[1]["aubc"][0], nan=-1))
    for strategy, s in ranked:
        at20 = accuracy_at(s["fractions"], s["accuracy"], 0.2)
        cells = [_pm(m, h) for m, h in zip(s["accuracy"], s["ci"])]
        vs = "" if strategy == RANDOM else _signed(*s["vs_random"])
        lines.append("| " + " | ".join([
            strategy, str(s["n"]), *cells, _pm(*s["aubc"]), vs,
            f"{100 * at20 / full_mean:.0f}%" if np.isfinite(full_mean) and full_mean > 0 else "",
            _reach(s, 0.95 * full_mean), _reach(s, 0.98 * full_mean), _reach(s, random_last),
        ]) + " |")
    return "\n".join(lines) + "\n"


def _reach(summary: dict, target: float) -> str:
    if not np.isfinite(target):
        return ""
    reach = labels_to_reach(summary["fractions"], summary["accuracy"], target)
    return f"{100 * reach:.0f}%" if np.isfinite(reach) else f"> {100 * summary['fractions'][-1]:g}%"


def beyond_table(name: str, by_strategy: dict, full: tuple[float, float]) -> str:
    """The rows run past the issue's budgets: accuracy per budget and the labels each needs to
    reach 95% and 98% of full supervision."""
    rows = [run[0] for run in RUNS if len(run) > 4 and run[4] == BEYOND_FRACTIONS
            and run[0] in by_strategy]
    if not rows:
        return ""
    head = (["strategy", "seeds"] + [f"{100 * f:g}%" for f in BEYOND_FRACTIONS]
            + ["labels to 95% of full", "labels to 98% of full"])
    lines = [f"#### {name}: past {100 * FRACTIONS[-1]:g}% (full supervision {_pm(*full)})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = summarise_strategy(by_strategy[row], None, BEYOND_FRACTIONS)
        if not s["n"]:
            continue
        cells = [_pm(m, h) for m, h in zip(s["accuracy"], s["ci"])]
        lines.append("| " + " | ".join([row, str(s["n"]), *cells, _reach(s, 0.95 * full[0]),
                                        _reach(s, 0.98 * full[0])]) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 4 else ""


def _pm(mean: float, half: float) -> str:
    if not np.isfinite(mean):
        return ""
    return f"{mean:.3f}" if not np.isfinite(half) else f"{mean:.3f} ± {half:.3f}"


def _signed(mean: float, half: float) -> str:
    if not np.isfinite(mean):
        return ""
    text = f"{mean:+.3f}" if not np.isfinite(half) else f"{mean:+.3f} ± {half:.3f}"
    if np.isfinite(half) and abs(mean) > half:
        text += " *"  # the 95% CI excludes zero
    return text


def highlighted(summaries: dict, most: int = 8) -> list[str]:
    """The strategies a plot draws in colour with their CI bands: all of them when few; else
    random, the paper's EMA-KL, the three best and the two worst by AUBC (the rest in grey)."""
    if len(summaries) <= most:
        return sorted(summaries)
    ranked = sorted(summaries, key=lambda k: -np.nan_to_num(summaries[k]["aubc"][0], nan=-1))
    picks = [RANDOM, "ema_kl", *ranked[:3], *ranked[-2:]]
    return [k for i, k in enumerate(picks) if k in summaries and k not in picks[:i]]


def plot(name: str, summaries: dict, full: tuple[float, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    shown = highlighted(summaries)
    others = [strategy for strategy in sorted(summaries) if strategy not in shown]
    for i, strategy in enumerate(others):  # thin grey lines, one legend entry for all
        s = summaries[strategy]
        axis.plot(100 * np.asarray(s["fractions"]), s["accuracy"], color="0.75", linewidth=0.8,
                  label=f"{len(others)} other strategies" if i == 0 else None)
    for strategy, colour in zip(shown, plt.cm.tab10.colors):
        s = summaries[strategy]
        x, m, h = 100 * np.asarray(s["fractions"]), np.asarray(s["accuracy"]), np.asarray(s["ci"])
        style = {"linewidth": 2.4, "color": "black"} if strategy == RANDOM else {"color": colour}
        axis.plot(x, m, marker="o", markersize=3, label=f"{strategy} (n={s['n']})", **style)
        band = np.isfinite(h)
        if band.any():
            axis.fill_between(x[band], (m - h)[band], (m + h)[band],
                              color=style["color"], alpha=0.12)
    if np.isfinite(full[0]):
        axis.axhline(full[0], color="grey", linestyle="--", label=f"full supervision {full[0]:.3f}")
    axis.set_xlabel("labelled (% of the train split)")
    axis.set_ylabel("test accuracy (mean, 95% CI band)")
    axis.set_title(name)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(results: Path, plots: Path, datasets: list[str] | None = None) -> str:
    """The tables (markdown) and one plot per data set, from the CSV (and the queries CSV
    beside it, when there is one: junk and the arms albl chose)."""
    curves = read_results(results)
    queries_file = beside(results, "queries")
    queries = read_queries(queries_file) if queries_file.exists() else {}
    kinds_file = beside(results, "junk_kinds")
    kinds = read_junk_kinds(kinds_file) if kinds_file.exists() else {}
    parts = []
    for name in datasets or sorted(curves):
        if name not in curves:
            continue
        by_strategy = curves[name]
        random_seeds = by_strategy.get(RANDOM)
        summaries = {strategy: summarise_strategy(seeds, random_seeds)
                     for strategy, seeds in by_strategy.items()
                     if strategy != FULL and strategy not in OWN_BUDGETS}
        full = full_accuracy(by_strategy)
        plot(name, summaries, full, plots / f"label_efficiency_{name}.png")
        parts.append(table(name, summaries, full))
        parts.append(comparisons_table(name, by_strategy))
        parts.append(albl_arms_table(name, by_strategy))
        parts.append(beyond_table(name, by_strategy, full))
        parts += [cold_start_table(name, by_strategy),
                  junk_table(name, by_strategy, queries.get(name, {}), kinds.get(name)),
                  *[arms_table(name, row, seeds) for row, seeds in sorted(queries.get(name, {}).items())
                    if row.startswith("albl") and row != "albl_uniform"]]
    rerun_file = beside(results, "rerun")
    newest = with_reruns(curves, read_results(rerun_file)) if rerun_file.exists() else curves
    parts.append(across_sets_table(newest, datasets))
    classes_file = beside(results, "classes")
    if classes_file.exists():
        parts.append(balance_table(read_class_counts(classes_file), datasets))
    details_file = beside(results, "models")
    if details_file.exists():
        parts.append(classifier_table(read_details(details_file), datasets))
    code_file = beside(results, "code")
    if code_file.exists():
        parts.append(code_pairs_note(read_codes(code_file), curves, datasets))
    return "\n".join(part for part in parts if part)


def read_codes(path: Path) -> dict:
    """{dataset: {row: {seed: code}}} from the code file beside the results."""
    codes: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            codes.setdefault(r["dataset"], {}).setdefault(r["strategy"], {})[int(r["seed"])] = r["code"]
    return codes


def code_pairs_note(codes: dict, curves: dict, datasets: list[str] | None = None) -> str:
    """The seeds whose "AUBC − random" pairs two runs of different training code, per data set
    and row (only where both runs' code is known: campaigns from before 2026-11-27 18:30 have
    none recorded)."""
    lines = []
    for name in datasets or sorted(curves):
        random_codes = codes.get(name, {}).get(RANDOM, {})
        for row in sorted(curves.get(name, {})):
            if row in (RANDOM, FULL) or row in OWN_BUDGETS:
                continue
            row_codes = codes.get(name, {}).get(row, {})
            seeds = [s for s in sorted(row_codes) if s in random_codes and row_codes[s] != random_codes[s]]
            if seeds:
                lines.append(f"| {name} | {row} | {', '.join(map(str, seeds))} |")
    if not lines:
        return ""
    return "\n".join(["#### Pairs across code versions", "",
                      'Seeds whose "AUBC − random" pairs runs of different code (a change anywhere under '
                      '`orchestrator/`: one that did not touch training leaves a true pair, one that '
                      'did makes it none).',
                      "", "| data set | row | seeds |", "|---|---|---|", *lines]) + "\n"


# --- the recipe's questions: KL direction, the regulariser, the mean teacher, T or M -----------

# (question, row B, row A): B − A in AUBC, paired by seed
COMPARISONS = [
    ("KL direction: KL(M‖T), the authors' script, minus KL(T‖M), the paper", "ema_kl_reverse", "ema_kl"),
    ("the λ·MSE(T, M) regulariser: EMA-KL with it minus without it", "ema_kl", "ema_kl_selection_only"),
    ("the mean teacher on unlabelled volumes: semi-supervised minus supervised EMA-KL", "ema_kl_semi", "ema_kl"),
    ("the same with the unlabelled term weighted λ = 0.03 (the paper's) instead of 1",
     "ema_kl_semi_lam0.03", "ema_kl"),
    ("class balance: EMA-KL in equal shares of the predicted classes minus plain EMA-KL",
     "ema_kl_class_balanced", "ema_kl"),
    ("class balance: entropy in equal shares of the predicted classes minus plain entropy",
     "entropy_class_balanced", "entropy"),
]


def comparisons_table(name: str, by_strategy: dict) -> str:
    """Paired AUBC differences that answer the recipe's questions, over the seeds both rows
    have finished."""
    lines = []
    for question, b, a in COMPARISONS:
        if a not in by_strategy or b not in by_strategy:
            continue
        aubcs = {row: {seed: aubc(c[0], c[2]) for seed, c in by_strategy[row].items()
                       if len(c[0]) == len(FRACTIONS)} for row in (a, b)}
        seeds = sorted(set(aubcs[a]) & set(aubcs[b]))
        if seeds:
            diff = paired(aubcs[a], aubcs[b])
            lines.append(f"| {question} | `{b}` − `{a}` | {len(seeds)} | {_signed(*diff)} |")
    if not lines:
        return ""
    return "\n".join([f"#### {name}: the recipe's questions (AUBC, paired by seed)", "",
                      "| question | difference | seeds | AUBC difference (95% CI) |",
                      "|---|---|---|---|", *lines]) + "\n"


ALBL_ARMS = ("random", "entropy", "ema_kl", "coreset")  # the arms of every albl row


def albl_arms_table(name: str, by_strategy: dict) -> str:
    """Issue 17's first target: each albl row's AUBC minus each arm's (run alone), paired by
    seed over the seeds both finished; * where the 95% CI excludes zero."""
    def aubcs(row):
        return {seed: aubc(c[0], c[2]) for seed, c in by_strategy.get(row, {}).items()
                if len(c[0]) == len(FRACTIONS)}

    arms = [arm for arm in ALBL_ARMS if aubcs(arm)]
    rows = [row for row in sorted(by_strategy) if row.startswith("albl") and row not in OWN_BUDGETS]
    if not arms or not rows:
        return ""
    best = max(arms, key=lambda arm: np.mean(list(aubcs(arm).values())))
    lines = [f"#### {name}: albl against each of its arms (AUBC, paired by seed)", "",
             "| row | seeds | " + " | ".join(f"− {arm}" for arm in arms) + " | ≥ best arm within CI? |",
             "|---|---|" + "---|" * len(arms) + "---|"]
    for row in rows:
        mine = aubcs(row)
        diffs = {arm: paired(aubcs(arm), mine) for arm in arms}
        mean, half = diffs[best]
        verdict = "yes" if mean + half >= 0 else "**no**"
        lines.append(f"| {row} | {len(mine)} | " + " | ".join(_signed(*diffs[arm]) for arm in arms)
                     + f" | {verdict} (best: {best}) |")
    return "\n".join(lines) + "\n"


def with_reruns(curves: dict, reruns: dict) -> dict:
    """`curves` with each seed that `reruns` ran again replaced by its rerun (a row's seeds
    rerun under the code of the rows it pairs with, kept in a results file of their own)."""
    merged = {name: {row: dict(seeds) for row, seeds in rows.items()} for name, rows in curves.items()}
    for name, rows in reruns.items():
        for row, seeds in rows.items():
            merged.setdefault(name, {}).setdefault(row, {}).update(seeds)
    return merged


AUTOMATIC = "albl_balance"  # the automatic choice judged across data sets (albl's default)


def across_sets_table(curves: dict, datasets: list[str] | None = None, row: str = AUTOMATIC) -> str:
    """What choosing per task is worth: on each data set where `row` and every albl arm ran,
    each one's AUBC minus the best arm's there (best by its mean, so in hindsight; paired by
    seed, * where the 95% CI excludes zero), then each one's worst and mean over the sets. A
    fixed arm is safe only if it is never far below the best; the automatic row should be."""
    columns = [*ALBL_ARMS, row]
    lines = []
    worst: dict[str, list[float]] = {column: [] for column in columns}
    for name in datasets or sorted(curves):
        aubcs = {column: {seed: aubc(c[0], c[2]) for seed, c in curves.get(name, {}).get(column, {}).items()
                          if len(c[0]) == len(FRACTIONS)} for column in columns}
        if not all(aubcs.values()):
            continue
        best = max(ALBL_ARMS, key=lambda arm: np.mean(list(aubcs[arm].values())))
        cells = []
        for column in columns:
            mean, half = paired(aubcs[best], aubcs[column])
            worst[column].append(mean)
            cells.append("best" if column == best else _signed(mean, half))
        lines.append(f"| {name} | {best} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    head = f"| data set | best arm | {' | '.join(columns)} |"
    return "\n".join([
        f"#### {row} and its arms across data sets: AUBC − the best arm's (paired by seed)", "",
        head, "|---|---|" + "---|" * len(columns), *lines,
        "| **worst** | | " + " | ".join(f"{np.nanmin(worst[c]):+.3f}" for c in columns) + " |",
        "| mean | | " + " | ".join(f"{np.nanmean(worst[c]):+.3f}" for c in columns) + " |",
    ]) + "\n"


def read_details(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def classifier_table(rows: list[dict], datasets: list[str] | None) -> str:
    """How often the validation split kept M rather than T, and what that was worth on test:
    per data set, the chosen model's test accuracy minus T's, over every trained cycle."""
    lines = []
    for name in sorted({r["dataset"] for r in rows}):
        if datasets and name not in datasets:
            continue
        mine = [r for r in rows if r["dataset"] == name and r["classifier"] in ("task", "mean")]
        if not mine:
            continue
        task = np.array([_float(r["test_accuracy_task"]) for r in mine])
        mean = np.array([_float(r["test_accuracy_mean"]) for r in mine])
        chosen = np.where([r["classifier"] == "mean" for r in mine], mean, task)
        share = np.mean([r["classifier"] == "mean" for r in mine])
        lines.append(f"| {name} | {len(mine)} | {100 * share:.0f}% | {_pm(*mean_ci(task))} | "
                     f"{_pm(*mean_ci(mean))} | {_signed(*mean_ci(chosen - task))} | "
                     f"{_signed(*mean_ci(mean - task))} |")
    if not lines:
        return ""
    return "\n".join(["#### T or M: which model the validation split kept", "",
                      "| data set | cycles | M kept | test T | test M | chosen − T | M − T |",
                      "|---|---|---|---|---|---|---|", *lines]) + "\n"


# --- why: how balanced each strategy's labelled set is ------------------------------------------


def read_class_counts(path: Path) -> dict:
    """{dataset: {strategy: {seed: {label: count}}}}."""
    out: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            seeds = out.setdefault(r["dataset"], {}).setdefault(r["strategy"], {})
            seeds.setdefault(int(r["seed"]), {})[int(r["label"])] = int(r["count"])
    return out


def balance(counts: dict[int, int], num_classes: int) -> float:
    """Entropy of the class shares over log(number of classes): 1 for equal classes, lower as
    the labels pile up on fewer."""
    total = sum(counts.values())
    shares = [n / total for n in counts.values() if n > 0]
    return -sum(p * np.log(p) for p in shares) / np.log(num_classes)


def balance_table(by_dataset: dict, datasets: list[str] | None) -> str:
    """Per data set and strategy, over seeds: the balance of the final labelled set and its
    fewest and most labels in one class, most balanced first."""
    lines = []
    for name in datasets or sorted(by_dataset):
        strategies = by_dataset.get(name, {})
        num_classes = max((len(c) for seeds in strategies.values() for c in seeds.values()), default=0)
        if num_classes < 2:
            continue
        rows = []
        for strategy, seeds in strategies.items():
            full = [{k: c.get(k, 0) for k in range(num_classes)} for c in seeds.values()]
            rows.append((float(np.mean([balance(c, num_classes) for c in full])), strategy, len(full),
                         np.mean([min(c.values()) for c in full]), np.mean([max(c.values()) for c in full])))
        lines += [f"#### {name}: class balance of the labelled set at the last budget", "",
                  "| strategy | seeds | balance (entropy / log C) | fewest in a class | most in a class |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s} | {n} | {b:.3f} | {lo:.0f} | {hi:.0f} |" for b, s, n, lo, hi in sorted(rows, reverse=True)]
        lines.append("")
    return "\n".join(lines)


# --- issue 17: cold start, junk, the arms albl chose ---------------------------------------------


def read_queries(path: Path) -> dict:
    """{dataset: {strategy: {seed: {cycle: {chosen_by: (queried, junk)}}}}}."""
    out: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            cycles = out.setdefault(r["dataset"], {}).setdefault(r["strategy"], {}).setdefault(
                int(r["seed"]), {})
            cycles.setdefault(int(r["cycle"]), {})[r["chosen_by"]] = (int(r["queried"]), int(r["junk"]))
    return out


def first_budget(seeds: dict | None) -> dict[int, float]:
    """Test accuracy of cycle 0 (the first budget) per seed."""
    return {seed: c[2][0] for seed, c in (seeds or {}).items() if c[2]}


def paired(first: dict[int, float], second: dict[int, float]) -> tuple[float, float]:
    """Mean and 95% CI half-width of second − first over the seeds both have."""
    return mean_ci([second[s] - first[s] for s in first if s in second])


def cold_start_table(name: str, by_strategy: dict) -> str:
    """Accuracy of the first labels alone, drawn at random or chosen by TypiClust (over each
    embedding that ran): one-cycle campaigns at 1–5%, and cycle 0 of `random` and of
    `typiclust_start` and `typiclust_density_start` (5%), each paired by seed with the draw."""
    methods = [method for method, _ in COLD_METHODS[1:]
               if any(f"cold_{method}_{round(100 * f)}pct" in by_strategy for f in COLD_FRACTIONS)]
    budgets = [(f"{100 * f:g}%", {m: by_strategy.get(f"cold_{m}_{round(100 * f)}pct")
                                  for m in ("random", *methods)}) for f in COLD_FRACTIONS]
    budgets.append((f"{100 * FRACTIONS[0]:g}%, the campaigns' cycle 0",
                    {"random": by_strategy.get(RANDOM), "typiclust": by_strategy.get("typiclust_start"),
                     "typiclust_density": by_strategy.get("typiclust_density_start")}))
    lines = []
    for budget, rows in budgets:
        first = first_budget(rows["random"])
        chosen = {m: first_budget(rows.get(m)) for m in methods}
        if not (first and any(chosen.values())):
            continue
        cells = [f"{_pm(*mean_ci(first.values()))} ({len(first)})"]
        for m in methods:
            cells += [f"{_pm(*mean_ci(chosen[m].values()))} ({len(chosen[m])})",
                      _signed(*paired(first, chosen[m]))] if chosen[m] else ["", ""]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    heads = [h for m in methods for h in (f"{m} (seeds)", f"{m} − random (paired)")]
    return "\n".join([f"#### {name}: cold start (test accuracy of the first labels alone)", "",
                      "| labelled | random draw (seeds) | " + " | ".join(heads) + " |",
                      "|---|---|" + "---|" * len(heads), *lines]) + "\n"


def junk_share(cycles: dict, first_cycle: bool) -> float:
    """The share of a campaign's queries answered junk: in cycle 0, or in every later cycle."""
    chosen = [tally for cycle, by in cycles.items() if (cycle == 0) == first_cycle
              for tally in by.values()]
    asked = sum(n for n, _ in chosen)
    return sum(j for _, j in chosen) / asked if asked else float("nan")


def read_junk_kinds(path: Path) -> dict:
    """{dataset: {strategy: {kind: queries answered junk}}}, over every seed and the cycles
    after the first draw (the selected queries)."""
    out: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if int(r["cycle"]) > 0:
                kinds = out.setdefault(r["dataset"], {}).setdefault(r["strategy"], {})
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + int(r["queried"])
    return out


def junk_table(name: str, by_strategy: dict, queries: dict, kinds: dict | None = None) -> str:
    """Per strategy: the share of its selected queries (cycles ≥ 1) answered junk, against
    entropy's (the ratio of the means, and the share minus half of entropy's paired by seed:
    issue 17's target, at most half), that of its first draw, and accuracy on the real classes;
    on data sets whose queries met junk. With `kinds` ({strategy: {kind: n}}), what the junk
    among the selected queries was."""
    if not any(j for seeds in queries.values() for cycles in seeds.values()
               for by in cycles.values() for _, j in by.values()):
        return ""
    shares = {strategy: {seed: junk_share(cycles, False) for seed, cycles in seeds.items()}
              for strategy, seeds in queries.items() if strategy not in OWN_BUDGETS and strategy != FULL}
    entropy_shares = shares.get("entropy", {})
    entropy = mean_ci(entropy_shares.values())[0]
    half_entropy = {seed: share / 2 for seed, share in entropy_shares.items()}
    named = sorted({kind for counts in (kinds or {}).values() for kind in counts})
    by_kind = f" | of it (all seeds): {' / '.join(named)}" if named else ""
    lines = [f"#### {name}: junk in the queries", "",
             "| strategy | seeds | junk share of selected queries | vs entropy | − ½ entropy's (paired) "
             f"| junk share of cycle 0 | test accuracy at {100 * FRACTIONS[-1]:g}% (real classes) "
             f"| AUBC{by_kind} |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if named else "")]
    for strategy in sorted(shares, key=lambda s: np.nan_to_num(mean_ci(shares[s].values())[0], nan=2)):
        curves = {s: c for s, c in by_strategy.get(strategy, {}).items() if len(c[0]) == len(FRACTIONS)}
        share = mean_ci(shares[strategy].values())
        ratio = f"{share[0] / entropy:.2f}×" if np.isfinite(entropy) and entropy > 0 else ""
        below_half = _signed(*paired(half_entropy, shares[strategy])) if strategy != "entropy" else ""
        first = mean_ci(junk_share(c, True) for c in queries[strategy].values())
        counts = (kinds or {}).get(strategy)
        of_it = (" | " + " / ".join(str(counts.get(k, 0)) for k in named) if counts else " | ") if named else ""
        lines.append(f"| {strategy} | {len(shares[strategy])} | {_pm(*share)} | {ratio} | {below_half} | {_pm(*first)} | "
                     f"{_pm(*mean_ci(c[2][-1] for c in curves.values()))} | "
                     f"{_pm(*mean_ci(aubc(c[0], c[2]) for c in curves.values()))}{of_it} |")
    return "\n".join(lines) + "\n"


def arms_table(name: str, row: str, seeds: dict) -> str:
    """Which base strategies an albl row queried with, per cycle: each arm's share of the
    cycle's queries, mean over seeds."""
    per_cycle: dict[int, list[dict[str, float]]] = {}
    for cycles in seeds.values():
        for cycle, by in cycles.items():
            asked = sum(n for n, _ in by.values())
            if cycle > 0 and asked:
                per_cycle.setdefault(cycle, []).append({arm: n / asked for arm, (n, _) in by.items()})
    if not per_cycle:
        return ""
    arms = sorted({arm for shares in per_cycle.values() for s in shares for arm in s})
    lines = [f"#### {name}: the base strategies {row} chose (share of each cycle's queries)", "",
             "| cycle | seeds | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for cycle, shares in sorted(per_cycle.items()):
        cells = [f"{np.mean([s.get(arm, 0.0) for s in shares]):.2f}" for arm in arms]
        lines.append(f"| {cycle} | {len(shares)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["shrec13_snr0.05"], choices=list(DATASETS))
    parser.add_argument("--strategies", nargs="+", default=[run[0] for run in RUNS],
                        help="rows to run (full supervision runs too, unless --no-full; `full` "
                             "alone runs only it)")
    parser.add_argument("--no-full", action="store_true",
                        help="skip full supervision: for rows compared only with each other, such "
                             "as cold starts on seeds that have no full-supervision run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="campaigns at a time")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "label_efficiency")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the CSV to write")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override every campaign's config, e.g. for a GPU cluster: "
                             "--set model.name=resnet18 --set model.width=64 --set train.epochs=100 "
                             "(use another --out and --results: finished runs are not rerun)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="subtomograms simulated per class (default: 200 SHREC, 60 built-in)")
    parser.add_argument("--report-only", action="store_true",
                        help="tables and plots from --results, run nothing")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.per_class:
        for settings in DATASETS.values():
            settings["per_class"] = args.per_class
    unknown = sorted(set(args.strategies) - {run[0] for run in RUNS} - {FULL})
    if unknown:
        parser.error(f"unknown strategies {unknown}; valid: {[run[0] for run in RUNS]}")
    if not args.report_only:
        run_all(args, args.strategies)
        write_results(args.out, args.results)
    text = report(args.results, args.plots, args.datasets)
    print("\n" + text)


if __name__ == "__main__":
    main()
