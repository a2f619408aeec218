"""The micro-batcher with a fake engine, on a fake clock (looptime): timing, merging, splitting, failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from fake_engine import FakeEngine, expected, pair
from similarity_service.batching import BatchRecord, Batcher, Draining, Overloaded

pytestmark = pytest.mark.looptime


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def make_batcher(engine: FakeEngine) -> AsyncIterator[Callable[..., Batcher]]:
    made: list[Batcher] = []

    def make(**overrides: object) -> Batcher:
        options: dict[str, object] = dict(max_batch_size=8, max_wait_ms=10, max_batch_tokens=None, max_queue_pairs=64)
        options.update(overrides)
        batcher = Batcher(engine, **options)  # type: ignore[arg-type]
        made.append(batcher)
        return batcher

    yield make
    engine.gate.set()
    for batcher in made:
        await batcher.close()


async def test_a_lone_pair_waits_max_wait_then_runs(make_batcher: Callable[..., Batcher], engine: FakeEngine) -> None:
    batcher = make_batcher(max_wait_ms=10)
    await batcher.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await batcher.submit([pair(7)]) == [0.0007]
    assert loop.time() - t0 == pytest.approx(0.010)
    assert engine.sizes() == [1]


async def test_zero_wait_runs_at_once(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(max_wait_ms=0)
    await batcher.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await batcher.submit([pair(1)])
    assert loop.time() - t0 == pytest.approx(0.0)


async def test_a_full_batch_goes_without_waiting(make_batcher: Callable[..., Batcher], engine: FakeEngine) -> None:
    batcher = make_batcher(max_batch_size=8, max_wait_ms=1000)
    await batcher.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results = await asyncio.gather(*(batcher.submit([pair(k)]) for k in range(8)))
    assert loop.time() - t0 < 0.001
    assert results == [[k / 10_000] for k in range(8)]
    assert engine.sizes() == [8]


async def test_concurrent_callers_share_passes_and_get_their_own_scores(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=16, max_wait_ms=5, max_queue_pairs=256)
    await batcher.start()
    requests = [[pair(100 * i + j) for j in range(1 + i % 5)] for i in range(30)]
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    assert results == [expected(r) for r in requests]
    assert max(engine.sizes()) <= 16
    assert len(engine.batches) < len(requests)  # merged
    assert sum(engine.sizes()) == sum(len(r) for r in requests)
    assert batcher.stats.pairs_scored == sum(len(r) for r in requests)


async def test_a_request_bigger_than_a_batch_is_split_and_reassembled_in_order(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=8)
    await batcher.start()
    big = [pair(k) for k in range(25)]
    assert await batcher.submit(big) == expected(big)
    assert engine.sizes() == [8, 8, 8, 1]


async def test_token_budget_closes_a_batch_and_an_oversized_pair_runs_alone(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=8, max_batch_tokens=25)
    await batcher.start()
    pairs = [pair(1, 10), pair(2, 10), pair(3, 10), pair(4, 40), pair(5, 10)]
    assert await batcher.submit(pairs) == expected(pairs)
    assert [[p.input_ids[0] for p in b] for b in engine.batches] == [[1, 2], [3], [4], [5]]


async def test_the_next_batch_forms_while_the_runner_is_busy_and_takes_in_later_arrivals(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=3, max_wait_ms=5)
    await batcher.start()
    engine.gate.clear()
    first = asyncio.create_task(batcher.submit([pair(1)]))
    await asyncio.to_thread(engine.started.wait, 5)  # pass 1 is in the runner thread, held
    second = asyncio.create_task(batcher.submit([pair(2), pair(3)]))
    await asyncio.sleep(0.004)
    assert batcher.stats.queued_pairs == 2  # before max_wait: not yet formed
    await asyncio.sleep(0.006)  # past max_wait: the second batch is formed and handed off
    assert batcher.stats.queued_pairs == 0
    assert batcher.stats.in_flight_pairs == 1
    third = asyncio.create_task(batcher.submit([pair(4)]))
    await asyncio.sleep(0)
    assert batcher.stats.queued_pairs == 0  # joined the formed batch at once: it waits for the runner anyway
    fourth = asyncio.create_task(batcher.submit([pair(5)]))
    await asyncio.sleep(0.010)
    assert batcher.stats.queued_pairs == 1  # the formed batch is full: the fourth waits in the queue
    engine.gate.set()
    assert await asyncio.gather(first, second, third, fourth) == [[0.0001], [0.0002, 0.0003], [0.0004], [0.0005]]
    assert engine.sizes() == [1, 3, 1]
    assert engine.threads == {next(iter(engine.threads))}  # one dedicated thread
    assert next(iter(engine.threads)).startswith("structsim-runner")


async def test_a_caller_that_left_is_dropped_before_it_costs_engine_time(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=2, max_wait_ms=1)
    await batcher.start()
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit([pair(1)]))
    await asyncio.to_thread(engine.started.wait, 5)
    in_slot = asyncio.create_task(batcher.submit([pair(2), pair(2)]))
    await asyncio.sleep(0.005)
    queued = asyncio.create_task(batcher.submit([pair(3), pair(4)]))
    await asyncio.sleep(0)
    assert batcher.stats.queued_pairs == 2
    in_slot.cancel()
    queued.cancel()
    await asyncio.sleep(0)
    assert batcher.stats.queued_pairs == 0  # queue space freed at once
    engine.gate.set()
    assert await running == [0.0001]
    kept = await batcher.submit([pair(5)])
    assert kept == [0.0005]
    assert [[p.input_ids[0] for p in b] for b in engine.batches] == [[1], [5]]
    assert batcher.stats.pairs_dropped == 4


async def test_an_engine_error_fails_that_batch_only(make_batcher: Callable[..., Batcher], engine: FakeEngine) -> None:
    records: list[BatchRecord] = []
    batcher = make_batcher(max_batch_size=4, max_wait_ms=1, on_batch=records.append)
    await batcher.start()
    engine.fail_on_key = 13
    bad, good_same_batch = await asyncio.gather(
        batcher.submit([pair(13)]), batcher.submit([pair(1)]), return_exceptions=True
    )
    assert isinstance(bad, RuntimeError) and isinstance(good_same_batch, RuntimeError)
    assert await batcher.submit([pair(2)]) == [0.0002]  # still serving
    assert [r.failed for r in records] == [True, False]


async def test_a_split_request_fails_whole_and_its_rest_is_not_run(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=2)
    await batcher.start()
    engine.fail_on_key = 13
    with pytest.raises(RuntimeError, match="device-side"):
        await batcher.submit([pair(13), pair(1), pair(2), pair(3), pair(4)])
    await asyncio.sleep(0.1)
    assert engine.sizes() in ([2], [2, 2])  # the pass already in the slot may run; nothing after it
    assert batcher.stats.queued_pairs == 0


async def test_a_wrong_number_of_scores_fails_the_batch(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher()
    await batcher.start()
    engine.short_by = 1
    with pytest.raises(RuntimeError, match="1 scores for 2 pairs"):
        await batcher.submit([pair(1), pair(2)])


async def test_a_full_queue_refuses_with_retry_after(make_batcher: Callable[..., Batcher], engine: FakeEngine) -> None:
    batcher = make_batcher(max_batch_size=2, max_wait_ms=0, max_queue_pairs=4)
    await batcher.start()
    engine.gate.clear()
    tasks = [asyncio.create_task(batcher.submit([pair(1)]))]
    await asyncio.to_thread(engine.started.wait, 5)
    tasks.append(asyncio.create_task(batcher.submit([pair(2), pair(3)])))  # taken into the slot
    await asyncio.sleep(0.001)
    tasks.append(asyncio.create_task(batcher.submit([pair(4), pair(5), pair(6)])))
    await asyncio.sleep(0)
    assert batcher.stats.queued_pairs == 3
    with pytest.raises(Overloaded) as refused:
        await batcher.submit([pair(7), pair(8)])
    assert refused.value.retry_after_s >= 1
    tasks.append(asyncio.create_task(batcher.submit([pair(9)])))  # one more pair fits exactly
    await asyncio.sleep(0)
    assert batcher.stats.queued_pairs == 4
    engine.gate.set()
    await asyncio.gather(*tasks)


async def test_requests_that_can_never_fit_and_empty_requests(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(max_queue_pairs=4)
    await batcher.start()
    with pytest.raises(ValueError, match="never fit"):
        await batcher.submit([pair(k) for k in range(5)])
    assert await batcher.submit([]) == []


async def test_drain_flushes_without_waiting_and_refuses_new_work(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=64, max_wait_ms=5_000)
    await batcher.start()
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(batcher.submit([pair(k)])) for k in range(5)]
    await asyncio.sleep(0.1)
    assert not any(t.done() for t in tasks)  # waiting for more pairs or the 5 s deadline
    t0 = loop.time()
    await batcher.drain()
    assert loop.time() - t0 < 0.001
    assert [t.result() for t in tasks] == [[k / 10_000] for k in range(5)]
    with pytest.raises(Draining):
        await batcher.submit([pair(1)])


async def test_drain_waits_for_callers_admitted_before_it_and_scores_them(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=64, max_wait_ms=0)
    await batcher.start()
    tokenized = asyncio.Event()

    async def admitted_caller() -> list[float]:
        with batcher.admission():
            await tokenized.wait()  # still tokenizing when the drain begins
            return await batcher.submit([pair(7)], admitted=True)

    caller = asyncio.create_task(admitted_caller())
    await asyncio.sleep(0)
    drain = asyncio.create_task(batcher.drain())
    await asyncio.sleep(0.05)
    assert not drain.done()  # held open by the admitted caller
    with pytest.raises(Draining):
        batcher.admission().__enter__()  # no one new is admitted
    with pytest.raises(Draining):
        await batcher.submit([pair(1)])
    tokenized.set()
    assert await caller == [7 / 10_000]
    await asyncio.wait_for(drain, 1)


async def test_reconfigure_applies_to_the_next_batch(make_batcher: Callable[..., Batcher], engine: FakeEngine) -> None:
    batcher = make_batcher(max_batch_size=2, max_wait_ms=50)
    await batcher.start()
    await batcher.submit([pair(k) for k in range(6)])
    assert engine.sizes() == [2, 2, 2]
    batcher.reconfigure(max_batch_size=6, max_wait_ms=0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await batcher.submit([pair(k) for k in range(6)])
    assert engine.sizes()[3:] == [6]
    assert loop.time() - t0 < 0.001
    assert (batcher.stats.max_batch_size, batcher.stats.max_wait_ms) == (6, 0)
    with pytest.raises(ValueError):
        batcher.reconfigure(max_batch_size=0)


async def test_reconfigure_shortens_a_wait_in_progress(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher(max_batch_size=8, max_wait_ms=10_000)
    await batcher.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    task = asyncio.create_task(batcher.submit([pair(1)]))
    await asyncio.sleep(0.5)
    batcher.reconfigure(max_wait_ms=100)  # the oldest pair has waited 500 ms: past the new bound
    await task
    assert loop.time() - t0 == pytest.approx(0.5)


async def test_observer_sees_sizes_tokens_and_waits(make_batcher: Callable[..., Batcher]) -> None:
    records: list[BatchRecord] = []
    batcher = make_batcher(max_batch_size=4, max_wait_ms=20, on_batch=records.append)
    await batcher.start()
    await asyncio.gather(batcher.submit([pair(1, 3)]), batcher.submit([pair(2, 5), pair(3, 7)]))
    (record,) = records
    assert (record.size, record.tokens, record.failed) == (3, 15, False)
    # A pass's start is timed in its thread on the real clock, so the fake clock's wait is off by real µs.
    assert record.queue_waits_s == (pytest.approx(0.020, abs=0.002), pytest.approx(0.020, abs=0.002))


async def test_close_stops_the_tasks_and_the_runner_thread(make_batcher: Callable[..., Batcher]) -> None:
    batcher = make_batcher()
    await batcher.start()
    await batcher.submit([pair(1)])
    await batcher.close()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(name.startswith("structsim-") for name in names)
    assert not any(t.name.startswith("structsim-runner") for t in threading.enumerate())
    with pytest.raises(Draining):
        await batcher.submit([pair(1)])


async def test_a_formed_batch_takes_in_later_arrivals_within_its_token_budget(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_batch_size=8, max_wait_ms=0, max_batch_tokens=25)
    await batcher.start()
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit([pair(1)]))
    await asyncio.to_thread(engine.started.wait, 5)
    waiting = [asyncio.create_task(batcher.submit([pair(k, 10)])) for k in (2, 3, 4)]
    await asyncio.sleep(0)
    assert (batcher.stats.queued_pairs, batcher.stats.queued_tokens) == (1, 10)  # 2 and 3 fit 25 tokens, 4 not
    engine.gate.set()
    await asyncio.gather(running, *waiting)
    assert [[p.input_ids[0] for p in b] for b in engine.batches] == [[1], [2, 3], [4]]


async def test_a_lone_small_request_runs_on_the_loop_when_the_batcher_is_idle_and_quiet(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    records: list[BatchRecord] = []
    batcher = make_batcher(max_wait_ms=0, inline_max_pairs=2, on_batch=records.append)
    await batcher.start()
    loop_thread = threading.current_thread().name

    assert await batcher.submit([pair(1), pair(2)]) == [0.0001, 0.0002]
    assert engine.threads == {loop_thread}  # no hand-off: the loop ran it
    assert await batcher.submit([pair(3)]) == [0.0003]  # right after another request: not quiet, the runner's
    await asyncio.sleep(0.01)
    assert await batcher.submit([pair(4), pair(5), pair(6)]) == [0.0004, 0.0005, 0.0006]  # too many pairs: the runner's
    await asyncio.sleep(0.01)
    assert await batcher.submit([pair(7)]) == [0.0007]  # quiet and idle again: the loop's
    assert engine.sizes() == [2, 1, 3, 1]
    assert [name == loop_thread for name in engine.thread_of_pass] == [True, False, False, True]
    assert [record.size for record in records] == [2, 1, 3, 1]  # observed as any pass
    assert batcher.stats.pairs_scored == 7 and batcher.replicas[0].batches_run == 4


async def test_requests_do_not_run_on_the_loop_while_a_pass_runs_or_batches_fill(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_wait_ms=0, inline_max_pairs=4)
    await batcher.start()
    engine.gate.clear()
    running = asyncio.create_task(batcher.submit([pair(1), pair(2), pair(3), pair(4), pair(5)]))  # the runner's
    await asyncio.to_thread(engine.started.wait, 5)
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(batcher.submit([pair(6)]))  # quiet, but the replica is busy: queued
    await asyncio.sleep(0)
    assert not queued.done()
    engine.gate.set()
    assert await asyncio.gather(running, queued) == [[0.0001, 0.0002, 0.0003, 0.0004, 0.0005], [0.0006]]
    assert all(name.startswith("structsim-runner") for name in engine.thread_of_pass)

    batcher.reconfigure(max_wait_ms=5)  # waiting to fill batches: never on the loop
    await asyncio.sleep(0.01)
    assert await batcher.submit([pair(7)]) == [0.0007]
    assert engine.thread_of_pass[-1].startswith("structsim-runner")


async def test_an_engine_error_on_the_loop_fails_that_request_and_counts_against_the_replica(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    batcher = make_batcher(max_wait_ms=0, inline_max_pairs=1, failures_before_unhealthy=1)
    await batcher.start()
    engine.fail_on_key = 13
    with pytest.raises(RuntimeError, match="device-side assert"):
        await batcher.submit([pair(13)])
    assert engine.thread_of_pass == [threading.current_thread().name]
    assert batcher.replicas[0].failed_batches == 1 and not batcher.healthy
    await asyncio.sleep(0.01)
    assert await batcher.submit([pair(2)]) == [0.0002]  # still serving: a success makes it healthy again
    assert batcher.healthy


class FakePeers:
    """Sibling workers on the same GPU: their running passes, and this batcher's as it reports them."""

    def __init__(self) -> None:
        self.siblings_running = False
        self.own_running = 0
        self.own_passes = 0

    def pass_started(self) -> None:
        self.own_running += 1
        self.own_passes += 1

    def pass_ended(self) -> None:
        self.own_running -= 1

    def others_running(self) -> bool:
        return self.siblings_running


