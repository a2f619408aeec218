"""The served path, in-process: one event loop, one engine per precision, one batcher per engine.

Trials reuse them: an engine is loaded (and warmed up) the first time its precision is tried and kept
for the study; its batcher is reconfigured to each trial's batch size and wait. These are the
service's own `Engine` and `Batcher`, on the event loop `structsim serve` gets from uvicorn (uvloop
where installed) and with serve's GIL switch interval and young-generation GC threshold, so a trial
measures what serve runs: at GPU rates the loop and the hand-offs between it and the runner thread are
a large part of a config's cost.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

from similarity_service.batching import Batcher
from similarity_service.commands.serve import GC_GEN0_THRESHOLD, GIL_SWITCH_INTERVAL_S
from similarity_service.engine_api import ScoringEngine

from similarity_autotune.space import ServingConfig

T = TypeVar("T")


class TunableEngine(ScoringEngine, Protocol):
    """An engine whose forward-pass size can change between trials (`runner.Engine` is one)."""

    max_batch_size: int


EngineLoader = Callable[[str], TunableEngine]  # precision -> a loaded, warmed-up engine


class ServingRuntime:
    """Owns the loop, the engines and the batchers of a study; close it (or use `with`) to stop them."""

    def __init__(self, load_engine: EngineLoader, *, max_queue_pairs: int, max_batch_tokens: int | None) -> None:
        self._load_engine = load_engine
        self._max_queue_pairs = max_queue_pairs
        self._max_batch_tokens = max_batch_tokens
        factory = _serve_loop_factory()
        self.event_loop = "uvloop" if factory is not None else "asyncio"
        self._runner = asyncio.Runner(loop_factory=factory)
        self._engines: dict[str, TunableEngine] = {}
        self._batchers: dict[str, Batcher] = {}
        # As `structsim serve` sets them once warm; restored by close(). (The load generator collects and
        # freezes the heap before each trial, as serve does once.)
        self._switch_interval = sys.getswitchinterval()
        self._gc_threshold = gc.get_threshold()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        gc.set_threshold(GC_GEN0_THRESHOLD, *self._gc_threshold[1:])

    @property
    def max_queue_pairs(self) -> int:
        return self._max_queue_pairs

    def engine(self, precision: str) -> TunableEngine:
        """The study's engine for `precision`, loaded on first use."""
        if precision not in self._engines:
            self._engines[precision] = self._load_engine(precision)
        return self._engines[precision]

    def batcher(self, config: ServingConfig) -> Batcher:
        """The batcher of `config.precision`'s engine, both set to the config's batch size and wait.

        The engine's forward-pass limit follows the batch size, as `structsim serve` loads it.
        """
        engine = self.engine(config.precision)
        engine.max_batch_size = config.max_batch_size
        batcher = self._batchers.get(config.precision)
        if batcher is None:
            batcher = self.run(self._start(engine, config))
            self._batchers[config.precision] = batcher
        batcher.reconfigure(max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms)
        return batcher

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the study's loop (batchers live on it between trials)."""
        return self._runner.run(coroutine)

    async def _start(self, engine: TunableEngine, config: ServingConfig) -> Batcher:
        batcher = Batcher(
            engine,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            max_batch_tokens=self._max_batch_tokens,
            max_queue_pairs=self._max_queue_pairs,
        )
        await batcher.start()
        return batcher

    def close(self) -> None:
        """Close every batcher (finishing what is queued), then the loop."""
        try:
            for batcher in self._batchers.values():
                self.run(batcher.close())
        finally:
            self._batchers.clear()
            self._runner.close()
            sys.setswitchinterval(self._switch_interval)
            gc.set_threshold(*self._gc_threshold)

    def __enter__(self) -> ServingRuntime:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _serve_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed, as uvicorn's `loop="auto"` picks it for `structsim serve`."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
