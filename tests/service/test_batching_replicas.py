"""The micro-batcher over several engine replicas (one per GPU in a pod): dispatch, failure isolation, shutdown.

Fake engines stand in for GPUs of different speeds; each records the batches it ran and the thread it
ran them in, so a test can see which replica got which batch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import msgspec
import pytest

from fake_engine import FakeEngine, expected, pair
from similarity_service.batching import BatchRecord, Batcher, Draining
from similarity_service.engine_api import EncodedPair


class Replica(FakeEngine):
    """A fake engine on its own "device", taking `delay_s` per forward pass; `always_fail` breaks it."""

    def __init__(self, device: str, delay_s: float = 0.0, always_fail: bool = False) -> None:
        super().__init__()
        self.info = msgspec.structs.replace(FakeEngine.info, device=device)  # type: ignore[misc]
        self.delay_s = delay_s
        self.always_fail = always_fail

    def score_encoded(self, batch: Sequence[EncodedPair]) -> list[float]:
        scores = super().score_encoded(batch)
        time.sleep(self.delay_s)
        if self.always_fail:
            raise RuntimeError(f"CUDA error: an illegal memory access on {self.info.device} (fake)")
        return scores

    def keys(self) -> list[int]:
        return [p.input_ids[0] for batch in self.batches for p in batch]


@pytest.fixture
async def make_batcher() -> AsyncIterator[Callable[..., Batcher]]:
    made: list[tuple[Batcher, Sequence[Replica]]] = []

    def make(engines: Sequence[Replica], **overrides: object) -> Batcher:
        options: dict[str, object] = dict(max_batch_size=4, max_wait_ms=1, max_batch_tokens=None, max_queue_pairs=256)
        options.update(overrides)
        batcher = Batcher(engines, **options)  # type: ignore[arg-type]
        made.append((batcher, engines))
        return batcher

    yield make
    for batcher, engines in made:
        for engine in engines:
            engine.gate.set()
        await batcher.close()


async def test_batches_spread_over_replicas_and_scores_return_to_their_callers(
    make_batcher: Callable[..., Batcher],
) -> None:
    fast, slow = Replica("cuda:0", delay_s=0.001), Replica("cuda:1", delay_s=0.02)
    batcher = make_batcher([fast, slow])
    await batcher.start()
    requests = [[pair(100 + 3 * i + j) for j in range(1 + i % 3)] for i in range(60)]
    results = await asyncio.gather(*(batcher.submit(request) for request in requests))
    assert results == [expected(request) for request in requests]  # each caller its own scores, in order
    assert fast.batches and slow.batches  # both replicas worked
    assert len(fast.batches) > len(slow.batches)  # a free replica takes the next batch: the fast one more often
    assert sorted(fast.keys() + slow.keys()) == sorted(p.input_ids[0] for r in requests for p in r)  # each pair once
    assert fast.threads.isdisjoint(slow.threads)  # one dedicated thread per replica
    assert {name.rsplit("_", 1)[0] for name in fast.threads | slow.threads} == {
        "structsim-runner-0",
        "structsim-runner-1",
    }
    stats = batcher.replicas
    assert [(s.index, s.device) for s in stats] == [(0, "cuda:0"), (1, "cuda:1")]
    assert [s.batches_run for s in stats] == [len(fast.batches), len(slow.batches)]
    assert sum(s.pairs_scored for s in stats) == batcher.stats.pairs_scored == sum(map(len, requests))
    assert all(s.healthy and not s.busy and s.inference_s > 0 for s in stats)


async def first_to_start(replicas: Sequence[Replica]) -> Replica:
    """The replica whose thread took the batch: which idle replica wakes first is up to the OS scheduler."""
    while True:
        for replica in replicas:
            if replica.started.is_set():
                return replica
        await asyncio.sleep(0.001)


async def test_a_batch_goes_to_the_idle_replica_while_another_is_busy(make_batcher: Callable[..., Batcher]) -> None:
    replicas = [Replica("cuda:0"), Replica("cuda:1")]
    batcher = make_batcher(replicas, max_wait_ms=0)
    await batcher.start()
    for replica in replicas:
        replica.gate.clear()
    held = asyncio.create_task(batcher.submit([pair(1)]))
    busy = await asyncio.wait_for(first_to_start(replicas), 5)  # one replica is busy with pass 1
    idle = replicas[1 - replicas.index(busy)]
    idle.gate.set()
    assert batcher.replicas[replicas.index(busy)].busy and batcher.stats.in_flight_pairs == 1
    assert await batcher.submit([pair(2)]) == [0.0002]  # answered while the busy replica is still held
    assert await batcher.submit([pair(3)]) == [0.0003]
    assert idle.keys() == [2, 3]
    busy.gate.set()
    assert await held == [0.0001]
    assert busy.keys() == [1]


async def test_one_replica_failing_fails_only_its_batches_and_is_then_avoided(
    make_batcher: Callable[..., Batcher],
) -> None:
    records: list[BatchRecord] = []
    good, broken = Replica("cuda:0"), Replica("cuda:1", always_fail=True)
    batcher = make_batcher([good, broken], max_wait_ms=0, on_batch=records.append, failures_before_unhealthy=3)
    await batcher.start()
    answered, failed = [], []
    # Idle replicas race for each batch; call until the broken one has failed its three passes.
    for key in range(1, 500):
        try:
            assert await batcher.submit([pair(key)]) == [key / 10_000]
            answered.append(key)
        except RuntimeError as error:
            assert "illegal memory access on cuda:1" in str(error)
            failed.append(key)
        if not batcher.replicas[1].healthy:
            break
    assert (good.keys(), broken.keys()) == (answered, failed) and len(failed) == 3
    assert [(s.healthy, s.failures_in_a_row, s.failed_batches) for s in batcher.replicas] == [
        (True, 0, 0),
        (False, 3, 3),
    ]
    assert batcher.healthy  # one replica still serves
    good.gate.clear()
    good.started.clear()
    held = asyncio.create_task(batcher.submit([pair(501)]))
    await asyncio.wait_for(first_to_start([good]), 5)
    later = asyncio.create_task(batcher.submit([pair(502)]))  # waits for the good replica, not the broken idle one
    await asyncio.sleep(0.05)
    assert not later.done() and broken.keys() == failed
    good.gate.set()
    assert await asyncio.gather(held, later) == [[0.0501], [0.0502]]
    assert good.keys() == [*answered, 501, 502]
    assert sorted((r.replica, r.failed) for r in records) == sorted([(1, True)] * 3 + [(0, False)] * (len(answered) + 2))


async def test_when_every_replica_is_broken_callers_get_errors_not_a_hang(make_batcher: Callable[..., Batcher]) -> None:
    engines = [Replica("cuda:0", always_fail=True), Replica("cuda:1", always_fail=True)]
    batcher = make_batcher(engines, max_wait_ms=0, failures_before_unhealthy=2)
    await batcher.start()
    for key in range(1, 7):
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(batcher.submit([pair(key)]), 5)
    assert not batcher.healthy
    assert all(not s.healthy for s in batcher.replicas)


async def test_a_replica_that_recovers_is_healthy_again(make_batcher: Callable[..., Batcher]) -> None:
    flaky = Replica("cuda:0", always_fail=True)
    batcher = make_batcher([flaky], max_wait_ms=0, failures_before_unhealthy=2)
    await batcher.start()
    for key in (1, 2):
        with pytest.raises(RuntimeError):
            await batcher.submit([pair(key)])
    assert not batcher.healthy  # its only replica: liveness should fail
    flaky.always_fail = False
    assert await batcher.submit([pair(3)]) == [0.0003]  # a lone replica keeps taking batches
    assert batcher.healthy and batcher.replicas[0].failures_in_a_row == 0


async def test_shutdown_answers_everything_admitted_on_every_replica(make_batcher: Callable[..., Batcher]) -> None:
    engines = [Replica("cuda:0"), Replica("cuda:1"), Replica("cuda:2")]
    batcher = make_batcher(engines, max_batch_size=2, max_wait_ms=10_000)
    await batcher.start()
    for engine in engines:
        engine.gate.clear()
    requests = [[pair(10 + 2 * i), pair(11 + 2 * i)] for i in range(9)]
    pending = [asyncio.create_task(batcher.submit(request)) for request in requests]
    for engine in engines:
        await asyncio.to_thread(engine.started.wait, 5)  # every replica holds a pass, the rest is queued
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    with pytest.raises(Draining):
        await batcher.submit([pair(99)])
    for engine in engines:
        engine.gate.set()
    await asyncio.wait_for(closing, 10)
    assert [task.result() for task in pending] == [expected(request) for request in requests]
    assert sum(len(engine.batches) for engine in engines) == len(requests)
    assert all(engine.batches for engine in engines)


def test_a_batcher_needs_an_engine() -> None:
    with pytest.raises(ValueError, match="at least one engine"):
        Batcher([], max_batch_size=1, max_wait_ms=0, max_batch_tokens=None, max_queue_pairs=1)


def test_batches_form_at_their_deadline_on_uvloop_as_served() -> None:
    """serve runs on uvloop (its timer handles differ from asyncio's): a lone pair waits max_wait, a full batch not."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> tuple[float, float, list[int]]:
        engine = Replica("cuda:0")
        batcher = Batcher(engine, max_batch_size=4, max_wait_ms=30, max_batch_tokens=None, max_queue_pairs=64)
        await batcher.start()
        try:
            t0 = time.perf_counter()
            assert await batcher.submit([pair(1)]) == [0.0001]
            lone = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(*(batcher.submit([pair(k)]) for k in range(4)))
            full = time.perf_counter() - t0
        finally:
            await batcher.close()
        return lone, full, [len(batch) for batch in engine.batches]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        lone, full, sizes = runner.run(scenario())
    assert 0.025 <= lone < 1.0 and full < 0.025
    assert sizes == [1, 4]
