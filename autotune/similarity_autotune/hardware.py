"""What device the study tunes: GPU product, compute capability, memory and driver, or the CPU.

NVML (nvidia-ml-py) is asked first because it reports the driver and the same product name the
Kubernetes GPU feature discovery publishes; torch is the fallback where NVML is missing (e.g. a
container without the driver's libnvidia-ml). On a CPU the model name and usable core count.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from similarity_service.host import usable_cores

DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """The device a study runs on. Build one directly to simulate a device (tests, planning)."""

    device: DeviceKind
    name: str  # "NVIDIA H100 80GB HBM3" or the CPU model
    compute_capability: str | None = None  # "9.0"; None on CPU
    memory_gib: float | None = None  # total device memory; None on CPU
    driver: str | None = None  # NVIDIA driver version where known
    cpu_cores: int = 1
    gpu_product: str | None = None  # the `nvidia.com/gpu.product` label value; None on CPU

    @property
    def capability(self) -> tuple[int, int] | None:
        """Compute capability as (major, minor), for comparisons."""
        if self.compute_capability is None:
            return None
        major, _, minor = self.compute_capability.partition(".")
        return int(major), int(minor or 0)

    @property
    def product(self) -> str:
        """A stable product key for study names: the GPU product, or `cpu-<model>`."""
        if self.gpu_product:
            return self.gpu_product
        return product_label(self.name) if self.device == "cuda" else f"cpu-{product_label(self.name)}"


def product_label(name: str) -> str:
    """Spell a device name the way GPU feature discovery writes `nvidia.com/gpu.product`."""
    return "-".join(name.split())


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def detect_hardware(device: str = "auto", *, gpu_product: str | None = None) -> Hardware:
    """Describe the device the engine will run on (`device`: auto, cpu, cuda, cuda:N). `gpu_product`
    overrides the derived label (the operator passes the node's `nvidia.com/gpu.product`, so profiles
    match its key exactly). Raises `similarity_service.precision.DeviceError` for a device not here."""
    from similarity_service.precision import resolve_device  # the engine's rule, so both agree

    resolved = resolve_device(device)
    if resolved.type == "cpu":
        return Hardware(device="cpu", name=cpu_model(), cpu_cores=usable_cores())
    index = resolved.index or 0
    found = _from_nvml(index) or _from_torch(index)
    return Hardware(
        device="cuda",
        name=found.name,
        compute_capability=found.compute_capability,
        memory_gib=found.memory_gib,
        driver=found.driver,
        cpu_cores=usable_cores(),
        gpu_product=gpu_product or product_label(found.name),
    )


def _nvml_uuid(index: int) -> str | None:
    """The NVML UUID of torch's device `index`: NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so
    the device is matched by UUID, never by position."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _from_nvml(index: int) -> Hardware | None:
    try:
        import pynvml
    except ImportError:
        return None
    uuid = _nvml_uuid(index)
    if uuid is None:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
    return Hardware(
        device="cuda",
        name=_text(name),
        compute_capability=f"{major}.{minor}",
        memory_gib=round(memory / 2**30, 2),
        driver=_text(driver),
    )


def _from_torch(index: int) -> Hardware:
    import torch

    props = torch.cuda.get_device_properties(index)
    return Hardware(
        device="cuda",
        name=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        memory_gib=round(props.total_memory / 2**30, 2),
    )


def _text(value: str | bytes) -> str:
    """NVML bindings return str, older ones bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)
