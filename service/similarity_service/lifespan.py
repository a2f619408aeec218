"""The service's resources and their order: load → warm up → start batcher → ready; drain → close.

The model loads in the background once the server listens, so liveness (/healthz) answers while a
large checkpoint downloads and readiness (/readyz) turns 200 only when warmed up. A load failure is
fatal: the phase turns FAILED, /healthz 503, and the serve command stops and exits 1.
No torch here: the engine comes from `engine_factory`, which imports it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from litestar import Litestar

from similarity_service.batching import Batcher, BatchRecord, Draining
from similarity_service.engine_api import ScoringEngine
from similarity_service.errors import NotReady
from similarity_service.gpu_stats import GpuStats
from similarity_service.metrics import ServiceMetrics
from similarity_service.profile import Profile, ProfileError, read_profile
from similarity_service.scoring import Scorer
from similarity_service.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], ScoringEngine]
LOADING_RETRY_AFTER_S = 5.0
# Forward passes failing back to back with none succeeding mean the device is broken, not the input
# (input is validated before it is queued): liveness then fails so Kubernetes restarts the pod.
FAILED_BATCHES_BEFORE_UNHEALTHY = 3


class EngineLoadError(Exception):
    """The model cannot be served as configured (missing files, a precision the device lacks, ...)."""


def load_engine(settings: Settings) -> ScoringEngine:
    """The real engine: load the checkpoint in the configured precision, then warm it up."""
    # torch: imported only when a real model is served
    from similarity_service.model import ModelLoadError
    from similarity_service.runner import Engine

    try:
        engine = Engine.load(
            settings.model,
            revision=settings.revision,
            cache_dir=settings.cache_dir,
            offline=settings.offline,
            precision=settings.precision,
            device=settings.device,
            max_seq_len=settings.max_seq_len,
            max_batch_size=settings.max_batch_size,
        )
    except (ModelLoadError, ValueError) as exc:  # ValueError: PrecisionError, DeviceError, limits
        raise EngineLoadError(str(exc)) from exc
    engine.warmup()
    return engine


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ServiceState:
    """The app's one owner of the engine, batcher and scorer, and of the phase that gates them."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.scorer: Scorer | None = None
        self.profile: Profile | None = None
        self._gpu_stats: GpuStats | None = None
        self._failed_in_a_row = 0

    # --- gates used by the routes -----------------------------------------------------------------

    def ready_scorer(self) -> Scorer:
        """The scorer, or the reason requests cannot be admitted now (503)."""
        if self.phase is Phase.READY and self.scorer is not None:
            return self.scorer
        if self.phase is Phase.DRAINING:
            raise Draining()
        if self.phase is Phase.FAILED:
            raise NotReady("load_failed", f"the model failed to load: {self.error}")
        raise NotReady("not_ready", "the model is loading", retry_after_s=LOADING_RETRY_AFTER_S)

    @property
    def healthy(self) -> bool:
        return self.phase is not Phase.FAILED and self._failed_in_a_row < FAILED_BATCHES_BEFORE_UNHEALTHY

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self, engine_factory: EngineFactory) -> None:
        settings = self.settings
        log.info("loading model %s (precision %s, device %s)", settings.model, settings.precision, settings.device)
        try:
            engine = await asyncio.to_thread(engine_factory, settings)
        except Exception as exc:
            # A configuration problem needs its message; anything else its traceback too.
            log.error("cannot serve: %s", exc, exc_info=not isinstance(exc, EngineLoadError))
            self.error = str(exc)
            self.phase = Phase.FAILED
            return
        if self.phase is not Phase.LOADING:  # shutdown began while loading
            return
        batcher = Batcher(
            engine,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_pairs=settings.max_queue_pairs,
            on_batch=self._observe_batch,
        )
        await batcher.start()
        self.scorer = Scorer(engine, batcher, settings)
        self.profile = self._read_profile(engine)
        self.metrics.watch_batcher(batcher)
        self.metrics.model.info(
            {"model": engine.info.model_id, "precision": engine.info.precision, "device": engine.info.device}
        )
        self._gpu_stats = GpuStats.open()
        if self._gpu_stats is not None:
            self.metrics.add_collector(self._gpu_stats)
        self.phase = Phase.READY
        self.metrics.ready.set(1)
        info = engine.info
        log.info("ready: %s in %s on %s (%s)", info.model_id, info.precision, info.device, info.device_name)

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting (readiness → 503 at once), then wait up to `timeout_s` for admitted requests."""
        if self.phase is Phase.READY or self.phase is Phase.LOADING:
            self.phase = Phase.DRAINING
            if self.scorer is not None:
                log.info("draining: %d pairs queued", self.scorer.batcher.stats.queued_pairs)
        self.metrics.ready.set(0)
        if self.scorer is None:
            return
        try:
            await asyncio.wait_for(self.scorer.batcher.drain(), timeout_s)
        except TimeoutError:
            log.warning("drain timed out after %.1f s", timeout_s)

    async def stop(self) -> None:
        await self.drain(self.settings.drain_timeout_s)
        if self.scorer is not None:
            await self.scorer.batcher.close()
        if self._gpu_stats is not None:
            self.metrics.remove_collector(self._gpu_stats)
            self._gpu_stats.close()
            self._gpu_stats = None

    def _observe_batch(self, record: BatchRecord) -> None:
        self._failed_in_a_row = self._failed_in_a_row + 1 if record.failed else 0
        self.metrics.observe_batch(record)

    def _read_profile(self, engine: ScoringEngine) -> Profile | None:
        if self.settings.profile is None:
            return None
        try:
            profile = read_profile(self.settings.profile)
        except ProfileError as exc:  # it was read at startup; it may have changed since
            log.warning("%s", exc)
            return None
        if profile.fingerprint != engine.info.fingerprint:
            log.warning(
                "profile %s was tuned for model fingerprint %s, but this model's is %s: its settings may not fit",
                self.settings.profile,
                profile.fingerprint,
                engine.info.fingerprint,
            )
        return profile


def service_lifespan(
    state: ServiceState, engine_factory: EngineFactory
) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    """Litestar lifespan: load in the background while serving liveness; drain and close on shutdown."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.start(engine_factory), name="structsim-load")
        try:
            yield
        finally:
            if not loading.done():
                state.phase = Phase.DRAINING
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await state.stop()

    return lifespan
