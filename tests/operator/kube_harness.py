"""The operator tests' harness: the operator running for real (kopf in a thread with its own loop,
K8S-TESTING.md §2), a client that plays the user and the cluster's controllers (nodes joining, Jobs
finishing, DaemonSets becoming ready), and the RBAC check of every API call the operator made."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import kmock
import kopf
import yaml
from helm_python import Chart

from similarity_operator.handlers import build_registry
from similarity_operator.settings import Settings
from similarity_service.profile import Profile, encode_profile

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "structsim"
GROUP_PATH = "/apis/structsim.io/v1alpha1"
H100 = "NVIDIA-H100-80GB-HBM3"
T4 = "Tesla-T4"
A100 = "NVIDIA-A100-SXM4-40GB"
MODEL = "iic/nlp_structbert_sentence-similarity_chinese-base"

JSON = dict[str, Any]
T = TypeVar("T")


def fast_settings(server: str) -> Settings:
    """Short intervals so that a whole lifecycle takes a second or two."""
    return Settings(
        resync_interval_s=0.25,
        api_retry_delay_s=0.2,
        tune_backoff_s=0.5,
        tune_backoff_max_s=2.0,
        api_server=server,
        watch_timeout_s=30.0,
        watch_reconnect_s=0.05,
    )


class OperatorThread:
    """kopf.operator() in a background thread with its own event loop. kmock serves from the test's
    loop; kopf cancels every task of its own loop at exit, so it must not share that one."""

    def __init__(self, settings: Settings, namespaces: Sequence[str] = ()) -> None:
        self.settings = settings
        self.namespaces = list(namespaces)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="kopf", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=build_registry(self.settings),
                    standalone=True,
                    clusterwide=not self.namespaces,
                    namespaces=self.namespaces,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                )
            )
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    async def start(self) -> OperatorThread:
        self.thread.start()
        started = await asyncio.to_thread(self.ready_flag.wait, 10)
        assert started and self.error is None, f"the operator did not start: {self.error!r}"
        return self

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "the operator did not stop"
        if self.error is not None:
            raise self.error


async def eventually(check: Callable[[], T], timeout: float = 8.0, interval: float = 0.02) -> T:
    """Poll `check` until it returns something truthy without an AssertionError; return that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
            problem = f"{check.__name__} returned {result!r}"
        except AssertionError as exc:
            problem = str(exc) or repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {problem}")
        await asyncio.sleep(interval)


def profile_json(
    product: str,
    precision: str = "fp16",
    batch: int = 64,
    wait_ms: float = 2.0,
    throughput: float = 24101.5,
    p99_ms: float = 12.5,
    cc: str = "9.0",
) -> str:
    """A profile as `structsim autotune` writes it, built with the service's own schema (the contract)."""
    profile = Profile(
        device="cuda",
        gpu_product=product,
        device_name=product.replace("-", " "),
        compute_capability=cc,
        memory_gib=79.6,
        precision=precision,
        max_batch_size=batch,
        max_wait_ms=wait_ms,  # type: ignore[arg-type]
        throughput=throughput,
        p50_ms=p99_ms / 3,
        p99_ms=p99_ms,
        slo_p99_ms=50.0,
        model_id=MODEL,
        revision="master",
        fingerprint="autotune-side",
        trials=30,
        tuned_at="2026-11-25T10:00:00Z",
        structsim_version="0.1.0",
    )
    return encode_profile(profile).decode()


