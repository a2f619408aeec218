"""GPU memory, utilization and temperature for /metrics, read through NVML (nvidia-ml-py) at scrape time.

Without an NVIDIA driver or GPU, `GpuStats.open()` returns None and the metrics are simply absent.
A reading a device does not support (utilization on a MIG slice, say) is skipped, not an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType

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
        labels = ["gpu", "name"]
        used = GaugeMetricFamily("structsim_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("structsim_gpu_memory_total_bytes", "GPU memory size", labels=labels)
        util = GaugeMetricFamily("structsim_gpu_utilization_ratio", "Share of the last sample period the GPU was busy", labels=labels)
        temp = GaugeMetricFamily("structsim_gpu_temperature_celsius", "GPU core temperature", labels=labels)
        for index, name in enumerate(self._names):
            values = [str(index), name]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError:
                continue
            for reading in (
                lambda: _add_memory(used, total, values, nvml.nvmlDeviceGetMemoryInfo(handle)),
                lambda: util.add_metric(values, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100),
                lambda: temp.add_metric(values, nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            ):
                try:
                    reading()
                except nvml.NVMLError:
                    pass  # not supported on this device
        yield from (used, total, util, temp)


def _add_memory(used: GaugeMetricFamily, total: GaugeMetricFamily, labels: list[str], memory: object) -> None:
    used.add_metric(labels, memory.used)  # type: ignore[attr-defined]
    total.add_metric(labels, memory.total)  # type: ignore[attr-defined]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older drivers' bindings return bytes
