"""The dynamic micro-batcher: many callers' pairs merged into few forward passes. No torch here.

Ownership, as in text-embeddings-inference: callers hold only futures; one task (the batch former)
owns the queue; a one-slot hand-off lets the next batch form while the runners compute. Each engine
replica (one per GPU) has its own runner task and its own dedicated thread, so the engine is never
called from the event loop and never from two threads at once.

Dispatch to several replicas is pull-based: a replica takes a batch from the shared one-slot hand-off
only when it has none in flight, so a formed batch goes to a free replica, never waits behind a busy
one while another is idle (a per-replica slot could strand it behind a slow GPU), and batches still
form while every replica is busy. The slot holds one batch, not one per replica: a batch formed later
is fuller, and under load a freed replica finds the next batch already formed. A replica whose last
`failures_before_unhealthy` passes all failed (out of memory aside: that is the batch's size, not the device)
is unhealthy: it takes no batches while a healthy replica exists (all unhealthy: all keep taking them,
so callers get errors rather than hang), and one success makes it healthy again.

A batch closes at `max_batch_size` pairs, at `max_batch_tokens` tokens, or `max_wait_ms` after its
oldest pair was queued, whichever comes first; while draining it closes at once. A request larger than
a batch is split across forward passes and reassembled in order. A caller that was cancelled (its
client left) is skipped before it costs engine time. An engine exception fails every request in that
batch (on that replica) and nothing else. Times come from the event loop's clock, so tests can run on a fake one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from similarity_service.engine_api import EncodedPair, EngineOutOfMemory, ScoringEngine

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full: try again after `retry_after_s`."""

    def __init__(self, queued_pairs: int, max_queue_pairs: int, retry_after_s: float) -> None:
        super().__init__(f"queue full: {queued_pairs} of {max_queue_pairs} pairs waiting")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The batcher is shutting down and admits nothing new."""

    def __init__(self) -> None:
        super().__init__("the service is shutting down")


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A snapshot for metrics and autotune."""

    queued_pairs: int  # admitted pairs not yet handed to the runner
    queued_tokens: int
    in_flight_pairs: int  # pairs in the forward pass now running
    batches_run: int
    pairs_scored: int
    pairs_dropped: int  # pairs of callers that left before their turn
    last_batch_size: int
    last_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """One engine replica's counters, for /v1/info and per-replica metrics."""

    index: int
    device: str
    busy: bool  # a forward pass is running on it now
    in_flight_pairs: int
    batches_run: int
    failed_batches: int
    pairs_scored: int
    inference_s: float  # total time of its forward passes
    failures_in_a_row: int
    healthy: bool


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one forward pass did; handed to the `on_batch` observer (metrics)."""

    size: int  # pairs
    tokens: int
    queue_waits_s: tuple[float, ...]  # per request slice: queued → forward pass started
    inference_s: float
    failed: bool
    replica: int = 0  # index of the engine replica that ran it


class _Request:
    """One caller's pairs, future and progress. Touched only on the event loop."""

    __slots__ = ("enqueued_at", "future", "pairs", "remaining", "scores", "taken")

    def __init__(self, pairs: Sequence[EncodedPair], future: asyncio.Future[list[float]], now: float) -> None:
        self.pairs = pairs
        self.future = future
        self.enqueued_at = now
        self.scores: list[float] = [math.nan] * len(pairs)
        self.taken = 0  # pairs[:taken] are in some batch already
        self.remaining = len(pairs)  # pairs not scored yet


@dataclass(frozen=True, slots=True)
class _Slice:
    request: _Request
    start: int
    stop: int


class _Replica:
    """One engine, its thread and its counters. Touched only on the event loop (the engine only in its thread)."""

    def __init__(self, index: int, engine: ScoringEngine) -> None:
        self.index = index
        self.engine = engine
        self.executor: ThreadPoolExecutor | None = None
        self.in_flight = 0
        self.busy = False
        self.batches_run = 0
        self.failed_batches = 0
        self.pairs_scored = 0
        self.inference_s = 0.0
        self.failures_in_a_row = 0

    def stats(self, failures_before_unhealthy: int) -> ReplicaStats:
        return ReplicaStats(
            index=self.index,
            device=self.engine.info.device,
            busy=self.busy,
            in_flight_pairs=self.in_flight,
            batches_run=self.batches_run,
            failed_batches=self.failed_batches,
            pairs_scored=self.pairs_scored,
            inference_s=self.inference_s,
            failures_in_a_row=self.failures_in_a_row,
            healthy=self.failures_in_a_row < failures_before_unhealthy,
        )


