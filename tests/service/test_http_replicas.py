"""`structsim serve` with several engine replicas (`devices`), over a real server on loopback.

Two real engines on the CPU (`devices=cpu,cpu`) stand in for a pod's GPUs; fake replicas stand in for a
GPU that breaks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import pytest

from fake_engine import FakeEngine
from live_server import live_server
from similarity_service.app import create_app
from similarity_service.lifespan import FAILED_BATCHES_BEFORE_UNHEALTHY, replica_devices
from similarity_service.settings import Settings

if TYPE_CHECKING:
    from similarity_service.runner import Engine

# fp32 on the CPU: a pair batched with others (padding, reduction order) moves by ~1e-6 on some CPUs
TOLERANCE = 1e-5


async def test_two_cpu_replicas_serve_correct_scores_and_report_each_replica(
    tiny_model_dir: Path, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    settings = Settings(
        model=str(tiny_model_dir), devices="cpu,cpu", precision="fp32", max_seq_len=128, max_batch_size=4
    )
    pairs = [chinese_pairs[i % len(chinese_pairs)] for i in range(120)]
    expected = tiny_engine.score(pairs)
    with live_server(create_app(settings)) as server:
        await asyncio.to_thread(server.wait_ready)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def score(sentence1: str, sentence2: str) -> Any:
                answer = await client.post("/v1/similarity", json={"sentence1": sentence1, "sentence2": sentence2})
                assert answer.status_code == 200, answer.text
                return answer.json()["similarity"]

            got = await asyncio.gather(*(score(a, b) for a, b in pairs))
            batch = await client.post(
                "/v1/similarity/batch", json={"pairs": [{"sentence1": a, "sentence2": b} for a, b in pairs[:40]]}
            )
            info = (await client.get("/v1/info")).json()
        assert got == pytest.approx(expected, abs=TOLERANCE)
        assert batch.json()["similarities"] == pytest.approx(expected[:40], abs=TOLERANCE)
        assert [(r["index"], r["device"], r["precision"], r["healthy"]) for r in info["replicas"]] == [
            (0, "cpu", "fp32", True),
            (1, "cpu", "fp32", True),
        ]
        ran = [
            await asyncio.to_thread(server.metric, "structsim_replica_batches_total", replica=str(i)) for i in (0, 1)
        ]
        assert all(count > 0 for count in ran)  # concurrent load reached both replicas
        assert sum(r["batches_run"] for r in info["replicas"]) <= sum(ran)
        assert await asyncio.to_thread(server.metric, "structsim_replica_healthy", replica="1", device="cpu") == 1


class BrokenEngine(FakeEngine):
    def score_encoded(self, batch: Any) -> list[float]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (fake)")


def test_a_broken_replica_is_reported_and_the_pod_stays_live() -> None:
    engines = iter([FakeEngine(), BrokenEngine()])
    loaded: list[str] = []

    def factory(settings: Settings) -> FakeEngine:
        loaded.append(settings.device)
        engine = next(engines)
        engine.info = msgspec.structs.replace(FakeEngine.info, device=settings.device)  # type: ignore[misc]
        return engine

    settings = Settings(devices="cuda:0,cuda:1", max_wait_ms=0)
    with (
        live_server(create_app(settings, engine_factory=factory)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        server.wait_ready()
        assert loaded == ["cuda:0", "cuda:1"]  # one engine per device, in order
        post = lambda: client.post("/v1/similarity", json={"sentence1": "好", "sentence2": "行"})  # noqa: E731
        # Sequential calls find both replicas idle: whichever takes a batch, only the broken one's callers fail.
        # Which one takes it is up to the threads' scheduling, so call until the broken one has failed enough.
        answers = [post()]
        while sum(a.status_code != 200 for a in answers) < FAILED_BATCHES_BEFORE_UNHEALTHY and len(answers) < 200:
            answers.append(post())
        answers += [post() for _ in range(12)]
        failed = sum(answer.status_code != 200 for answer in answers)
        assert failed == FAILED_BATCHES_BEFORE_UNHEALTHY  # then the broken replica gets no more batches
        assert all(answer.json()["similarity"] == 0.0002 for answer in answers if answer.status_code == 200)
        info = client.get("/v1/info").json()
        assert [(r["device"], r["healthy"]) for r in info["replicas"]] == [("cuda:0", True), ("cuda:1", False)]
        assert client.get("/healthz").status_code == 200  # one replica still serves
        assert server.metric("structsim_replica_healthy", replica="1", device="cuda:1") == 0
        assert server.metric("structsim_replica_failed_batches_total", replica="1") == FAILED_BATCHES_BEFORE_UNHEALTHY


def test_replica_devices_come_from_devices_or_device() -> None:
    assert replica_devices(Settings(device="cpu")) == ["cpu"]
    assert replica_devices(Settings(devices="cuda:0,cuda:1")) == ["cuda:0", "cuda:1"]
    import torch

    expected = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    assert replica_devices(Settings(devices="auto")) == expected


class RescoringEngine(FakeEngine):
    """An engine that reports pairs scored again in fp32 near an exact threshold (runner.Engine's counter)."""

    rescored_pairs = 7


def test_pairs_rescored_in_fp32_are_counted_per_replica() -> None:
    with live_server(create_app(Settings(max_wait_ms=0), engine_factory=lambda settings: RescoringEngine())) as server:
        server.wait_ready()
        assert server.metric("structsim_replica_pairs_rescored_fp32_total", replica="0", device="cpu") == 7