async def test_requests_run_on_the_loop_only_while_no_sibling_worker_runs_a_pass(
    make_batcher: Callable[..., Batcher], engine: FakeEngine
) -> None:
    peers = FakePeers()
    batcher = make_batcher(max_wait_ms=0, inline_max_pairs=1, peers=peers)
    await batcher.start()
    loop_thread = threading.current_thread().name
    peers.siblings_running = True  # the GPU would run theirs first: hand it to the runner, keep the loop free
    assert await batcher.submit([pair(1)]) == [0.0001]
    await asyncio.sleep(0.01)
    peers.siblings_running = False
    assert await batcher.submit([pair(2)]) == [0.0002]
    assert [name == loop_thread for name in engine.thread_of_pass] == [False, True]
    assert (peers.own_passes, peers.own_running) == (2, 0)  # each pass told to the siblings, wherever it ran

    engine.fail_on_key = 3  # a failed pass ends too
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError):
        await batcher.submit([pair(3)])
    assert (peers.own_passes, peers.own_running) == (3, 0)


def test_the_service_runs_requests_on_the_loop_only_on_gpus() -> None:
    import msgspec

    from similarity_service.lifespan import inline_max_pairs
    from similarity_service.scoring import SHARED_ENCODE_MAX_PAIRS

    def on(device: str) -> FakeEngine:
        engine = FakeEngine()
        engine.info = msgspec.structs.replace(FakeEngine.info, device=device)  # type: ignore[misc]
        return engine

    assert inline_max_pairs([on("cuda:0"), on("cuda:1")]) == SHARED_ENCODE_MAX_PAIRS
    assert inline_max_pairs([on("cpu")]) == 0  # a pass would hold the loop for ms
    assert inline_max_pairs([on("cuda:0"), on("cpu")]) == 0
