"""An async HTTP load generator for `structsim serve`: open loop at a rate, or closed loop at a concurrency.

Open loop: requests start at Poisson arrival times whatever the server does, as independent clients
would, and each latency counts from the request's scheduled start, so a server that falls behind is
charged for its backlog (no coordinated omission). Closed loop: `concurrency` clients each send the
next request when the previous one is answered (a saturation test). Pairs come from the project's
corpus (or a pairs file) in a seeded random order.

One Python client process keeps its schedule up to ~1,500-2,000 single-pair requests/s on a fast
host (its own lag shows in `client_lag_p99_ms`); `open_loop_in_processes` splits a higher rate over
several processes, each an independent Poisson stream on the same clock, and merges their records.

Importable (`run_open_loop`, `open_loop_in_processes`, `run_closed_loop`, `LoadResult`) and a command:

    python bench/loadgen.py http://127.0.0.1:8000 --rate 200 --duration 10
    python bench/loadgen.py http://127.0.0.1:8000 --concurrency 64 --duration 10 --pairs-per-request 8
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import multiprocessing
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import numpy as np

from similarity_service.corpus import load_corpus, load_pairs_file

Route = Literal["similarity", "batch", "rank"]
PATHS: dict[Route, str] = {"similarity": "/v1/similarity", "batch": "/v1/similarity/batch", "rank": "/v1/rank"}
MAX_CONNECTIONS = 1024  # past this, open-loop requests wait client-side (and that wait counts as latency)


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured. Latencies (ms) are of successful (200) requests only."""

    mode: Literal["open", "closed"]
    route: Route
    pairs_per_request: int
    target_rate: float | None  # requests/s, open loop
    concurrency: int | None  # closed loop
    duration_s: float  # from the first request to the last answer
    sent: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)  # by HTTP status or exception name
    throughput_rps: float = 0.0  # successful requests per second
    pairs_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    # Open loop: how late this client started requests (p99, ms). Large values mean the client, not
    # the server, could not keep the rate, and the latencies above include that lag.
    client_lag_p99_ms: float | None = None
    # The same latencies timed from when this client actually sent each request, not from its scheduled
    # time: without the client's own lateness (asyncio timers, uvloop's have 1 ms resolution). At low load
    # the gap to p50_ms is the client's, not the server's.
    p50_from_send_ms: float | None = None
    p99_from_send_ms: float | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def corpus_pairs(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The project's bundled Chinese corpus, or a JSON Lines file with `sentence1`/`sentence2`."""
    if path is None:
        return [row.pair for row in load_corpus()]
    return [(row.sentence1, row.sentence2) for row in load_pairs_file(path)]


def request_bodies(
    pairs: Sequence[tuple[str, str]], route: Route, pairs_per_request: int, seed: int
) -> Iterator[bytes]:
    """Endless JSON bodies, pre-encoded (so the client spends its time sending), pairs in a seeded shuffle."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    stream = itertools.cycle(order)
    bodies = []
    for _ in range(max(1, len(order) // pairs_per_request)):
        chunk = [next(stream) for _ in range(pairs_per_request)]
        if route == "similarity":
            body: object = {"sentence1": chunk[0][0], "sentence2": chunk[0][1]}
        elif route == "batch":
            body = {"pairs": [{"sentence1": a, "sentence2": b} for a, b in chunk]}
        else:
            body = {"source": chunk[0][0], "targets": [b for _, b in chunk]}
        bodies.append(json.dumps(body, ensure_ascii=False).encode())
    return itertools.cycle(bodies)


class _Recorder:
    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.from_send_ms: list[float] = []  # the same answers, timed from when the client actually sent
        self.lags_ms: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.first_start = float("inf")
        self.last_end = 0.0

    async def send(self, session: aiohttp.ClientSession, url: str, body: bytes, scheduled: float) -> None:
        self.sent += 1
        self.first_start = min(self.first_start, scheduled)
        sent = time.perf_counter()
        self.lags_ms.append((sent - scheduled) * 1000)
        try:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as answer:
                await answer.read()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[type(exc).__name__] += 1
            return
        finally:
            self.last_end = max(self.last_end, time.perf_counter())
        if status == 200:
            now = time.perf_counter()
            self.latencies_ms.append((now - scheduled) * 1000)
            self.from_send_ms.append((now - sent) * 1000)
        else:
            self.errors[str(status)] += 1

    def merge(self, other: _Recorder) -> None:
        """Add another client's records (time.perf_counter is one clock for every process of a host)."""
        self.latencies_ms += other.latencies_ms
        self.from_send_ms += other.from_send_ms
        self.lags_ms += other.lags_ms
        self.errors += other.errors
        self.sent += other.sent
        self.first_start = min(self.first_start, other.first_start)
        self.last_end = max(self.last_end, other.last_end)

    def result(
        self,
        mode: Literal["open", "closed"],
        route: Route,
        pairs_per_request: int,
        rate: float | None,
        concurrency: int | None,
    ) -> LoadResult:
        ok = len(self.latencies_ms)
        duration = self.last_end - self.first_start if self.sent else 0.0
        percentiles: list[float | None] = [None, None, None]
        if ok:
            percentiles = [float(p) for p in np.percentile(self.latencies_ms, [50, 95, 99])]
        return LoadResult(
            mode=mode,
            route=route,
            pairs_per_request=pairs_per_request,
            target_rate=rate,
            concurrency=concurrency,
            duration_s=duration,
            sent=self.sent,
            ok=ok,
            errors=dict(self.errors),
            throughput_rps=ok / duration if duration > 0 else 0.0,
            pairs_per_s=ok * pairs_per_request / duration if duration > 0 else 0.0,
            p50_ms=percentiles[0],
            p95_ms=percentiles[1],
            p99_ms=percentiles[2],
            max_ms=max(self.latencies_ms) if ok else None,
            client_lag_p99_ms=float(np.percentile(self.lags_ms, 99)) if mode == "open" and self.lags_ms else None,
            p50_from_send_ms=float(np.percentile(self.from_send_ms, 50)) if ok else None,
            p99_from_send_ms=float(np.percentile(self.from_send_ms, 99)) if ok else None,
        )


def _session(timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))


