"""Which junk each detector can tell from particles: read back from the junk set's
label-efficiency campaigns (`bench/label_efficiency.py --datasets shrec13_snr0.05_junk0.2`),
nothing trained here.

    python bench/junk_detection.py        # after the junk set's poal and *_junk_class rows ran
    python bench/junk_detection.py --dataset shrec13_snr0.05_junk0.2_particle_noise \
        --results docs/results/junk_detection_particle_noise.csv

For every cycle's scoring pass of those campaigns, each candidate (train split, not labelled
yet) gets a junk score from each detector, and each junk kind of the simulator (empty, edge,
fragment, off-centre) is scored against the real particles:

- ``junk_output``: the learnt junk output's probability (`train.junk_class`, the `junk_prob`
  column), from the `*_junk_class` rows;
- ``poal_rule``: `poal`'s rule on the same pass's embeddings, from the `poal` rows: squared
  Mahalanobis distance to the nearest class mean of the labelled particles minus that to the
  nearest k-means centre of the labelled junk (positive: nearer junk, which `poal` asks last).

Per kind: the AUROC (1 = every such junk above every particle, 0.5 = chance) and the share
flagged at the operating point (`junk_prob` ≥ 0.5; for the rule, > 0); for particles the share
flagged (false alarms). Mean over campaigns and cycles. Raw rows: docs/results/junk_detection.csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.al import selection_math as sm  # noqa: E402
from orchestrator.distributed.score import column_array, read_scores  # noqa: E402

DATASET = "shrec13_snr0.05_junk0.2"
KINDS = ("empty", "edge", "fragment", "off_centre")
RESULTS = ROOT / "docs" / "results" / "junk_detection.csv"
COLUMNS = ["detector", "run", "cycle", "kind", "n", "auroc", "flagged"]


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a positive row scores above a negative one (ties count half)."""
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # mid-ranks, from 1
    pos, neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg)) if pos and neg else float("nan")


def kinds_of(ids) -> np.ndarray:
    """The simulator's junk kind from the id (junk-<kind>-NNNNNN), "particle" otherwise."""
    return np.array([i.split("-")[1] if i.startswith("junk-") else "particle" for i in ids])


def answered_before(run: Path, cycle: int) -> dict[str, int]:
    """The ledger's answers that the model of `cycle` was trained on."""
    with open(run / "labels.csv", newline="") as f:
        return {r["subtomo_id"]: int(r["label"]) for r in csv.DictReader(f) if int(r["cycle"]) <= cycle}


def poal_rule(table, answers: dict[str, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the candidates, poal's junk rule score) for one pass: positive = nearer junk."""
    ids = np.asarray(table.column("subtomo_id").to_pylist())
    x = column_array(table, "embeddings").astype(np.float64)
    label = np.array([answers.get(i, -2) for i in ids])
    real, junk, candidate = label >= 0, label == -1, label == -2
    if not real.any() or not junk.any():
        return ids[:0], np.zeros(0)
    _, means, precision = sm.fit_gaussians(x[real], label[real], 0.5)
    _, centres = sm.kmeans(x[junk], 8, np.random.default_rng(seed), 10)
    to_class = sm.mahalanobis_sq(x[candidate], means, precision).min(axis=1)
    to_junk = sm.mahalanobis_sq(x[candidate], centres, precision).min(axis=1)
    return ids[candidate], to_class - to_junk


def junk_output(table, answers: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the candidates, the learnt junk output's probability) for one pass."""
    ids = np.asarray(table.column("subtomo_id").to_pylist())
    candidate = np.array([i not in answers for i in ids])
    return ids[candidate], table.column("junk_prob").to_numpy()[candidate] - 0.5


def measure(runs: Path, dataset: str = DATASET) -> list[dict]:
    out = []
    detectors = {"junk_output": ("*_junk_class-seed*", ["row", "subtomo_id", "junk_prob"]),
                 "poal_rule": ("poal-seed*", ["row", "subtomo_id", "embeddings"])}
    for detector, (pattern, columns) in detectors.items():
        for run in sorted((runs / dataset).glob(pattern)):
            if not run.is_dir():
                continue
            for scores in sorted(run.glob("cycles/c*/scores")):
                cycle = int(scores.parent.name[1:])
                table = read_scores(scores, columns)
                answers = answered_before(run, cycle)
                ids, score = (junk_output(table, answers) if detector == "junk_output"
                              else poal_rule(table, answers, seed=cycle))
                kinds = kinds_of(ids)
                particle = kinds == "particle"
                for kind in (*KINDS, "particle"):
                    mask = kinds == kind
                    if not mask.any():
                        continue
                    area = auroc(score[mask | particle], kinds[mask | particle] == kind) if kind != "particle" else float("nan")
                    out.append({"detector": detector, "run": run.name, "cycle": cycle, "kind": kind,
                                "n": int(mask.sum()), "auroc": area, "flagged": float((score[mask] > 0).mean())})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| detector | campaigns × cycles | " + " | ".join(f"{k}: AUROC, flagged" for k in KINDS)
             + " | particles flagged |", "|---|---|" + "---|" * (len(KINDS) + 1)]
    for detector in sorted({r["detector"] for r in rows}):
        mine = [r for r in rows if r["detector"] == detector]
        passes = len({(r["run"], r["cycle"]) for r in mine})
        cells = []
        for kind in KINDS:
            k = [r for r in mine if r["kind"] == kind]
            cells.append(f"{np.mean([r['auroc'] for r in k]):.3f}, {np.mean([r['flagged'] for r in k]):.0%}" if k else "–")
        particles = [r["flagged"] for r in mine if r["kind"] == "particle"]
        lines.append(f"| {detector} | {passes} | " + " | ".join(cells) + f" | {np.mean(particles):.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "label_efficiency" / "runs")
    parser.add_argument("--dataset", default=DATASET, help="the junk data set whose campaigns to read")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.runs / args.dataset).is_dir():
        raise SystemExit(f"no campaigns of {args.dataset} under {args.runs}: run bench/label_efficiency.py "
                         f"--datasets {args.dataset} --strategies poal random_junk_class first")
    rows = measure(args.runs, args.dataset)
    if not rows:
        raise SystemExit(f"no scoring passes of poal or *_junk_class campaigns under {args.runs / args.dataset}")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(table(rows))
    print(f"\nraw rows: {args.results}")


if __name__ == "__main__":
    main()
