"""bench/loadgen.py against a real server (fake engine, so only the HTTP path is measured)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fake_engine import FakeEngine
from live_server import LiveServer, live_server
from similarity_service.app import create_app
from similarity_service.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import loadgen  # bench/ is a folder of scripts, not a package


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(create_app(Settings(max_wait_ms=1), engine_factory=lambda settings: FakeEngine())) as running:
        running.wait_ready()
        yield running


def test_bodies_cover_each_route_from_the_corpus() -> None:
    pairs = loadgen.corpus_pairs()
    assert len(pairs) > 1000 and all(a.strip() and b.strip() for a, b in pairs)
    single = next(loadgen.request_bodies(pairs, "similarity", 1, seed=0))
    assert single.startswith(b'{"sentence1": ')
    batch = next(loadgen.request_bodies(pairs, "batch", 4, seed=0))
    assert batch.count(b"sentence2") == 4
    rank = next(loadgen.request_bodies(pairs, "rank", 3, seed=0))
    assert b'"targets"' in rank


async def test_open_loop_sends_at_the_rate_and_reports_percentiles(server: LiveServer) -> None:
    result = await loadgen.run_open_loop(server.url, rate=200, duration_s=1.0, pairs=loadgen.corpus_pairs())
    assert 120 <= result.sent <= 280  # Poisson: about 200 in a second
    assert result.ok == result.sent and result.errors == {}
    assert result.p50_ms is not None and result.p99_ms is not None and 0 < result.p50_ms <= result.p99_ms
    assert result.mode == "open" and result.target_rate == 200
    assert result.client_lag_p99_ms is not None and result.client_lag_p99_ms >= 0
    assert result.p50_from_send_ms is not None and 0 < result.p50_from_send_ms <= result.p50_ms  # no client lag


def test_open_loop_in_processes_splits_the_rate_and_merges_the_records(server: LiveServer) -> None:
    result = loadgen.open_loop_in_processes(server.url, 300, 1.0, loadgen.corpus_pairs(), processes=2)
    assert 200 <= result.sent <= 400  # two Poisson streams of 150/s for a second
    assert result.ok == result.sent and result.errors == {}
    assert result.target_rate == 300 and 0.9 <= result.duration_s <= 3.0  # the clients started together
    assert result.p50_ms is not None and result.p99_ms is not None and 0 < result.p50_ms <= result.p99_ms
    with pytest.raises(ValueError, match="processes"):
        loadgen.open_loop_in_processes(server.url, 300, 1.0, [], processes=0)


async def test_closed_loop_batches_and_errors_by_status(server: LiveServer) -> None:
    pairs = loadgen.corpus_pairs()
    result = await loadgen.run_closed_loop(server.url, 8, 0.5, pairs, route="batch", pairs_per_request=4)
    assert result.ok > 8 and result.pairs_per_s == pytest.approx(result.throughput_rps * 4)
    assert result.client_lag_p99_ms is None  # closed loop: no schedule to be late for
    too_many = await loadgen.run_closed_loop(server.url, 2, 0.3, pairs, route="batch", pairs_per_request=300)
    assert too_many.ok == 0 and set(too_many.errors) == {"413"} and too_many.p50_ms is None
