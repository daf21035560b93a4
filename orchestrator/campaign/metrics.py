"""A campaign's cycles in numbers and lines of text: the summary line of each cycle, the table at
the end, and the area under the learning curve. Shared by the campaign, report.html, sweeps
and the benchmarks (bench/label_efficiency.py)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["aubc", "cycle_line", "accuracy_table", "number_text"]


def aubc(fractions, accuracies) -> float:
    """Area under accuracy vs labelled fraction (trapezoids) over the fraction range: a flat
    curve at accuracy a gives a; a single point gives its accuracy."""
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(accuracies, dtype=float)
    if len(x) == 0 or not np.all(np.isfinite(y)):
        return float("nan")
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / float(x[-1] - x[0])


def cycle_line(c: dict) -> str:
    """The cycle's summary: accuracy, then whether the model still changes (κ with the previous
    cycle's predictions on the unlabelled pool) and how unsure it is of that pool."""
    return (
        f"cycle {c['cycle']}: {c['labelled']} labelled ({100 * c['labelled_fraction']:.1f}%)  "
        f"val {_float(c.get('val_accuracy')):.3f}  test {_float(c.get('test_accuracy')):.3f}  "
        f"κ {number_text(c.get('agreement'))}  uncertainty {number_text(c.get('uncertainty'))}"
        f"  (train {c.get('seconds_train', 0):.0f} s, score {c.get('seconds_score', 0):.0f} s)"
    )


def accuracy_table(cycles: list[dict]) -> str:
    """The end-of-campaign table (markdown), one row per cycle."""
    lines = ["| cycle | labelled | fraction | val acc | test acc | κ | uncertainty |",
             "|---|---|---|---|---|---|---|"]
    for c in cycles:
        lines.append(
            f"| {c['cycle']} | {c['labelled']} | {100 * c['labelled_fraction']:.1f}% | "
            f"{_float(c.get('val_accuracy')):.3f} | {_float(c.get('test_accuracy')):.3f} | "
            f"{number_text(c.get('agreement'))} | {number_text(c.get('uncertainty'))} |"
        )
    return "\n".join(lines)


def number_text(value, digits: int = 3) -> str:
    """A number as the tables show it; missing or NaN is a dash."""
    value = math.nan if value is None or value == "" else float(value)
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _float(value) -> float:
    return float("nan") if value is None else float(value)
