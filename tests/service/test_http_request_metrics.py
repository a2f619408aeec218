"""Per-request metrics over a real server: each answer counted once, under its route template, method and status."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import FakeEngine
from live_server import live_server
from similarity_service.app import create_app
from similarity_service.settings import Settings

PAIR = {"sentence1": "ab", "sentence2": "c"}


def samples(http: httpx.Client, name: str) -> dict[tuple[str, str, str], float]:
    """(route, method, status) → value of the `name` samples; status is "" for series without one."""
    return {
        (sample.labels["route"], sample.labels["method"], sample.labels.get("status", "")): sample.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        for sample in family.samples
        if sample.name == name
    }


def test_each_answer_is_counted_once_under_its_route_method_and_status() -> None:
    engine = FakeEngine()
    with (
        live_server(create_app(Settings(), engine_factory=lambda settings: engine)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        server.wait_ready()
        for _ in range(3):
            assert http.post("/v1/similarity", json=PAIR).status_code == 200
        assert http.post("/v1/similarity", json={"sentence1": "", "sentence2": "c"}).status_code == 400
        assert http.post("/similarity", json=PAIR).status_code == 200
        assert http.get("/v1/similarity").status_code == 405
        assert http.get("/nowhere").status_code == 404

        counted = samples(http, "structsim_http_requests_total")
        assert counted[("/v1/similarity", "POST", "200")] == 3
        assert counted[("/v1/similarity", "POST", "400")] == 1
        assert counted[("/similarity", "POST", "200")] == 1
        assert not [key for key in counted if key[0] == "/nowhere" or key[2] == "405"]  # routes only: 404/405 are rejections
        timed = samples(http, "structsim_http_request_duration_seconds_count")
        assert timed[("/v1/similarity", "POST", "")] == 4
        assert timed[("/similarity", "POST", "")] == 1
        assert server.metric("structsim_rejections_total", reason="not_found") == 1
