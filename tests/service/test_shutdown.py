"""SIGTERM under load on a real `structsim serve` process: every admitted request is answered, exit 0."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from similarity_service.runner import Engine

STRUCTSIM = str(Path(sys.executable).with_name("structsim"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serving(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    log = tmp_path / "serve.log"
    # Batches wait up to 10 s to fill 4096 pairs: the load below stays queued until the drain flushes it.
    command = [
        STRUCTSIM,
        "serve",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--max-seq-len",
        "128",
        "--max-batch-size",
        "4096",
        "--max-wait-ms",
        "10000",
        "--max-queue-pairs",
        "8192",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, log, timeout_s=90)
        yield process, url, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> None:
    """Until `/readyz` answers 200; fails with the server's log if it exits or takes longer than `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"structsim serve not ready after {timeout_s} s:\n" + log.read_text()
        time.sleep(0.1)


def queued_pairs(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("structsim_queue_pairs "):
            return float(line.split()[1])
    return 0.0


async def test_sigterm_under_load_answers_every_admitted_request_and_exits_0(
    serving: tuple[subprocess.Popen[bytes], str, Path], tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    process, url, log = serving
    requests = [chinese_pairs[i : i + 8] for i in range(0, 240, 8) if len(chinese_pairs[i : i + 8]) == 8] * 4
    admitted_pairs = sum(len(r) for r in requests)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=200)) as client:

        async def batch(pairs: list[tuple[str, str]]) -> httpx.Response:
            body = {"pairs": [{"sentence1": a, "sentence2": b} for a, b in pairs]}
            return await client.post("/v1/similarity/batch", json=body)

        async def late_arrival() -> int | None:
            """A request sent during shutdown: refused (503) or unable to connect, never an error."""
            try:
                answer = await client.post("/v1/similarity", json={"sentence1": "好", "sentence2": "行"})
            except httpx.TransportError:
                return None
            return answer.status_code

        admitted = [asyncio.create_task(batch(r)) for r in requests]
        deadline = time.monotonic() + 30
        while await asyncio.to_thread(queued_pairs, url) < admitted_pairs:  # all admitted, waiting for a batch
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        late = []
        for _ in range(20):
            late.append(asyncio.create_task(late_arrival()))
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(*admitted)
        late_statuses = await asyncio.gather(*late)

    assert [a.status_code for a in answers] == [200] * len(requests)
    for pairs, answer in zip(requests, answers, strict=True):
        assert answer.json()["similarities"] == pytest.approx(tiny_engine.score(pairs), abs=1e-5)
    assert set(late_statuses) <= {200, 503, None}
    assert process.wait(timeout=30) == 0, log.read_text()
    assert "draining" in log.read_text()
