"""Child manifests of a SimilarityService. Pure: spec + GPU product + profile in, dicts out.

Names are deterministic, so a rerun, a restart or a lost event finds the same children instead of
making new ones; they are DNS-safe and at most 63 characters (a Job's name becomes a pod label), with
a hash suffix when a part had to be shortened or rewritten. Every child carries an ownerReference to
the resource (deleting it deletes them) and labels saying which resource and GPU product it serves.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from similarity_operator import gpus, quantity
from similarity_operator.spec import API_VERSION, KIND, Spec, TunedProfile

SERVE_PORT = 8080
PROFILE_DIR = "/etc/structsim"
PROFILE_KEY = "profile.json"
FINGERPRINT_KEY = "fingerprint"
MODELS_DIR = "/models"
TUNE_RESULT = "/dev/termination-log"
# torch.compile's on-disk caches (Inductor's compiled graphs, Triton's kernels) live on the model volume,
# not in /tmp (HOME), an emptyDir that dies with the pod. On one H100, a `structsim serve` whose caches
# were warm was ready in 35.0 s against 74.6 s cold (bench/http_bench.py, first vs second process), so a
# restarted pod, or one on a node whose tune Job already compiled, skips most of the compile. Both write
# a temp file and rename it into place, so pods sharing a ReadWriteMany claim never read half an entry;
# the keys hold the torch, CUDA and Triton versions and the GPU's name, so products and images keep apart.
COMPILE_CACHE_DIR = f"{MODELS_DIR}/.cache"
INDUCTOR_CACHE_DIR = f"{COMPILE_CACHE_DIR}/torchinductor"
TRITON_CACHE_DIR = f"{COMPILE_CACHE_DIR}/triton"
RUN_AS = 10001  # the service image's non-root user and group (images/service.Dockerfile)
# A terminating pod keeps receiving requests until endpoint controllers, kube-proxy and ingresses have
# dropped it (a few seconds). The preStop sleep holds SIGTERM back that long, so the service starts its
# drain (503 to anything new) only once traffic has moved to other pods. `sleep` is in the image's base
# (python slim); the native sleep action needs Kubernetes 1.30 and the chart supports 1.29.
PRESTOP_SLEEP_S = 5
# The kubelet kills the pod this long after it starts terminating, preStop included: the sleep, serve's
# drain (drain_timeout_s, 25 s by default), uvicorn's 5 s to finish writing responses, and margin.
# tests/operator checks it against serve's own settings.
TERMINATION_GRACE_S = 45
# serve's --workers per pod: one per this much requested CPU and memory, at most MAX_WORKERS.
CPUS_PER_WORKER = 4
MEMORY_PER_WORKER = 8 << 30
MAX_WORKERS = 3

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_SERVICE = "structsim.io/service"
LABEL_PRODUCT = "structsim.io/gpu-product"
LABEL_FINGERPRINT = "structsim.io/fingerprint"
LABEL_ATTEMPT = "structsim.io/attempt"
LABEL_TUNE_JOB = "structsim.io/tune-job"
ANNOTATION_CONFIG_HASH = "structsim.io/config-hash"
MANAGED_BY = "structsim-operator"

COMPONENT_SERVER = "server"
COMPONENT_TUNE = "autotune"
COMPONENT_PROFILE = "profile"
COMPONENT_SERVICE = "service"

_MAX_NAME = 63
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True)
class Owner:
    """The resource that owns the children."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _digest(text: str, size: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def child_name(*parts: str, letter_first: bool = False) -> str:
    """A DNS-1123 label from the parts; hashed when shortened or when characters were replaced."""
    raw = "-".join(parts).lower()
    name = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", raw)).strip("-")
    starts_ok = bool(name) and (name[0].isalpha() if letter_first else name[0].isalnum())
    if name == raw and len(name) <= _MAX_NAME and starts_ok:
        return name
    head = name[: _MAX_NAME - 9].rstrip("-")
    if letter_first and not (head and head[0].isalpha()):
        head = ("s-" + head)[: _MAX_NAME - 9].rstrip("-")
    return f"{head}-{_digest(raw)}" if head else f"s-{_digest(raw)}"


