"""Where the scorer tokenizes: on the loop while the batcher is idle, else in the tokenizer threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

import pytest

from fake_engine import FakeEngine
from similarity_service.batching import Batcher
from similarity_service.encoding import Encoder
from similarity_service.engine_api import EncodedPair
from similarity_service.scoring import SHARED_ENCODE_MAX_PAIRS, Scorer
from similarity_service.settings import Settings


class ThreadRecordingEngine(FakeEngine):
    """FakeEngine whose `encode` records the thread of each call."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded_on: list[str] = []
        self.large_gate = threading.Event()  # holds the tokenizing of requests of more than 4 pairs
        self.large_gate.set()

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        self.encoded_on.append(threading.current_thread().name)
        if len(pairs) > SHARED_ENCODE_MAX_PAIRS:
            self.large_gate.wait(timeout=10)
        return super().encode(pairs)


@pytest.fixture
def engine() -> ThreadRecordingEngine:
    return ThreadRecordingEngine()


@pytest.fixture
async def scorer(engine: ThreadRecordingEngine) -> AsyncIterator[Scorer]:
    settings = Settings()
    batcher = Batcher(engine, max_batch_size=64, max_wait_ms=0, max_batch_tokens=None, max_queue_pairs=1_000)
    encoder = Encoder(engine.encode)
    await batcher.start()
    await encoder.start()
    yield Scorer(engine, encoder, batcher, settings)
    engine.gate.set()
    engine.large_gate.set()
    await batcher.close()
    await encoder.close()


async def test_a_small_request_to_an_idle_batcher_is_tokenized_on_the_loop(
    scorer: Scorer, engine: ThreadRecordingEngine
) -> None:
    assert scorer.batcher.idle
    assert await scorer.similarity("ab", "c") == 0.0003
    assert engine.encoded_on == [threading.current_thread().name]
    assert scorer.batcher.idle  # answered: nothing left queued or running


async def test_while_a_pass_runs_small_requests_go_to_the_tokenizer_thread(
    scorer: Scorer, engine: ThreadRecordingEngine
) -> None:
    engine.gate.clear()  # the first pass holds the (fake) GPU
    first = asyncio.create_task(scorer.similarity("a", "b"))
    await asyncio.to_thread(engine.started.wait, 5)
    assert not scorer.batcher.idle
    second = asyncio.create_task(scorer.batch([("ab", "cd")] * SHARED_ENCODE_MAX_PAIRS))
    while len(engine.encoded_on) < 2:
        await asyncio.sleep(0.001)
    engine.gate.set()
    assert await first == 0.0002
    assert await second == [0.0004] * SHARED_ENCODE_MAX_PAIRS
    assert engine.encoded_on == [threading.current_thread().name, "structsim-tokenizer"]


async def test_while_another_request_tokenizes_small_ones_go_to_the_tokenizer_thread(
    scorer: Scorer, engine: ThreadRecordingEngine
) -> None:
    """The batcher is idle, but the service is not: another caller was admitted and is preparing."""
    engine.large_gate.clear()
    large = asyncio.create_task(scorer.batch([("a", "b")] * (SHARED_ENCODE_MAX_PAIRS + 1)))
    while not engine.encoded_on:
        await asyncio.sleep(0.001)
    small = asyncio.create_task(scorer.similarity("ab", "c"))
    while len(engine.encoded_on) < 2:
        await asyncio.sleep(0.001)
    engine.large_gate.set()
    assert await small == 0.0003
    assert await large == [0.0002] * (SHARED_ENCODE_MAX_PAIRS + 1)
    assert engine.encoded_on[1] == "structsim-tokenizer"


async def test_a_large_request_is_tokenized_in_a_thread_of_its_own(
    scorer: Scorer, engine: ThreadRecordingEngine
) -> None:
    count = SHARED_ENCODE_MAX_PAIRS + 1
    assert await scorer.batch([("a", "bc")] * count) == [0.0003] * count
    (thread,) = engine.encoded_on
    assert thread not in (threading.current_thread().name, "structsim-tokenizer")
