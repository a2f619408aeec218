"""The load generator against the service's real batcher and the tiny engine, and the pruning rule."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import optuna
import pytest

from similarity_service.batching import Batcher
from similarity_service.engine_api import EncodedPair
from similarity_service.runner import Engine

from similarity_autotune.benchmark import LoadGenerator, LoadSettings
from similarity_autotune.objective import BelowBestPruner
from similarity_autotune.study import best_trial

FAST = LoadSettings(step_seconds=0.1, probe_seconds=0.05, fractions=(0.25, 0.5), bisections=1)


@pytest.fixture
def requests(tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]) -> list[list[EncodedPair]]:
    return [[pair] for pair in tiny_engine.encode(chinese_pairs)]


@pytest.fixture
async def batcher(tiny_engine: Engine) -> AsyncIterator[Batcher]:
    batcher = Batcher(tiny_engine, max_batch_size=8, max_wait_ms=1.0, max_batch_tokens=None, max_queue_pairs=4096)
    await batcher.start()
    yield batcher
    await batcher.close()


async def test_an_open_loop_step_offers_exactly_its_rate_and_times_every_answer(
    batcher: Batcher, requests: list[list[EncodedPair]]
) -> None:
    step = await LoadGenerator(requests, FAST).open_loop(batcher, rate=100.0, seconds=0.2, seed=1)
    assert step.offered == 20 and step.completed == 20
    assert step.rejected == step.failed == 0
    assert step.throughput == pytest.approx(100.0)
    assert 0 < step.p50_ms <= step.p99_ms < math.inf


async def test_rejections_fail_a_step(tiny_engine: Engine, requests: list[list[EncodedPair]]) -> None:
    tight = Batcher(tiny_engine, max_batch_size=1, max_wait_ms=0.0, max_batch_tokens=None, max_queue_pairs=1)
    await tight.start()
    try:
        step = await LoadGenerator(requests, FAST).open_loop(tight, rate=2000.0, seconds=0.05, seed=1)
    finally:
        await tight.close()
    assert step.rejected > 0 and step.completed < step.offered
    assert step.p99_ms == math.inf  # a refused request counts as never answered


async def test_measure_finds_a_passing_rate_below_capacity(batcher: Batcher, requests: list[list[EncodedPair]]) -> None:
    result = await LoadGenerator(requests, FAST).measure(batcher, slo_p99_ms=5000, max_batch_size=8)
    kinds = [step.kind for step in result.steps]
    assert kinds[0] == "probe" and set(kinds[1:]) == {"open"}
    assert result.capacity > 0 and result.best is not None and result.best.passed
    # Rising rates: the open steps go up until the first failure (none here, with this SLO).
    rates = [step.rate for step in result.steps[1:]]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.5 * result.capacity)
    assert result.throughput == pytest.approx(result.best.throughput)


async def test_an_unreachable_slo_stops_at_the_lowest_rate(batcher: Batcher, requests: list[list[EncodedPair]]) -> None:
    result = await LoadGenerator(requests, FAST).measure(batcher, slo_p99_ms=0.001, max_batch_size=8)
    assert [step.kind for step in result.steps] == ["probe", "open"]
    assert result.best is None and result.throughput == 0.0


async def test_a_hopeless_trial_stops_after_the_probe(batcher: Batcher, requests: list[list[EncodedPair]]) -> None:
    calls: list[tuple[int, float, float]] = []

    def on_step(step: int, best: float, bound: float) -> bool:
        calls.append((step, best, bound))
        return True  # the pruner says: cannot beat the best

    result = await LoadGenerator(requests, FAST).measure(batcher, slo_p99_ms=5000, max_batch_size=8, on_step=on_step)
    assert result.stopped_early and len(result.steps) == 1
    assert calls == [(0, 0.0, result.capacity)]


def _trial(study: optuna.Study, value: float, *, feasible: bool) -> None:
    trial = study.ask()
    trial.set_constraint("slo", 0.0 if feasible else 1.0)
    study.tell(trial, value)


def test_the_pruner_stops_a_trial_whose_bound_is_below_the_best_feasible_value() -> None:
    study = optuna.create_study(direction="maximize", pruner=BelowBestPruner())
    _trial(study, 1000.0, feasible=False)  # infeasible: its value does not count
    _trial(study, 100.0, feasible=True)

    hopeless, promising = study.ask(), study.ask()
    hopeless.report(90.0, 0)
    promising.report(500.0, 0)
    assert hopeless.should_prune() and not promising.should_prune()
    assert best_trial(study.trials).value == 100.0  # the feasible one, not the bigger infeasible one
