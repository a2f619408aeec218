"""The service's resources and their order: load → warm up → start batcher → ready; drain → close.

With `devices` set, one engine replica loads per device (one after another: CUDA graph capture in a
warm-up must not overlap other CUDA work in the process) and all of them serve behind one batcher.
The model loads in the background once the server listens, so liveness (/healthz) answers while a
large checkpoint downloads and readiness (/readyz) turns 200 only when warmed up. A load failure is
fatal: the phase turns FAILED, /healthz 503, and the serve command stops and exits 1.
No torch here: the engine comes from `engine_factory`, which imports it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import msgspec
from litestar import Litestar

from similarity_service.batching import Batcher, Draining
from similarity_service.encoding import Encoder
from similarity_service.engine_api import ScoringEngine
from similarity_service.errors import NotReady
from similarity_service.gpu_stats import GpuStats
from similarity_service.metrics import ServiceMetrics
from similarity_service.profile import Profile, ProfileError, read_profile
from similarity_service.scoring import SHARED_ENCODE_MAX_PAIRS, Scorer
from similarity_service.settings import Settings
from similarity_service.workers import WorkerPeers

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], ScoringEngine]
LOADING_RETRY_AFTER_S = 5.0
# Forward passes failing back to back with none succeeding mean the device is broken, not the input
# (input is validated before it is queued): the replica gets no more batches while another serves, and
# when every replica is so, liveness fails so Kubernetes restarts the pod.
FAILED_BATCHES_BEFORE_UNHEALTHY = 3


def inline_max_pairs(engines: Sequence[ScoringEngine]) -> int:
    """The batcher's `inline_max_pairs`: a lone small request at low load runs on the event loop where that is
    quick, on GPUs. There its pass (a graph replay) is shorter than the two thread wake-ups it saves (in-process,
    one pair after 10 ms idle: 0.80 ms against 1.06 on an H200, bench/one_pair_path.py). On the CPU a pass
    would hold the loop for milliseconds. Beside sibling workers the batcher asks them first (`peers`)."""
    if not all(engine.info.device.startswith("cuda") for engine in engines):
        return 0
    return SHARED_ENCODE_MAX_PAIRS


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
            exact_thresholds=settings.exact_threshold_values,
        )
    except (ModelLoadError, ValueError) as exc:  # ValueError: PrecisionError, DeviceError, limits
        raise EngineLoadError(str(exc)) from exc
    engine.warmup()
    return engine


def replica_devices(settings: Settings) -> list[str]:
    """The device of each engine replica: `devices` expanded (`auto`: every visible CUDA GPU, else the CPU),
    or just `device` when `devices` is unset."""
    if settings.devices is None:
        return [settings.device]
    if settings.devices != "auto":
        return settings.devices.split(",")
    import torch  # only here: "auto" must ask CUDA how many GPUs this process sees

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


def load_replicas(engine_factory: EngineFactory, settings: Settings) -> list[ScoringEngine]:
    """One engine per replica device, loaded and warmed one after another (in the calling thread)."""
    if settings.devices is None:
        return [engine_factory(settings)]
    return [engine_factory(msgspec.structs.replace(settings, device=device)) for device in replica_devices(settings)]


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ServiceState:
    """The app's one owner of the engine, batcher and scorer, and of the phase that gates them."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        on_ready: Callable[[], None] | None = None,
        workers: WorkerPeers | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._on_ready = on_ready  # called once, loaded and warm, just before readiness turns 200
        self.workers = workers  # with several serving processes: which of them are ready, or running passes
        self._publishing: asyncio.Task[None] | None = None
        self.phase = Phase.LOADING
        self.error: str | None = None
        self.scorer: Scorer | None = None
        self.engines: Sequence[ScoringEngine] = ()  # one per replica, in the batcher's replica order
        self.profile: Profile | None = None
        self._gpu_stats: GpuStats | None = None

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

    def check_ready(self) -> None:
        """Readiness: this process admits requests, and so does every sibling serving the same port."""
        self.ready_scorer()
        if self.workers is not None and (warming := self.workers.warming()):
            raise NotReady(
                "workers_not_ready",
                f"{warming} of {self.workers.count} serving processes are not ready",
                retry_after_s=LOADING_RETRY_AFTER_S,
            )

    @property
    def healthy(self) -> bool:
        return self.phase is not Phase.FAILED and (self.scorer is None or self.scorer.batcher.healthy)

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self, engine_factory: EngineFactory) -> None:
        settings = self.settings
        devices = settings.devices or settings.device
        log.info("loading model %s (precision %s, devices %s)", settings.model, settings.precision, devices)
        try:
            engines = await asyncio.to_thread(load_replicas, engine_factory, settings)
        except Exception as exc:
            # A configuration problem needs its message; anything else its traceback too.
            log.error("cannot serve: %s", exc, exc_info=not isinstance(exc, EngineLoadError))
            self.error = str(exc)
            self.phase = Phase.FAILED
            return
        if self.phase is not Phase.LOADING:  # shutdown began while loading
            return
        engine = engines[0]  # tokenizes and answers for the model: every replica serves the same one
        batcher = Batcher(
            engines,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_pairs=settings.max_queue_pairs,
            on_batch=self.metrics.observe_batch,
            failures_before_unhealthy=FAILED_BATCHES_BEFORE_UNHEALTHY,
            inline_max_pairs=inline_max_pairs(engines),
            peers=self.workers,
        )
        encoder = Encoder(engine.encode)
        await encoder.start()
        await batcher.start()
        self.engines = engines
        self.scorer = Scorer(engine, encoder, batcher, settings)
        self.profile = self._read_profile(engine)
        self.metrics.watch_batcher(batcher)
        self.metrics.model.labels(
            model=engine.info.model_id,
            precision=engine.info.precision,
            device=",".join(replica.info.device for replica in engines),
        ).set(1)
        if self.metrics.multiprocess:
            self._publishing = asyncio.create_task(self.metrics.publish_periodically(), name="structsim-metrics")
        self._gpu_stats = GpuStats.open()
        if self._gpu_stats is not None:
            self.metrics.add_collector(self._gpu_stats)
        if self._on_ready is not None:
            self._on_ready()
        self.phase = Phase.READY
        self.metrics.ready.set(1)
        if self.workers is not None:
            self.workers.set_ready(True)
        for replica in engines:
            info = replica.info
            log.info("ready: %s in %s on %s (%s)", info.model_id, info.precision, info.device, info.device_name)

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting (readiness → 503 at once), then wait up to `timeout_s` for admitted requests."""
        if self.phase is Phase.READY or self.phase is Phase.LOADING:
            self.phase = Phase.DRAINING
            if self.scorer is not None:
                log.info("draining: %d pairs queued", self.scorer.batcher.stats.queued_pairs)
        self.metrics.ready.set(0)
        if self.workers is not None:
            self.workers.set_ready(False)
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
            await self.scorer.encoder.close()
        if self._publishing is not None:
            self._publishing.cancel()
            self.metrics.publish()  # the last passes' counts, for the siblings' scrapes
        if self._gpu_stats is not None:
            self.metrics.remove_collector(self._gpu_stats)
            self._gpu_stats.close()
            self._gpu_stats = None

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
