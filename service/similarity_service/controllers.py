"""The routes: each translates wire types to a `Scorer` call and back, nothing more.

DESIGN §5's API under /v1, probes and metrics, and the source article's Flask routes (`/similarity`,
`/batch_similarity`, `/health`) with its field names, so its users switch by changing a URL.
A request whose client disconnects is cancelled, so its pairs never reach the GPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from litestar import Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from prometheus_client import CONTENT_TYPE_LATEST

from similarity_service import __version__
from similarity_service.errors import ErrorBody, NotReady, ServiceError
from similarity_service.lifespan import Phase, ServiceState
from similarity_service.schemas import (
    BatchingInfo,
    BatchSimilarityRequest,
    BatchSimilarityResponse,
    HealthResponse,
    InfoResponse,
    LegacyBatchRequest,
    LegacyBatchResponse,
    LegacyHealthResponse,
    LegacyRankedSentence,
    LegacySimilarityResponse,
    LimitsInfo,
    ProfileInfo,
    RankedTarget,
    RankRequest,
    RankResponse,
    ReadyResponse,
    ReplicaInfo,
    SimilarityRequest,
    SimilarityResponse,
)

T = TypeVar("T")
# Watching for a client that leaves costs a task per request. Pairs wait in the queue only under load, for
# longer than this: a request answered sooner never needed the watch, and the pairs of a client that left
# sooner are still dropped, from the moment the watch begins.
CLIENT_WATCH_DELAY_S = 0.01
Service = NamedDependency[ServiceState]


class ClientGone(ServiceError):
    """The client disconnected before its answer was ready (nginx's 499; nobody reads it)."""

    status_code = 499


def dependencies(service: ServiceState) -> dict[str, Provide]:
    """The routes' `service`: the app's one `ServiceState`, from a provider that takes no arguments, so Litestar
    has nothing to extract or validate for it on each request (from `state: State` it cost ~6 µs a request)."""

    def provide_service() -> ServiceState:
        return service

    return {"service": Provide(provide_service, sync_to_thread=False)}


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    descriptions = {
        400: "Malformed, empty or ill-typed input",
        413: "Body, pairs, targets or a sentence over the configured limits",
        415: "The body is not declared as JSON",
        429: "Queue full; retry after `Retry-After` seconds",
        503: "Loading, failed, shutting down or out of GPU memory; retry after `Retry-After` seconds",
    }
    return {s: ResponseSpec(data_container=ErrorBody, description=descriptions[s]) for s in statuses}


SCORING: dict[str, Any] = {"tags": ["scoring"], "responses": _errors(400, 413, 415, 429, 503), "status_code": 200}
COMPATIBLE: dict[str, Any] = {**SCORING, "tags": ["compatibility"]}
OPERATIONS: dict[str, Any] = {"tags": ["operations"], "responses": _errors(503)}


async def _unless_client_leaves(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it if the client disconnects first (the batcher then drops its
    pairs). The watch begins `CLIENT_WATCH_DELAY_S` after the request did, so the many requests answered sooner
    cost the loop a timer instead of a watcher task; one whose client left before then is cancelled then."""
    loop = asyncio.get_running_loop()
    handler = asyncio.current_task()
    assert handler is not None
    left = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal left
        message = await request.receive()
        if message["type"] != "http.disconnect":  # a server that does not report disconnects this way
            await asyncio.Event().wait()
        left = True
        handler.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(CLIENT_WATCH_DELAY_S, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if not left:
            raise  # cancelled by the server, not by the client leaving
        handler.uncancel()
        raise ClientGone("client_closed", "the client disconnected") from None
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


# --- the v1 API --------------------------------------------------------------------------------


@post("/v1/similarity", operation_id="scoreSimilarity", summary="Score one sentence pair", **SCORING)
async def similarity(
    data: JSONBody[SimilarityRequest], service: Service, request: Request[Any, Any, Any]
) -> SimilarityResponse:
    scorer = service.ready_scorer()
    score = await _unless_client_leaves(request, scorer.similarity(data.sentence1, data.sentence2))
    info = scorer.engine.info
    return SimilarityResponse(similarity=score, model=info.model_id, precision=info.precision)


@post("/v1/similarity/batch", operation_id="scoreSimilarityBatch", summary="Score pairs, in order", **SCORING)
async def similarity_batch(
    data: JSONBody[BatchSimilarityRequest], service: Service, request: Request[Any, Any, Any]
) -> BatchSimilarityResponse:
    scorer = service.ready_scorer()
    pairs = [(pair.sentence1, pair.sentence2) for pair in data.pairs]
    scores = await _unless_client_leaves(request, scorer.batch(pairs))
    info = scorer.engine.info
    return BatchSimilarityResponse(similarities=scores, model=info.model_id, precision=info.precision)


@post("/v1/rank", operation_id="rankTargets", summary="Rank targets by similarity to a source", **SCORING)
async def rank(data: JSONBody[RankRequest], service: Service, request: Request[Any, Any, Any]) -> RankResponse:
    scorer = service.ready_scorer()
    ranked = await _unless_client_leaves(request, scorer.rank(data.source, data.targets, data.top_k))
    info = scorer.engine.info
    results = [RankedTarget(index=r.index, sentence=r.sentence, similarity=r.similarity) for r in ranked]
    return RankResponse(source=data.source, results=results, model=info.model_id, precision=info.precision)


@get("/v1/info", operation_id="getInfo", summary="Model, precision, device, active batching config", **OPERATIONS)
async def info(service: Service) -> InfoResponse:
    scorer = service.scorer or service.ready_scorer()  # shown while draining too
    engine, settings, stats = scorer.engine.info, service.settings, scorer.batcher.stats
    profile = service.profile
    return InfoResponse(
        model=engine.model_id,
        revision=engine.revision,
        fingerprint=engine.fingerprint,
        precision=engine.precision,
        device=engine.device,
        device_name=engine.device_name,
        compute_capability=engine.compute_capability,
        max_seq_len=engine.max_seq_len,
        batching=BatchingInfo(
            stats.max_batch_size, stats.max_wait_ms, settings.max_batch_tokens, settings.max_queue_pairs
        ),
        limits=LimitsInfo(
            settings.max_body_bytes,
            settings.max_pairs_per_request,
            settings.max_chars_per_sentence,
            settings.max_rank_targets,
        ),
        profile=None
        if profile is None or settings.profile is None
        else ProfileInfo(
            path=settings.profile,
            device_name=profile.device_name,
            tuned_at=profile.tuned_at,
            fingerprint=profile.fingerprint,
            matches_model=profile.fingerprint == engine.fingerprint,
        ),
        version=__version__,
        replicas=[
            ReplicaInfo(
                index=stats.index,
                device=replica.info.device,
                device_name=replica.info.device_name,
                compute_capability=replica.info.compute_capability,
                precision=replica.info.precision,
                healthy=stats.healthy,
                batches_run=stats.batches_run,
            )
            for replica, stats in zip(service.engines, scorer.batcher.replicas, strict=True)
        ],
        workers=service.workers.count if service.workers is not None else 1,
        worker=service.workers.index if service.workers is not None else 0,
    )


# --- probes and metrics --------------------------------------------------------------------------


@get("/healthz", operation_id="getLiveness", summary="Liveness (answers while loading too)", **OPERATIONS)
async def healthz(service: Service) -> HealthResponse:
    if not service.healthy:
        raise NotReady("unhealthy", service.error or "forward passes keep failing")
    return HealthResponse()


@get("/readyz", operation_id="getReadiness", summary="Readiness: loaded, warm, not draining", **OPERATIONS)
async def readyz(service: Service) -> ReadyResponse:
    service.check_ready()
    return ReadyResponse()


@get("/metrics", operation_id="getMetrics", summary="Prometheus metrics", tags=["operations"])
async def metrics(service: Service) -> Response[bytes]:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# --- the source article's Flask routes, same fields -------------------------------------------------


@post("/similarity", operation_id="legacySimilarity", summary="Score one pair (article format)", **COMPATIBLE)
async def legacy_similarity(
    data: JSONBody[SimilarityRequest], service: Service, request: Request[Any, Any, Any]
) -> LegacySimilarityResponse:
    scorer = service.ready_scorer()
    started = time.perf_counter()
    score = await _unless_client_leaves(request, scorer.similarity(data.sentence1, data.sentence2))
    return LegacySimilarityResponse(
        similarity=score,
        sentence1=data.sentence1,
        sentence2=data.sentence2,
        inference_time_ms=(time.perf_counter() - started) * 1000,
        precision=scorer.engine.info.precision,
    )


@post("/batch_similarity", operation_id="legacyBatchSimilarity", summary="Rank targets (article format)", **COMPATIBLE)
async def legacy_batch_similarity(
    data: JSONBody[LegacyBatchRequest], service: Service, request: Request[Any, Any, Any]
) -> LegacyBatchResponse:
    scorer = service.ready_scorer()
    started = time.perf_counter()
    ranked = await _unless_client_leaves(request, scorer.rank(data.source, data.targets))
    total_ms = (time.perf_counter() - started) * 1000
    return LegacyBatchResponse(
        source=data.source,
        results=[LegacyRankedSentence(sentence=r.sentence, similarity=r.similarity) for r in ranked],
        total_time_ms=total_ms,
        avg_time_per_pair_ms=total_ms / len(data.targets),
    )


@get("/health", operation_id="legacyHealth", summary="Health (article format)", tags=["compatibility"])
async def legacy_health(service: Service) -> LegacyHealthResponse:
    scorer = service.scorer
    engine = scorer.engine.info if scorer is not None else None
    return LegacyHealthResponse(
        status="healthy"
        if service.phase is Phase.READY
        else "loading"
        if service.phase is Phase.LOADING
        else "unhealthy",
        model_loaded=scorer is not None,
        precision=engine.precision if engine else None,
        device=engine.device if engine else None,
    )


ROUTES = [
    similarity,
    similarity_batch,
    rank,
    info,
    healthz,
    readyz,
    metrics,
    legacy_similarity,
    legacy_batch_similarity,
    legacy_health,
]
