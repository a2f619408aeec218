"""Tokenizing off the event loop: one thread encodes, in one call, the pairs of every request that arrived
while it was busy. No torch here.

A pair costs the Rust tokenizer 15-140 µs (the more, the colder the CPU's caches, as on a loop that runs
Litestar between pairs), and a single-pair call holds the GIL; a call of two pairs or more releases it
(on hosts of 8 cores or more: `tokenization.parallel_encode_min_pairs`). On the loop that was the largest
item of a single-pair request's cost; here the loop pays for a future and, per call rather than per
request, one wake-up. Callers hold only futures: the thread owns the calls to `encode`, and the loop
resolves the futures (one `call_soon_threadsafe` per call). A caller that was cancelled meanwhile is
skipped; an exception in `encode` fails that call's callers only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

from similarity_service.engine_api import EncodedPair

Pairs = Sequence[tuple[str, str]]
_Waiting = tuple[Pairs, "asyncio.Future[list[EncodedPair]]"]


class Encoder:
    """Runs `encode` in its own thread for every `await encoder.encode(pairs)` on the loop that started it."""

    def __init__(self, encode: Callable[[Pairs], list[EncodedPair]]) -> None:
        self._encode = encode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition(threading.Lock())
        self._waiting: list[_Waiting] = []  # guarded by `_changed`
        self._busy = False  # the thread is encoding: it takes `_waiting` when done, no need to wake it
        self._closing = False

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("encoder already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._serve, name="structsim-tokenizer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the thread once it has encoded what it holds (callers still waiting get their answer)."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def encode(self, pairs: Pairs) -> list[EncodedPair]:
        """`pairs` encoded, in order."""
        loop = self._loop
        if loop is None or self._closing:
            raise RuntimeError("encoder not running")
        future: asyncio.Future[list[EncodedPair]] = loop.create_future()
        with self._changed:
            self._waiting.append((pairs, future))
            if not self._busy:
                self._changed.notify()
        return await future

    def _serve(self) -> None:
        while True:
            with self._changed:
                self._busy = False
                while not self._waiting and not self._closing:
                    self._changed.wait()
                if not self._waiting:
                    return
                taken, self._waiting = self._waiting, []
                self._busy = True
            live = [(pairs, future) for pairs, future in taken if not future.done()]  # callers still waiting
            encoded: list[EncodedPair] | BaseException
            try:
                encoded = self._encode([pair for pairs, _ in live for pair in pairs]) if live else []
            except Exception as exc:  # fail these callers; the thread keeps serving
                encoded = exc
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_answer, live, encoded)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return


def _answer(live: list[_Waiting], encoded: list[EncodedPair] | BaseException) -> None:
    offset = 0
    for pairs, future in live:
        if not future.done():
            if isinstance(encoded, BaseException):
                future.set_exception(encoded)
            else:
                future.set_result(encoded[offset : offset + len(pairs)])
        offset += len(pairs)