def label_value(text: str) -> str:
    """The text as a valid label value (63 characters), hashed when it does not fit as is."""
    if _LABEL_VALUE.match(text) and len(text) <= _MAX_NAME:
        return text
    return child_name(text)


def service_name(owner: Owner) -> str:
    return child_name(owner.name, letter_first=True)


def daemonset_name(owner: Owner, product_label: str) -> str:
    return child_name(owner.name, product_label)


def configmap_name(owner: Owner, hardware: str) -> str:
    return child_name(owner.name, "profile", hardware)


def job_name(owner: Owner, hardware: str, fp: str, attempt: int) -> str:
    return child_name(owner.name, "tune", hardware, fp[:8], str(attempt))


def endpoint(owner: Owner, port: int) -> str:
    suffix = "" if port == 80 else f":{port}"
    return f"http://{service_name(owner)}.{owner.namespace}.svc{suffix}"


def owned_selector(owner: Owner) -> str:
    """The label selector that lists this resource's children."""
    return f"{LABEL_SERVICE}={label_value(owner.name)},{LABEL_MANAGED_BY}={MANAGED_BY}"


def labels(owner: Owner, component: str, product: str | None = None) -> dict[str, str]:
    result = {
        LABEL_NAME: "structsim",
        LABEL_INSTANCE: label_value(owner.name),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_SERVICE: label_value(owner.name),
    }
    if product is not None:
        result[LABEL_PRODUCT] = product
    return result


def _metadata(owner: Owner, name: str, labels_: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels_,
        "ownerReferences": [owner.reference()],
        **extra,
    }


@dataclass(frozen=True)
class Serving:
    """How one GPU product's pods serve: a tuned profile, the safe default, or what the spec pins."""

    mode: Literal["tuned", "default", "pinned"]
    precision: str
    args: tuple[str, ...]
    profile_json: str | None = None

    @property
    def config_hash(self) -> str:
        """Changes whenever what the pods run changes, so the DaemonSet rolls (the ConfigMap's
        content is mounted, and a changed ConfigMap alone would not restart anything)."""
        return _digest(json.dumps([list(self.args), self.profile_json]), 16)


def serving(spec: Spec, product: gpus.Product, profile: TunedProfile | None, profile_json: str | None) -> Serving:
    """The serving config of a product: its tuned profile if it has one for the current fingerprint."""
    if profile is not None and profile_json is not None:
        return Serving("tuned", profile.precision, ("--profile", f"{PROFILE_DIR}/{PROFILE_KEY}"), profile_json)
    precision = spec.pinned_precision or product.safe_precision
    args = ["--precision", precision]
    if spec.batching.max_batch_size != "auto":
        args += ["--max-batch-size", str(spec.batching.max_batch_size)]
    if spec.batching.max_wait_ms != "auto":
        args += ["--max-wait-ms", str(spec.batching.max_wait_ms)]
    return Serving("pinned" if spec.fully_pinned else "default", precision, tuple(args))


