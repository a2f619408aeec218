"""The resource's status from what the reconcile saw and did. Pure.

phase (the first rule that applies; an invalid spec is Degraded before any of these):
- Pending: no selected node has a GPU product;
- Degraded: a GPU product's tuning failed (it serves the safe default while a retry waits);
- Tuning: a tune Job runs;
- Ready: every serving pod of every GPU product is available;
- Tuning: a new config is still rolling out to the pods;
- Pending: no serving pod is available yet;
- Degraded: some serving pods are unavailable.
Conditions Ready and Tuned carry the reasons; lastTransitionTime moves only when a status changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

TuneState = Literal["tuned", "pinned", "disabled", "running", "failed"]


@dataclass(frozen=True)
class ProductReport:
    """What one GPU product label ended up with in this reconcile."""

    gpu_product: str  # the node label value
    hardware: str
    nodes: int
    daemonset: str
    daemonset_status: Mapping[str, Any]
    daemonset_generation: int
    config: Literal["tuned", "default", "pinned"]
    precision: str
    tune: TuneState
    tune_message: str = ""

    @property
    def desired(self) -> int:
        return int(self.daemonset_status.get("desiredNumberScheduled") or 0)

    @property
    def available(self) -> int:
        return int(self.daemonset_status.get("numberAvailable") or 0)

    @property
    def rolling(self) -> bool:
        """A new pod template is still being rolled out (only known once the controller saw it)."""
        observed = self.daemonset_status.get("observedGeneration")
        if observed is None:
            return False
        updated = int(self.daemonset_status.get("updatedNumberScheduled") or 0)
        return int(observed) < self.daemonset_generation or updated < self.desired

    def entry(self) -> dict[str, Any]:
        return {
            "gpuProduct": self.gpu_product,
            "nodes": self.nodes,
            "daemonSet": self.daemonset,
            "desired": self.desired,
            "available": self.available,
            "config": self.config,
            "precision": self.precision,
        }


def condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """A condition; it keeps its lastTransitionTime while its status stays the same."""
    status = "True" if ok else "False"
    since = now.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    for old in previous:
        if old.get("type") == type_ and old.get("status") == status and old.get("lastTransitionTime"):
            since = old["lastTransitionTime"]
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": generation,
    }


def phase(products: Sequence[ProductReport]) -> str:
    if not products:
        return "Pending"
    if any(p.tune == "failed" for p in products):
        return "Degraded"
    if any(p.tune == "running" for p in products):
        return "Tuning"
    if all(p.desired > 0 and p.available >= p.desired for p in products):
        return "Ready"
    if any(p.rolling for p in products):
        return "Tuning"
    if sum(p.available for p in products) == 0:
        return "Pending"
    return "Degraded"


def ready_condition(products: Sequence[ProductReport]) -> tuple[bool, str, str]:
    if not products:
        return False, "NoGpuNodes", "no selected node has an nvidia.com/gpu.product label (see spec.nodeSelector)"
    desired = sum(p.desired for p in products)
    available = sum(p.available for p in products)
    ok = all(p.desired > 0 and p.available >= p.desired for p in products)
    message = f"{available}/{desired} serving pods available on {len(products)} GPU product(s)"
    return ok, "AllPodsReady" if ok else "PodsNotReady", message


def tuned_condition(products: Sequence[ProductReport]) -> tuple[bool, str, str]:
    if not products:
        return False, "NoGpuNodes", "nothing to tune: no GPU product among the selected nodes"
    by_state: dict[str, list[str]] = {}
    for p in products:
        if p.hardware not in by_state.get(p.tune, []):
            by_state.setdefault(p.tune, []).append(p.hardware)
    messages = [p.tune_message for p in products if p.tune_message]
    if "failed" in by_state:
        return False, "TuneFailed", "; ".join(dict.fromkeys(messages))
    if "running" in by_state:
        return False, "Tuning", "tuning " + ", ".join(by_state["running"])
    if "disabled" in by_state:
        return False, "AutotuneDisabled", "spec.autotune.enabled is false: serving the safe default or pinned values"
    if set(by_state) == {"pinned"}:
        return True, "Pinned", "precision and batching are pinned in the spec: nothing to tune"
    return True, "Tuned", "tuned: " + ", ".join(by_state.get("tuned", []))


def summary(products: Sequence[ProductReport], profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The printer columns: precisions in use, and the slowest tuned GPU type's throughput and p99."""
    result: dict[str, Any] = {
        "precision": ",".join(sorted({p.precision for p in products})) or None,
        "throughput": None,
        "p99Ms": None,
    }
    if profiles:
        slowest = min(profiles, key=lambda entry: entry["throughput"])
        result["throughput"] = int(slowest["throughput"])
        result["p99Ms"] = slowest["p99Ms"]
    return result
