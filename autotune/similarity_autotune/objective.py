"""The Optuna objective: one trial = one serving config measured on the served path.

Value: the highest sustained throughput (pairs/s) with p99 under the SLO; maximized. Two constraints
(`trial.set_constraint`, feasible when <= 0): `accuracy` (the precision's errors against fp32 break
the tolerance) and `slo` (no rate met the SLO, not even the lowest). A precision that fails the
accuracy guard is not measured at all. After each rate step the trial reports the most it could still
reach; `BelowBestPruner` stops it once that is clearly below the best feasible trial so far.

Measurements repeat to a few percent, not exactly: trials within `NEAR_TIE` of the best are ties (the
study then prefers the lowest p99, see `study.best_trial`), and a trial that could still reach a tie is
not pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from similarity_service.profile import PrecisionAccuracy

from similarity_autotune.accuracy import AccuracyGuard
from similarity_autotune.benchmark import LoadGenerator, Measurement
from similarity_autotune.runtime import ServingRuntime
from similarity_autotune.space import SearchSpace, ServingConfig

# User-attribute keys of a trial's evidence (read back by the report, the plot and the profile).
ATTR_P50 = "p50_ms"
ATTR_P99 = "p99_ms"
ATTR_CAPACITY = "capacity"
ATTR_UPPER = "upper"
ATTR_STEPS = "steps"
ATTR_SKIPPED = "skipped"

# Relative throughput difference below which two configs count as tied: about what one config's
# value moves between repeated measurements (bench/autotune_repeatability.py).
NEAR_TIE = 0.03


class TrialObserver(Protocol):
    """Progress display hooks (the command's progress bar); the objective works without one."""

    def trial_started(self, number: int, config: ServingConfig, steps: int) -> None: ...
    def step_done(self, number: int, best: float, bound: float) -> None: ...
    def trial_finished(self, number: int, config: ServingConfig, measurement: Measurement | None, note: str) -> None: ...


@dataclass
class Objective:
    """Callable objective for `study.optimize`."""

    space: SearchSpace
    runtime: ServingRuntime
    load: LoadGenerator
    slo_p99_ms: float
    guard: AccuracyGuard
    accuracy: dict[str, PrecisionAccuracy]
    observer: TrialObserver | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        config = self.space.suggest(trial)
        accuracy = self.accuracy[config.precision]
        trial.set_constraint("accuracy", self.guard.violation(accuracy))
        if not accuracy.admissible:
            # Infeasible whatever it measures: spend no time on it.
            trial.set_constraint("slo", 0.0)
            trial.set_user_attr(ATTR_SKIPPED, f"{config.precision} fails the accuracy guard")
            self._notify_finished(trial.number, config, None, "skipped: fails the accuracy guard")
            return 0.0

        batcher = self.runtime.batcher(config)
        if self.observer:
            self.observer.trial_started(trial.number, config, self.load.settings.max_steps())

        def on_step(step: int, best: float, bound: float) -> bool:
            if self.observer:
                self.observer.step_done(trial.number, best, bound)
            trial.report(bound, step)
            return trial.should_prune()

        measurement = self.runtime.run(
            self.load.measure(
                batcher,
                slo_p99_ms=self.slo_p99_ms,
                max_batch_size=config.max_batch_size,
                probe_concurrency=min(2 * config.max_batch_size, self.runtime.max_queue_pairs),
                on_step=on_step,
            )
        )
        self._record(trial, measurement)
        if measurement.stopped_early:
            self._notify_finished(trial.number, config, measurement, "pruned: cannot beat the best")
            raise optuna.TrialPruned()
        self._notify_finished(
            trial.number, config, measurement, "" if measurement.best else "misses the SLO at every rate"
        )
        return measurement.throughput

    def _record(self, trial: optuna.Trial, measurement: Measurement) -> None:
        best = measurement.best
        for key, value in measurement.evidence().items():
            trial.set_user_attr(key, _json_safe(value))
        if best is not None:
            trial.set_user_attr(ATTR_P50, best.p50_ms)
            trial.set_user_attr(ATTR_P99, best.p99_ms)
            trial.set_constraint("slo", 0.0)
        else:
            # How far the lowest rate's p99 was over the SLO (inf → a large finite number for the sampler).
            opened = [step for step in measurement.steps if step.kind == "open"]
            over = (opened[0].p99_ms - self.slo_p99_ms) / self.slo_p99_ms if opened else 1.0
            trial.set_constraint("slo", min(max(over, 1e-9), 1e6) if math.isfinite(over) else 1e6)

    def _notify_finished(
        self, number: int, config: ServingConfig, measurement: Measurement | None, note: str
    ) -> None:
        if self.observer:
            self.observer.trial_finished(number, config, measurement, note)


class BelowBestPruner(optuna.pruners.BasePruner):
    """Prune a trial whose reported upper bound is below the best feasible value so far, by more than
    a near tie.

    Each report is the most the trial can still reach (its probe's best window, then the first rate
    that failed), so a pruned trial could not have become the best, nor tied with it: pruning only
    saves time.
    """

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        best = best_feasible_value(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        return best is not None and trial.intermediate_values[step] < best * (1 - NEAR_TIE)


def is_feasible(trial: FrozenTrial) -> bool:
    """Complete, and every constraint satisfied (<= 0)."""
    return trial.state == TrialState.COMPLETE and all(v <= 0 for v in trial.constraints.values())


def best_feasible_value(trials: list[FrozenTrial]) -> float | None:
    values = [t.value for t in trials if is_feasible(t) and t.value is not None and t.value > 0]
    return max(values) if values else None


def _json_safe(value: object) -> object:
    """Infinite latencies (unanswered requests) as None: JSON has no infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value
