"""What the user sees: a progress bar per trial, one line per finished trial, a table of the best configs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TextIO

from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from similarity_autotune.benchmark import Measurement
from similarity_autotune.objective import ATTR_P50, ATTR_P99, ATTR_SKIPPED, is_feasible
from similarity_autotune.space import ServingConfig


class ProgressReporter:
    """A tqdm bar over each trial's rate steps (on a terminal), and a summary line per trial (always)."""

    def __init__(self, stream: TextIO, *, bars: bool) -> None:
        self._stream = stream
        self._bars = bars
        self._bar: tqdm[None] | None = None

    def trial_started(self, number: int, config: ServingConfig, steps: int) -> None:
        if self._bars:
            self._bar = tqdm(total=steps, desc=f"trial {number}: {config.label()}", file=self._stream, leave=False)

    def step_done(self, number: int, best: float, bound: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{best:,.0f} pairs/s (≤ {bound:,.0f})", refresh=False)
            self._bar.update()

    def trial_finished(
        self, number: int, config: ServingConfig, measurement: Measurement | None, note: str
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if measurement is None or measurement.best is None:
            result = note or "no result"
        else:
            best = measurement.best
            result = (
                f"{best.throughput:,.0f} pairs/s (at most {measurement.upper:,.0f}), "
                f"p50 {best.p50_ms:.1f} ms, p99 {best.p99_ms:.1f} ms"
            )
            result += f" ({note})" if note else ""
        print(f"trial {number}: {config.label()}: {result}", file=self._stream, flush=True)


def best_table(trials: Sequence[FrozenTrial], *, chosen: FrozenTrial | None, top: int = 5) -> str:
    """A plain-text table of the best feasible configs, best first; the chosen one is starred."""
    ranked = sorted(
        (t for t in trials if is_feasible(t) and (t.value or 0) > 0),
        key=lambda t: (-(t.value or 0.0), t.number),
    )[:top]
    header = ("", "trial", "precision", "max_batch_size", "max_wait_ms", "pairs/s", "p50 ms", "p99 ms")
    rows = [header]
    for trial in ranked:
        rows.append(
            (
                "*" if chosen is not None and trial.number == chosen.number else "",
                str(trial.number),
                str(trial.params["precision"]),
                str(trial.params["max_batch_size"]),
                f"{trial.params['max_wait_ms']:.2f}",
                f"{trial.value:,.0f}",
                _ms(trial.user_attrs.get(ATTR_P50)),
                _ms(trial.user_attrs.get(ATTR_P99)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def study_summary(trials: Sequence[FrozenTrial]) -> str:
    """How many trials completed, were pruned, skipped by the accuracy guard, or missed the SLO."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    skipped = sum(ATTR_SKIPPED in t.user_attrs for t in complete)
    feasible = sum(is_feasible(t) and (t.value or 0) > 0 for t in complete)
    missed = len(complete) - skipped - feasible
    return (
        f"{len(trials)} trials: {feasible} met the SLO, {missed} missed it at every rate, "
        f"{skipped} skipped (precision fails the accuracy guard), {pruned} pruned"
    )


def _ms(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) and math.isfinite(value) else "-"
