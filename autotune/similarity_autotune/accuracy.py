"""The accuracy guard: how far each precision's scores move from fp32 on the validation pairs.

A precision is admissible only if both the mean and the max |Δ| of P(similar) against fp32 stay within
the tolerance and no decision flips at the threshold. Each pair is scored twice, in one call of all the
pairs and in a call of its own, and counts with the worse of the two: the engine runs small batches on
other kernels than large ones (on CUDA, a single short pair's graph runs the latency kernels), and a
served request may take either. Measured once per study (the results live in the study's user
attributes, so a resumed study does not measure again) and recorded in the profile.
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

    def compare(self, precision: str, reference: Sequence[float], *scorings: Sequence[float]) -> PrecisionAccuracy:
        """Errors of one or more scorings of the same pairs against the fp32 `reference`, pair by pair: a
        pair's error is its largest over the scorings, and it flips if any scoring flips it."""
        if not scorings or len(reference) == 0 or any(len(scores) != len(reference) for scores in scorings):
            sizes = ", ".join(str(len(scores)) for scores in scorings) or "no"
            raise ValueError(f"{precision}: {sizes} scores for {len(reference)} reference scores")
        ref = np.asarray(reference, dtype=np.float64)
        got = np.asarray(scorings, dtype=np.float64)  # [scorings, pairs]
        delta = np.abs(got - ref).max(axis=0)
        mean_err, max_err = float(delta.mean()), float(delta.max())
        flips = int(np.count_nonzero(((ref >= self.threshold) != (got >= self.threshold)).any(axis=0)))
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
        if precision == "fp32":
            results[precision] = guard.compare(precision, reference, reference)
            continue
        engine = engine_for(precision)
        together = engine.score_encoded(encoded)
        alone = [engine.score_encoded([item])[0] for item in encoded]
        results[precision] = guard.compare(precision, reference, together, alone)
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
