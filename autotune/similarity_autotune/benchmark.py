"""Measure one serving config: open-loop Poisson arrivals at rising rates against the real batcher.

A trial's number is the highest arrival rate the config sustains: every request answered, the queue
not piling up, and p99 latency (from each request's *scheduled* arrival, so a stalled generator cannot
hide queueing: no coordinated omission) under the SLO. The search:

1. a short closed-loop probe with the queue kept full gives the config's capacity, an upper bound on
   what it can sustain (full batches are its most efficient case);
2. open-loop steps at rising fractions of that capacity, stopping at the first step that fails;
3. a few bisection steps between the last pass and the first failure.

After each step the caller hears the best passing rate so far and the upper bound still possible, so a
pruner can stop a trial that can no longer beat the study's best. No torch and no model here: the
benchmark sees only the `Batcher` and pre-tokenized requests.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from similarity_service.batching import Overloaded
from similarity_service.engine_api import EncodedPair


class BatcherLike(Protocol):
    """What the benchmark uses of `similarity_service.batching.Batcher`."""

    async def submit(self, encoded: Sequence[EncodedPair]) -> list[float]: ...


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """How long and how finely each trial is measured. Longer windows: less noise, slower studies."""

    step_seconds: float = 0.5  # open-loop window per rate step
    probe_seconds: float = 0.3  # closed-loop capacity probe
    fractions: tuple[float, ...] = (0.25, 0.5, 0.7, 0.85, 1.0)  # rising rates, as fractions of capacity
    bisections: int = 2  # refinement steps between the last pass and the first failure
    drain_seconds: float = 5.0  # how long to wait for a step's last answers before counting them lost
    seed: int = 0  # arrival times and request order are reproducible per step

    def max_steps(self) -> int:
        """Probe + ladder + bisections: the length of a trial's progress bar."""
        return 1 + len(self.fractions) + self.bisections


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """One measured window."""

    kind: str  # "probe" (closed loop) or "open" (open-loop Poisson arrivals)
    rate: float  # target arrivals/s (0 for the probe)
    offered: int  # requests sent
    completed: int
    rejected: int  # refused by the batcher's admission bound (Overloaded)
    failed: int  # any other error, or no answer within the drain time
    duration_s: float  # the arrival window
    throughput: float  # pairs/s: answered requests per second of the window
    p50_ms: float
    p99_ms: float
    backlog: int  # requests still unanswered when the window closed
    passed: bool = False


@dataclass(kw_only=True)
class Measurement:
    """A trial's result: the best passing open-loop step (if any) and every step on the way."""

    capacity: float
    steps: list[StepResult] = field(default_factory=list)
    best: StepResult | None = None
    stopped_early: bool = False  # the caller's `on_step` asked to stop (pruned)

    @property
    def throughput(self) -> float:
        return self.best.throughput if self.best else 0.0

    def evidence(self) -> dict[str, Any]:
        """A JSON-ready record for the trial's user attributes."""
        return {
            "capacity": self.capacity,
            "steps": [asdict(step) for step in self.steps],
        }


# Called after each step with (step index, best passing throughput so far, upper bound still possible).
# Returning True stops the measurement (the trial is hopeless).
StepCallback = Callable[[int, float, float], bool]