class Cluster:
    """Plays the user (kubectl) and the controllers a real cluster would run, over kmock's own client.
    Its requests carry kmock's User-Agent, which the RBAC check leaves out."""

    def __init__(self, kube: kmock.KubernetesEmulator, namespace: str = "team-a") -> None:
        self.kube = kube
        self.ns = namespace

    async def call(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json") -> JSON:
        data = None if body is None else json.dumps(body)
        async with self.kube.request(method, path, data=data, headers={"Content-Type": content_type}) as response:
            reply = await response.json()
            assert response.status < 300, f"{method} {path}: {response.status} {reply.get('message')}"
            return reply

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.call("POST", path, body)

    async def merge(self, path: str, body: JSON) -> JSON:
        return await self.call("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, path: str) -> JSON:
        return await self.call("DELETE", path)

    def objects(self, resource: str, namespace: str | None = None, **labels: str) -> list[JSON]:
        """Live objects of a resource ('apps/v1/daemonsets'), optionally by labels (keys with '/' via **{...})."""
        wanted = kmock.resource(resource)
        found = []
        for (res, ns, _), obj in self.kube.objects.items():
            if res != wanted or obj.deleted or (namespace is not None and ns != namespace):
                continue
            raw = obj.raw
            if all((raw["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items()):
                found.append(raw)
        return found

    def get(self, resource: str, name: str, namespace: str | None = None) -> JSON | None:
        for obj in self.objects(resource, namespace):
            if obj["metadata"]["name"] == name:
                return obj
        return None

    def history(self, resource: str, name: str, namespace: str | None = None) -> list[JSON | None]:
        """Every stored version of an object (None marks a deletion)."""
        key = (kmock.resource(resource), namespace, name)
        return [None if v is None else v.raw for v in self.kube.objects[key].history]

    # -- the user ---------------------------------------------------------------------------------

    def resource_path(self, name: str | None = None) -> str:
        base = f"{GROUP_PATH}/namespaces/{self.ns}/similarityservices"
        return f"{base}/{name}" if name else base

    async def apply(self, name: str, spec: JSON) -> JSON:
        body = {
            "apiVersion": "structsim.io/v1alpha1",
            "kind": "SimilarityService",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": spec,
        }
        return await self.create(self.resource_path(), body)

    def resource(self, name: str) -> JSON:
        obj = self.get("structsim.io/v1alpha1/similarityservices", name, self.ns)
        assert obj is not None, f"no SimilarityService {name}"
        return obj

    def status(self, name: str) -> JSON:
        return self.resource(name).get("status") or {}

    # -- the nodes --------------------------------------------------------------------------------

    async def add_node(self, name: str, product: str, cc: str | None = "9.0", **labels: str) -> JSON:
        node_labels = {"nvidia.com/gpu.product": product, **labels}
        if cc:
            node_labels["nvidia.com/gpu.compute.major"], node_labels["nvidia.com/gpu.compute.minor"] = cc.split(".")
        return await self.create("/api/v1/nodes", {"metadata": {"name": name, "labels": node_labels}})

    async def remove_node(self, name: str) -> None:
        await self.delete(f"/api/v1/nodes/{name}")

    # -- the controllers --------------------------------------------------------------------------

    def jobs(self, **labels: str) -> list[JSON]:
        return self.objects("batch/v1/jobs", self.ns, **labels)

    def daemonsets(self) -> list[JSON]:
        return self.objects("apps/v1/daemonsets", self.ns)

    async def finish_job(
        self, job: str, *, result: str | None, exit_code: int = 0, reason: str = "BackoffLimitExceeded"
    ) -> None:
        """What the Job controller and kubelet would do: a pod whose container terminated with the
        termination message `result`, then the Job's Complete (exit 0) or Failed condition."""
        spec = self.get("batch/v1/jobs", job, self.ns)
        assert spec is not None, f"no Job {job}"
        pod_labels = spec["spec"]["template"]["metadata"]["labels"]
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job,
            "uid": spec["metadata"]["uid"],
            "controller": True,
        }
        pod = await self.create(
            f"/api/v1/namespaces/{self.ns}/pods",
            {
                "metadata": {
                    "name": f"{job}-x1",
                    "labels": {**pod_labels, "batch.kubernetes.io/job-name": job},
                    "ownerReferences": [owner],
                },
                "spec": spec["spec"]["template"]["spec"],
            },
        )
        terminated: JSON = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
        if result is not None:
            terminated["message"] = result
        phase = "Succeeded" if exit_code == 0 else "Failed"
        await self.merge(
            f"/api/v1/namespaces/{self.ns}/pods/{pod['metadata']['name']}/status",
            {
                "status": {
                    "phase": phase,
                    "containerStatuses": [{"name": "autotune", "state": {"terminated": terminated}}],
                }
            },
        )
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")  # sub-second: backoffs here are short
        condition = (
            {"type": "Complete", "status": "True", "lastTransitionTime": now}
            if exit_code == 0
            else {
                "type": "Failed",
                "status": "True",
                "reason": reason,
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": now,
            }
        )
        counts = {"succeeded": 1} if exit_code == 0 else {"failed": 1}
        await self.merge(
            f"/apis/batch/v1/namespaces/{self.ns}/jobs/{job}/status",
            {"status": {"conditions": [condition], "startTime": now, **counts}},
        )

    async def daemonsets_ready(self, ready: bool = True) -> None:
        """What the DaemonSet controller would report once its pods run (or not) on every node."""
        for ds in self.daemonsets():
            product = ds["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
            nodes = [
                n for n in self.objects("v1/nodes") if n["metadata"]["labels"].get("nvidia.com/gpu.product") == product
            ]
            status = {
                "desiredNumberScheduled": len(nodes),
                "currentNumberScheduled": len(nodes),
                "updatedNumberScheduled": len(nodes),
                "numberAvailable": len(nodes) if ready else 0,
                "numberReady": len(nodes) if ready else 0,
                "observedGeneration": ds["metadata"]["generation"],
            }
            await self.merge(
                f"/apis/apps/v1/namespaces/{self.ns}/daemonsets/{ds['metadata']['name']}/status", {"status": status}
            )

    def events(self, reason: str | None = None) -> list[JSON]:
        """Events posted on resources in this namespace, oldest first."""
        found = [e for e in self.objects("v1/events", self.ns) if reason in (None, e.get("reason"))]
        return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))


# -- RBAC -----------------------------------------------------------------------------------------

VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch", "DELETE": "delete"}


def operator_calls(kube: kmock.KubernetesEmulator) -> set[tuple[str, str, str, str | None]]:
    """(apiGroup, resource[/subresource], verb, namespace) of every API request the operator made
    (discovery requests are allowed to every authenticated user and are left out)."""
    calls = set()
    for request in kube:
        if (request.headers.get("User-Agent") or "").startswith("kmock/"):
            continue  # the test's own requests
        if request.resource is None or not request.resource.plural or request.action is None:
            continue
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        calls.add((request.resource.group, resource, VERBS[request.action.name], request.namespace))
    return calls


def render_chart(values: JSON) -> list[JSON]:
    with Chart.load(CHART_DIR) as chart:
        rendered = chart.render(values, name="structsim", namespace="structsim-system", is_install=True)
    texts = [text for path, text in rendered.items() if path.endswith((".yaml", ".yml"))]
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def _allows(rules: list[JSON], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and verb in rule.get("verbs", [])
        for rule in rules
    )


def rbac_gaps(calls: set[tuple[str, str, str, str | None]], docs: list[JSON]) -> list[str]:
    """The calls the chart's RBAC would refuse: cluster-wide grants come from ClusterRoleBindings,
    namespaced grants from RoleBindings in the call's namespace."""
    roles = {d["metadata"]["name"]: d.get("rules") or [] for d in docs if d["kind"] == "ClusterRole"}
    cluster = [r for d in docs if d["kind"] == "ClusterRoleBinding" for r in roles.get(d["roleRef"]["name"], [])]
    per_ns: dict[str, list[JSON]] = {}
    for d in docs:
        if d["kind"] == "RoleBinding":
            per_ns.setdefault(d["metadata"]["namespace"], []).extend(roles.get(d["roleRef"]["name"], []))
    gaps = []
    for group, resource, verb, namespace in sorted(calls, key=str):
        if _allows(cluster, group, resource, verb):
            continue
        if namespace is not None and _allows(per_ns.get(namespace, []), group, resource, verb):
            continue
        gaps.append(f"{verb} {group or 'core'}/{resource}" + (f" in {namespace}" if namespace else " (cluster-wide)"))
    return gaps
