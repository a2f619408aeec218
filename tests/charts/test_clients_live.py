"""The example clients against the real service: `structsim serve` (the service image's command)
started as a process on loopback with the tiny synthetic checkpoint. Scores are not semantic; what
is checked is that the clients and the service agree on every route and field."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from chart_render import EXAMPLES

CLIENT = EXAMPLES / "client"
STRUCTSIM = Path(sys.executable).parent / "structsim"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def service_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # Configured through the environment, as the image and the operator's pods configure it.
    # A short max_seq_len only shortens the warm-up; the example sentences are far shorter.
    env = {**os.environ, "STRUCTSIM_HOST": "127.0.0.1", "STRUCTSIM_PORT": str(port),
           "STRUCTSIM_DEVICE": "cpu", "STRUCTSIM_PRECISION": "fp32", "STRUCTSIM_MAX_SEQ_LEN": "128"}  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen([STRUCTSIM, "serve", "--model", str(tiny_model_dir)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _ready(url):
            assert proc.poll() is None, f"structsim serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"structsim serve not ready: {log.read_text()}"
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()  # drains and exits cleanly


def _client_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("structsim_example_client_live", CLIENT / "client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_client_example_runs_against_the_service(service_url: str) -> None:
    result = subprocess.run([sys.executable, str(CLIENT / "client.py"), "--url", service_url],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "one pair: similarity=" in result.stdout and "(fp32)" in result.stdout
    assert result.stdout.count("rank: ") == 2  # top_k=2


def test_python_client_library_against_the_service(service_url: str) -> None:
    client = _client_module()
    api = client.SimilarityClient(service_url)
    pairs = [("花呗可以提前还款吗", "花呗能不能提前还"), ("快递几天能到", "退货运费谁承担"), ("好", "行")]
    scores = api.batch(pairs)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    one = api.similarity(*pairs[0])
    assert one["similarity"] == pytest.approx(scores[0], abs=1e-5)  # one pair or a batch: same score
    ranked = api.rank("我的订单什么时候发货", ["订单多久发货", "怎么申请退款", "发货时间是多久"])
    assert [r["similarity"] for r in ranked] == sorted((r["similarity"] for r in ranked), reverse=True)
    assert sorted(r["index"] for r in ranked) == [0, 1, 2]
    assert api.info()["precision"] == "fp32"
    with pytest.raises(client.ServiceError) as error:
        api.similarity("", "b")  # empty input: a 4xx with the service's error body
    assert 400 <= error.value.status < 500 and error.value.code


def test_curl_example_runs_against_the_service(service_url: str) -> None:
    result = subprocess.run(["sh", str(CLIENT / "curl.sh"), service_url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    bodies = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [sorted(b) for b in bodies] == [
        ["status"],
        ["model", "precision", "similarity"],
        ["model", "precision", "similarities"],
        ["model", "precision", "results", "source"],
    ]
