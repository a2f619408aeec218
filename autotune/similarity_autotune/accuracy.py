"""The accuracy guard: how far each precision's scores move from fp32 on the validation pairs.

A precision is admissible only if both the mean and the max |Δ| of P(similar) against fp32 stay within
the tolerance and no decision flips at the threshold. Measured once per study (the results live in the
study's user attributes, so a resumed study does not measure again) and recorded in the profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from similarity_service.engine_api import ScoringEngine
from similarity_service.profile import PrecisionAccuracy

# Study user-attribute key per precision.
_ATTR_PREFIX = "accuracy:"


@dataclass(frozen=True, kw_only=True)
class AccuracyGuard:
    """The tolerance a precision must meet against fp32."""

    max_abs_error: float  # the largest |Δ P(similar)| allowed, for the mean and for any single pair
    threshold: float  # the decision threshold at which no pair may flip

    def compare(self, precision: str, reference: Sequence[float], scores: Sequence[float]) -> PrecisionAccuracy:
        """Errors of `scores` against the fp32 `reference`, pair by pair."""
        ref = np.asarray(reference, dtype=np.float64)
        got = np.asarray(scores, dtype=np.float64)
        if ref.shape != got.shape or ref.size == 0:
            raise ValueError(f"{precision}: {got.size} scores for {ref.size} reference scores")
        delta = np.abs(got - ref)
        mean_err, max_err = float(delta.mean()), float(delta.max())
        flips = int(np.count_nonzero((ref >= self.threshold) != (got >= self.threshold)))
        return PrecisionAccuracy(
            precision=precision,  # type: ignore[arg-type]  # validated by the space
            mean_abs_error=mean_err,
            max_abs_error=max_err,
            flips=flips,
            threshold=self.threshold,
            pairs=int(ref.size),
            admissible=mean_err <= self.max_abs_error and max_err <= self.max_abs_error and flips == 0,
        )

    def violation(self, accuracy: PrecisionAccuracy) -> float:
        """An Optuna constraint value: <= 0 when admissible, growing with the error and the flips."""
        if accuracy.admissible:
            return 0.0
        return max(accuracy.max_abs_error - self.max_abs_error, 0.0) + accuracy.flips + 1e-9


def measure_accuracy(
    precisions: Sequence[str],
    engine_for: Callable[[str], ScoringEngine],
    pairs: Sequence[tuple[str, str]],
    guard: AccuracyGuard,
    known: Mapping[str, PrecisionAccuracy] | None = None,
) -> dict[str, PrecisionAccuracy]:
    """Each precision's errors against fp32 on `pairs`; `known` results are kept, not measured again."""
    results = dict(known or {})
    missing = [p for p in precisions if p not in results]
    if not missing:
        return {p: results[p] for p in precisions}
    reference_engine = engine_for("fp32")
    encoded = reference_engine.encode(pairs)
    reference = reference_engine.score_encoded(encoded)
    for precision in missing:
        scores = reference if precision == "fp32" else engine_for(precision).score_encoded(encoded)
        results[precision] = guard.compare(precision, reference, scores)
    return {p: results[p] for p in precisions}


def attr_key(precision: str) -> str:
    """The study user-attribute key holding one precision's measured errors."""
    return f"{_ATTR_PREFIX}{precision}"


def to_attr(accuracy: PrecisionAccuracy) -> dict[str, object]:
    """JSON-ready form for `study.set_user_attr`."""
    return msgspec.to_builtins(accuracy)  # type: ignore[no-any-return]


def from_attrs(attrs: Mapping[str, object]) -> dict[str, PrecisionAccuracy]:
    """The accuracy results a study already holds (a resumed study measures nothing twice)."""
    return {
        key.removeprefix(_ATTR_PREFIX): msgspec.convert(value, PrecisionAccuracy)
        for key, value in attrs.items()
        if key.startswith(_ATTR_PREFIX)
    }
