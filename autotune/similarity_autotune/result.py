"""A finished study as a tuned profile, or as a clear explanation of why no config qualified."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from optuna.trial import FrozenTrial, TrialState

from similarity_service import __version__
from similarity_service.engine_api import EngineInfo
from similarity_service.profile import PrecisionAccuracy, Profile

from similarity_autotune.hardware import Hardware
from similarity_autotune.objective import ATTR_P50, ATTR_P99, ATTR_STEPS


def build_profile(
    best: FrozenTrial,
    *,
    hardware: Hardware,
    info: EngineInfo,
    accuracy: Sequence[PrecisionAccuracy],
    slo_p99_ms: float,
    trials: int,
) -> Profile:
    """The profile `structsim serve --profile` reads and the operator copies into its status."""
    return Profile(
        device=hardware.device,
        gpu_product=hardware.gpu_product,
        device_name=hardware.name,
        compute_capability=hardware.compute_capability,
        memory_gib=hardware.memory_gib,
        precision=best.params["precision"],
        max_batch_size=int(best.params["max_batch_size"]),
        max_wait_ms=round(float(best.params["max_wait_ms"]), 3),
        throughput=round(float(best.value or 0.0), 1),
        p50_ms=round(float(best.user_attrs[ATTR_P50]), 3),
        p99_ms=round(float(best.user_attrs[ATTR_P99]), 3),
        slo_p99_ms=slo_p99_ms,
        accuracy=list(accuracy),
        model_id=info.model_id,
        revision=info.revision,
        fingerprint=info.fingerprint,
        trials=trials,
        tuned_at=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        structsim_version=__version__,
    )


def explain_no_feasible(
    trials: Sequence[FrozenTrial], accuracy: Sequence[PrecisionAccuracy], *, slo_p99_ms: float, max_abs_error: float
) -> str:
    """Why no trial qualified: the accuracy guard, the SLO (with the best p99 any config reached), or both."""
    parts = [f"no feasible config in {len(trials)} trials"]
    rejected = [a for a in accuracy if not a.admissible]
    if rejected:
        detail = ", ".join(f"{a.precision} (max |Δ| {a.max_abs_error:.2g}, {a.flips} flips)" for a in rejected)
        parts.append(f"precisions over the accuracy tolerance {max_abs_error:g}: {detail}")
    lowest = _lowest_p99(trials)
    if lowest is None:
        parts.append(f"no trial measured a p99 under the SLO of {slo_p99_ms:g} ms")
    else:
        parts.append(
            f"no config kept p99 under the SLO of {slo_p99_ms:g} ms even at its lowest rate "
            f"(the lowest p99 seen was {lowest:.3g} ms): raise --p99-ms or use a faster device"
        )
    return "; ".join(parts)


def _lowest_p99(trials: Sequence[FrozenTrial]) -> float | None:
    seen = [
        step["p99_ms"]
        for trial in trials
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
        for step in trial.user_attrs.get(ATTR_STEPS, [])
        if step.get("kind") == "open" and isinstance(step.get("p99_ms"), float) and math.isfinite(step["p99_ms"])
    ]
    return min(seen) if seen else None