def render_service(owner: Owner, spec: Spec) -> dict[str, Any]:
    selector = {LABEL_SERVICE: label_value(owner.name), LABEL_COMPONENT: COMPONENT_SERVER}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, service_name(owner), labels(owner, COMPONENT_SERVICE)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": spec.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def render_configmap(owner: Owner, hardware: str, fp: str, profile_json: str | None) -> dict[str, Any]:
    """The product's record: the fingerprint it is tuned (or being tuned) for, and the profile once
    tuned. Serving pods mount it at /etc/structsim; it outlives the product's nodes, so a node pool
    that scales to zero and back does not tune again."""
    data = {FINGERPRINT_KEY: fp}
    if profile_json is not None:
        data[PROFILE_KEY] = profile_json
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, configmap_name(owner, hardware), labels(owner, COMPONENT_PROFILE, hardware)),
        "data": data,
    }


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,  # the model cache volume must be writable by that user
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env() -> list[dict[str, str]]:
    return [
        {"name": "STRUCTSIM_CACHE_DIR", "value": MODELS_DIR},
        {"name": "HOME", "value": "/tmp"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": INDUCTOR_CACHE_DIR},
        {"name": "TRITON_CACHE_DIR", "value": TRITON_CACHE_DIR},
    ]


def _models_volume(spec: Spec) -> dict[str, Any]:
    if spec.model.cache.pvc:
        return {"name": "models", "persistentVolumeClaim": {"claimName": spec.model.cache.pvc}}
    return {"name": "models", "emptyDir": {}}


def _exact_threshold_args(spec: Spec) -> list[str]:
    """serve's and autotune's --exact-thresholds, only when the spec names some (so other specs' pods and
    tune Jobs keep their args)."""
    if not spec.exact_thresholds:
        return []
    return ["--exact-thresholds", ",".join(f"{threshold:.6f}".rstrip("0") for threshold in spec.exact_thresholds)]


def _model_args(spec: Spec) -> list[str]:
    """The model flags serve and autotune share. `--offline` only when asked for, so a spec that
    does not use it renders the same args as before the field existed (no rollout on upgrade)."""
    args = ["--model", spec.model.id, "--revision", spec.model.revision]
    return [*args, "--offline"] if spec.model.offline else args


def _devices_args(spec: Spec) -> list[str]:
    """A pod given several GPUs serves on all of them (one engine replica per GPU; the device plugin makes
    exactly the pod's GPUs visible). One GPU renders no flag, so such pods keep their args (no rollout)."""
    return ["--devices", "auto"] if spec.gpus_per_pod > 1 else []


def _workers_args(spec: Spec) -> list[str]:
    """serve's `--workers` from what the pod requests: one serving process per 4 CPUs and 8Gi of memory
    requested, 1 to 3 (serve's own `auto` counts the node's cores, which a pod without a CPU limit sees, and
    each process takes ~3 cores and ~8 GB under load; docs/performance.md). Always rendered, so serve
    never starts more processes than the scheduler reserved room for."""
    requests = spec.resources.requests
    cpus = quantity.parse(requests.get("cpu", "0")).value
    memory = quantity.parse(requests.get("memory", "0")).value
    count = min(MAX_WORKERS, int(cpus // CPUS_PER_WORKER), int(memory // MEMORY_PER_WORKER))
    return ["--workers", str(max(1, count))]


def _tolerations(spec: Spec) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(toleration) for toleration in spec.tolerations]


def _resources(spec: Spec, gpus_: int) -> dict[str, Any]:
    """The spec's requests and limits plus the GPUs, in limits only (a GPU request defaults to its limit)."""
    resources: dict[str, Any] = {"requests": dict(spec.resources.requests)} if spec.resources.requests else {}
    resources["limits"] = {**spec.resources.limits, gpus.GPU_RESOURCE: str(gpus_)}
    return resources


def _container_base(spec: Spec, name: str, args: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": spec.image,
        "command": ["structsim"],
        "args": args,
        "env": _env(),
        "securityContext": _security_context(),
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def render_daemonset(owner: Owner, spec: Spec, product_label: str, config: Serving, configmap: str) -> dict[str, Any]:
    """The serving pods on every node labelled with this product value."""
    selector = {
        LABEL_SERVICE: label_value(owner.name),
        LABEL_COMPONENT: COMPONENT_SERVER,
        LABEL_PRODUCT: product_label,
    }
    pod_labels = {**labels(owner, COMPONENT_SERVER, product_label), **selector}
    args = [
        "serve",
        *_model_args(spec),
        *config.args,
        *_exact_threshold_args(spec),
        *_devices_args(spec),
        *_workers_args(spec),
        "--host",
        "0.0.0.0",
        "--port",
        str(SERVE_PORT),
    ]
    container = _container_base(spec, "server", args)
    container.update(
        {
            "ports": [{"name": "http", "containerPort": SERVE_PORT, "protocol": "TCP"}],
            "readinessProbe": {
                "httpGet": {"path": "/readyz", "port": "http"},
                "periodSeconds": 5,
                "failureThreshold": 3,
            },
            "livenessProbe": {
                "httpGet": {"path": "/healthz", "port": "http"},
                "periodSeconds": 10,
                "failureThreshold": 3,
            },
            # A first start downloads the model and warms up; give it 10 minutes before liveness counts.
            "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
            "startupProbe": {
                "httpGet": {"path": "/healthz", "port": "http"},
                "periodSeconds": 10,
                "failureThreshold": 60,
            },
            "resources": _resources(spec, spec.gpus_per_pod),
            "volumeMounts": [
                {"name": "tmp", "mountPath": "/tmp"},
                {"name": "models", "mountPath": MODELS_DIR},
                {"name": "profile", "mountPath": PROFILE_DIR, "readOnly": True},
            ],
        }
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _metadata(
            owner, daemonset_name(owner, product_label), labels(owner, COMPONENT_SERVER, product_label)
        ),
        "spec": {
            "selector": {"matchLabels": selector},
            # One GPU pod per node and no spare GPU to surge into: replace one node's pod at a time.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {ANNOTATION_CONFIG_HASH: config.config_hash}},
                "spec": {
                    "nodeSelector": {**spec.node_selector, gpus.PRODUCT_LABEL: product_label},
                    "tolerations": _tolerations(spec),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "containers": [container],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {}},
                        _models_volume(spec),
                        {"name": "profile", "configMap": {"name": configmap}},
                    ],
                },
            },
        },
    }


