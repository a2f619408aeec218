"""Prometheus metrics, in a registry owned by one app (never the process-global one).

Per HTTP request: count and latency by route template, method and status (routes only: an unknown
path is counted by `structsim_rejections_total{reason="not_found"}`). Per forward pass: batch size,
tokens, each caller's queue wait, inference time. Gauges: queue depth, pairs in flight, readiness.
Per engine replica (one per GPU), copied from the batcher and labelled `replica` and `device`: passes
run and failed, pairs scored, inference seconds, busy and healthy. GPU memory, utilization and
temperature come from gpu_stats, per GPU, when a GPU is present. No torch here.

With several serving processes (`workers` > 1) every series is summed over them through
prometheus_client's multiprocess mode: each process writes its values to files in a shared directory,
and whichever process a scrape reaches reads them all. The batcher's live state (queue, replicas) is
copied into those files at each scrape and every `PUBLISH_INTERVAL_S`, so a sibling's part of a scrape
is at most that old.
"""

from __future__ import annotations

import asyncio
import time

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from similarity_service.batching import Batcher, BatchRecord

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PAIR_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 … 4096
TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 21))  # 16 … 1M
PUBLISH_INTERVAL_S = 1.0


class ServiceMetrics:
    """Every metric the service exports, registered in `self.registry`.

    `multiprocess_dir`: the directory prometheus_client's multiprocess mode writes to (its
    `PROMETHEUS_MULTIPROC_DIR`, which must be set before prometheus_client is imported); a scrape then
    shows the sum over every process writing there.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_dir is not None
        if multiprocess_dir is None:
            self._exposed = self.registry
        else:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, multiprocess_dir)
        r = self.registry
        self.requests = Counter(
            "structsim_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "structsim_http_request_duration_seconds",
            "Time from request received to response sent",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "structsim_rejections", "Requests answered with an error, by reason", ["reason"], registry=r
        )
        self.queue_pairs = Gauge(
            "structsim_queue_pairs", "Pairs waiting for a forward pass", registry=r, multiprocess_mode="livesum"
        )
        self.in_flight_pairs = Gauge(
            "structsim_in_flight_pairs",
            "Pairs in the forward passes now running",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "structsim_batch_size_pairs", "Pairs per forward pass", buckets=PAIR_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "structsim_batch_tokens", "Tokens per forward pass (sum of pair lengths)", buckets=TOKEN_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "structsim_queue_wait_seconds",
            "Time a request's pairs waited before their forward pass started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "structsim_inference_duration_seconds", "Time of one forward pass", buckets=LATENCY_BUCKETS, registry=r
        )
        self.pairs = Counter("structsim_pairs_scored", "Pairs scored", registry=r)
        self.tokens = Counter("structsim_tokens_scored", "Tokens scored (rate() gives tokens/s)", registry=r)
        self.failed_batches = Counter("structsim_failed_batches", "Forward passes that raised", registry=r)
        self.ready = Gauge(
            "structsim_ready", "1 while the service admits requests", registry=r, multiprocess_mode="livemin"
        )
        # An info metric as a gauge: prometheus_client's Info does not work across processes.
        self.model = Gauge(
            "structsim_model_info",
            "The model being served",
            ["model", "precision", "device"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._replicas = ReplicaMetrics(r)
        self._batcher: Batcher | None = None

    def count_rejection(self, status: int, code: str) -> None:
        self.rejections.labels(reason=code).inc()

    def observe_batch(self, record: BatchRecord) -> None:
        """The batcher's `on_batch` observer."""
        if record.failed:
            self.failed_batches.inc()
            return
        self.batch_size.observe(record.size)
        self.batch_tokens.observe(record.tokens)
        self.inference.observe(record.inference_s)
        for wait in record.queue_waits_s:
            self.queue_wait.observe(wait)
        self.pairs.inc(record.size)
        self.tokens.inc(record.tokens)

    def watch_batcher(self, batcher: Batcher) -> None:
        """Copy the queue gauges and the per-replica series from `batcher` at every scrape."""
        self._batcher = batcher

    def publish(self) -> None:
        """Copy the batcher's live state into the metrics."""
        if self._batcher is None:
            return
        stats = self._batcher.stats
        self.queue_pairs.set(stats.queued_pairs)
        self.in_flight_pairs.set(stats.in_flight_pairs)
        self._replicas.publish(self._batcher)

    async def publish_periodically(self) -> None:
        """With several processes: keep this one's part of a sibling's scrape fresh."""
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def add_collector(self, collector: Collector) -> None:
        self._exposed.register(collector)

    def remove_collector(self, collector: Collector) -> None:
        self._exposed.unregister(collector)

    def render(self) -> bytes:
        self.publish()
        return generate_latest(self._exposed)


