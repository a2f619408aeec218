"""The load generator against the service's real batcher and the tiny engine; its windowed statistics,
heap freezing and event loop; the pruning and near-tie rules."""

from __future__ import annotations

import asyncio
import gc
import math
import sys
import time
import weakref
from collections.abc import AsyncIterator, Sequence

import optuna
import pytest

from similarity_service.batching import Batcher
from similarity_service.commands.serve import GC_GEN0_THRESHOLD, GIL_SWITCH_INTERVAL_S
from similarity_service.engine_api import EncodedPair
from similarity_service.runner import Engine

from similarity_autotune.benchmark import MAX_WINDOW_STRETCH, LoadGenerator, LoadSettings
from similarity_autotune.objective import ATTR_P99, NEAR_TIE, BelowBestPruner
from similarity_autotune.runtime import ServingRuntime
from similarity_autotune.study import best_trial

FAST = LoadSettings(
    step_seconds=0.15, probe_seconds=0.06, warmup_seconds=0.03, min_window_requests=1, fractions=(0.25, 0.5), bisections=1
)


@pytest.fixture
def requests(tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]) -> list[list[EncodedPair]]:
    return [[pair] for pair in tiny_engine.encode(chinese_pairs)]


@pytest.fixture
async def batcher(tiny_engine: Engine) -> AsyncIterator[Batcher]:
    batcher = Batcher(tiny_engine, max_batch_size=8, max_wait_ms=1.0, max_batch_tokens=None, max_queue_pairs=4096)
    await batcher.start()
    yield batcher
    await batcher.close()


class StallingBatcher:
    """Answers after 1 ms, except that requests arriving in [stall_from, stall_until) (seconds after the
    first request) are answered only at stall_until: a machine that stopped for a moment."""

    def __init__(self, stall_from: float = math.inf, stall_until: float = math.inf) -> None:
        self.stall_from, self.stall_until = stall_from, stall_until
        self.first: float | None = None
        self.frozen_at_first = 0

    async def submit(self, encoded: Sequence[EncodedPair]) -> list[float]:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.frozen_at_first = gc.get_freeze_count()  # walks the frozen heap: once only
        since = now - self.first
        if self.stall_from <= since < self.stall_until:
            await asyncio.sleep(self.stall_until - since)
        await asyncio.sleep(0.001)
        return [0.5] * len(encoded)


async def test_an_open_loop_step_offers_exactly_its_rate_in_each_window_after_an_unmeasured_lead_in(
    batcher: Batcher, requests: list[list[EncodedPair]]
) -> None:
    step = await LoadGenerator(requests, FAST).open_loop(batcher, rate=400.0, seconds=0.15, seed=1)
    # Three measured windows of 0.05 s with 20 arrivals each; the lead-in's 20 are not counted.
    assert step.offered == 60 and step.completed == 60
    assert step.rejected == step.failed == 0
    assert step.duration_s == pytest.approx(0.15)
    assert step.throughput == pytest.approx(400.0)
    assert len(step.window_p99_ms) == len(step.window_backlog) == len(step.window_throughput) == 3
    assert 0 < step.p50_ms <= step.p99_ms < math.inf
    assert step.send_lag_ms >= 0


async def test_a_step_is_judged_by_the_median_window_so_one_stall_does_not_fail_it(
    requests: list[list[EncodedPair]],
) -> None:
    load = LoadGenerator(requests, FAST)
    # Windows: lead-in [0, 0.05), then [0.05, 0.1), [0.1, 0.15), [0.15, 0.2). A 60 ms stall in the second.
    once = await load.open_loop(StallingBatcher(0.1, 0.16), rate=400.0, seconds=0.15, seed=1)
    assert max(once.window_p99_ms) > 40 and once.p99_ms < 20  # one window saw it; the median did not
    twice = await load.open_loop(StallingBatcher(0.05, 0.16), rate=400.0, seconds=0.15, seed=1)
    assert sorted(twice.window_p99_ms)[1] > 40 and twice.p99_ms > 40  # two of three windows: it counts


class _Cycle:
    """Garbage only the cyclic collector can free."""

    def __init__(self) -> None:
        self.me = self


async def test_a_trial_starts_from_a_collected_and_frozen_heap(requests: list[list[EncodedPair]]) -> None:
    fake = StallingBatcher()
    load = LoadGenerator(requests, LoadSettings(step_seconds=0.03, probe_seconds=0.01, warmup_seconds=0.0, fractions=(0.001,), bisections=0))
    garbage = weakref.ref(_Cycle())
    assert garbage() is not None  # unreachable, but alive until a collection
    before = gc.get_freeze_count()
    result = await load.measure(fake, slo_p99_ms=1000, max_batch_size=1, probe_concurrency=2)
    assert result.best is not None
    assert garbage() is None  # collected before the trial, not during a window
    assert fake.frozen_at_first > before  # the trial's requests ran with the heap frozen
    assert all(step.gc_max_ms >= 0 for step in result.steps)


def test_a_slow_rate_stretches_its_windows_for_enough_arrivals_within_a_limit() -> None:
    settings = LoadSettings(step_seconds=0.3, windows=3, min_window_requests=100)
    assert settings.window_seconds(10_000.0, 0.3) == pytest.approx(0.1)  # 1000 arrivals: as is
    assert settings.window_seconds(500.0, 0.3) == pytest.approx(0.2)  # stretched to hold 100
    assert settings.window_seconds(10.0, 0.3) == pytest.approx(MAX_WINDOW_STRETCH * 0.1)  # but no further