def _number(value: float) -> str:
    return repr(float(value))


def tune_args(spec: Spec, hardware: str) -> list[str]:
    """`structsim autotune ...` for one GPU product; pinned knobs are passed so they are not tuned."""
    args = [
        "autotune",
        *_model_args(spec),
        "--gpu-product",
        hardware,
        "--precision",
        spec.precision,
    ]
    if spec.batching.max_batch_size != "auto":
        args += ["--max-batch-size", str(spec.batching.max_batch_size)]
    if spec.batching.max_wait_ms != "auto":
        args += ["--max-wait-ms", str(spec.batching.max_wait_ms)]
    # Tuned as served: the accuracy guard sees the decisions fp32 rescoring fixes, trials pay its cost.
    args += _exact_threshold_args(spec)
    args += [
        "--trials",
        str(spec.autotune.trials),
        "--p99-ms",
        _number(spec.autotune.p99_ms),
        "--max-abs-error",
        _number(spec.autotune.max_abs_error),
        "--threshold",
        _number(spec.autotune.threshold),
        "--out",
        "/tmp/profile.json",
        "--termination-log",
        TUNE_RESULT,
    ]
    return args


def render_job(
    owner: Owner, spec: Spec, product: gpus.Product, fp: str, attempt: int, priority_class: str | None = None
) -> dict[str, Any]:
    """One tuning attempt on one GPU product. The profile comes back as the pod's termination
    message; the Job never retries by itself (backoffLimit 0): the operator retries with backoff.
    A priority class lets the tune pod preempt a serving pod where serving holds every GPU."""
    name = job_name(owner, product.hardware, fp, attempt)
    job_labels = {
        **labels(owner, COMPONENT_TUNE, product.hardware),
        LABEL_FINGERPRINT: fp,
        LABEL_ATTEMPT: str(attempt),
    }
    container = _container_base(spec, COMPONENT_TUNE, tune_args(spec, product.hardware))
    container.update(
        {
            "terminationMessagePath": TUNE_RESULT,
            "terminationMessagePolicy": "File",
            # Tuning measures one device; the profile applies to each GPU of a serving pod alike. The CPU
            # and memory are the serving pods', so the trials measure what the pods will have.
            "resources": _resources(spec, 1),
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "models", "mountPath": MODELS_DIR}],
        }
    )
    pod_spec: dict[str, Any] = {"priorityClassName": priority_class} if priority_class else {}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": gpus.PRODUCT_LABEL, "operator": "In", "values": list(product.tune_labels)}
                        ]
                    },
                ]
            }
        }
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, name, job_labels),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": spec.autotune.timeout_seconds,
            "template": {
                "metadata": {"labels": {**job_labels, LABEL_TUNE_JOB: name}},
                "spec": {
                    **pod_spec,
                    "restartPolicy": "Never",
                    "nodeSelector": dict(spec.node_selector),
                    "affinity": affinity,
                    "tolerations": _tolerations(spec),
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}, _models_volume(spec)],
                },
            },
        },
    }


def is_owned_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner.uid for ref in refs)