async def run_open_loop(
    base_url: str,
    rate: float,
    duration_s: float,
    pairs: Sequence[tuple[str, str]],
    *,
    route: Route = "similarity",
    pairs_per_request: int = 1,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """Poisson arrivals at `rate` requests/s for `duration_s`; then wait for every answer (or its timeout)."""
    recorder = await _open_loop(base_url, rate, duration_s, pairs, route, pairs_per_request, timeout_s, seed)
    return recorder.result("open", route, pairs_per_request, rate, None)


def open_loop_in_processes(
    base_url: str,
    rate: float,
    duration_s: float,
    pairs: Sequence[tuple[str, str]],
    *,
    processes: int,
    route: Route = "similarity",
    pairs_per_request: int = 1,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """`run_open_loop` at `rate` split over `processes` client processes (the sum of independent Poisson
    streams is a Poisson stream at the summed rate), started together, their records merged."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    recorder = _merged_from_processes(
        _open_loop_process,
        [(base_url, rate / processes, duration_s, list(pairs), route, pairs_per_request, timeout_s, seed + 7919 * index)
         for index in range(processes)],
    )
    return recorder.result("open", route, pairs_per_request, rate, None)


def _merged_from_processes(target: Callable[..., _Recorder], arguments: list[tuple[object, ...]]) -> _Recorder:
    """`target(*args, start_at)` in one spawned client process per `arguments`, all starting at `start_at`;
    their records merged."""
    with ProcessPoolExecutor(len(arguments), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_settle, range(len(arguments))))  # every worker started and this module imported
        start_at = time.perf_counter() + 0.2
        jobs = [pool.submit(target, *args, start_at) for args in arguments]
        recorder = _Recorder()
        for job in jobs:
            recorder.merge(job.result())
    return recorder


def _settle(_: int) -> None:
    time.sleep(0.2)  # long enough that each worker takes one of these, so all of them have started


def _open_loop_process(base_url: str, rate: float, duration_s: float, pairs: list[tuple[str, str]], route: Route,
                       pairs_per_request: int, timeout_s: float, seed: int, start_at: float) -> _Recorder:
    time.sleep(max(0.0, start_at - time.perf_counter()))
    return asyncio.run(_open_loop(base_url, rate, duration_s, pairs, route, pairs_per_request, timeout_s, seed))


async def _open_loop(
    base_url: str,
    rate: float,
    duration_s: float,
    pairs: Sequence[tuple[str, str]],
    route: Route,
    pairs_per_request: int,
    timeout_s: float,
    seed: int,
) -> _Recorder:
    if rate <= 0:
        raise ValueError("rate must be positive")
    bodies = request_bodies(pairs, route, pairs_per_request, seed)
    gaps = random.Random(seed + 1)
    recorder = _Recorder()
    url = base_url.rstrip("/") + PATHS[route]
    async with _session(timeout_s) as session:
        tasks: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        scheduled = start
        while (scheduled := scheduled + gaps.expovariate(rate)) < start + duration_s:
            if (delay := scheduled - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(recorder.send(session, url, next(bodies), scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    return recorder


async def run_closed_loop(
    base_url: str,
    concurrency: int,
    duration_s: float,
    pairs: Sequence[tuple[str, str]],
    *,
    route: Route = "similarity",
    pairs_per_request: int = 1,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """`concurrency` clients, each sending its next request as soon as its last is answered, for `duration_s`."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    recorder = await _closed_loop(base_url, concurrency, duration_s, pairs, route, pairs_per_request, timeout_s, seed)
    return recorder.result("closed", route, pairs_per_request, None, concurrency)


async def _closed_loop(
    base_url: str,
    concurrency: int,
    duration_s: float,
    pairs: Sequence[tuple[str, str]],
    route: Route,
    pairs_per_request: int,
    timeout_s: float,
    seed: int,
) -> _Recorder:
    bodies = request_bodies(pairs, route, pairs_per_request, seed)
    recorder = _Recorder()
    url = base_url.rstrip("/") + PATHS[route]
    async with _session(timeout_s) as session:
        end = time.perf_counter() + duration_s

        async def client() -> None:
            while (now := time.perf_counter()) < end:
                await recorder.send(session, url, next(bodies), now)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return recorder


def closed_loop_in_processes(
    base_url: str,
    concurrency: int,
    duration_s: float,
    pairs: Sequence[tuple[str, str]],
    *,
    processes: int,
    route: Route = "similarity",
    pairs_per_request: int = 1,
    timeout_s: float = 30.0,
    seed: int = 0,
) -> LoadResult:
    """`run_closed_loop` with its clients spread over `processes` client processes (a Python client's own
    CPU per request would otherwise cap a fast server's figure), started together, their records merged."""
    if not 1 <= processes <= concurrency:
        raise ValueError("processes must be between 1 and the concurrency")
    recorder = _merged_from_processes(
        _closed_loop_process,
        [(base_url, concurrency // processes + (index < concurrency % processes), duration_s, list(pairs), route,
          pairs_per_request, timeout_s, seed + 7919 * index) for index in range(processes)],
    )
    return recorder.result("closed", route, pairs_per_request, None, concurrency)


def _closed_loop_process(base_url: str, concurrency: int, duration_s: float, pairs: list[tuple[str, str]],
                         route: Route, pairs_per_request: int, timeout_s: float, seed: int,
                         start_at: float) -> _Recorder:
    time.sleep(max(0.0, start_at - time.perf_counter()))
    return asyncio.run(_closed_loop(base_url, concurrency, duration_s, pairs, route, pairs_per_request, timeout_s, seed))


async def wait_until_ready(base_url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> float:
    """Poll /readyz until 200; seconds waited. `alive()` False (the server process died) stops early."""
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.perf_counter() - started < timeout_s and alive():
            try:
                async with session.get(base_url.rstrip("/") + "/readyz") as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{base_url} was not ready within {timeout_s} s")


def format_table(results: Sequence[LoadResult]) -> str:
    rows = ["mode    load      sent     ok   req/s   pairs/s   p50 ms   p95 ms   p99 ms  errors"]
    for r in results:
        load = f"{r.target_rate:g}/s" if r.mode == "open" else f"c={r.concurrency}"
        fmt = lambda v: "-" if v is None else f"{v:8.1f}"  # noqa: E731
        rows.append(
            f"{r.mode:6}  {load:>8}  {r.sent:5}  {r.ok:5}  {r.throughput_rps:6.0f}  {r.pairs_per_s:8.0f} "
            f"{fmt(r.p50_ms)} {fmt(r.p95_ms)} {fmt(r.p99_ms)}  {r.errors or ''}"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the service's base URL, e.g. http://127.0.0.1:8000")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, action="append", help="open loop: requests/s (repeat for several runs)")
    load.add_argument("--concurrency", type=int, action="append", help="closed loop: clients (repeat for several runs)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    parser.add_argument("--route", choices=list(PATHS), default="similarity")
    parser.add_argument("--pairs-per-request", type=int, default=1)
    parser.add_argument("--pairs", type=Path, help="JSON Lines pairs file (default: the bundled corpus)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print results as JSON lines instead of a table")
    args = parser.parse_args(argv)
    pairs = corpus_pairs(args.pairs)
    options = {
        "route": args.route,
        "pairs_per_request": args.pairs_per_request,
        "timeout_s": args.timeout,
        "seed": args.seed,
    }
    runs: list[Callable[[], Awaitable[LoadResult]]] = [
        (lambda r=rate: run_open_loop(args.url, r, args.duration, pairs, **options)) for rate in args.rate or []
    ] + [(lambda c=c: run_closed_loop(args.url, c, args.duration, pairs, **options)) for c in args.concurrency or []]
    results = [asyncio.run(run()) for run in runs]
    if args.json:
        for result in results:
            print(json.dumps(result.to_dict()))
    else:
        print(format_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
