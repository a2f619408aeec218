"""GPU memory, utilization and temperature for /metrics, read through NVML (nvidia-ml-py) at scrape time.

Without an NVIDIA driver or GPU, `GpuStats.open()` returns None and the metrics are simply absent.
A reading a device does not support (utilization on a MIG slice, say) is skipped, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pynvml
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuStats(Collector):
    """A Prometheus collector over every GPU NVML sees (in a pod: the GPUs allocated to it)."""

    def __init__(self, nvml: ModuleType, names: list[str]) -> None:
        self._nvml = nvml
        self._names = names

    @classmethod
    def open(cls, nvml: ModuleType = pynvml) -> GpuStats | None:
        """Initialise NVML; None when there is no driver or no GPU."""
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            log.info("no GPU metrics: %s", exc)
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
            names = [_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
        except nvml.NVMLError as exc:
            log.warning("no GPU metrics: %s", exc)
            names = []
        if not names:
            nvml.nvmlShutdown()
            return None
        return cls(nvml, names)

    def close(self) -> None:
        self._nvml.nvmlShutdown()

    def collect(self) -> Iterator[Metric]:
        nvml = self._nvml
        keys = ["gpu", "name"]
        used = GaugeMetricFamily("structsim_gpu_memory_used_bytes", "GPU memory in use", labels=keys)
        total = GaugeMetricFamily("structsim_gpu_memory_total_bytes", "GPU memory size", labels=keys)
        util = GaugeMetricFamily(
            "structsim_gpu_utilization_ratio", "Share of the last sample the GPU was busy", labels=keys
        )
        temp = GaugeMetricFamily("structsim_gpu_temperature_celsius", "GPU core temperature", labels=keys)
        for index, name in enumerate(self._names):
            labels = [str(index), name]
            handle = _read(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:
                continue
            if (memory := _read(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)) is not None:
                used.add_metric(labels, memory.used)
                total.add_metric(labels, memory.total)
            if (rates := _read(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)) is not None:
                util.add_metric(labels, rates.gpu / 100)
            if (celsius := _read(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)) is not None:
                temp.add_metric(labels, celsius)
        yield from (used, total, util, temp)


def _read(nvml: ModuleType, call: Callable[..., Any], *args: Any) -> Any:
    """One NVML reading, or None where the device does not support it (utilization on a MIG slice, say)."""
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older drivers' bindings return bytes
