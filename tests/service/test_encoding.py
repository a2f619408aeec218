"""The tokenizer thread: callers that arrive while it works share its next call; failures and departures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

import pytest

from fake_engine import FakeEngine
from similarity_service.encoding import Encoder
from similarity_service.engine_api import EncodedPair


class GatedEncode:
    """FakeEngine's encode, recording each call's pairs and thread; `gate` holds a call; `fail_on` raises."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, str]]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on: str | None = None

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        self.threads.add(threading.current_thread().name)
        self.started.set()
        self.gate.wait(timeout=10)
        self.calls.append(list(pairs))
        if self.fail_on is not None and any(a == self.fail_on for a, _ in pairs):
            raise ValueError(f"cannot encode {self.fail_on!r}")
        return FakeEngine().encode(pairs)


@pytest.fixture
def encode() -> GatedEncode:
    return GatedEncode()


@pytest.fixture
async def encoder(encode: GatedEncode) -> AsyncIterator[Encoder]:
    encoder = Encoder(encode)
    await encoder.start()
    yield encoder
    encode.gate.set()
    await encoder.close()


def key(encoded: list[EncodedPair]) -> list[int]:
    return [pair.input_ids[0] for pair in encoded]  # FakeEngine keys a pair by its total length


async def test_callers_that_arrive_during_a_call_share_the_next_one_and_get_their_own_pairs(
    encoder: Encoder, encode: GatedEncode
) -> None:
    encode.gate.clear()
    first = asyncio.create_task(encoder.encode([("a", "b")]))
    await asyncio.to_thread(encode.started.wait, 10)  # the thread is in its first call, held
    waiting = [asyncio.create_task(encoder.encode([("x" * k, "y"), ("x" * k, "yy")])) for k in range(1, 6)]
    await asyncio.sleep(0.05)
    encode.gate.set()
    assert key(await first) == [2]
    assert [key(await task) for task in waiting] == [[k + 1, k + 2] for k in range(1, 6)]
    assert [len(call) for call in encode.calls] == [1, 10]  # the five waiting requests in one call
    assert encode.threads == {"structsim-tokenizer"}  # never on the event loop


async def test_a_failed_call_fails_its_callers_only(encoder: Encoder, encode: GatedEncode) -> None:
    encode.fail_on = "bad"
    with pytest.raises(ValueError, match="cannot encode 'bad'"):
        await encoder.encode([("bad", "pair")])
    assert key(await encoder.encode([("good", "pair")])) == [8]


async def test_a_caller_that_left_is_not_encoded(encoder: Encoder, encode: GatedEncode) -> None:
    encode.gate.clear()
    first = asyncio.create_task(encoder.encode([("a", "b")]))
    await asyncio.to_thread(encode.started.wait, 10)
    leaving = asyncio.create_task(encoder.encode([("left", "early")]))
    staying = asyncio.create_task(encoder.encode([("stays", "on")]))
    await asyncio.sleep(0.01)
    leaving.cancel()
    encode.gate.set()
    await first
    assert key(await staying) == [7]
    assert leaving.cancelled()
    assert encode.calls == [[("a", "b")], [("stays", "on")]]


async def test_close_answers_the_call_in_progress_then_refuses(encode: GatedEncode) -> None:
    encoder = Encoder(encode)
    await encoder.start()
    encode.gate.clear()
    held = asyncio.create_task(encoder.encode([("a", "b")]))
    await asyncio.to_thread(encode.started.wait, 10)
    closing = asyncio.create_task(encoder.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    encode.gate.set()
    await closing
    assert key(await held) == [2]
    with pytest.raises(RuntimeError, match="not running"):
        await encoder.encode([("a", "b")])
