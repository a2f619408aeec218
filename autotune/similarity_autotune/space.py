"""The search space: the service settings a tuned profile sets, bounded by what this device can do.

Parameter names are `similarity_service.settings.Settings` field names (`precision`, `max_batch_size`,
`max_wait_ms`), so a trial's params are a settings override as they stand. The space follows the
hardware: only precisions the device supports (fp16 needs compute capability 7.0, tf32 and bf16 8.0;
the CPU runs fp32), and a largest batch bounded by device memory. A knob the user pins is a
one-value range, so pinned and free knobs flow through the same code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Protocol

from similarity_autotune.hardware import Hardware

MAX_BATCH_SIZE = 1024
MAX_WAIT_MS = 20.0
# Share of free device memory the activations of one batch may take (weights, the CUDA context and
# the allocator's fragmentation need the rest).
ACTIVATION_MEMORY_SHARE = 0.5


class TrialLike(Protocol):
    """The part of `optuna.trial.Trial` the space uses."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """One point of the space; field names are the service's settings names."""

    precision: str
    max_batch_size: int
    max_wait_ms: float

    def params(self) -> dict[str, Any]:
        """As Optuna params (and as a settings override)."""
        return asdict(self)

    def label(self) -> str:
        return f"{self.precision} batch {self.max_batch_size} wait {self.max_wait_ms:.2f} ms"


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Ranges of the tuned settings. A range with low == high is a pinned knob."""

    precisions: tuple[str, ...]
    max_batch_size: tuple[int, int] = (1, MAX_BATCH_SIZE)  # searched on a log scale
    max_wait_ms: tuple[float, float] = (0.0, MAX_WAIT_MS)

    def __post_init__(self) -> None:
        if not self.precisions:
            raise ValueError("the search space has no precision")
        low, high = self.max_batch_size
        if not 1 <= low <= high:
            raise ValueError(f"max_batch_size range {low}..{high} is empty")
        low_wait, high_wait = self.max_wait_ms
        if not 0 <= low_wait <= high_wait:
            raise ValueError(f"max_wait_ms range {low_wait}..{high_wait} is empty")

    def suggest(self, trial: TrialLike) -> ServingConfig:
        """Sample one config through Optuna's define-by-run API."""
        return ServingConfig(
            precision=trial.suggest_categorical("precision", list(self.precisions)),
            max_batch_size=trial.suggest_int("max_batch_size", *self.max_batch_size, log=True),
            max_wait_ms=trial.suggest_float("max_wait_ms", *self.max_wait_ms),
        )

    def clamp(self, config: ServingConfig) -> ServingConfig:
        """The nearest config inside the space (the default may lie outside a pinned or bounded one)."""
        precision = config.precision if config.precision in self.precisions else self.precisions[0]
        return ServingConfig(
            precision=precision,
            max_batch_size=min(max(config.max_batch_size, self.max_batch_size[0]), self.max_batch_size[1]),
            max_wait_ms=min(max(config.max_wait_ms, self.max_wait_ms[0]), self.max_wait_ms[1]),
        )

    def grid(self, batch_points: int, wait_points: Sequence[float]) -> list[ServingConfig]:
        """An exhaustive grid: every precision × `batch_points` log-spaced batch sizes × the waits
        (clamped into the range; duplicates dropped)."""
        sizes = sorted({round(v) for v in _log_points(*self.max_batch_size, batch_points)})
        low, high = self.max_wait_ms
        waits = sorted({min(max(float(w), low), high) for w in wait_points})
        return [
            ServingConfig(precision=p, max_batch_size=b, max_wait_ms=w)
            for p in self.precisions
            for b in sizes
            for w in waits
        ]

    def key(self) -> str:
        """A short stable hash of the ranges, part of the study name (Optuna refuses changed ranges)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def device_precisions(hardware: Hardware) -> list[str]:
    """The precisions the engine can run on this device (the engine's own rule)."""
    from similarity_service.precision import supported_precisions

    return supported_precisions(hardware.device, capability=hardware.capability)


def build_space(
    hardware: Hardware,
    *,
    precision: str = "auto",
    max_batch_size: int | None = None,
    max_wait_ms: float | None = None,
    batch_limit: int = MAX_BATCH_SIZE,
) -> SearchSpace:
    """The space for this device. `precision` other than "auto" and the batch/wait values pin those
    knobs. `batch_limit` is the most pairs the device can hold in one batch (see `memory_batch_limit`).

    Raises `similarity_service.precision.PrecisionError` for a precision the device cannot run.
    """
    from similarity_service.precision import resolve_precision

    supported = device_precisions(hardware)
    if precision == "auto":
        precisions = tuple(supported)
    else:
        precisions = (
            resolve_precision(precision, hardware.device, capability=hardware.capability, device_name=hardware.name),
        )
    high = max(1, min(MAX_BATCH_SIZE, batch_limit))
    batch = (max_batch_size, max_batch_size) if max_batch_size is not None else (1, high)
    wait = (max_wait_ms, max_wait_ms) if max_wait_ms is not None else (0.0, MAX_WAIT_MS)
    return SearchSpace(precisions=precisions, max_batch_size=batch, max_wait_ms=wait)


def default_config(hardware: Hardware, space: SearchSpace) -> ServingConfig:
    """What `structsim serve` runs untuned (its settings defaults, precision "auto"), inside the space."""
    from similarity_service.precision import resolve_precision
    from similarity_service.settings import Settings

    defaults = Settings()
    precision = resolve_precision(defaults.precision, hardware.device, capability=hardware.capability)
    return space.clamp(
        ServingConfig(precision=precision, max_batch_size=defaults.max_batch_size, max_wait_ms=defaults.max_wait_ms)
    )


def memory_batch_limit(hardware: Hardware, model_dir: str | Path, max_seq_len: int) -> int:
    """The largest batch whose activations fit a share of the device's memory, for a worst-case
    (`max_seq_len`) batch: per pair and layer the hidden states, the feed-forward intermediate and the
    attention scores and probabilities, held in at most 4 bytes. Weights are counted too."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    per_pair = 4 * max_seq_len * (4 * hidden + inter + 2 * heads * max_seq_len)
    memory = hardware.memory_gib * 2**30 if hardware.memory_gib is not None else _host_memory_bytes()
    weights = 4 * config["num_hidden_layers"] * (4 * hidden * hidden + 2 * hidden * inter)
    weights += 4 * hidden * (config.get("vocab_size", 21128) + config.get("max_position_embeddings", 512))
    budget = (memory - weights) * ACTIVATION_MEMORY_SHARE
    return max(1, min(MAX_BATCH_SIZE, math.floor(budget / per_pair)))


def _host_memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest 8 GiB
        return 8.0 * 2**30


def _log_points(low: int, high: int, count: int) -> list[float]:
    if count <= 1 or low == high:
        return [float(low)]
    ratio = (high / low) ** (1 / (count - 1))
    return [low * ratio**i for i in range(count)]
