"""The examples are what users apply and run: they validate against the CRD's own schema (as the
API server would check them, unknown fields included) and Kubernetes' schemas, and the example
clients speak the service's HTTP API."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chart_render import (
    CRD_SOURCE,
    EXAMPLES,
    KUBE_VERSIONS,
    assert_locked_down,
    load_yaml_documents,
    pod_templates,
)

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
CLIENT = EXAMPLES / "client"


def crd_validator(crd: dict[str, Any], version: str) -> jsonschema.Validator:
    """A validator for one served version of the CRD that checks what the API server checks.

    CRD schemas are OpenAPI 3.0 (draft-4 style `exclusiveMinimum: true`). The API server also
    refuses unknown fields under `kubectl apply`'s strict field validation, and treats
    `x-kubernetes-int-or-string` as "integer or string"; both are made explicit here.
    """
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(served["schema"]["openAPIV3Schema"])

    def tighten(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            if node.get("x-kubernetes-int-or-string"):
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for child in node.values():
                tighten(child)
        elif isinstance(node, list):
            for child in node:
                tighten(child)

    tighten(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's ObjectMeta, not the CRD's
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_SOURCE.read_text())


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> jsonschema.Validator:
    return crd_validator(crd, "v1alpha1")


def _documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in EXAMPLE_FILES:
        for doc in load_yaml_documents(path):
            yield path.name, doc


def test_the_examples_exist() -> None:
    names = {path.name for path in EXAMPLE_FILES}
    assert names >= {"similarity.yaml", "similarity-pinned.yaml", "model-cache.yaml", "model-preload.yaml",
                     "model-copy-pod.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_every_example_validates(path: Path, validator: jsonschema.Validator) -> None:
    for doc in load_yaml_documents(path):
        if doc["apiVersion"].startswith("structsim.io/"):
            assert doc["apiVersion"] == "structsim.io/v1alpha1" and doc["kind"] == "SimilarityService"
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert errors == []
        else:
            for kube_version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, kube_version, strict=True)


def _similarity(name: str) -> dict[str, Any]:
    (doc,) = [d for f, d in _documents() if f == name and d["kind"] == "SimilarityService"]
    return doc


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda s: s["spec"].update(precision="fp8"), "'fp8' is not one of"),
        (lambda s: s["spec"].update(gpuPerPod=1), "Additional properties are not allowed ('gpuPerPod'"),
        (lambda s: s["spec"]["autotune"].update(p99Ms=0), "minimum of 0"),
        (lambda s: s["spec"]["batching"].update(maxBatchSize=1.5), "is not valid under any of the given schemas"),
        (lambda s: s["spec"].pop("image"), "'image' is a required property"),
        (lambda s: s["spec"]["model"].update(id="not a model id"), "does not match"),
        (lambda s: s["spec"]["resources"]["requests"].update(cpu="2 cores"), "does not match"),
        (lambda s: s["spec"]["resources"]["limits"].update(memory=0.5), "is not valid under any of the given schemas"),
    ],
)
def test_the_crd_schema_refuses_a_broken_resource(validator: jsonschema.Validator, mutate: Any, error: str) -> None:
    """Guards the test above: the schema as applied here does bite."""
    resource = copy.deepcopy(_similarity("similarity.yaml"))
    mutate(resource)
    messages = [e.message for e in validator.iter_errors(resource)]
    assert any(error in m for m in messages), messages


def test_main_example_shows_every_spec_field(crd: dict[str, Any]) -> None:
    """similarity.yaml is the reference users copy from: every spec field, each with a comment."""
    (served,) = crd["spec"]["versions"]
    spec_schema = served["schema"]["openAPIV3Schema"]["properties"]["spec"]
    example = _similarity("similarity.yaml")["spec"]

    def missing(schema: dict[str, Any], value: dict[str, Any], path: str) -> list[str]:
        out = []
        for key, sub in schema.get("properties", {}).items():
            if key not in value:
                out.append(path + key)
            elif sub.get("type") == "object" and "properties" in sub:
                out += missing(sub, value[key], f"{path}{key}.")
        return out

    assert missing(spec_schema, example, "spec.") == []
    lines = (EXAMPLES / "similarity.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if line.startswith("  ") and not stripped.startswith(("#", "-")) and ":" in stripped:
            # A field's comment sits on the lines right above it (or above its group's first field).
            j = i - 1
            while j >= 0 and not lines[j].strip().startswith("#") and lines[j].strip() and ":" in lines[j]:
                j -= 1
            assert lines[j].strip().startswith("#"), f"similarity.yaml:{i + 1} {stripped} has no comment"


def test_pinned_example_pins_and_never_tunes() -> None:
    spec = _similarity("similarity-pinned.yaml")["spec"]
    assert spec["precision"] != "auto"
    assert all(isinstance(v, int) for v in spec["batching"].values()) and len(spec["batching"]) == 2
    assert spec["autotune"]["enabled"] is False


def test_model_cache_examples_feed_the_resource() -> None:
    (claim,) = load_yaml_documents(EXAMPLES / "model-cache.yaml")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes mount it
    spec = _similarity("similarity.yaml")["spec"]
    assert spec["model"]["cache"]["pvc"] == claim["metadata"]["name"]
    for path in ("model-preload.yaml", "model-copy-pod.yaml"):
        ((_, pod),) = pod_templates(load_yaml_documents(EXAMPLES / path))
        (container,) = pod["containers"]
        assert container["image"] == spec["image"], path
        assert {"mountPath": "/models", "name": "models"} in container["volumeMounts"], path
        assert {"name": "models", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in pod["volumes"]
    # The Job downloads the model and revision the resource serves, into the directory pods read.
    ((_, pod),) = pod_templates(load_yaml_documents(EXAMPLES / "model-preload.yaml"))
    args = pod["containers"][0]["args"]
    assert args[1:] == [spec["model"]["id"], spec["model"]["revision"]]
    assert 'cache_dir="/models"' in args[0]


def test_example_pods_are_locked_down() -> None:
    pods = [pod for path in EXAMPLE_FILES for pod in pod_templates(load_yaml_documents(path))]
    assert len(pods) == 2
    for name, pod in pods:
        assert_locked_down(name, pod)


# --- the example clients, against a loopback server that answers as the service's API does ---


class FakeService(BaseHTTPRequestHandler):
    """Answers the routes the clients call with the documented shapes; records every request.
    The first POST /v1/similarity gets 503 + Retry-After, as a service still warming up would."""

    calls: list[tuple[str, str, Any, str | None]]
    refused_once: bool

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.calls.append(("GET", self.path, None, None))
        if self.path == "/readyz":
            self._send(200, {"status": "ready"})
        elif self.path == "/v1/info":
            self._send(200, {"model": "iic/nlp_structbert_sentence-similarity_chinese-base", "precision": "fp16"})
        else:
            self._send(404, {"error": {"code": "not_found", "message": self.path}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(("POST", self.path, body, self.headers.get("Content-Type")))
        if self.path == "/v1/similarity":
            if not type(self).refused_once:
                type(self).refused_once = True
                self._send(503, {"error": {"code": "not_ready", "message": "warming up"}}, {"Retry-After": "0"})
            elif set(body) == {"sentence1", "sentence2"} and body["sentence1"].strip():
                self._send(200, {"similarity": 0.91, "model": "structbert", "precision": "fp16"})
            else:
                self._send(400, {"error": {"code": "invalid_input", "message": "sentence1 is empty"}})
        elif self.path == "/v1/similarity/batch":
            self._send(200, {"similarities": [0.5] * len(body["pairs"])})
        elif self.path == "/v1/rank":
            ranked = [{"index": i, "sentence": t, "similarity": 0.5} for i, t in enumerate(body["targets"])]
            ranked = ranked[: body.get("top_k")]
            self._send(200, {"results": ranked})
        else:
            self._send(404, {"error": {"code": "not_found", "message": self.path}})


@pytest.fixture
def fake_service() -> Iterator[tuple[str, type[FakeService]]]:
    handler = type("Handler", (FakeService,), {"calls": [], "refused_once": False})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _posts(handler: type[FakeService]) -> dict[str, list[Any]]:
    posts: dict[str, list[Any]] = {}
    for method, path, body, content_type in handler.calls:
        if method == "POST":
            assert content_type == "application/json", path
            posts.setdefault(path, []).append(body)
    return posts


def test_python_client_calls_the_api(fake_service: tuple[str, type[FakeService]]) -> None:
    url, handler = fake_service
    result = subprocess.run([sys.executable, str(CLIENT / "client.py"), "--url", url],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "one pair: similarity=0.9100 (fp16)" in result.stdout
    assert "batch: 0.5000, 0.5000" in result.stdout
    assert "rank: 0.5000 订单多久发货" in result.stdout
    posts = _posts(handler)
    assert len(posts["/v1/similarity"]) == 2  # refused once with 503 + Retry-After, then retried
    assert set(posts["/v1/similarity"][1]) == {"sentence1", "sentence2"}
    (batch,) = posts["/v1/similarity/batch"]
    assert [set(p) for p in batch["pairs"]] == [{"sentence1", "sentence2"}] * 2
    (rank,) = posts["/v1/rank"]
    assert set(rank) == {"source", "targets", "top_k"} and rank["top_k"] == 2
    assert ("GET", "/v1/info", None, None) in handler.calls


def test_python_client_reports_service_errors(fake_service: tuple[str, type[FakeService]]) -> None:
    url, _ = fake_service
    # The example itself, imported as a library under a name no other module uses.
    spec = importlib.util.spec_from_file_location("structsim_example_client", CLIENT / "client.py")
    assert spec is not None and spec.loader is not None
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    api = client.SimilarityClient(url, retries=0)
    with pytest.raises(client.ServiceError, match="HTTP 503 not_ready: warming up"):
        api.similarity("a", "b")
    with pytest.raises(client.ServiceError, match="HTTP 400 invalid_input") as error:
        api.similarity(" ", "b")
    assert error.value.status == 400
    result = subprocess.run([sys.executable, str(CLIENT / "client.py"), "--url", "http://127.0.0.1:1"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2 and "cannot reach http://127.0.0.1:1" in result.stderr


def test_curl_example_calls_the_api(fake_service: tuple[str, type[FakeService]]) -> None:
    url, handler = fake_service
    result = subprocess.run(["sh", str(CLIENT / "curl.sh"), url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    posts = _posts(handler)
    assert posts["/v1/similarity"][-1] == {"sentence1": "怎么修改登录密码", "sentence2": "如何更改账户密码"}
    assert len(posts["/v1/similarity/batch"][0]["pairs"]) == 2
    assert posts["/v1/rank"][0]["top_k"] == 2
    assert '"similarity": 0.91' in result.stdout


def test_curl_example_passes_shellcheck() -> None:
    result = subprocess.run([Path(sys.executable).parent / "shellcheck", str(CLIENT / "curl.sh")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout
