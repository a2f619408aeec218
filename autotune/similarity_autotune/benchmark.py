"""Measure one serving config: open-loop Poisson arrivals at rising rates against the real batcher.

A trial's number is the highest arrival rate the config sustains: every request answered, the queue
not piling up, and p99 latency (from each request's *scheduled* arrival, so a stalled generator cannot
hide queueing: no coordinated omission) under the SLO. The search:

1. a warm-up: the config runs full batches, unmeasured, so first calls at a new batch size (kernel
   choices, allocator growth, graph or compiler work) and the switch between engines cost no window;
2. a closed-loop probe with the queue kept full gives the config's capacity, an upper bound on what
   it can sustain (full batches are its most efficient case): the median of a few windows;
3. open-loop steps at rising fractions of that capacity, stopping at the first step that fails;
4. a few bisection steps between the last pass and the first failure.

Every measured part is a few short windows judged by their median (p99, backlog, capacity), so one
stall of the machine spoils one window, not the trial; each step starts with an unmeasured lead-in
window, so the windows see the queue in its steady state rather than empty. Before a trial the heap
is collected and what survives is frozen (`gc.freeze`, as `structsim serve` settles its heap once
warm): a full collection of a torch process's few hundred thousand objects takes 50-250 ms, fires
every few seconds at GPU request rates, and would fail whichever window it fell in.

After each step the caller hears the best passing rate so far and the upper bound still possible, so a
pruner can stop a trial that can no longer beat the study's best. No torch and no model here: the
benchmark sees only the `Batcher` and pre-tokenized requests.
"""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from similarity_service.batching import Overloaded
from similarity_service.engine_api import EncodedPair

# A window is stretched (up to this many times its length) to hold `min_window_requests` arrivals.
MAX_WINDOW_STRETCH = 2.0


class BatcherLike(Protocol):
    """What the benchmark uses of `similarity_service.batching.Batcher`."""

    async def submit(self, encoded: Sequence[EncodedPair]) -> list[float]: ...


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """How long and how finely each trial is measured. Longer windows: less noise, slower studies."""

    step_seconds: float = 0.45  # measured time of an open-loop rate step (after a lead-in of one window)
    probe_seconds: float = 0.3  # measured time of the closed-loop capacity probe (after the warm-up)
    windows: int = 3  # each step and the probe are judged by the median over this many windows
    warmup_seconds: float = 0.2  # unmeasured closed loop before the probe ...
    warmup_batches: int = 3  # ... and at least this many full batches (at most 4 × warmup_seconds)
    min_window_requests: int = 100  # a step's window is stretched to hold this many arrivals (within limits)
    fractions: tuple[float, ...] = (0.3, 0.6, 0.85, 1.0)  # rising rates, as fractions of capacity
    bisections: int = 3  # refinement steps between the last pass and the first failure
    drain_seconds: float = 5.0  # how long to wait for a step's last answers before counting them lost
    seed: int = 0  # arrival times and request order are reproducible per step

    def __post_init__(self) -> None:
        if self.windows < 1 or self.step_seconds <= 0 or self.probe_seconds <= 0 or self.warmup_seconds < 0:
            raise ValueError("windows must be >= 1, step_seconds and probe_seconds > 0, warmup_seconds >= 0")

    def max_steps(self) -> int:
        """Probe + ladder + bisections: the length of a trial's progress bar."""
        return 1 + len(self.fractions) + self.bisections

    def window_seconds(self, rate: float, seconds: float) -> float:
        """One window of a step measured for `seconds` at `rate`: its share, stretched for enough arrivals."""
        nominal = seconds / self.windows
        wanted = self.min_window_requests / rate if rate > 0 else nominal
        return min(max(nominal, wanted), MAX_WINDOW_STRETCH * nominal)


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """One measured step: its windows, and the medians that judge it."""

    kind: str  # "probe" (closed loop) or "open" (open-loop Poisson arrivals)
    rate: float  # target arrivals/s (0 for the probe)
    offered: int  # requests sent in the measured windows
    completed: int
    rejected: int  # refused by the batcher's admission bound (Overloaded)
    failed: int  # any other error, or no answer within the drain time
    duration_s: float  # the measured windows (lead-in and warm-up excluded)
    throughput: float  # pairs/s: open, answered requests per measured second; probe, the median window
    p50_ms: float  # open: median over windows of each window's p50; probe: over all measured answers
    p99_ms: float  # open: median over windows of each window's p99 (what the SLO is checked against)
    backlog: int  # open: median over windows of the requests unanswered at the window's end
    window_throughput: list[float] = field(default_factory=list)  # open: answers completed in the window per s
    window_p99_ms: list[float] = field(default_factory=list)
    window_backlog: list[int] = field(default_factory=list)
    send_lag_ms: float = 0.0  # p99 of how late the generator sent a request (a busy loop shows here)
    gc_max_ms: float = 0.0  # the longest garbage collection during the step
    passed: bool = False


