"""The SimilarityService resource as typed data: its spec (defaults applied here, in code, the same
as the CRD's) and the tuned profile the operator copies into its status.

The CRD (operator/crd/) is the schema users see; this module is what the operator trusts. A real API
server validates and defaults against the CRD, but the operator must not depend on that (an older
CRD, a dry run, a test server), so parsing repeats the defaults and adds the checks a structural
schema cannot express (int-or-string values, label syntax).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from similarity_operator import quantity
from similarity_operator.gpus import GPU_RESOURCE

GROUP = "structsim.io"
VERSION = "v1alpha1"
PLURAL = "similarityservices"
KIND = "SimilarityService"
API_VERSION = f"{GROUP}/{VERSION}"

PrecisionPolicy = Literal["auto", "fp32", "tf32", "fp16", "bf16"]
Precision = Literal["fp32", "tf32", "fp16", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "tf32", "fp16", "bf16")
Auto = Literal["auto"]

MAX_BATCH_SIZE = 1024
MAX_WAIT_MS = 1000
RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
# Requests without limits make the pods Burstable: the kubelet evicts BestEffort pods first under memory
# pressure, and the scheduler reserves nothing for a pod without requests (the tokenizer, the event loop
# and torch's host threads need CPU). No limits: a CPU limit throttles latency, a memory limit could
# OOM-kill torch.compile's workers during warm-up.
DEFAULT_REQUESTS = {"cpu": "2", "memory": "6Gi"}

# Kubernetes label syntax (apimachinery's validation): optional DNS-subdomain prefix, then a name.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SpecError(ValueError):
    """A spec the operator cannot serve; the message names the field and says what is allowed."""


class _Struct(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


class ModelCache(_Struct, frozen=True):
    pvc: str | None = None  # a PersistentVolumeClaim mounted at /models; None: an emptyDir


class ModelSpec(_Struct, frozen=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    revision: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] = "master"
    cache: ModelCache = msgspec.field(default_factory=ModelCache)
    offline: bool = False  # pods read only the cache volume and never contact the hub


class Batching(_Struct, frozen=True):
    """Micro-batcher limits: a number pins the knob, "auto" leaves it to autotune."""

    max_batch_size: int | Auto = "auto"
    max_wait_ms: int | Auto = "auto"


class Autotune(_Struct, frozen=True):
    enabled: bool = True
    trials: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 30
    p99_ms: Annotated[float, msgspec.Meta(gt=0, le=60000)] = 50.0
    max_abs_error: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.003
    threshold: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.7
    timeout_seconds: Annotated[int, msgspec.Meta(ge=60, le=86400)] = 3600


class Toleration(_Struct, frozen=True, omit_defaults=True):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(_Struct, frozen=True):
    """CPU, memory and ephemeral-storage of serving and tune containers, each quantity written as the API
    server stores it (so rendered containers never drift from their live selves)."""

    requests: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_REQUESTS))
    limits: dict[str, str] = {}


class Spec(_Struct, frozen=True):
    """`spec` of a SimilarityService with every default applied."""

    model: ModelSpec
    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    gpus_per_pod: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    resources: Resources = msgspec.field(default_factory=Resources)
    precision: PrecisionPolicy = "auto"
    batching: Batching = msgspec.field(default_factory=Batching)
    # serve's and autotune's --exact-thresholds: decisions at these are fp32's (pairs near one are scored
    # again in fp32)
    exact_thresholds: Annotated[list[Annotated[float, msgspec.Meta(ge=1e-6, le=0.999999)]], msgspec.Meta(max_length=16)] = []
    autotune: Autotune = msgspec.field(default_factory=Autotune)
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 80

    @property
    def pinned_precision(self) -> Precision | None:
        return None if self.precision == "auto" else self.precision

    @property
    def fully_pinned(self) -> bool:
        """Nothing is left to tune: precision and both batching knobs are pinned."""
        return (
            self.precision != "auto" and self.batching.max_batch_size != "auto" and self.batching.max_wait_ms != "auto"
        )

    @property
    def tunes(self) -> bool:
        """Whether tune Jobs run at all for this spec."""
        return self.autotune.enabled and not self.fully_pinned


def parse_spec(raw: Mapping[str, Any] | None) -> Spec:
    """Validate a resource's `spec` and apply defaults; raise SpecError naming the bad field."""
    if not isinstance(raw, Mapping):
        raise SpecError("spec is missing or not an object")
    data = dict(raw)
    batching = data.get("batching")
    if isinstance(batching, Mapping):
        data["batching"] = {
            **batching,
            "maxBatchSize": _int_or_auto(batching.get("maxBatchSize", "auto"), "maxBatchSize", 1, MAX_BATCH_SIZE),
            "maxWaitMs": _int_or_auto(batching.get("maxWaitMs", "auto"), "maxWaitMs", 0, MAX_WAIT_MS),
        }
    resources = data.get("resources")
    if isinstance(resources, Mapping):
        data["resources"] = {
            **resources,
            **{kind: _quantities(resources[kind], kind) for kind in ("requests", "limits") if kind in resources},
        }
    try:
        spec = msgspec.convert(data, type=Spec)
    except msgspec.ValidationError as exc:
        raise SpecError(_spec_path(str(exc))) from None
    _check_labels(spec.node_selector)
    if spec.model.cache.pvc is not None and not _DNS_SUBDOMAIN.match(spec.model.cache.pvc):
        raise SpecError(f"spec.model.cache.pvc: {spec.model.cache.pvc!r} is not a valid PersistentVolumeClaim name")
    if spec.model.offline and not spec.model.cache.pvc:
        # Without a claim /models is an emptyDir: an offline pod would find no model, every time.
        raise SpecError("spec.model.offline needs spec.model.cache.pvc: a volume pre-loaded with the model")
    for name, limit in spec.resources.limits.items():
        request = spec.resources.requests.get(name)
        if request is not None and quantity.parse(request).value > quantity.parse(limit).value:
            # The API server would refuse the DaemonSet (and retrying would not help): say so here.
            raise SpecError(f"spec.resources.requests.{name}: {request} is above spec.resources.limits.{name}, {limit}")
    return spec


