"""Offline rendering of charts/structsim for the chart tests: Helm v4 embedded (helm-python-sdk), no
helm binary, no cluster. Each helper returns plain data (dicts parsed from the rendered YAML)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "structsim"
CRD_FILE = "similarityservices.structsim.io.yaml"
CRD_SOURCE = ROOT / "operator" / "crd" / CRD_FILE
CRD_COPY = CHART_DIR / "crds" / CRD_FILE
EXAMPLES = ROOT / "examples"
RELEASE = "structsim"
NAMESPACE = "structsim-system"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion), a middle one and the newest
# kubernetes-validate bundles.
KUBE_VERSIONS = ("1.29.0", "1.32.0", "1.37.0")

# Every optional feature on and every default changed, so no template branch goes unrendered.
NON_DEFAULT_VALUES: dict[str, Any] = {
    "fullnameOverride": "simop",
    "commonLabels": {"team": "search"},
    "image": {
        "repository": "registry.example.com/platform/structsim-operator",
        "digest": "sha256:" + "ab" * 32,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "operator": {
        "watchNamespaces": ["team-a", "team-b"],
        "logLevel": "debug",
        "logFormat": "json",
        "resyncIntervalSeconds": 2.5,
        "tuneBackoffSeconds": 30,
        "tuneBackoffMaxSeconds": 600,
        "livenessPort": 9090,
        "env": {"HTTPS_PROXY": "http://proxy.example.com:3128", "NO_PROXY": ".svc,10.0.0.0/8"},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}},
        "runAsUser": None,
        "runAsGroup": None,
        "terminationGracePeriodSeconds": 60,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}]}
                    ]
                }
            }
        },
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/scrape": "false"},
        "podLabels": {"tier": "control"},
    },
    "tunePriorityClass": {"create": False, "value": 1000, "name": "gpu-batch"},
    "serviceAccount": {"create": True, "name": "simop-sa", "annotations": {"example.com/role": "simop"}},
    "networkPolicy": {"enabled": True, "apiServer": {"cidrs": ["10.0.0.1/32", "fd00::1/128"], "ports": [6443]}},
    "podDisruptionBudget": {"enabled": True, "maxUnavailable": "50%"},
}

VALUE_SETS = {"default": None, "non-default": NON_DEFAULT_VALUES}


def render(chart: Chart, values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path (e.g. "structsim/templates/operator-deployment.yaml") → rendered text."""
    return chart.render(values, name=RELEASE, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(template path, text) of every rendered manifest, NOTES.txt left out."""
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            yield path, text


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object the render produced (templates that rendered nothing are skipped)."""
    return [doc for _, text in manifests(rendered) for doc in yaml.safe_load_all(text) if doc]


def render_objects(chart: Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return objects(render(chart, values))


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objs if obj["kind"] == kind]


def the(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The only object of `kind`."""
    found = of_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def pod_templates(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every object that runs pods."""
    specs = []
    for obj in objs:
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "Pod":
            specs.append((obj["metadata"]["name"], spec))
        elif kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
            specs.append((obj["metadata"]["name"], spec["template"]["spec"]))
        elif kind == "CronJob":
            specs.append((obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def assert_locked_down(name: str, pod: dict[str, Any]) -> None:
    """The pod and each container run non-root, with a read-only root filesystem, no privilege
    escalation, no capabilities and the runtime's default seccomp profile; no host namespaces."""
    pod_ctx = pod.get("securityContext", {})
    assert pod_ctx.get("runAsNonRoot") is True, name
    assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, name
    assert pod_ctx.get("runAsUser", 10001) != 0, name
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), (name, key)
    assert all("hostPath" not in volume for volume in pod.get("volumes", [])), name
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = container.get("securityContext", {})
        where = (name, container["name"])
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 10001)) != 0, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("privileged", False) is False, where
        assert ctx.get("capabilities") == {"drop": ["ALL"]}, where
        assert ctx.get("seccompProfile", pod_ctx.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