@dataclass(kw_only=True)
class Measurement:
    """A trial's result: the best passing open-loop step (if any) and every step on the way."""

    capacity: float  # the probe's median window
    capacity_max: float = 0.0  # its best window: the optimistic bound a pruner may use
    warmup_s: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    best: StepResult | None = None
    stopped_early: bool = False  # the caller's `on_step` asked to stop (pruned)

    @property
    def throughput(self) -> float:
        return self.best.throughput if self.best else 0.0

    @property
    def upper(self) -> float:
        """The most this config may sustain by this measurement: the lowest failing rate, else its
        capacity. Its value lies in [throughput, upper]: the measurement's resolution."""
        failed = [step.rate for step in self.steps if step.kind == "open" and not step.passed]
        return min(failed) if failed else max(self.capacity, self.throughput)

    def evidence(self) -> dict[str, Any]:
        """A JSON-ready record for the trial's user attributes."""
        return {
            "capacity": self.capacity,
            "capacity_max": self.capacity_max,
            "upper": self.upper,
            "warmup_s": self.warmup_s,
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
        with _quiet_heap() as collector:
            return await self._measure(batcher, collector, slo_p99_ms, max_batch_size, probe_concurrency, on_step)

    async def _measure(
        self,
        batcher: BatcherLike,
        collector: _Collections,
        slo_p99_ms: float,
        max_batch_size: int,
        probe_concurrency: int | None,
        on_step: StepCallback | None,
    ) -> Measurement:
        settings = self.settings
        concurrency = probe_concurrency or 2 * max_batch_size
        warmup_started = time.perf_counter()
        await self.closed_loop(
            batcher,
            concurrency=concurrency,
            seconds=settings.warmup_seconds,
            min_answers=settings.warmup_batches * min(max_batch_size, concurrency),
        )
        warmup_s = time.perf_counter() - warmup_started
        collector.collect()
        probe = await self.closed_loop(batcher, concurrency=concurrency, seconds=settings.probe_seconds)
        probe = replace(probe, gc_max_ms=collector.reset())
        result = Measurement(
            capacity=probe.throughput, capacity_max=max(probe.window_throughput, default=0.0), warmup_s=warmup_s, steps=[probe]
        )
        if probe.completed == 0 or (on_step and on_step(0, 0.0, result.capacity_max)):
            result.stopped_early = probe.completed > 0
            return result

        passing: float | None = None  # highest passing rate so far
        failing: float | None = None  # lowest failing rate so far
        ladder = [float(fraction * probe.throughput) for fraction in settings.fractions]
        for index in range(1, settings.max_steps()):
            if index <= len(ladder):
                rate = ladder[index - 1]
                if failing is not None:
                    continue  # rising rates stop at the first failure
            elif passing is None or failing is None:
                break  # failed at the lowest rate, or passed the whole ladder: nothing to refine
            else:
                rate = (passing + failing) / 2
            collector.collect()  # the last step's garbage (an overloaded one leaves plenty), before the windows
            step = await self._step(batcher, rate, index, slo_p99_ms=slo_p99_ms, max_batch_size=max_batch_size)
            step = replace(step, gc_max_ms=collector.reset())
            result.steps.append(step)
            if step.passed:
                passing = rate
                if result.best is None or step.throughput > result.best.throughput:
                    result.best = step
            else:
                failing = rate
                if passing is None:
                    break  # the SLO is out of reach for this config even at a low rate
            bound = max(failing if failing is not None else result.capacity_max, result.throughput)
            if on_step and on_step(index, result.throughput, bound):
                result.stopped_early = True
                break
        return result

    async def _step(
        self, batcher: BatcherLike, rate: float, index: int, *, slo_p99_ms: float, max_batch_size: int
    ) -> StepResult:
        step = await self.open_loop(batcher, rate=rate, seconds=self.settings.step_seconds, seed=index)
        passed = step.offered > 0 and bool(_passes(step, slo_p99_ms=slo_p99_ms, max_batch_size=max_batch_size))
        return replace(step, passed=passed)

    async def open_loop(self, batcher: BatcherLike, *, rate: float, seconds: float, seed: int) -> StepResult:
        """Poisson arrivals at `rate`: one unmeasured lead-in window, then `settings.windows` measured
        windows of `seconds` in all (each stretched to hold `min_window_requests` arrivals, within
        limits). Each request's latency counts from its scheduled time."""
        windows = self.settings.windows
        window = self.settings.window_seconds(rate, seconds)
        per_window = max(1, round(rate * window))
        rng = np.random.default_rng((self.settings.seed, seed))
        # In each window a Poisson process conditioned on its count: exactly rate × window arrivals at
        # uniformly random times. Bursts are as in any Poisson stream, but the offered load carries no
        # count noise, so windows, steps and trials compare at the rates they name.
        offsets = np.concatenate(
            [np.sort(rng.uniform(w * window, (w + 1) * window, size=per_window)) for w in range(windows + 1)]
        )
        picks = rng.integers(0, len(self._requests), size=len(offsets))
        tally = _Tally(len(offsets))
        loop = asyncio.get_running_loop()
        # Only unanswered requests are kept: thousands of finished tasks held to the end would make
        # every collection during the step scan them, a cost of the generator, not of the config.
        pending: set[asyncio.Task[list[float]]] = set()
        start = time.perf_counter()
        for index, offset in enumerate(offsets.tolist()):
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tally.sent[index] = time.perf_counter() - scheduled
            task = loop.create_task(batcher.submit(self._requests[picks[index]]))
            task.add_done_callback(tally.callback(index, scheduled))
            task.add_done_callback(pending.discard)
            pending.add(task)
        end = start + (windows + 1) * window
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        await _drain(pending, self.settings.drain_seconds)
        bounds = [start + w * window for w in range(1, windows + 2)]  # lead-in end, then each window's end
        return tally.result(rate=rate, starts=start + offsets, bounds=bounds, per_window=per_window)

    async def closed_loop(
        self, batcher: BatcherLike, *, concurrency: int, seconds: float, min_answers: int | None = None
    ) -> StepResult:
        """Keep `concurrency` requests outstanding: the config's capacity when batches are always full.

        Runs for `seconds`, longer if needed to see `min_answers` answers (default: four full batches,
        as one batch of a slow big config says little), but never more than four times `seconds`. The
        answers are cut into `settings.windows` windows of equal count; the throughput is their median.
        """
        if min_answers is None:
            min_answers = 2 * concurrency  # two full pipelines: four batches when concurrency is two batches
        start = time.perf_counter()
        soft_deadline, hard_deadline = start + seconds, start + 4 * seconds
        done_at: list[float] = []
        latencies: list[float] = []
        errors: list[BaseException] = []
        picks = np.random.default_rng((self.settings.seed, 0)).integers(0, len(self._requests), size=4096)

        def more() -> bool:
            now = time.perf_counter()
            return now < soft_deadline or (now < hard_deadline and len(latencies) < min_answers)

        async def worker(offset: int) -> None:
            turn = offset
            while more():
                sent = time.perf_counter()
                try:
                    await batcher.submit(self._requests[picks[turn % len(picks)]])
                except Exception as exc:  # the probe reports errors; it does not crash the study
                    errors.append(exc)
                    return
                now = time.perf_counter()
                latencies.append(now - sent)
                done_at.append(now)
                turn += concurrency

        await asyncio.gather(*(worker(offset) for offset in range(concurrency)))
        elapsed = time.perf_counter() - start
        windows = _count_windows(start, done_at, self.settings.windows)
        lat = np.asarray(latencies) * 1000.0
        return StepResult(
            kind="probe",
            rate=0.0,
            offered=len(latencies) + len(errors),
            completed=len(latencies),
            rejected=sum(isinstance(exc, Overloaded) for exc in errors),
            failed=sum(not isinstance(exc, Overloaded) for exc in errors),
            duration_s=elapsed,
            throughput=statistics.median(windows) if windows else 0.0,
            p50_ms=float(np.percentile(lat, 50)) if lat.size else math.inf,
            p99_ms=float(np.percentile(lat, 99)) if lat.size else math.inf,
            backlog=0,
            window_throughput=windows,
        )


def _count_windows(start: float, done_at: list[float], windows: int) -> list[float]:
    """Answers per second over `windows` runs of equal count. A closed loop answers a batch at a time;
    windows cut by count (not by clock) cannot straddle a burst unevenly."""
    if not done_at:
        return []
    cuts = np.linspace(0, len(done_at), min(windows, len(done_at)) + 1).round().astype(int).tolist()
    rates = []
    previous_end = start
    for low, high in zip(cuts[:-1], cuts[1:], strict=True):
        end = done_at[high - 1]
        rates.append((high - low) / max(end - previous_end, 1e-9))
        previous_end = end
    return rates


def _passes(step: StepResult, *, slo_p99_ms: float, max_batch_size: int) -> bool:
    """Every request answered, p99 under the SLO, and the queue not piling up: at a window's end no
    more is outstanding than the latency budget allows (rate × SLO) plus one batch in service. The
    latency and the backlog are the medians over the step's windows."""
    allowed_backlog = step.rate * slo_p99_ms / 1000.0 + max_batch_size
    return (
        step.rejected == 0
        and step.failed == 0
        and step.completed == step.offered
        and step.p99_ms <= slo_p99_ms
        and step.backlog <= allowed_backlog
    )


class _Tally:
    """Per request: latency, when it was done, how late it was sent. Filled on the event loop (one
    thread: no locking)."""

    def __init__(self, size: int) -> None:
        self.latency = np.full(size, np.inf)  # unanswered requests stay infinitely late
        self.done_at = np.full(size, np.inf)  # answered, refused or failed: when
        self.sent = np.zeros(size)  # seconds after its scheduled time
        self.rejected = np.zeros(size, dtype=bool)

    def callback(self, index: int, scheduled: float) -> Callable[[asyncio.Task[list[float]]], None]:
        def record(task: asyncio.Task[list[float]]) -> None:
            now = time.perf_counter()
            self.done_at[index] = now
            if task.cancelled():
                return
            exc = task.exception()
            if isinstance(exc, Overloaded):
                self.rejected[index] = True
            elif exc is None:
                self.latency[index] = now - scheduled

        return record

    def result(self, *, rate: float, starts: np.ndarray, bounds: list[float], per_window: int) -> StepResult:
        """The measured windows (`bounds[0]` ends the lead-in; each later bound ends a window)."""
        measured = slice(per_window, None)  # arrivals are in window order, `per_window` in each
        lat_ms = self.latency[measured] * 1000.0
        offered = lat_ms.size
        completed = int(np.isfinite(lat_ms).sum())
        rejected = int(self.rejected[measured].sum())
        p50s, p99s, served, backlogs = [], [], [], []
        for w, (low, high) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            # Percentiles over every request of the window, unanswered ones as infinitely late, so a
            # lossy window cannot report a good p99.
            window_ms = lat_ms[w * per_window : (w + 1) * per_window]
            p50s.append(float(np.percentile(window_ms, 50, method="higher")))
            p99s.append(float(np.percentile(window_ms, 99, method="higher")))
            answered_in = np.isfinite(self.latency) & (self.done_at >= low) & (self.done_at < high)
            served.append(float(answered_in.sum()) / (high - low))
            backlogs.append(int(((starts < high) & (self.done_at > high)).sum()))
        duration = bounds[-1] - bounds[0]
        return StepResult(
            kind="open",
            rate=rate,
            offered=offered,
            completed=completed,
            rejected=rejected,
            failed=offered - completed - rejected,
            duration_s=duration,
            throughput=completed / duration,
            p50_ms=statistics.median(p50s),
            p99_ms=statistics.median(p99s),
            backlog=int(statistics.median(backlogs)),
            window_throughput=served,
            window_p99_ms=p99s,
            window_backlog=backlogs,
            send_lag_ms=float(np.percentile(self.sent[measured], 99)) * 1000.0,
        )


class _Collections:
    """The longest garbage collection since the last `reset` (gc.callbacks)."""

    def __init__(self) -> None:
        self._longest = 0.0
        self._started: float | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._longest = max(self._longest, time.perf_counter() - self._started)
            self._started = None

    def reset(self) -> float:
        """The longest pause (ms) since the last reset."""
        longest, self._longest = self._longest, 0.0
        return longest * 1000.0

    def collect(self) -> None:
        """Collect now, between windows (cheap: the frozen heap is not scanned), and forget its pause."""
        gc.collect()
        self.reset()


@contextmanager
def _quiet_heap() -> Iterator[_Collections]:
    """Collect, then freeze what survives (later collections scan only what the trial allocates; a
    frozen object that dies is still freed by its reference count), and watch the collections that
    still run. The heap stays frozen, as in `structsim serve`: the next trial's freeze is cheap."""
    collections = _Collections()
    gc.collect()
    gc.freeze()
    gc.callbacks.append(collections)
    try:
        yield collections
    finally:
        gc.callbacks.remove(collections)


async def _drain(tasks: set[asyncio.Task[list[float]]], seconds: float) -> None:
    """Wait for every answer up to `seconds`; cancel the rest so no task outlives its step."""
    if not tasks:
        return
    _, pending = await asyncio.wait(set(tasks), timeout=seconds)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
