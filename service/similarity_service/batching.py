"""The dynamic micro-batcher: many callers' pairs merged into few forward passes. No torch here.

Ownership, as in text-embeddings-inference: callers hold only futures; the event loop owns the queue
and forms batches; a one-slot hand-off lets the next batch form while the engines compute. Each engine
replica (one per GPU) has its own dedicated thread, so the engine is never called from two threads at once,
and from the event loop only for a lone small request at low load (`inline_max_pairs`, below).

The loop and the threads meet only at the slot and at one callback per pass. Batches form on the loop
in plain callbacks, not a task: when a request is submitted, when the slot empties, when a pass is
answered, when a batch's deadline passes. A replica thread takes the slot's batch itself, runs it, hands
the scores back with one `call_soon_threadsafe` (the loop then resolves every caller's future at once)
and takes the next batch straight away if one is formed: under load the engine never waits for the
loop, and a request costs the loop one wake-up of its caller, not a chain of task switches.

Dispatch to several replicas is pull-based: a replica takes a batch from the shared one-slot hand-off
only when it has none in flight, so a formed batch goes to a free replica, never waits behind a busy
one while another is idle (a per-replica slot could strand it behind a slow GPU), and batches still
form while every replica is busy. The slot holds one batch, not one per replica: a batch formed later
is fuller, and under load a freed replica finds the next batch already formed. A replica whose last
`failures_before_unhealthy` passes all failed (out of memory aside: that is the batch's size, not the device)
is unhealthy: it takes no batches while a healthy replica exists (all unhealthy: all keep taking them,
so callers get errors rather than hang), and one success makes it healthy again.

One exception to the threads: with `inline_max_pairs`, a request of that many pairs or fewer that finds the
batcher idle (nothing queued, formed or running, `max_wait_ms` 0, and no request for `INLINE_AFTER_QUIET_S`
before it) runs on the loop itself, at once: at low load the two hand-offs (wake the replica thread, wake the
loop for the answer) cost more than the forward pass, each a sleeping core's wake-up. The loop is blocked
meanwhile, so this is for engines whose small passes take well under a millisecond (CUDA graphs), and the
quiet interval keeps it off under load, where the loop must keep reading requests while the device runs.
With `peers` (other processes serving the same devices: workers.py) it is off too while a peer runs a pass,
which the device would finish first with the loop held; `peers` hears of every pass this batcher runs.

A batch closes at `max_batch_size` pairs, at `max_batch_tokens` tokens, or `max_wait_ms` after its
oldest pair was queued, whichever comes first (with `max_wait_ms` 0 a lone request goes at once); while
draining it closes at once. A request larger than a batch is split across forward passes and reassembled
in order. A caller that was cancelled (its client left) is skipped before it costs engine time. An
engine exception fails every request in that batch (on that replica) and nothing else. Queue times and
deadlines come from the event loop's clock, so tests can run on a fake one; a pass's duration is
measured in its thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from similarity_service.engine_api import EncodedPair, EngineOutOfMemory, ScoringEngine

log = logging.getLogger(__name__)

# A request runs on the loop (`inline_max_pairs`) only this long after the one before it: low load, not a lull.
INLINE_AFTER_QUIET_S = 0.002


class DevicePeers(Protocol):
    """Other processes running forward passes on the same devices (workers.WorkerPeers)."""

    def pass_started(self) -> None: ...

    def pass_ended(self) -> None: ...

    def others_running(self) -> bool: ...


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
    pairs_rescored_fp32: int  # scored again by the engine's fp32 copy near an exact threshold
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
    """One caller's pairs, future and progress. Touched only on the event loop (threads read `pairs`
    and whether `future` is done)."""

    __slots__ = ("enqueued_at", "future", "pairs", "remaining", "scores", "taken", "tokens")

    def __init__(
        self, pairs: Sequence[EncodedPair], tokens: int, future: asyncio.Future[list[float]], now: float
    ) -> None:
        self.pairs = pairs
        self.tokens = tokens
        self.future = future
        self.enqueued_at = now
        self.scores: list[float] | None = None  # assembled here only when the request is split across passes
        self.taken = 0  # pairs[:taken] are in some batch already
        self.remaining = len(pairs)  # pairs not scored yet


# One request's share of a batch: (request, start, stop, tokens of pairs[start:stop]). A tuple: one is
# made per request per pass.
_Piece = tuple[_Request, int, int, int]


class _Pass:
    """What a replica thread hands back to the loop about one batch it took."""

    __slots__ = ("dropped", "error", "inference_s", "live", "perf_started", "scores", "unhealthy_changed")

    def __init__(self, live: list[_Piece], dropped: int) -> None:
        self.live = live
        self.dropped = dropped  # pairs of callers that had left by the time the batch was taken
        self.scores: list[float] = []
        self.error: Exception | None = None
        self.perf_started = 0.0  # time.perf_counter() when the forward pass began
        self.inference_s = 0.0
        self.unhealthy_changed = False  # this pass made the replica unhealthy, or healthy again


class _Replica:
    """One engine, its thread and its counters. The loop owns the counters; the thread owns the engine;
    `taken` (passes taken and not yet answered) and `failures_in_a_row` change under the batcher's lock."""

    def __init__(self, index: int, engine: ScoringEngine) -> None:
        self.index = index
        self.engine = engine
        self.thread: threading.Thread | None = None
        self.taken = 0
        self.in_flight = 0
        self.batches_run = 0
        self.failed_batches = 0
        self.pairs_scored = 0
        self.inference_s = 0.0
        self.failures_in_a_row = 0

    def stats(self, failures_before_unhealthy: int) -> ReplicaStats:
        return ReplicaStats(
            index=self.index,
            device=self.engine.info.device,
            busy=self.taken > 0,
            in_flight_pairs=self.in_flight,
            batches_run=self.batches_run,
            failed_batches=self.failed_batches,
            pairs_scored=self.pairs_scored,
            pairs_rescored_fp32=getattr(self.engine, "rescored_pairs", 0),  # engines without exact thresholds: 0
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
        inline_max_pairs: int = 0,
        peers: DevicePeers | None = None,
    ) -> None:
        """`engines`: one engine, or one replica per device (all of the same model). `inline_max_pairs`: requests
        this small run on the loop when the batcher is idle (module docstring); 0, never. `peers`: other
        processes on the same devices, told of this batcher's passes and asked before a pass on the loop."""
        if max_queue_pairs < 1:
            raise ValueError("max_queue_pairs must be at least 1")
        if failures_before_unhealthy < 1:
            raise ValueError("failures_before_unhealthy must be at least 1")
        replicas = list(engines) if isinstance(engines, Sequence) else [engines]
        if not replicas:
            raise ValueError("the batcher needs at least one engine")
        self._replicas = [_Replica(index, engine) for index, engine in enumerate(replicas)]
        self._failures_before_unhealthy = failures_before_unhealthy
        self._max_batch_tokens = max_batch_tokens
        self._max_queue_pairs = max_queue_pairs
        self._on_batch = on_batch
        self._inline_max_pairs = inline_max_pairs
        self._peers = peers
        self._last_submit_at = -math.inf

        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_pairs = 0
        self._queued_tokens = 0
        self._deadline: asyncio.TimerHandle | None = None  # forms the waiting batch at its oldest pair's deadline
        self._deadline_at = 0.0
        self._draining = False
        self._preparing = 0  # admitted callers still preparing their pairs (tokenizing), see `admission`
        self._drained: asyncio.Event | None = None

        # The hand-off, shared with the replica threads; everything below is guarded by this condition.
        self._changed = threading.Condition(threading.Lock())
        self._slot: list[_Piece] | None = None
        self._slot_pairs = self._slot_tokens = 0  # the slot batch's size
        self._slot_wanted = False  # the loop has a batch to form once the slot empties: tell it then
        self._closing = False

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
        """Start a runner thread per replica; batches form on the running loop."""
        if self._loop is not None:
            raise RuntimeError("batcher already started")
        self._loop = asyncio.get_running_loop()
        for replica in self._replicas:
            replica.thread = threading.Thread(
                target=self._serve, args=(replica,), name=f"structsim-runner-{replica.index}", daemon=True
            )
            replica.thread.start()

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
        self._pump()  # a batch waiting on the old limits re-checks them

    async def drain(self) -> None:
        """Stop admitting (`submit` raises `Draining`), then finish everything queued and in flight."""
        self._draining = True
        if self._loop is None:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        self._pump()  # a batch waiting for its deadline goes now
        self._check_drained()
        await self._drained.wait()

    async def close(self) -> None:
        """Drain, then stop every replica's thread."""
        await self.drain()
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        threads = [replica.thread for replica in self._replicas if replica.thread is not None]
        for replica in self._replicas:
            replica.thread = None
        # A pass for callers that already left may still be running; wait for it off the loop.
        for thread in threads:
            await asyncio.to_thread(thread.join)

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
    def idle(self) -> bool:
        """Nothing queued, formed or running, and at most one caller admitted and preparing (the one asking).
        Read without the lock: a hint for callers, not a promise."""
        return self._preparing <= 1 and not self._queued_pairs and self._none_formed_or_running()

    def _none_formed_or_running(self) -> bool:
        return self._slot is None and not any(replica.taken for replica in self._replicas)

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

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Admit a caller before it prepares its pairs: a drain that begins meanwhile waits for it, and its
        `submit(..., admitted=True)` is scored, not refused. Raises `Draining` when shutting down."""
        if self._draining:
            raise Draining()
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1
            if self._draining:
                self._check_drained()

    async def submit(self, encoded: Sequence[EncodedPair], *, admitted: bool = False) -> list[float]:
        """Score `encoded` in order. Raises `Overloaded` when the queue is full, `Draining` when shutting down
        (unless the caller was `admitted` before the drain began)."""
        if self._draining and not admitted:
            raise Draining()
        loop = self._loop
        if loop is None or self._closing:
            raise RuntimeError("batcher not started")
        count = len(encoded)
        if not count:
            return []
        if count > self._max_queue_pairs:
            raise ValueError(f"{count} pairs can never fit a queue of {self._max_queue_pairs}")
        if self._queued_pairs + count > self._max_queue_pairs:
            raise Overloaded(self._queued_pairs, self._max_queue_pairs, self._retry_after_s())
        tokens = encoded[0].num_tokens if count == 1 else sum(pair.num_tokens for pair in encoded)
        now, quiet_since = loop.time(), self._last_submit_at
        self._last_submit_at = now
        request = _Request(encoded, tokens, loop.create_future(), now)
        quiet = now - quiet_since >= INLINE_AFTER_QUIET_S
        if count <= self._inline_max_pairs and quiet and (replica := self._take_idle_replica()) is not None:
            request.taken = count
            self._answer(replica, self._run_pass(replica, [(request, 0, count, tokens)]))  # resolves the future
            return request.future.result()
        self._queue.append(request)
        self._queued_pairs += count
        self._queued_tokens += tokens
        self._pump()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._drop_untaken(request)  # the client left: free its queue space now
            if self._draining:
                self._check_drained()
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

    # --- forming batches: on the loop, the sole owner of the queue --------------------------------

    def _pump(self) -> None:
        """Form the next batch into the slot if one is due; else arrange to be called again when one may be
        (the slot empties, a pass ends, the deadline passes, a submit). A batch already in the slot, waiting
        for a replica, takes in what arrived since, up to the limits: it runs no later for it, and those
        requests need not wait for the pass after."""
        loop = self._loop
        if loop is None or (first := self._first_live_request()) is None:
            return
        due = -math.inf if self._draining or self._batch_is_full() else first.enqueued_at + self._max_wait_s
        with self._changed:
            if self._slot is None:
                if due > loop.time():
                    self._arm_deadline(loop, due)
                    return
                self._slot, self._slot_pairs, self._slot_tokens = [], 0, 0
                self._changed.notify_all()  # heard once the lock is released, with the batch formed
            self._slot_pairs, self._slot_tokens = self._take_batch(self._slot, self._slot_pairs, self._slot_tokens)
            self._slot_wanted = self._first_live_request() is not None  # more is queued: form it when taken
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _arm_deadline(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._deadline is not None and self._deadline_at == due:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = loop.call_at(due, self._on_deadline)  # uvloop's handle has no when(): kept apart
        self._deadline_at = due

    def _on_deadline(self) -> None:
        self._deadline = None
        self._pump()

    def _first_live_request(self) -> _Request | None:
        while self._queue:
            request = self._queue[0]
            if request.taken < len(request.pairs):
                if not request.future.done():
                    return request
                self._drop_untaken(request)  # failed earlier in another batch
            self._queue.popleft()
        return None

    def _batch_is_full(self) -> bool:
        if self._queued_pairs >= self._max_batch_size:
            return True
        return self._max_batch_tokens is not None and self._queued_tokens >= self._max_batch_tokens

    def _take_batch(self, batch: list[_Piece], pairs: int, tokens: int) -> tuple[int, int]:
        """Move queued pairs into `batch` (holding `pairs` pairs of `tokens` tokens) up to the batch limits;
        the batch's new pair and token counts."""
        taken_pairs, taken_tokens = pairs, tokens
        budget = self._max_batch_tokens
        limit = self._max_batch_size
        while pairs < limit and (budget is None or tokens < budget) and (request := self._first_live_request()):
            start = request.taken
            count = len(request.pairs)
            if budget is None and start == 0 and count <= limit - pairs:
                stop, cost = count, request.tokens  # the whole request: its tokens are known
            elif budget is None:
                stop = min(count, start + limit - pairs)
                cost = sum(pair.num_tokens for pair in request.pairs[start:stop])
            else:
                stop, cost = start, 0
                while stop < count and pairs + stop - start < limit:
                    pair_tokens = request.pairs[stop].num_tokens
                    if (pairs or stop > start) and tokens + cost + pair_tokens > budget:
                        break  # over the budget (a pair over it alone still runs, alone)
                    cost += pair_tokens
                    stop += 1
                if stop == start:
                    break  # the token budget is spent
            batch.append((request, start, stop, cost))
            request.taken = stop
            pairs += stop - start
            tokens += cost
        self._queued_pairs -= pairs - taken_pairs
        self._queued_tokens -= tokens - taken_tokens
        return pairs, tokens

    # --- the runners: one thread per replica, one forward pass at a time ---------------------------

    def _serve(self, replica: _Replica) -> None:
        """The replica's thread: take a batch, run it, hand the scores to the loop; until closed."""
        while (batch := self._take_slot(replica)) is not None:
            done = self._run_pass(replica, batch)
            try:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._answer, replica, done)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _run_pass(self, replica: _Replica, batch: list[_Piece]) -> _Pass:
        """One forward pass of `batch`'s live callers on `replica` (taken for it), in the calling thread."""
        live = [piece for piece in batch if not piece[0].future.done()]  # callers still waiting
        done = _Pass(live, sum(stop - start for _, start, stop, _ in batch) - sum(p[2] - p[1] for p in live))
        if live:
            pairs = [pair for request, start, stop, _ in live for pair in request.pairs[start:stop]]
            replica.in_flight = len(pairs)
            if self._peers is not None:
                self._peers.pass_started()
            done.perf_started = time.perf_counter()
            try:
                scores = replica.engine.score_encoded(pairs)
                if len(scores) != len(pairs):
                    raise RuntimeError(f"engine returned {len(scores)} scores for {len(pairs)} pairs")
                done.scores = scores
            except Exception as exc:  # the engine failed this batch: fail its callers, keep serving
                done.error = exc
            finally:
                if self._peers is not None:
                    self._peers.pass_ended()
            done.inference_s = time.perf_counter() - done.perf_started
            replica.in_flight = 0
            self._note_health(replica, done)
        return done

    def _take_idle_replica(self) -> _Replica | None:
        """For a request run on the loop: a replica, taken, if the batcher is idle (nothing queued, formed or
        running, no wait to fill batches, not closing) and no peer runs a pass, preferring healthy ones; else None."""
        if self._max_wait_s or self._closing or self._first_live_request() is not None:
            return None
        if self._peers is not None and self._peers.others_running():
            return None
        with self._changed:
            if not self._none_formed_or_running():
                return None
            replica = next((r for r in self._replicas if self._is_healthy(r)), self._replicas[0])
            replica.taken += 1
            return replica

    def _take_slot(self, replica: _Replica) -> list[_Piece] | None:
        """Block until this replica may take the slot's batch (None: the batcher is closing)."""
        with self._changed:
            while not self._closing:
                if self._slot is not None and (self._is_healthy(replica) or not self.healthy):
                    batch, self._slot = self._slot, None
                    replica.taken += 1
                    if self._slot_wanted:  # the loop has the next batch ready to form
                        self._slot_wanted = False
                        assert self._loop is not None
                        self._loop.call_soon_threadsafe(self._pump)
                    return batch
                self._changed.wait()
            return None

    def _note_health(self, replica: _Replica, done: _Pass) -> None:
        """Count failures in the thread, before it takes another batch, so an unhealthy replica takes none."""
        with self._changed:
            was_healthy = self._is_healthy(replica)
            if done.error is None:
                replica.failures_in_a_row = 0
            elif not isinstance(done.error, EngineOutOfMemory):  # OOM: the batch was too big, not the device
                replica.failures_in_a_row += 1
            if self._is_healthy(replica) != was_healthy:
                done.unhealthy_changed = True
                self._changed.notify_all()  # replicas waiting for their turn re-check

    # --- answering: on the loop, one callback per pass ----------------------------------------------

    def _answer(self, replica: _Replica, done: _Pass) -> None:
        with self._changed:
            replica.taken -= 1
        self._pairs_dropped += done.dropped
        if done.live:
            if done.error is not None:
                log.error(
                    "forward pass of %d pairs on replica %d failed",
                    sum(stop - start for _, start, stop, _ in done.live),
                    replica.index,
                    exc_info=done.error,
                )
                for request, _, _, _ in done.live:
                    if not request.future.done():
                        request.future.set_exception(done.error)
            else:
                self._fan_out(done.live, done.scores)
            self._record(replica, done)
        self._pump()
        if self._draining:
            self._check_drained()

    def _fan_out(self, live: list[_Piece], scores: Sequence[float]) -> None:
        offset = 0
        for request, start, stop, _ in live:
            count = stop - start
            part = [float(score) for score in scores[offset : offset + count]]
            offset += count
            if count == len(request.pairs):  # the whole request in this pass: its answer as is
                if not request.future.done():
                    request.future.set_result(part)
                continue
            if request.scores is None:
                request.scores = [math.nan] * len(request.pairs)
            request.scores[start:stop] = part
            request.remaining -= count
            if request.remaining == 0 and not request.future.done():
                request.future.set_result(request.scores)

    def _record(self, replica: _Replica, done: _Pass) -> None:
        size = sum(stop - start for _, start, stop, _ in done.live)
        tokens = sum(piece[3] for piece in done.live)
        failed = done.error is not None
        self._batches_run += 1
        self._last_size = size
        self._last_tokens = tokens
        replica.batches_run += 1
        replica.inference_s += done.inference_s
        if failed:
            replica.failed_batches += 1
        else:
            replica.pairs_scored += size
            self._pairs_scored += size
            self._seconds_per_pair = done.inference_s / size
        if done.unhealthy_changed:
            log.warning(
                "replica %d (%s) is %s",
                replica.index,
                replica.engine.info.device,
                "healthy again" if self._is_healthy(replica) else "unhealthy: its last passes all failed",
            )
        if self._on_batch is not None:
            assert self._loop is not None
            # The pass began this long ago, on the loop's clock (which a test may fake).
            started = self._loop.time() - (time.perf_counter() - done.perf_started)
            waits = tuple(started - piece[0].enqueued_at for piece in done.live)
            try:
                self._on_batch(BatchRecord(size, tokens, waits, done.inference_s, failed, replica.index))
            except Exception:  # an observer's bug must not stop the batcher
                log.exception("on_batch observer failed")

    def _check_drained(self) -> None:
        """While draining: set `_drained` once nothing is being prepared, queued, formed or running."""
        if self._drained is None or self._preparing or self._first_live_request() is not None:
            return
        with self._changed:
            idle = self._none_formed_or_running()
        if idle:
            self._drained.set()