class ReplicaMetrics:
    """Each engine replica's counters and state, labelled by replica index and device.

    The batcher keeps totals; counters advance by what changed since the last copy, so that across
    processes they sum like any counter.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        keys = ["replica", "device"]
        self.batches = Counter("structsim_replica_batches", "Forward passes run on the replica", keys, registry=registry)
        self.failed = Counter("structsim_replica_failed_batches", "Forward passes that raised", keys, registry=registry)
        self.pairs = Counter("structsim_replica_pairs_scored", "Pairs scored on the replica", keys, registry=registry)
        self.rescored = Counter(
            "structsim_replica_pairs_rescored_fp32",
            "Pairs scored again in fp32 because they lay near an exact threshold",
            keys,
            registry=registry,
        )
        self.seconds = Counter(
            "structsim_replica_inference_seconds", "Time the replica spent in forward passes", keys, registry=registry
        )
        self.busy = Gauge(
            "structsim_replica_busy",
            "1 while a forward pass runs on the replica (in any serving process)",
            keys,
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.healthy = Gauge(
            "structsim_replica_healthy",
            "0 once the replica's last passes all failed (it then gets no batches; in any serving process)",
            keys,
            registry=registry,
            multiprocess_mode="livemin",
        )
        self._copied: dict[tuple[str, str, str], float] = {}  # (counter, replica, device) → total copied so far

    def publish(self, batcher: Batcher) -> None:
        for replica in batcher.replicas:
            labels = (str(replica.index), replica.device)
            self._advance("batches", self.batches, labels, replica.batches_run)
            self._advance("failed", self.failed, labels, replica.failed_batches)
            self._advance("pairs", self.pairs, labels, replica.pairs_scored)
            self._advance("rescored", self.rescored, labels, replica.pairs_rescored_fp32)
            self._advance("seconds", self.seconds, labels, replica.inference_s)
            self.busy.labels(*labels).set(float(replica.busy))
            self.healthy.labels(*labels).set(float(replica.healthy))

    def _advance(self, name: str, counter: Counter, labels: tuple[str, str], total: float) -> None:
        key = (name, *labels)
        copied = self._copied.get(key, 0.0)
        if total > copied:
            counter.labels(*labels).inc(total - copied)
            self._copied[key] = total


class RequestMetricsMiddleware:
    """Counts and times every HTTP request that reached a route, labelled by its path template.

    A plain ASGI middleware factory rather than Litestar's `ASGIMiddleware`, whose exclusion checks run
    on every request, and each label set's series is looked up once, not by `labels(...)` per request:
    the event loop's CPU per request is what limits a fast engine.
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._counted: dict[tuple[str, str, int], Counter] = {}  # (route, method, status) → its series
        self._timed: dict[tuple[str, str], Histogram] = {}  # (route, method) → its series

    def __call__(self, app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 500  # if nothing is sent at all

            async def send_and_note(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_and_note)
            finally:
                route = scope.get("path_template", scope["path"])
                self._record(route, scope["method"], status, time.perf_counter() - started)

        return middleware

    def _record(self, route: str, method: str, status: int, seconds: float) -> None:
        counted = self._counted.get((route, method, status))
        if counted is None:
            counted = self._metrics.requests.labels(route=route, method=method, status=str(status))
            self._counted[route, method, status] = counted
        counted.inc()
        timed = self._timed.get((route, method))
        if timed is None:
            timed = self._timed[route, method] = self._metrics.request_seconds.labels(route=route, method=method)
        timed.observe(seconds)
