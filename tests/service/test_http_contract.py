"""Every route's contract, over a real uvicorn server on loopback, with the real Engine on the tiny checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from live_server import LiveServer, live_server
from similarity_service.app import create_app
from similarity_service.settings import Settings

if TYPE_CHECKING:
    from similarity_service.runner import Engine

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    # max_wait_ms stays at its default, 0: the concurrency test below checks that requests still merge
    # into shared passes by queueing behind the pass that is running.
    settings = Settings(model=str(tiny_model_dir), device="cpu", precision="fp32", max_seq_len=128, max_batch_size=64)
    with live_server(create_app(settings)) as running:
        running.wait_ready()
        yield running


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def test_similarity(client: httpx.Client, tiny_engine: Engine) -> None:
    answer = client.post("/v1/similarity", json={"sentence1": "今天天气真好", "sentence2": "今天适合出去散步"})
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"similarity", "model", "precision"}
    assert body["precision"] == "fp32"
    assert body["similarity"] == pytest.approx(
        tiny_engine.score([("今天天气真好", "今天适合出去散步")])[0], abs=TOLERANCE
    )


def test_batch_keeps_the_order_of_pairs(
    client: httpx.Client, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    pairs = chinese_pairs[:20]
    answer = client.post("/v1/similarity/batch", json={"pairs": [{"sentence1": a, "sentence2": b} for a, b in pairs]})
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"similarities", "model", "precision"}
    assert body["similarities"] == pytest.approx(tiny_engine.score(pairs), abs=TOLERANCE)


def test_rank_sorts_targets_and_honours_top_k(client: httpx.Client, tiny_engine: Engine) -> None:
    source, targets = "怎么申请退货退款？", ["退货流程是怎样的？", "今天天气真好", "如何退款", "我想学做红烧肉"]
    scores = tiny_engine.score([(source, t) for t in targets])
    answer = client.post("/v1/rank", json={"source": source, "targets": targets})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert [r["similarity"] for r in results] == pytest.approx(sorted(scores, reverse=True), abs=TOLERANCE)
    assert [targets[r["index"]] for r in results] == [r["sentence"] for r in results]
    assert sorted(r["index"] for r in results) == [0, 1, 2, 3]
    top = client.post("/v1/rank", json={"source": source, "targets": targets, "top_k": 2}).json()
    assert top["results"] == results[:2] and top["source"] == source
    everything = client.post("/v1/rank", json={"source": source, "targets": targets, "top_k": 100}).json()
    assert len(everything["results"]) == 4


def test_probes_and_info(client: httpx.Client, tiny_model_dir: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/info").json()
    assert info["model"] == str(tiny_model_dir)
    assert (info["precision"], info["device"], info["max_seq_len"]) == ("fp32", "cpu", 128)
    assert info["batching"] == {
        "max_batch_size": 64,
        "max_wait_ms": 0.0,
        "max_batch_tokens": None,
        "max_queue_pairs": 4096,
    }
    assert info["limits"]["max_pairs_per_request"] == 256
    assert info["profile"] is None and info["fingerprint"] and info["version"]


def test_source_article_routes_answer_with_its_field_names(client: httpx.Client, tiny_engine: Engine) -> None:
    one = client.post("/similarity", json={"sentence1": "密码忘了怎么办", "sentence2": "如何找回登录密码"})
    assert one.status_code == 200
    body = one.json()
    assert set(body) == {"similarity", "sentence1", "sentence2", "inference_time_ms", "precision"}
    assert (body["sentence1"], body["sentence2"], body["precision"]) == ("密码忘了怎么办", "如何找回登录密码", "fp32")
    assert body["similarity"] == pytest.approx(
        tiny_engine.score([("密码忘了怎么办", "如何找回登录密码")])[0], abs=TOLERANCE
    )
    assert body["inference_time_ms"] > 0

    targets = ["退货流程是怎样的？", "今天天气真好", "如何退款"]
    batch = client.post("/batch_similarity", json={"source": "怎么退货", "targets": targets}).json()
    assert set(batch) == {"source", "results", "total_time_ms", "avg_time_per_pair_ms"}
    assert [set(r) for r in batch["results"]] == [{"sentence", "similarity"}] * 3
    similarities = [r["similarity"] for r in batch["results"]]
    assert similarities == sorted(similarities, reverse=True)
    assert batch["avg_time_per_pair_ms"] == pytest.approx(batch["total_time_ms"] / 3)

    health = client.get("/health").json()
    assert health == {"status": "healthy", "model_loaded": True, "precision": "fp32", "device": "cpu"}


def test_openapi_documents_every_route(client: httpx.Client) -> None:
    spec = client.get("/docs/openapi.json").json()
    operations = [op for path in spec["paths"].values() for op in path.values()]
    paths = set(spec["paths"])
    assert {
        "/v1/similarity",
        "/v1/similarity/batch",
        "/v1/rank",
        "/v1/info",
        "/healthz",
        "/readyz",
        "/metrics",
        "/similarity",
        "/batch_similarity",
        "/health",
    } <= paths
    for operation in operations:
        assert operation["operationId"] and operation["summary"] and operation["tags"]
    assert "413" in spec["paths"]["/v1/similarity"]["post"]["responses"]
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


async def test_200_concurrent_requests_are_answered_correctly_in_shared_batches(
    server: LiveServer, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    pairs = [chinese_pairs[i % len(chinese_pairs)] for i in range(200)]
    expected = tiny_engine.score(pairs)
    batches_before = server.metric("structsim_batch_size_pairs_count")
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:

        async def score(sentence1: str, sentence2: str) -> Any:
            answer = await client.post("/v1/similarity", json={"sentence1": sentence1, "sentence2": sentence2})
            assert answer.status_code == 200, answer.text
            return answer.json()["similarity"]

        got = await asyncio.gather(*(score(a, b) for a, b in pairs))
    assert got == pytest.approx(expected, abs=TOLERANCE)
    batches = server.metric("structsim_batch_size_pairs_count") - batches_before
    assert 1 <= batches < 200  # merged
    multi = server.metric("structsim_batch_size_pairs_count") - server.metric(
        "structsim_batch_size_pairs_bucket", le="1.0"
    )
    assert multi > 0


def test_metrics_cover_requests_batches_and_queue(client: httpx.Client, server: LiveServer) -> None:
    client.post("/v1/similarity", json={"sentence1": "好", "sentence2": "行"})
    client.get("/nowhere")
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert server.metric("structsim_http_requests_total", route="/v1/similarity", method="POST", status="200") >= 1
    assert server.metric("structsim_http_request_duration_seconds_count", route="/v1/similarity", method="POST") >= 1
    assert server.metric("structsim_rejections_total", reason="not_found") >= 1
    assert server.metric("structsim_ready") == 1
    assert server.metric("structsim_tokens_scored_total") > 0
    for name in (
        "structsim_queue_pairs",
        "structsim_batch_tokens_count",
        "structsim_queue_wait_seconds_count",
        "structsim_inference_duration_seconds_count",
    ):
        assert name.removesuffix("_count") in answer.text
    assert "structsim_gpu_" not in answer.text  # no GPU here: the GPU metrics are simply absent
