"""What the host gives this process: CPU cores, as its affinity mask and its cgroup's CPU quota allow, and
NVIDIA GPUs. No torch here: CUDA must not be initialised in a process that spawns the serving workers."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pynvml

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1 = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPU cores this process may use: the affinity mask (which cpusets narrow), and no more than its
    cgroup's CPU quota rounded up (a Kubernetes CPU limit shows only there: the mask keeps every core)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota is not None else cores


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period the cgroup allows (cgroup v2 `cpu.max`, else v1's CFS files), or None
    where there is no quota or no cgroup file to read (outside a container the root has none)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """Bytes of memory the cgroup may use (cgroup v2 `memory.max`, else v1's limit), or None where unlimited."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            return None
        return limit if limit < UNLIMITED_V1 else None
    return None


class Gpus(NamedTuple):
    count: int  # NVIDIA GPUs CUDA would show this process
    smallest_memory_bytes: int  # of the GPUs the driver shows; 0 without any


def visible_gpus(env: Mapping[str, str] = os.environ, nvml: ModuleType = pynvml) -> Gpus:
    """The GPUs CUDA would show: `CUDA_VISIBLE_DEVICES`' entries where it is set (up to the first invalid
    one, as CUDA reads it), else every GPU the driver has; none without a driver."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return Gpus(0, 0)
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())]
        memory = [int(nvml.nvmlDeviceGetMemoryInfo(handle).total) for handle in handles]
    except nvml.NVMLError:
        return Gpus(0, 0)
    finally:
        nvml.nvmlShutdown()
    if not memory:
        return Gpus(0, 0)
    count = len(memory)
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        count = 0
        for entry in listed.split(","):
            if not entry.strip() or entry.strip().startswith("-"):
                break
            count += 1
    return Gpus(min(count, len(memory)), min(memory))
