"""Bad input of every kind gets a 4xx with the error body, never a 5xx, and the server keeps serving.

A real uvicorn server with the real Engine on the tiny checkpoint, with small limits so the
over-limit cases stay small.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from live_server import LiveServer, live_server
from similarity_service.app import create_app
from similarity_service.settings import Settings

MAX_BODY = 64 * 1024
MAX_PAIRS = 16
MAX_CHARS = 200
MAX_TARGETS = 16
JSON = {"content-type": "application/json"}
GOOD = {"sentence1": "今天天气很好", "sentence2": "今天适合出去散步"}


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def chunks(total: int) -> Iterator[bytes]:
    """A body sent chunked (no Content-Length), so only the bytes received can reveal its size."""
    yield b'{"sentence1": "'
    for _ in range(total // 1024):
        yield b"a" * 1024
    yield b'", "sentence2": "b"}'


# (id, method, path, body, headers, expected status)
CASES: list[tuple[str, str, str, Any, dict[str, str], int]] = [
    ("not-json", "POST", "/v1/similarity", b"hello", JSON, 400),
    ("truncated-json", "POST", "/v1/similarity", b'{"sentence1": "a"', JSON, 400),
    ("empty-body", "POST", "/v1/similarity", b"", JSON, 400),
    ("null", "POST", "/v1/similarity", b"null", JSON, 400),
    ("array-instead-of-object", "POST", "/v1/similarity", dumps([GOOD]), JSON, 400),
    ("string-instead-of-object", "POST", "/v1/similarity", b'"a"', JSON, 400),
    ("missing-field", "POST", "/v1/similarity", dumps({"sentence1": "a"}), JSON, 400),
    ("number-instead-of-string", "POST", "/v1/similarity", dumps({"sentence1": 123, "sentence2": "b"}), JSON, 400),
    ("null-sentence", "POST", "/v1/similarity", dumps({"sentence1": None, "sentence2": "b"}), JSON, 400),
    ("array-sentence", "POST", "/v1/similarity", dumps({"sentence1": ["a"], "sentence2": "b"}), JSON, 400),
    ("object-sentence", "POST", "/v1/similarity", dumps({"sentence1": {"a": 1}, "sentence2": "b"}), JSON, 400),
    ("empty-string", "POST", "/v1/similarity", dumps({"sentence1": "", "sentence2": "b"}), JSON, 400),
    ("whitespace-string", "POST", "/v1/similarity", dumps({"sentence1": " \t\n\u3000", "sentence2": "b"}), JSON, 400),
    ("nul-byte", "POST", "/v1/similarity", dumps({"sentence1": "a\u0000b", "sentence2": "b"}), JSON, 400),
    ("invalid-utf8", "POST", "/v1/similarity", b'{"sentence1": "\xff\xfe", "sentence2": "b"}', JSON, 400),
    ("lone-surrogate", "POST", "/v1/similarity", b'{"sentence1": "\\ud800", "sentence2": "b"}', JSON, 400),
    ("lone-surrogate-key", "POST", "/v1/similarity", b'{"sentence1": "a", "sentence2": "b", "\\udfff": 1}', JSON, 400),
    ("utf8-bom", "POST", "/v1/similarity", b"\xef\xbb\xbf" + dumps(GOOD), JSON, 400),
    ("duplicate-keys", "POST", "/v1/similarity", b'{"sentence1": "a", "sentence1": "b", "sentence2": "c"}', JSON, 400),
    ("extra-field", "POST", "/v1/similarity", dumps({**GOOD, "model": "other"}), JSON, 400),
    ("deep-nesting", "POST", "/v1/similarity", b"[" * 30_000 + b"]" * 30_000, JSON, 400),
    (
        "deep-nesting-in-field",
        "POST",
        "/v1/similarity",
        b'{"sentence1": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        JSON,
        400,
    ),
    (
        "huge-integer",
        "POST",
        "/v1/rank",
        b'{"source": "a", "targets": ["b"], "top_k": 1' + b"0" * 5000 + b"}",
        JSON,
        400,
    ),
    ("nan-literal", "POST", "/v1/rank", b'{"source": "a", "targets": ["b"], "top_k": NaN}', JSON, 400),
    (
        "huge-sentence",
        "POST",
        "/v1/similarity",
        dumps({"sentence1": "长" * (MAX_CHARS + 1), "sentence2": "b"}),
        JSON,
        413,
    ),
    (
        "100k-pair-batch",
        "POST",
        "/v1/similarity/batch",
        dumps({"pairs": [{"sentence1": "a", "sentence2": "b"}] * 100_000}),
        JSON,
        413,
    ),
    ("pairs-over-limit", "POST", "/v1/similarity/batch", dumps({"pairs": [GOOD] * (MAX_PAIRS + 1)}), JSON, 413),
    ("body-over-limit", "POST", "/v1/similarity", dumps({"sentence1": "a" * MAX_BODY, "sentence2": "b"}), JSON, 413),
    ("chunked-oversize-body", "POST", "/v1/similarity", chunks(2 * MAX_BODY), JSON, 413),
    ("text-content-type", "POST", "/v1/similarity", dumps(GOOD), {"content-type": "text/plain"}, 415),
    (
        "form-content-type",
        "POST",
        "/v1/similarity",
        b"sentence1=a&sentence2=b",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
    ),
    (
        "latin1-charset",
        "POST",
        "/v1/similarity",
        dumps(GOOD),
        {"content-type": "application/json; charset=latin-1"},
        415,
    ),
    ("pairs-not-a-list", "POST", "/v1/similarity/batch", dumps({"pairs": GOOD}), JSON, 400),
    ("empty-pairs", "POST", "/v1/similarity/batch", dumps({"pairs": []}), JSON, 400),
    ("extra-field-in-pair", "POST", "/v1/similarity/batch", dumps({"pairs": [{**GOOD, "x": 1}]}), JSON, 400),
    (
        "empty-string-in-pair",
        "POST",
        "/v1/similarity/batch",
        dumps({"pairs": [GOOD, {"sentence1": "a", "sentence2": ""}]}),
        JSON,
        400,
    ),
    ("empty-targets", "POST", "/v1/rank", dumps({"source": "a", "targets": []}), JSON, 400),
    ("non-string-target", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b", 3]}), JSON, 400),
    ("whitespace-target", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b", "   "]}), JSON, 400),
    ("targets-over-limit", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"] * (MAX_TARGETS + 1)}), JSON, 413),
    ("zero-top-k", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"], "top_k": 0}), JSON, 400),
    ("negative-top-k", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"], "top_k": -3}), JSON, 400),
    ("huge-top-k", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"], "top_k": 10**30}), JSON, 400),
    ("top-k-as-string", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"], "top_k": "3"}), JSON, 400),
    ("fractional-top-k", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"], "top_k": 2.5}), JSON, 400),
    ("boolean-top-k", "POST", "/v1/rank", dumps({"source": "a", "targets": ["b"], "top_k": True}), JSON, 400),
    ("legacy-missing-source", "POST", "/batch_similarity", dumps({"targets": ["b"]}), JSON, 400),
    ("legacy-empty-targets", "POST", "/batch_similarity", dumps({"source": "a", "targets": []}), JSON, 400),
    ("legacy-bad-pair", "POST", "/similarity", dumps({"sentence1": "a", "sentence2": 5}), JSON, 400),
    ("wrong-method", "GET", "/v1/similarity", None, {}, 405),
    ("wrong-method-put", "PUT", "/v1/rank", dumps(GOOD), JSON, 405),
    ("unknown-path", "POST", "/v2/similarity", dumps(GOOD), JSON, 404),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        precision="fp32",
        max_seq_len=64,
        max_body_bytes=MAX_BODY,
        max_pairs_per_request=MAX_PAIRS,
        max_chars_per_sentence=MAX_CHARS,
        max_rank_targets=MAX_TARGETS,
    )
    with live_server(create_app(settings)) as running:
        running.wait_ready()
        yield running


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def test_there_are_at_least_25_kinds() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_4xx_with_the_error_body(
    client: httpx.Client, method: str, path: str, body: Any, headers: dict[str, str], status: int
) -> None:
    answer = client.request(method, path, content=body, headers=headers)
    assert answer.status_code == status, answer.text
    payload = answer.json()
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message"}
    assert payload["error"]["code"] and payload["error"]["message"]


def test_messages_say_what_is_wrong(client: httpx.Client) -> None:
    def message(body: bytes, path: str = "/v1/similarity") -> str:
        return str(client.post(path, content=body, headers=JSON).json()["error"]["message"])

    assert "sentence2" in message(dumps({"sentence1": "a"}))
    assert "sentence1" in message(dumps({"sentence1": "  ", "sentence2": "b"}))
    assert "duplicate key" in message(b'{"sentence1": "a", "sentence1": "b", "sentence2": "c"}')
    assert "pairs[1].sentence2" in message(
        dumps({"pairs": [GOOD, {"sentence1": "a", "sentence2": "长" * 201}]}), "/v1/similarity/batch"
    )
    assert "17 targets" in message(dumps({"source": "a", "targets": ["b"] * 17}), "/v1/rank")
    assert "empty" in message(b"")


def test_the_server_is_alive_and_never_answered_5xx(client: httpx.Client, server: LiveServer) -> None:
    for case_id, method, path, body, headers, _ in CASES:  # chunked bodies are generators: rebuild them
        content = chunks(2 * MAX_BODY) if case_id == "chunked-oversize-body" else body
        client.request(method, path, content=content, headers=headers)
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/similarity", json=GOOD).status_code == 200
    answered = [
        (sample.labels["route"], sample.labels["status"])
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for sample in family.samples
        if sample.name == "structsim_http_requests_total"
    ]
    assert ("/v1/similarity", "400") in answered
    assert [(route, status) for route, status in answered if status.startswith("5") and route != "/readyz"] == []
    assert server.metric("structsim_rejections_total", reason="internal_error") == 0
