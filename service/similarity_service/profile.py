"""The tuned profile: what `structsim autotune` writes, `structsim serve --profile` reads and the
operator copies into `status.profiles`. Defined once here; validated whenever it is read.

JSON keys are camelCase so the operator can copy the document into the custom resource's status as is.
No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

SCHEMA_VERSION = 1

Precision = Literal["fp32", "tf32", "fp16", "bf16"]


class ProfileError(ValueError):
    """A profile file that is missing, not JSON, or not a valid profile."""


class PrecisionAccuracy(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """One precision's scores against fp32 on the validation pairs."""

    precision: Precision
    mean_abs_error: Annotated[float, msgspec.Meta(ge=0)]
    max_abs_error: Annotated[float, msgspec.Meta(ge=0)]
    flips: Annotated[int, msgspec.Meta(ge=0)]  # decisions that change at `threshold`
    threshold: Annotated[float, msgspec.Meta(ge=0, le=1)]
    pairs: Annotated[int, msgspec.Meta(ge=1)]
    admissible: bool  # under the tolerance and no flips


class Profile(msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    """The best serving config found on one device type for one model fingerprint."""

    schema_version: Literal[1] = SCHEMA_VERSION
    device: str  # "cuda" | "cpu"
    gpu_product: str | None  # e.g. "NVIDIA-H100-80GB-HBM3" as nvidia.com/gpu.product spells it; None on CPU
    device_name: str  # the name the driver reports, e.g. "NVIDIA H100 80GB HBM3", or the CPU model
    compute_capability: str | None  # "9.0"; None on CPU
    memory_gib: float | None
    precision: Precision
    max_batch_size: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    max_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)]
    throughput: Annotated[float, msgspec.Meta(ge=0)]  # sustained pairs/s with p99 under the SLO
    p50_ms: Annotated[float, msgspec.Meta(ge=0)]
    p99_ms: Annotated[float, msgspec.Meta(ge=0)]
    slo_p99_ms: Annotated[float, msgspec.Meta(gt=0)]
    accuracy: list[PrecisionAccuracy] = []
    model_id: str
    revision: str | None = None
    fingerprint: str
    trials: Annotated[int, msgspec.Meta(ge=0)]
    tuned_at: str  # ISO 8601, UTC
    structsim_version: str


def encode_profile(profile: Profile) -> bytes:
    return msgspec.json.format(msgspec.json.encode(profile), indent=2)


def decode_profile(data: bytes | str) -> Profile:
    try:
        return msgspec.json.decode(data, type=Profile)
    except msgspec.ValidationError as exc:
        raise ProfileError(f"not a valid structsim profile: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ProfileError(f"profile is not JSON: {exc}") from exc


def read_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from exc
    try:
        return decode_profile(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from exc


def write_profile(profile: Profile, path: str | Path) -> None:
    Path(path).write_bytes(encode_profile(profile) + b"\n")