class Batcher:
    """Merges concurrent `submit` calls into forward passes of `score_encoded` on one or several engine replicas."""

    def __init__(
        self,
        engines: ScoringEngine | Sequence[ScoringEngine],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_batch_tokens: int | None,
        max_queue_pairs: int,
        on_batch: Callable[[BatchRecord], None] | None = None,
        failures_before_unhealthy: int = 3,
    ) -> None:
        """`engines`: one engine, or one replica per device (all of the same model)."""
        if max_queue_pairs < 1:
            raise ValueError("max_queue_pairs must be at least 1")
        if failures_before_unhealthy < 1:
            raise ValueError("failures_before_unhealthy must be at least 1")
        replicas = list(engines) if isinstance(engines, Sequence) else [engines]
        if not replicas:
            raise ValueError("the batcher needs at least one engine")
        self._replicas = [_Replica(index, engine) for index, engine in enumerate(replicas)]
        self._failures_before_unhealthy = failures_before_unhealthy
        self._health_changed = asyncio.Event()  # wakes unhealthy replicas waiting for their turn
        self._max_batch_tokens = max_batch_tokens
        self._max_queue_pairs = max_queue_pairs
        self._on_batch = on_batch

        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_pairs = 0
        self._queued_tokens = 0
        self._outstanding: set[asyncio.Future[list[float]]] = set()
        self._wake = asyncio.Event()  # set on every change the batch former may be waiting for
        self._handoff: asyncio.Queue[list[_Slice]] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False

        self._batches_run = 0
        self._pairs_scored = 0
        self._pairs_dropped = 0
        self._last_size = 0
        self._last_tokens = 0
        self._seconds_per_pair = 0.0  # of the last forward pass, for Retry-After estimates
        self._max_batch_size = 1
        self._max_wait_s = 0.0
        self.reconfigure(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)

    # --- control -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batch-former task, and a runner task and thread per replica."""
        if self._tasks:
            raise RuntimeError("batcher already started")
        self._tasks = [asyncio.create_task(self._form_batches(), name="structsim-batch-former")]
        for replica in self._replicas:
            replica.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"structsim-runner-{replica.index}")
            self._tasks.append(
                asyncio.create_task(self._run_batches(replica), name=f"structsim-batch-runner-{replica.index}")
            )

    def reconfigure(self, *, max_batch_size: int | None = None, max_wait_ms: float | None = None) -> None:
        """Change the batch limits; a batch that is still forming (and every later one) uses them."""
        if max_batch_size is not None:
            if max_batch_size < 1:
                raise ValueError("max_batch_size must be at least 1")
            self._max_batch_size = max_batch_size
        if max_wait_ms is not None:
            if not 0 <= max_wait_ms < math.inf:
                raise ValueError("max_wait_ms must be a finite number >= 0")
            self._max_wait_s = max_wait_ms / 1000
        self._wake.set()  # a batch waiting on the old limits re-checks them

    async def drain(self) -> None:
        """Stop admitting (`submit` raises `Draining`), then finish everything queued and in flight."""
        self._draining = True
        self._wake.set()  # a batch waiting for its deadline goes now
        if self._outstanding:
            await asyncio.wait(list(self._outstanding))

    async def close(self) -> None:
        """Drain, then stop the tasks and every replica's thread."""
        await self.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        loop = asyncio.get_running_loop()
        for replica in self._replicas:
            if replica.executor is not None:
                # A pass for callers that already left may still be running; wait for it off the loop.
                await loop.run_in_executor(None, replica.executor.shutdown)
                replica.executor = None

    @property
    def stats(self) -> BatcherStats:
        return BatcherStats(
            queued_pairs=self._queued_pairs,
            queued_tokens=self._queued_tokens,
            in_flight_pairs=sum(replica.in_flight for replica in self._replicas),
            batches_run=self._batches_run,
            pairs_scored=self._pairs_scored,
            pairs_dropped=self._pairs_dropped,
            last_batch_size=self._last_size,
            last_batch_tokens=self._last_tokens,
            max_batch_size=self._max_batch_size,
            max_wait_ms=self._max_wait_s * 1000,
        )

    @property
    def replicas(self) -> list[ReplicaStats]:
        """Per-replica counters, in replica order."""
        return [replica.stats(self._failures_before_unhealthy) for replica in self._replicas]

    @property
    def healthy(self) -> bool:
        """False when every replica is unhealthy (its last passes all failed): liveness should fail."""
        return any(self._is_healthy(replica) for replica in self._replicas)

    def _is_healthy(self, replica: _Replica) -> bool:
        return replica.failures_in_a_row < self._failures_before_unhealthy

    # --- callers -------------------------------------------------------------------------------

    async def submit(self, encoded: Sequence[EncodedPair]) -> list[float]:
        """Score `encoded` in order. Raises `Overloaded` when the queue is full, `Draining` when shutting down."""
        if self._draining:
            raise Draining()
        if not self._tasks:
            raise RuntimeError("batcher not started")
        if not encoded:
            return []
        if len(encoded) > self._max_queue_pairs:
            raise ValueError(f"{len(encoded)} pairs can never fit a queue of {self._max_queue_pairs}")
        if self._queued_pairs + len(encoded) > self._max_queue_pairs:
            raise Overloaded(self._queued_pairs, self._max_queue_pairs, self._retry_after_s())
        loop = asyncio.get_running_loop()
        request = _Request(encoded, loop.create_future(), loop.time())
        self._queue.append(request)
        self._queued_pairs += len(encoded)
        self._queued_tokens += sum(pair.num_tokens for pair in encoded)
        self._outstanding.add(request.future)
        request.future.add_done_callback(self._outstanding.discard)
        self._wake.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop_untaken(request)  # the client left: free its queue space now
            raise

    def _retry_after_s(self) -> float:
        """Roughly when the queue will have drained: queued pairs at the last pass's speed on every healthy
        replica, at least 1 s."""
        serving = sum(1 for replica in self._replicas if self._is_healthy(replica)) or 1
        return max(1.0, self._queued_pairs * self._seconds_per_pair / serving)

    def _drop_untaken(self, request: _Request) -> None:
        untaken = request.pairs[request.taken :]
        self._queued_pairs -= len(untaken)
        self._queued_tokens -= sum(pair.num_tokens for pair in untaken)
        self._pairs_dropped += len(untaken)
        request.taken = len(request.pairs)

    # --- the batch former: sole owner of the queue ---------------------------------------------

    async def _form_batches(self) -> None:
        while True:
            await self._handoff.join()  # the runner has taken the previous batch: form the next one now
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                self._handoff.put_nowait(batch)

    async def _wait_for_batch(self) -> None:
        """Wait for a first live request, then until the batch is full, its deadline, or draining."""
        loop = asyncio.get_running_loop()
        while not self._first_live_request():
            self._wake.clear()
            await self._wake.wait()
        while not (self._draining or self._batch_is_full()):
            first = self._first_live_request()
            if first is None:
                return
            remaining = first.enqueued_at + self._max_wait_s - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _first_live_request(self) -> _Request | None:
        while self._queue:
            request = self._queue[0]
            if request.future.done() and request.taken < len(request.pairs):
                self._drop_untaken(request)  # failed earlier in another batch
            if request.taken < len(request.pairs):
                return request
            self._queue.popleft()
        return None

    def _batch_is_full(self) -> bool:
        if self._queued_pairs >= self._max_batch_size:
            return True
        return self._max_batch_tokens is not None and self._queued_tokens >= self._max_batch_tokens

    def _take_batch(self) -> list[_Slice]:
        batch: list[_Slice] = []
        pairs = tokens = 0
        budget = self._max_batch_tokens
        while pairs < self._max_batch_size and (request := self._first_live_request()) is not None:
            start = stop = request.taken
            while stop < len(request.pairs) and pairs < self._max_batch_size:
                cost = request.pairs[stop].num_tokens
                if budget is not None and pairs and tokens + cost > budget:
                    break
                tokens += cost
                pairs += 1
                stop += 1
            if stop == start:
                break  # the token budget is spent
            batch.append(_Slice(request, start, stop))
            request.taken = stop
        self._queued_pairs -= pairs
        self._queued_tokens -= tokens
        return batch

    # --- the runners: one per replica, one forward pass at a time in its dedicated thread ---------

    async def _run_batches(self, replica: _Replica) -> None:
        loop = asyncio.get_running_loop()
        assert replica.executor is not None
        while True:
            await self._wait_for_turn(replica)
            batch = await self._handoff.get()
            self._handoff.task_done()  # the slot is free: the former starts on the next batch
            live = [piece for piece in batch if not piece.request.future.done()]
            for piece in batch:
                if piece.request.future.done():
                    self._pairs_dropped += piece.stop - piece.start
            if not live:
                continue
            pairs = [pair for piece in live for pair in piece.request.pairs[piece.start : piece.stop]]
            started = loop.time()
            replica.in_flight = len(pairs)
            replica.busy = True
            failed = device_fault = False
            try:
                scores = await loop.run_in_executor(replica.executor, replica.engine.score_encoded, pairs)
                if len(scores) != len(pairs):
                    raise RuntimeError(f"engine returned {len(scores)} scores for {len(pairs)} pairs")
            except Exception as exc:  # the engine failed this batch: fail its callers, keep serving
                log.exception("forward pass of %d pairs on replica %d failed", len(pairs), replica.index)
                failed = True
                device_fault = not isinstance(exc, EngineOutOfMemory)  # OOM: the batch was too big
                for piece in live:
                    if not piece.request.future.done():
                        piece.request.future.set_exception(exc)
            else:
                self._fan_out(live, scores)
            finally:
                replica.in_flight = 0
                replica.busy = False
            self._record(replica, live, len(pairs), started, loop.time(), failed, device_fault)

    async def _wait_for_turn(self, replica: _Replica) -> None:
        """An unhealthy replica waits while a healthy one exists, so batches go where they can succeed."""
        while not self._is_healthy(replica) and self.healthy:
            self._health_changed.clear()
            await self._health_changed.wait()

    def _fan_out(self, live: list[_Slice], scores: Sequence[float]) -> None:
        offset = 0
        for piece in live:
            count = piece.stop - piece.start
            request = piece.request
            request.scores[piece.start : piece.stop] = [float(score) for score in scores[offset : offset + count]]
            offset += count
            request.remaining -= count
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.scores)

    def _record(
        self,
        replica: _Replica,
        live: list[_Slice],
        size: int,
        started: float,
        finished: float,
        failed: bool,
        device_fault: bool,
    ) -> None:
        tokens = sum(pair.num_tokens for piece in live for pair in piece.request.pairs[piece.start : piece.stop])
        self._batches_run += 1
        self._last_size = size
        self._last_tokens = tokens
        replica.batches_run += 1
        replica.inference_s += finished - started
        was_healthy = self._is_healthy(replica)
        if failed:
            replica.failed_batches += 1
            if device_fault:
                replica.failures_in_a_row += 1
        else:
            replica.failures_in_a_row = 0
            replica.pairs_scored += size
            self._pairs_scored += size
            self._seconds_per_pair = (finished - started) / size
        if self._is_healthy(replica) != was_healthy:
            log.warning(
                "replica %d (%s) is %s",
                replica.index,
                replica.engine.info.device,
                "healthy again" if not was_healthy else "unhealthy: its last passes all failed",
            )
            self._health_changed.set()
        if self._on_batch is not None:
            waits = tuple(started - piece.request.enqueued_at for piece in live)
            try:
                self._on_batch(BatchRecord(size, tokens, waits, finished - started, failed, replica.index))
            except Exception:  # an observer's bug must not stop the runner
                log.exception("on_batch observer failed")
