"""Overload, readiness, draining, clients that leave and engine failures, over a real server.

These need an engine that can be held mid-batch, so they use the fake engine (fake_engine.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fake_engine import FakeEngine
from live_server import LiveServer, live_server
from similarity_service import controllers
from similarity_service.app import create_app
from similarity_service.lifespan import EngineLoadError, Phase
from similarity_service.settings import Settings

PAIR = {"sentence1": "ab", "sentence2": "c"}  # the fake engine scores it 0.0003


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.01)


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    yield engine
    engine.gate.set()  # never leave a server's runner thread held


def serve(engine: FakeEngine, **overrides: object) -> live_server:  # type: ignore[valid-type]
    options: dict[str, object] = {"max_batch_size": 1, "max_wait_ms": 0}
    options.update(overrides)
    return live_server(create_app(Settings(**options), engine_factory=lambda settings: engine))  # type: ignore[arg-type]


def queued(server: LiveServer) -> int:
    scorer = server.service.scorer
    assert scorer is not None
    return scorer.batcher.stats.queued_pairs


def test_a_full_queue_answers_429_with_retry_after(engine: FakeEngine) -> None:
    limits = {"max_queue_pairs": 4, "max_pairs_per_request": 4, "max_rank_targets": 4}
    with serve(engine, **limits) as server, ThreadPoolExecutor(8) as pool:
        server.wait_ready()
        engine.gate.clear()
        post = lambda: httpx.post(f"{server.url}/v1/similarity", json=PAIR, timeout=30)  # noqa: E731
        held = [pool.submit(post)]
        engine.started.wait(10)  # the first pair is in the runner, held
        held.append(pool.submit(post))  # taken into the one-slot hand-off
        time.sleep(0.2)
        held += [pool.submit(post) for _ in range(4)]  # the queue's four places
        wait_for(lambda: queued(server) == 4)
        refused = httpx.post(f"{server.url}/v1/similarity", json=PAIR)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"
        assert server.metric("structsim_rejections_total", reason="overloaded") == 1
        engine.gate.set()
        assert [f.result().status_code for f in held] == [200] * 6


def test_not_ready_while_loading_then_ready(engine: FakeEngine) -> None:
    loaded = threading.Event()

    def slow_factory(settings: Settings) -> FakeEngine:
        loaded.wait(30)
        return engine

    with (
        live_server(create_app(Settings(), engine_factory=slow_factory)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        assert http.get("/healthz").status_code == 200  # alive while loading
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        assert int(not_ready.headers["retry-after"]) >= 1
        assert http.post("/v1/similarity", json=PAIR).status_code == 503
        assert http.get("/v1/info").status_code == 503
        assert http.get("/health").json() == {
            "status": "loading",
            "model_loaded": False,
            "precision": None,
            "device": None,
        }
        loaded.set()
        server.wait_ready()
        assert http.post("/v1/similarity", json=PAIR).json()["similarity"] == pytest.approx(0.0003)


def test_a_model_that_fails_to_load_fails_liveness(engine: FakeEngine) -> None:
    def broken(settings: Settings) -> FakeEngine:
        raise EngineLoadError("no checkpoint in /models/missing")

    with (
        live_server(create_app(Settings(), engine_factory=broken)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        wait_for(lambda: http.get("/healthz").status_code == 503)
        assert "no checkpoint" in http.get("/healthz").json()["error"]["message"]
        assert http.get("/readyz").json()["error"]["code"] == "load_failed"
        assert http.post("/v1/similarity", json=PAIR).status_code == 503


def test_draining_refuses_new_work_and_finishes_admitted_work(engine: FakeEngine) -> None:
    with serve(engine, max_wait_ms=0) as server, ThreadPoolExecutor(4) as pool:
        server.wait_ready()
        engine.gate.clear()
        admitted = [
            pool.submit(httpx.post, f"{server.url}/v1/similarity/batch", json={"pairs": [PAIR] * 3}, timeout=30)
        ]
        engine.started.wait(10)
        wait_for(lambda: queued(server) == 1)  # pair 1 in flight, pair 2 in the hand-off slot, pair 3 queued
        admitted.append(pool.submit(httpx.post, f"{server.url}/v1/similarity", json=PAIR, timeout=30))
        wait_for(lambda: queued(server) == 2)
        drained = asyncio.run_coroutine_threadsafe(server.service.drain(30), server.loop)
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 503)
        refused = httpx.post(f"{server.url}/v1/similarity", json=PAIR)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert int(refused.headers["retry-after"]) >= 1
        assert not drained.done()  # still waiting for the admitted requests
        engine.gate.set()
        drained.result(10)
        answers = [f.result() for f in admitted]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["similarities"] == pytest.approx([0.0003] * 3)


def test_pairs_of_a_client_that_left_never_reach_the_engine(engine: FakeEngine) -> None:
    with serve(engine) as server, ThreadPoolExecutor(4) as pool:
        server.wait_ready()
        engine.gate.clear()
        first = pool.submit(httpx.post, f"{server.url}/v1/similarity", json=PAIR, timeout=30)
        engine.started.wait(10)
        leaving = {"sentence1": "abcdefg", "sentence2": "h"}  # key 8: recognisable in the engine's batches
        gone = [pool.submit(httpx.post, f"{server.url}/v1/similarity", json=leaving, timeout=0.5) for _ in range(2)]
        for future in gone:  # one waits in the hand-off slot, one in the queue; both clients give up
            with pytest.raises(httpx.TimeoutException):
                future.result()
        wait_for(lambda: server.service.scorer is not None and queued(server) == 0)
        engine.gate.set()
        assert first.result().status_code == 200
        assert httpx.post(f"{server.url}/v1/similarity", json=PAIR).status_code == 200
        keys = [p.input_ids[0] for batch in engine.batches for p in batch]
        assert 8 not in keys and keys == [3, 3]


def test_pairs_of_a_client_that_left_before_the_watch_began_are_dropped_once_it_begins(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controllers, "CLIENT_WATCH_DELAY_S", 1.0)  # the clients below leave after 0.2 s
    with serve(engine) as server, ThreadPoolExecutor(4) as pool:
        server.wait_ready()
        engine.gate.clear()
        first = pool.submit(httpx.post, f"{server.url}/v1/similarity", json=PAIR, timeout=30)
        engine.started.wait(10)
        leaving = {"sentence1": "abcdefg", "sentence2": "h"}  # key 8
        gone = [pool.submit(httpx.post, f"{server.url}/v1/similarity", json=leaving, timeout=0.2) for _ in range(2)]
        for future in gone:
            with pytest.raises(httpx.TimeoutException):
                future.result()
        wait_for(lambda: queued(server) == 0)  # the watch began: the queued one is dropped, the slot's cancelled
        engine.gate.set()
        assert first.result().status_code == 200
        assert httpx.post(f"{server.url}/v1/similarity", json=PAIR).status_code == 200
        keys = [p.input_ids[0] for batch in engine.batches for p in batch]
        assert 8 not in keys and keys == [3, 3]


def test_engine_errors_answer_500_and_repeated_failures_fail_liveness(engine: FakeEngine) -> None:
    engine.fail_on_key = 3
    with serve(engine) as server, httpx.Client(base_url=server.url) as http:
        server.wait_ready()
        failed = http.post("/v1/similarity", json=PAIR)
        assert failed.status_code == 500
        assert failed.json()["error"] == {
            "code": "internal_error",
            "message": "internal error; the server log has the details",
        }
        assert http.post("/v1/similarity", json={"sentence1": "a", "sentence2": "b"}).status_code == 200
        assert http.get("/healthz").status_code == 200
        for _ in range(3):
            http.post("/v1/similarity", json=PAIR)
        unhealthy = http.get("/healthz")
        assert unhealthy.status_code == 503 and unhealthy.json()["error"]["code"] == "unhealthy"
        assert server.metric("structsim_failed_batches_total") == 4


def test_out_of_gpu_memory_answers_503_with_retry_after_and_keeps_the_pod_alive(engine: FakeEngine) -> None:
    from similarity_service.runner import EngineOOMError  # what the real engine raises once splitting fails

    engine.fail_on_key = 3
    engine.failure = EngineOOMError("out of GPU memory on fake (cpu) scoring a single pair of 4 tokens in fp32")
    with serve(engine) as server, httpx.Client(base_url=server.url) as http:
        server.wait_ready()
        for _ in range(4):  # more in a row than the failures that mark a broken device
            answer = http.post("/v1/similarity", json=PAIR)
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "out_of_memory"
            assert answer.json()["error"]["message"].startswith("out of GPU memory on fake")
            assert int(answer.headers["retry-after"]) >= 1
        assert http.get("/healthz").status_code == 200  # the engine works: no restart for a batch too big
        assert http.get("/readyz").status_code == 200
        assert http.post("/v1/similarity", json={"sentence1": "a", "sentence2": "b"}).status_code == 200
        assert server.metric("structsim_failed_batches_total") == 4
        assert server.metric("structsim_rejections_total", reason="out_of_memory") == 4


def test_the_ready_hook_runs_once_loaded_and_before_readiness(engine: FakeEngine) -> None:
    seen: list[tuple[Phase, bool]] = []

    def on_ready() -> None:  # structsim serve settles the heap here
        seen.append((app.state.service.phase, app.state.service.scorer is not None))

    app = create_app(Settings(), engine_factory=lambda settings: engine, on_ready=on_ready)
    with live_server(app) as server:
        server.wait_ready()
        assert seen == [(Phase.LOADING, True)]  # the batcher runs; readiness is not 200 yet