def _quantities(raw: object, kind: str) -> object:
    """Requests or limits with each quantity in the API server's form; names other than RESOURCE_NAMES are
    refused (GPUs are the operator's to set, from gpusPerPod)."""
    if not isinstance(raw, Mapping):
        return raw  # msgspec names the wrong type
    field = f"spec.resources.{kind}"
    result = {}
    for name, value in raw.items():
        if name == GPU_RESOURCE:
            raise SpecError(f"{field}: {name} is set by the operator: use spec.gpusPerPod")
        if name not in RESOURCE_NAMES:
            raise SpecError(f"{field}: {name!r} is not one of {', '.join(RESOURCE_NAMES)}")
        try:
            result[name] = quantity.parse(value).text
        except ValueError as exc:
            raise SpecError(f'{field}.{name}: {exc}: a string like "500m", "2" or "6Gi", or an integer') from None
    return result


def _int_or_auto(value: object, field: str, low: int, high: int) -> int | str:
    """An int-or-string knob: "auto", an integer in [low, high], or such an integer as a string."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f'spec.batching.{field} must be an integer {low}-{high} or "auto", got {value!r}')
    return value


def _spec_path(message: str) -> str:
    # msgspec says "Expected `int` >= 1 - at `$.gpusPerPod`"; users know the field as spec.gpusPerPod.
    text, sep, path = message.rpartition(" - at `")
    if not sep:
        return f"spec: {message}"
    return f"{path.rstrip('`').replace('$', 'spec', 1)}: {text}"


def _check_labels(selector: Mapping[str, str]) -> None:
    for key, value in selector.items():
        prefix, _, name = key.rpartition("/")
        valid_key = bool(name) and _LABEL_NAME.match(name) and (not prefix or _DNS_SUBDOMAIN.match(prefix))
        if not valid_key or len(prefix) > 253:
            raise SpecError(f"spec.nodeSelector: {key!r} is not a valid label key")
        if not _LABEL_NAME.match(value):
            raise SpecError(f"spec.nodeSelector[{key!r}]: {value!r} is not a valid label value")


def fingerprint(spec: Spec) -> str:
    """What a tuned profile is valid for: model, revision, precision policy, pinned batching, SLO, exact
    thresholds (they change the accuracy guard's verdict and each trial's cost), a CPU limit.

    The trial budget and the image are left out on purpose: more trials or a new image tag refine
    the same question, they do not change it. Offline mode is left out too: it changes where the
    weights come from, not which weights they are.
    """
    key: dict[str, object] = {
        "model": spec.model.id,
        "revision": spec.model.revision,
        "precision": spec.precision,
        "maxBatchSize": spec.batching.max_batch_size,
        "maxWaitMs": spec.batching.max_wait_ms,
        "p99Ms": float(spec.autotune.p99_ms),
        "maxAbsError": float(spec.autotune.max_abs_error),
        "threshold": float(spec.autotune.threshold),
    }
    if spec.exact_thresholds:  # only when set, so other resources keep their fingerprints (and profiles)
        key["exactThresholds"] = sorted({float(threshold) for threshold in spec.exact_thresholds})
    # A CPU limit caps the throughput autotune measures (the tokenizer and event loop run on the CPU);
    # requests cap nothing. Only when set, as above.
    if "cpu" in spec.resources.limits:
        key["cpuLimit"] = spec.resources.limits["cpu"]
    canonical = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class TunedProfile(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """The fields of autotune's profile JSON that the operator copies into status.profiles.

    Light on purpose: the service owns the full schema (similarity_service/profile.py), which this
    package must not import. Unknown keys are ignored here; `serve --profile` checks them all.
    """

    precision: Precision
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)]
    throughput: Annotated[float, msgspec.Meta(ge=0)]
    p99_ms: Annotated[float, msgspec.Meta(ge=0)]
    compute_capability: str | None = None
    tuned_at: str


class ProfileError(ValueError):
    """A tune result that is not a usable profile."""


def parse_profile(text: str | None) -> TunedProfile:
    """Check the profile JSON a tune Job reported (its termination message)."""
    if not text or not text.strip():
        raise ProfileError("the tune pod left no termination message")
    try:
        return msgspec.json.decode(text.encode(), type=TunedProfile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"not a valid profile: {exc}") from None
    except msgspec.DecodeError:
        raise ProfileError(f"not JSON: {text.strip()[:200]!r}") from None


def profile_status(gpu_product: str, profile: TunedProfile, compute_capability: str | None, fp: str) -> dict[str, Any]:
    """One entry of status.profiles."""
    entry: dict[str, Any] = {
        "gpuProduct": gpu_product,
        "precision": profile.precision,
        "maxBatchSize": profile.max_batch_size,
        "maxWaitMs": profile.max_wait_ms,
        "throughput": profile.throughput,
        "p99Ms": profile.p99_ms,
        "fingerprint": fp,
        "tunedAt": profile.tuned_at,
    }
    cc = profile.compute_capability or compute_capability
    if cc:
        entry["computeCapability"] = cc
    return entry
