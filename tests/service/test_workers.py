"""Several serving processes on one port (`structsim serve --workers N`), on real `structsim serve` processes.

The workers are real: spawned interpreters that each load the tiny model on the CPU and listen on the port
with SO_REUSEPORT. Fresh connections land on either, so the tests open one per request where they need both.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import FakeEngine
from live_server import live_server
from similarity_service.app import create_app
from similarity_service.host import Gpus, visible_gpus
from similarity_service.settings import Settings
from similarity_service.workers import HostResources, WorkerPeers, worker_count
from test_shutdown import STRUCTSIM, free_port, wait_until_ready

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import SynchronizedArray

    from similarity_service.runner import Engine

BODY = {"sentence1": "今天天气怎么样", "sentence2": "今天天气如何"}


# --- how many workers, and who counts as ready --------------------------------------------------------


GIB = 1 << 30


@pytest.mark.parametrize(
    ("listed", "count"),
    [("0,1", 2), ("", 0), ("1", 1), ("0,-1,1", 1), ("GPU-8f2c3a1e,GPU-1d4b", 2), ("0,,1", 1)],
)
def test_cuda_visible_devices_decides_the_visible_gpus(listed: str, count: int) -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": listed}, nvml=_nvml([80 * GIB] * 8)) == Gpus(count, 80 * GIB)


def test_without_cuda_visible_devices_the_driver_shows_the_gpus_and_their_smallest_memory() -> None:
    assert visible_gpus({}, nvml=_nvml([80 * GIB, 24 * GIB])) == Gpus(2, 24 * GIB)
    assert visible_gpus({}, nvml=_nvml([])) == Gpus(0, 0)
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0"}, nvml=_nvml(None)) == Gpus(0, 0)  # no driver
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}, nvml=_nvml([80 * GIB])) == Gpus(1, 80 * GIB)


def _nvml(memory: list[int] | None) -> SimpleNamespace:
    class NVMLError(Exception):
        pass

    def init() -> None:
        if memory is None:
            raise NVMLError("NVML Shared Library Not Found")

    return SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(memory or []),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetMemoryInfo=lambda index: SimpleNamespace(total=(memory or [])[index]),
    )


H200 = Gpus(1, 141 * GIB)


@pytest.mark.parametrize(
    ("options", "host", "count"),
    [
        ({"workers": 2}, HostResources(2, Gpus(0, 0), None), 2),  # as set, whatever the host
        ({}, HostResources(16, H200, None), 3),
        ({}, HostResources(128, Gpus(8, 80 * GIB), None), 3),  # at most 3: the most measured
        ({}, HostResources(8, H200, None), 2),
        ({}, HostResources(7, H200, None), 1),
        ({}, HostResources(16, Gpus(1, 40 * GIB), None), 2),  # 16 GiB of GPU memory a worker
        ({}, HostResources(16, Gpus(1, 24 * GIB), None), 1),
        ({}, HostResources(16, H200, 20 * GIB), 2),  # 8 GiB of the container's memory limit a worker
        ({}, HostResources(16, H200, 6 * GIB), 1),
        ({}, HostResources(16, Gpus(0, 0), None), 1),  # no GPU: CPU forwards take the cores themselves
        ({"device": "cpu"}, HostResources(16, H200, None), 1),
        ({"devices": "cpu,cpu"}, HostResources(16, H200, None), 1),
        ({"device": "cuda:1"}, HostResources(12, Gpus(2, 141 * GIB), None), 3),
    ],
)
def test_auto_workers_follow_the_cores_and_memory_where_a_gpu_serves(
    options: dict[str, object], host: HostResources, count: int
) -> None:
    assert worker_count(Settings(**options), host) == count  # type: ignore[arg-type]


def shared_peers(count: int) -> tuple[SynchronizedArray[ctypes.c_bool], SynchronizedArray[ctypes.c_int]]:
    context = multiprocessing.get_context("spawn")
    return context.Array(ctypes.c_bool, count), context.Array(ctypes.c_int, count)


def test_readiness_waits_for_every_worker_while_this_one_already_serves() -> None:
    ready, passes = shared_peers(2)
    engine = FakeEngine()
    engine.gate.set()
    app = create_app(Settings(), engine_factory=lambda settings: engine, workers=WorkerPeers(ready, passes, 0))  # type: ignore[arg-type, return-value]
    with live_server(app) as server:
        deadline = time.monotonic() + 30
        while not ready[0]:  # this worker is warm...
            assert time.monotonic() < deadline
            time.sleep(0.02)
        waiting = httpx.get(f"{server.url}/readyz")
        assert waiting.status_code == 503  # ...its sibling is not
        assert waiting.json()["error"]["code"] == "workers_not_ready"
        assert "1 of 2 serving processes" in waiting.json()["error"]["message"]
        assert "retry-after" in waiting.headers
        assert httpx.post(f"{server.url}/v1/similarity", json={"sentence1": "ab", "sentence2": "c"}).status_code == 200
        ready[1] = True
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        info = httpx.get(f"{server.url}/v1/info").json()
        assert (info["workers"], info["worker"]) == (2, 0)
    assert not ready[0]  # stopped: no longer counted ready


def test_a_workers_passes_are_seen_by_its_siblings_while_they_run() -> None:
    ready, passes = shared_peers(3)
    engine = FakeEngine()
    engine.gate.clear()
    app = create_app(Settings(), engine_factory=lambda settings: engine, workers=WorkerPeers(ready, passes, 1))  # type: ignore[arg-type, return-value]
    sibling, this_one = WorkerPeers(ready, passes, 0), WorkerPeers(ready, passes, 1)
    with live_server(app) as server, concurrent.futures.ThreadPoolExecutor(1) as client:
        answer = client.submit(httpx.post, f"{server.url}/v1/similarity", json={"sentence1": "ab", "sentence2": "c"})
        assert engine.started.wait(30)
        assert passes[:] == [0, 1, 0]  # the service's batcher counts its pass in this worker's slot
        assert sibling.others_running() and not this_one.others_running()
        engine.gate.set()
        assert answer.result(30).status_code == 200
        assert passes[:] == [0, 0, 0] and not sibling.others_running()


# --- real `structsim serve --workers 2` -----------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen[bytes]
    url: str
    log: Path


def start(tiny_model_dir: Path, log: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    command = [STRUCTSIM, "serve", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp32",
               "--max-seq-len", "128", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", *extra]
    with log.open("wb") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture
def served(tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """`structsim serve --workers 2`, ready; extra flags from indirect parametrization."""
    port = free_port()
    log = tmp_path / "serve.log"
    process = start(tiny_model_dir, log, port, *getattr(request, "param", ()))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url, log, timeout_s=120)
        yield Served(process, url, log)
    finally:
        for pid in workers_of(process.pid):
            _kill(pid)
        if process.poll() is None:
            process.kill()
            process.wait()


def workers_of(parent: int) -> list[int]:
    """The worker processes `parent` spawned (not multiprocessing's resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == parent and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return sorted(found)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def metric(url: str, name: str) -> float:
    """A sample's value summed over its labels."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        total += sum(sample.value for sample in family.samples if sample.name == name)
    return total


def test_two_workers_share_the_port_and_their_metrics(served: Served) -> None:
    answered_by = set()
    for _ in range(40):  # a fresh connection each time: the kernel hashes it to either worker
        with httpx.Client(base_url=served.url) as client:
            answer = client.post("/v1/similarity", json=BODY)
            assert answer.status_code == 200, answer.text
            info = client.get("/v1/info").json()
        assert info["workers"] == 2
        answered_by.add(info["worker"])
    assert answered_by == {0, 1}
    assert len(workers_of(served.process.pid)) == 2

    time.sleep(1.5)  # each worker copies its batcher's counters into the shared files every second
    for _ in range(6):  # whichever worker a scrape reaches shows the sum over both
        assert metric(served.url, "structsim_pairs_scored_total") == 40
        assert metric(served.url, "structsim_replica_pairs_scored_total") == 40
        assert metric(served.url, "structsim_http_requests_total") >= 80
        assert metric(served.url, "structsim_ready") == 1
        assert metric(served.url, "structsim_model_info") == 1


# Batches wait up to 10 s to fill: requests stay queued in their worker until the drain flushes them.
@pytest.mark.parametrize("served", [("--max-batch-size", "4096", "--max-wait-ms", "10000")], indirect=True)
def test_sigterm_drains_every_worker_and_exits_0(served: Served, tiny_engine: Engine) -> None:
    pairs = [("今天天气怎么样", "今天天气如何"), ("我想退货", "怎么申请退款"), ("你好", "您好")]
    body = {"pairs": [{"sentence1": a, "sentence2": b} for a, b in pairs]}
    clients = [httpx.Client(base_url=served.url, timeout=60) for _ in range(8)]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            answers = [pool.submit(client.post, "/v1/similarity/batch", json=body) for client in clients]
            deadline = time.monotonic() + 30
            while metric(served.url, "structsim_queue_pairs") < len(clients) * len(pairs):  # all queued, both workers
                assert time.monotonic() < deadline, "requests were not all admitted"
                time.sleep(0.1)
            served.process.send_signal(signal.SIGTERM)
            results = [answer.result() for answer in answers]
    finally:
        for client in clients:
            client.close()
    assert [r.status_code for r in results] == [200] * len(clients)
    for r in results:
        assert r.json()["similarities"] == pytest.approx(tiny_engine.score(pairs), abs=1e-5)
    assert served.process.wait(timeout=30) == 0, served.log.read_text()
    log = served.log.read_text()
    assert "worker 0 similarity_service.server: signal received: draining" in log
    assert "worker 1 similarity_service.server: signal received: draining" in log


def test_a_worker_that_dies_takes_the_others_down_with_status_1(served: Served) -> None:
    first, second = workers_of(served.process.pid)
    _kill(first)
    assert served.process.wait(timeout=30) == 1
    deadline = time.monotonic() + 10
    while alive(second):
        assert time.monotonic() < deadline, "the other worker kept running"
        time.sleep(0.05)
    assert "exited with status -9: draining the others" in served.log.read_text()


def test_workers_whose_parent_was_killed_drain_and_exit(served: Served) -> None:
    workers = workers_of(served.process.pid)
    served.process.kill()
    served.process.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers kept serving"
        time.sleep(0.05)


def test_a_port_taken_by_another_program_fails_the_start_with_status_1(tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:  # no SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start(tiny_model_dir, tmp_path / "serve.log", port)
        assert process.wait(timeout=60) == 1
    assert "cannot listen on 127.0.0.1" in (tmp_path / "serve.log").read_text()
