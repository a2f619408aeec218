"""GPU products among the nodes, as NVIDIA's GPU Feature Discovery labels them. Pure functions.

- `nvidia.com/gpu.product` names the product, e.g. `NVIDIA-H100-80GB-HBM3`.
- A `-SHARED` suffix marks time-slicing (several pods per GPU): the same hardware, so it shares the
  base product's tuned profile, but its nodes still need a DaemonSet that selects them as labelled.
- A MIG slice under the `single` strategy is labelled like `NVIDIA-A100-SXM4-40GB-MIG-1g.5gb`: a
  different device from the whole GPU, so it is its own product and is tuned on its own.
- Nodes with `nvidia.com/mig.strategy=mixed` expose their slices as `nvidia.com/mig-*` resources,
  which serving pods (asking for `nvidia.com/gpu`) cannot use; they are left out.
- `nvidia.com/gpu.compute.major`/`.minor` give the compute capability, which picks the safe default
  precision before tuning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PRODUCT_LABEL = "nvidia.com/gpu.product"
CC_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
CC_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
GPU_RESOURCE = "nvidia.com/gpu"
SHARED_SUFFIX = "-SHARED"


@dataclass(frozen=True)
class GpuNode:
    """What the operator keeps of a Node: its name, labels and advertised GPU count (None: unknown)."""

    name: str
    labels: Mapping[str, str]
    gpus: int | None = None

    @classmethod
    def from_node(cls, name: str, labels: Mapping[str, str], status: Mapping[str, object] | None) -> GpuNode:
        capacity = (status or {}).get("capacity")
        raw = capacity.get(GPU_RESOURCE) if isinstance(capacity, Mapping) else None
        try:
            gpus = int(str(raw)) if raw is not None else None
        except ValueError:
            gpus = None
        return cls(name=name, labels=dict(labels), gpus=gpus)

    @property
    def product_label(self) -> str | None:
        return self.labels.get(PRODUCT_LABEL) or None

    @property
    def compute_capability(self) -> str | None:
        major, minor = self.labels.get(CC_MAJOR_LABEL), self.labels.get(CC_MINOR_LABEL)
        if major is None or not major.isdigit() or not (minor or "0").isdigit():
            return None
        return f"{int(major)}.{int(minor or 0)}"

    def serves_gpus(self) -> bool:
        """False for nodes whose GPUs a pod asking for `nvidia.com/gpu` cannot get."""
        if self.product_label is None or self.labels.get(MIG_STRATEGY_LABEL) == "mixed":
            return False
        return self.gpus is None or self.gpus > 0


def hardware_of(product_label: str) -> str:
    """The hardware a product label names: time-sliced `-SHARED` is the same GPU as without it."""
    return product_label.removesuffix(SHARED_SUFFIX) if product_label.endswith(SHARED_SUFFIX) else product_label


@dataclass(frozen=True)
class Product:
    """One GPU hardware type among the selected nodes (the unit of tuning)."""

    hardware: str  # the tuning key, e.g. NVIDIA-A100-SXM4-40GB
    labels: tuple[str, ...]  # the product label values on nodes, one DaemonSet each
    nodes: Mapping[str, int] = field(default_factory=dict)  # label value -> node count
    compute_capability: str | None = None

    @property
    def tune_labels(self) -> tuple[str, ...]:
        """Where a tune Job may run: whole GPUs if any, time-sliced ones only if nothing else."""
        exclusive = tuple(label for label in self.labels if not label.endswith(SHARED_SUFFIX))
        return exclusive or self.labels

    @property
    def safe_precision(self) -> str:
        """fp16 where tensor cores make it safe and fast (compute capability >= 7.0), else fp32."""
        return "fp16" if cc_at_least(self.compute_capability, 7, 0) else "fp32"


def cc_at_least(cc: str | None, major: int, minor: int) -> bool:
    if not cc:
        return False
    head, _, tail = cc.partition(".")
    try:
        return (int(head), int(tail or 0)) >= (major, minor)
    except ValueError:
        return False


def matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def select_products(nodes: Iterable[GpuNode], node_selector: Mapping[str, str]) -> list[Product]:
    """The GPU products among the nodes the selector picks, grouped by hardware, sorted by name."""
    counts: dict[str, dict[str, int]] = {}
    capability: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: n.name):  # sorted: the first node's capability wins
        label = node.product_label
        if label is None or not node.serves_gpus() or not matches(node.labels, node_selector):
            continue
        hardware = hardware_of(label)
        per_label = counts.setdefault(hardware, {})
        per_label[label] = per_label.get(label, 0) + 1
        cc = node.compute_capability
        if cc and hardware not in capability:
            capability[hardware] = cc
    return [
        Product(
            hardware=hardware,
            labels=tuple(sorted(per_label)),
            nodes=dict(sorted(per_label.items())),
            compute_capability=capability.get(hardware),
        )
        for hardware, per_label in sorted(counts.items())
    ]
