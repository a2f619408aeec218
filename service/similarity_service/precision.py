"""Devices and precision modes: which precisions a device can run, and what each means for torch.

On CUDA a precision needs Tensor Cores of a minimum compute capability: fp16 ≥ 7.0 (Volta),
bf16 and tf32 ≥ 8.0 (Ampere). The CPU runs fp32 only. The capability can be passed in, so the
refusal of a mode is testable without that GPU (and the GPU smoke benchmark simulates a 7.5 card).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
AUTO = "auto"
# The lowest CUDA compute capability on which each precision runs on Tensor Cores.
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fp32": (0, 0), "tf32": (8, 0), "fp16": (7, 0), "bf16": (8, 0)}
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class PrecisionError(ValueError):
    """A precision the device cannot run, or an unknown precision name."""


class DeviceError(ValueError):
    """A device that does not exist here (e.g. "cuda" on a machine without a GPU)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the engine reports about its device."""

    device: torch.device
    name: str  # "NVIDIA H100 80GB HBM3" or the CPU model
    capability: tuple[int, int] | None  # CUDA compute capability; None on CPU


def resolve_device(device: str = AUTO) -> torch.device:
    """ "auto" → the current CUDA device if there is one, else the CPU; "cuda" → "cuda:<current>"."""
    if device == AUTO:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but torch sees no CUDA GPU here (use --device cpu)")
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> DeviceFacts:
    """Name and compute capability of a resolved device."""
    if device.type == "cuda":
        return DeviceFacts(device, torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    return DeviceFacts(device, _cpu_name(), None)


def supported_precisions(device: str | torch.device, *, capability: tuple[int, int] | None = None) -> list[str]:
    """Precisions `device` can run, fastest-to-use order aside: fp32, tf32, fp16, bf16 as supported.

    `capability` overrides the CUDA compute capability (for tests and simulations); it is read from the
    device when not given.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return ["fp32"]
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return [precision for precision in PRECISIONS if tuple(capability) >= MIN_CAPABILITY[precision]]


def resolve_precision(
    requested: str,
    device: str | torch.device,
    *,
    capability: tuple[int, int] | None = None,
    device_name: str | None = None,
) -> str:
    """The precision to run: `requested` if the device supports it, or the default for "auto".

    "auto" is fp16 on CUDA ≥ 7.0 and fp32 otherwise. Raises PrecisionError naming the device, its
    capability and the modes it supports.
    """
    if requested != AUTO and requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}: choose one of {AUTO}, {', '.join(PRECISIONS)}")
    device = torch.device(device)
    supported = supported_precisions(device, capability=capability)
    if requested == AUTO:
        return "fp16" if "fp16" in supported else "fp32"
    if requested in supported:
        return requested
    if device.type == "cpu":
        raise PrecisionError(f"precision {requested} is not available on the CPU, which runs fp32 only")
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    if device_name is None:
        device_name = torch.cuda.get_device_name(device)
    need = ".".join(map(str, MIN_CAPABILITY[requested]))
    have = ".".join(map(str, capability))
    raise PrecisionError(
        f"precision {requested} needs CUDA compute capability >= {need}, but {device_name} ({device}) has {have}; "
        f"it supports: {', '.join(supported)}"
    )


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype weights and activations are held in (tf32 is fp32 storage with TF32 matmuls)."""
    return _DTYPES[precision]


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run fp32 matmuls as TF32 inside the block when precision is tf32; restore the process setting after.

    torch keeps this setting per process, so it is switched only around the engine's own forward.
    """
    if precision != "tf32":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (Linux), else what the platform module knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"
