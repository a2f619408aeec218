"""GPU metrics through NVML: present with a GPU, absent without one (no GPU here, so NVML is faked)."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
from prometheus_client import CollectorRegistry, generate_latest

from similarity_service.gpu_stats import GpuStats


class FakeNvml:
    """The few NVML calls gpu_stats makes, for two GPUs; the second cannot report utilization (a MIG slice)."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.shut_down = False

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        pass

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        if handle == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:  # noqa: N802
        return 61


def test_gpu_metrics_from_nvml() -> None:
    nvml = FakeNvml()
    stats = GpuStats.open(nvml)  # type: ignore[arg-type]
    assert stats is not None
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    assert 'structsim_gpu_memory_used_bytes{gpu="0",name="NVIDIA H100 80GB HBM3"} 1.073741824e+09' in text
    assert 'structsim_gpu_memory_total_bytes{gpu="1",name="NVIDIA H100 80GB HBM3"} 8.589934592e+10' in text
    assert 'structsim_gpu_utilization_ratio{gpu="0",name="NVIDIA H100 80GB HBM3"} 0.87' in text
    assert 'structsim_gpu_utilization_ratio{gpu="1"' not in text  # not supported there: skipped, not an error
    assert 'structsim_gpu_temperature_celsius{gpu="1",name="NVIDIA H100 80GB HBM3"} 61.0' in text
    stats.close()
    assert nvml.shut_down


def test_no_gpu_means_no_collector() -> None:
    assert GpuStats.open(FakeNvml(count=0)) is None  # type: ignore[arg-type]
    assert GpuStats.open() is None  # this machine: no NVIDIA driver