async def test_measure_warms_up_then_probes_then_finds_a_passing_rate_below_capacity(
    batcher: Batcher, requests: list[list[EncodedPair]]
) -> None:
    result = await LoadGenerator(requests, FAST).measure(batcher, slo_p99_ms=5000, max_batch_size=8)
    kinds = [step.kind for step in result.steps]
    assert kinds[0] == "probe" and set(kinds[1:]) == {"open"}
    assert result.warmup_s >= FAST.warmup_seconds
    probe = result.steps[0]
    assert len(probe.window_throughput) == FAST.windows and probe.throughput == sorted(probe.window_throughput)[1]
    assert result.capacity == probe.throughput <= result.capacity_max
    assert result.best is not None and result.best.passed
    # Rising rates: the open steps go up until the first failure (none here, with this SLO).
    rates = [step.rate for step in result.steps[1:]]
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.5 * result.capacity)
    assert result.throughput == pytest.approx(result.best.throughput)
    assert result.upper == result.capacity  # nothing failed: the capacity bounds it
    assert result.evidence()["upper"] == result.upper


async def test_an_unreachable_slo_stops_at_the_lowest_rate(batcher: Batcher, requests: list[list[EncodedPair]]) -> None:
    result = await LoadGenerator(requests, FAST).measure(batcher, slo_p99_ms=0.001, max_batch_size=8)
    assert [step.kind for step in result.steps] == ["probe", "open"]
    assert result.best is None and result.throughput == 0.0
    assert result.upper == result.steps[1].rate  # the lowest rate failed


async def test_rejections_fail_a_step(tiny_engine: Engine, requests: list[list[EncodedPair]]) -> None:
    tight = Batcher(tiny_engine, max_batch_size=1, max_wait_ms=0.0, max_batch_tokens=None, max_queue_pairs=1)
    await tight.start()
    try:
        step = await LoadGenerator(requests, FAST).open_loop(tight, rate=2000.0, seconds=0.05, seed=1)
    finally:
        await tight.close()
    assert step.rejected > 0 and step.completed < step.offered
    assert step.p99_ms == math.inf  # a refused request counts as never answered


async def test_a_hopeless_trial_stops_after_the_probe(batcher: Batcher, requests: list[list[EncodedPair]]) -> None:
    calls: list[tuple[int, float, float]] = []

    def on_step(step: int, best: float, bound: float) -> bool:
        calls.append((step, best, bound))
        return True  # the pruner says: cannot beat the best

    result = await LoadGenerator(requests, FAST).measure(batcher, slo_p99_ms=5000, max_batch_size=8, on_step=on_step)
    assert result.stopped_early and len(result.steps) == 1
    assert calls == [(0, 0.0, result.capacity_max)]  # the optimistic bound: the probe's best window


def test_the_runtime_runs_on_serves_event_loop_gil_switch_interval_and_gc_threshold(tiny_engine: Engine) -> None:
    before, gc_before = sys.getswitchinterval(), gc.get_threshold()
    with ServingRuntime(lambda _precision: tiny_engine, max_queue_pairs=64, max_batch_tokens=None) as runtime:
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *gc_before[1:])

        async def loop_module() -> str:
            return type(asyncio.get_running_loop()).__module__

        assert runtime.event_loop == "uvloop" and runtime.run(loop_module()).startswith("uvloop")
    assert sys.getswitchinterval() == pytest.approx(before) and gc.get_threshold() == gc_before


def _trial(study: optuna.Study, value: float, *, feasible: bool, p99_ms: float = 10.0, batch: int = 8) -> None:
    trial = study.ask()
    trial.suggest_int("max_batch_size", batch, batch)
    trial.set_constraint("slo", 0.0 if feasible else 1.0)
    trial.set_user_attr(ATTR_P99, p99_ms)
    study.tell(trial, value)


def test_the_pruner_stops_a_trial_whose_bound_is_clearly_below_the_best_feasible_value() -> None:
    study = optuna.create_study(direction="maximize", pruner=BelowBestPruner())
    _trial(study, 1000.0, feasible=False)  # infeasible: its value does not count
    _trial(study, 100.0, feasible=True)

    hopeless, near_tie, promising = study.ask(), study.ask(), study.ask()
    hopeless.report(90.0, 0)
    near_tie.report(100.0 * (1 - NEAR_TIE / 2), 0)  # could still tie with the best: measured on
    promising.report(500.0, 0)
    assert hopeless.should_prune() and not near_tie.should_prune() and not promising.should_prune()
    assert best_trial(study.trials).value == 100.0  # the feasible one, not the bigger infeasible one


def test_near_ties_go_to_the_lower_p99_then_the_smaller_batch() -> None:
    study = optuna.create_study(direction="maximize")
    _trial(study, 1000.0, feasible=True, p99_ms=45.0, batch=512)
    _trial(study, 1000.0 * (1 - NEAR_TIE / 2), feasible=True, p99_ms=20.0, batch=256)  # a tie, lower p99
    _trial(study, 1000.0 * (1 - NEAR_TIE / 2), feasible=True, p99_ms=20.0, batch=128)  # same p99, smaller batch
    _trial(study, 1000.0 * (1 - 2 * NEAR_TIE), feasible=True, p99_ms=5.0, batch=8)  # clearly slower: no tie
    assert best_trial(study.trials).number == 2