class LoadGenerator:
    """Drives one batcher with the workload. Stateless between calls except for the request pool."""

    def __init__(self, requests: Sequence[Sequence[EncodedPair]], settings: LoadSettings) -> None:
        if not requests:
            raise ValueError("the workload holds no requests")
        self._requests = list(requests)
        self.settings = settings

    async def measure(
        self,
        batcher: BatcherLike,
        *,
        slo_p99_ms: float,
        max_batch_size: int,
        probe_concurrency: int | None = None,
        on_step: StepCallback | None = None,
    ) -> Measurement:
        """Find the highest rate this batcher sustains under the SLO (see the module docstring).

        `probe_concurrency` defaults to two batches outstanding, so the next batch forms while one runs.
        """
        settings = self.settings
        concurrency = probe_concurrency or 2 * max_batch_size
        probe = await self.closed_loop(batcher, concurrency=concurrency, seconds=settings.probe_seconds)
        result = Measurement(capacity=probe.throughput, steps=[probe])
        if probe.completed == 0 or (on_step and on_step(0, 0.0, probe.throughput)):
            result.stopped_early = probe.completed > 0
            return result

        passing: float | None = None  # highest passing rate so far
        failing: float | None = None  # lowest failing rate so far
        ladder = [fraction * probe.throughput for fraction in settings.fractions]
        for index in range(1, settings.max_steps()):
            if index <= len(ladder):
                rate = ladder[index - 1]
                if failing is not None:
                    continue  # rising rates stop at the first failure
            elif passing is None or failing is None:
                break  # failed at the lowest rate, or passed the whole ladder: nothing to refine
            else:
                rate = (passing + failing) / 2
            step = await self._step(batcher, rate, index, slo_p99_ms=slo_p99_ms, max_batch_size=max_batch_size)
            result.steps.append(step)
            if step.passed:
                passing = rate
                if result.best is None or step.throughput > result.best.throughput:
                    result.best = step
            else:
                failing = rate
                if passing is None:
                    break  # the SLO is out of reach for this config even at a low rate
            bound = max(failing if failing is not None else probe.throughput, result.throughput)
            if on_step and on_step(index, result.throughput, bound):
                result.stopped_early = True
                break
        return result

    async def _step(
        self, batcher: BatcherLike, rate: float, index: int, *, slo_p99_ms: float, max_batch_size: int
    ) -> StepResult:
        step = await self.open_loop(batcher, rate=rate, seconds=self.settings.step_seconds, seed=index)
        passed = step.offered > 0 and _passes(step, slo_p99_ms=slo_p99_ms, max_batch_size=max_batch_size)
        return replace(step, passed=passed)

    async def open_loop(self, batcher: BatcherLike, *, rate: float, seconds: float, seed: int) -> StepResult:
        """Poisson arrivals at `rate` for `seconds`; each request's latency counts from its scheduled time."""
        rng = np.random.default_rng((self.settings.seed, seed))
        # A Poisson process conditioned on its count: exactly rate × seconds arrivals at uniformly
        # random times. Bursts are as in any Poisson stream, but the offered load carries no count
        # noise, so steps (and trials) compare at the rates they name.
        offsets = np.sort(rng.uniform(0.0, seconds, size=max(1, round(rate * seconds))))
        picks = rng.integers(0, len(self._requests), size=len(offsets))
        tally = _Tally(len(offsets))
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[list[float]]] = []
        start = time.perf_counter()
        for index, offset in enumerate(offsets.tolist()):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(batcher.submit(self._requests[picks[index]]))
            task.add_done_callback(tally.callback(index, start + offset))
            tasks.append(task)
        await asyncio.sleep(max(0.0, start + seconds - time.perf_counter()))
        backlog = len(tasks) - tally.done
        await _drain(tasks, self.settings.drain_seconds)
        return tally.result(kind="open", rate=rate, duration_s=seconds, backlog=backlog)

    async def closed_loop(self, batcher: BatcherLike, *, concurrency: int, seconds: float) -> StepResult:
        """Keep `concurrency` requests outstanding: the config's capacity when batches are always full.

        Runs for `seconds`, longer if needed to see four full batches (one batch of a slow big config
        says little), but never more than four times `seconds`.
        """
        start = time.perf_counter()
        soft_deadline, hard_deadline = start + seconds, start + 4 * seconds
        wanted = 2 * concurrency  # two full pipelines: four batches when concurrency is two batches
        latencies: list[float] = []
        errors: list[BaseException] = []
        picks = np.random.default_rng((self.settings.seed, 0)).integers(0, len(self._requests), size=4096)

        def more() -> bool:
            now = time.perf_counter()
            return now < soft_deadline or (now < hard_deadline and len(latencies) < wanted)

        async def worker(offset: int) -> None:
            turn = offset
            while more():
                sent = time.perf_counter()
                try:
                    await batcher.submit(self._requests[picks[turn % len(picks)]])
                except Exception as exc:  # the probe reports errors; it does not crash the study
                    errors.append(exc)
                    return
                latencies.append(time.perf_counter() - sent)
                turn += concurrency

        await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
        elapsed = time.perf_counter() - start
        lat = np.asarray(latencies) * 1000.0
        return StepResult(
            kind="probe",
            rate=0.0,
            offered=len(latencies) + len(errors),
            completed=len(latencies),
            rejected=sum(isinstance(exc, Overloaded) for exc in errors),
            failed=sum(not isinstance(exc, Overloaded) for exc in errors),
            duration_s=elapsed,
            throughput=len(latencies) / elapsed if elapsed > 0 else 0.0,
            p50_ms=float(np.percentile(lat, 50)) if lat.size else math.inf,
            p99_ms=float(np.percentile(lat, 99)) if lat.size else math.inf,
            backlog=0,
        )


def _passes(step: StepResult, *, slo_p99_ms: float, max_batch_size: int) -> bool:
    """Every request answered, p99 under the SLO, and the queue not piling up: at the window's end no
    more is outstanding than the latency budget allows (rate × SLO) plus one batch in service."""
    allowed_backlog = step.rate * slo_p99_ms / 1000.0 + max_batch_size
    return (
        step.rejected == 0
        and step.failed == 0
        and step.completed == step.offered
        and step.p99_ms <= slo_p99_ms
        and step.backlog <= allowed_backlog
    )


class _Tally:
    """Latency per request, filled by done-callbacks on the event loop (one thread: no locking)."""

    def __init__(self, size: int) -> None:
        self.latency = np.full(size, np.inf)  # unanswered requests stay infinitely late
        self.done = 0
        self.rejected = 0

    def callback(self, index: int, scheduled: float) -> Callable[[asyncio.Task[list[float]]], None]:
        def record(task: asyncio.Task[list[float]]) -> None:
            self.done += 1
            if task.cancelled():
                return
            exc = task.exception()
            if isinstance(exc, Overloaded):
                self.rejected += 1
            elif exc is None:
                self.latency[index] = time.perf_counter() - scheduled

        return record

    def result(self, *, kind: str, rate: float, duration_s: float, backlog: int) -> StepResult:
        offered = self.latency.size
        completed = int(np.isfinite(self.latency).sum())
        # Percentiles over every request sent, unanswered ones as infinitely late, so a lossy step
        # cannot report a good p99.
        lat_ms = self.latency * 1000.0
        return StepResult(
            kind=kind,
            rate=rate,
            offered=offered,
            completed=completed,
            rejected=self.rejected,
            failed=offered - completed - self.rejected,
            duration_s=duration_s,
            throughput=completed / duration_s,
            p50_ms=float(np.percentile(lat_ms, 50, method="higher")) if offered else math.inf,
            p99_ms=float(np.percentile(lat_ms, 99, method="higher")) if offered else math.inf,
            backlog=backlog,
        )


async def _drain(tasks: list[asyncio.Task[list[float]]], seconds: float) -> None:
    """Wait for every answer up to `seconds`; cancel the rest so no task outlives its step."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
