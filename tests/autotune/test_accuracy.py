"""The accuracy guard: errors against fp32, flips at the threshold, and infeasible precisions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna
import pytest

from similarity_service.engine_api import EncodedPair, EngineInfo
from similarity_service.runner import Engine

from similarity_autotune.accuracy import AccuracyGuard, from_attrs, measure_accuracy, to_attr
from similarity_autotune.benchmark import LoadGenerator, LoadSettings
from similarity_autotune.objective import Objective
from similarity_autotune.runtime import ServingRuntime
from similarity_autotune.space import SearchSpace

GUARD = AccuracyGuard(max_abs_error=0.003, threshold=0.7)


def test_errors_and_flips_are_measured_pair_by_pair() -> None:
    reference = [0.10, 0.69, 0.71, 0.95]
    result = GUARD.compare("fp16", reference, [0.10, 0.701, 0.71, 0.9502])
    assert result.max_abs_error == pytest.approx(0.011)
    assert result.mean_abs_error == pytest.approx((0.011 + 0.0002) / 4)
    assert result.flips == 1  # 0.69 → 0.701 crosses 0.7
    assert not result.admissible and GUARD.violation(result) > 0

    close = GUARD.compare("bf16", reference, [0.101, 0.689, 0.712, 0.951])
    assert close.flips == 0 and close.max_abs_error == pytest.approx(0.002)
    assert close.admissible and GUARD.violation(close) <= 0

    # No flip, but one pair over the tolerance: still inadmissible.
    assert not GUARD.compare("bf16", reference, [0.10, 0.69, 0.71, 0.96]).admissible


def test_a_pair_counts_with_its_worst_scoring() -> None:
    """One call of all pairs and one call per pair run different kernels: the guard takes each pair's worse."""
    reference = [0.10, 0.69, 0.95]
    together = [0.10, 0.69, 0.951]
    alone = [0.102, 0.701, 0.95]
    result = GUARD.compare("fp16", reference, together, alone)
    assert result.max_abs_error == pytest.approx(0.011)
    assert result.mean_abs_error == pytest.approx((0.002 + 0.011 + 0.001) / 3)
    assert result.flips == 1 and result.pairs == 3 and not result.admissible
    with pytest.raises(ValueError, match="3, 2 scores for 3 reference"):
        GUARD.compare("fp16", reference, together, alone[:2])


@dataclass
class PerturbedEngine:
    """A real engine whose scores are shifted by `shift` (unit-level stand-in for a lossy precision)."""

    inner: Engine
    shift: float
    max_batch_size: int = 8
    alone_shift: float = 0.0  # added too where a call scores a single pair (the engine's small-batch kernels)

    @property
    def info(self) -> EngineInfo:
        return self.inner.info

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        return self.inner.encode(pairs)

    def score_encoded(self, batch: Sequence[EncodedPair]) -> list[float]:
        shift = self.shift + (self.alone_shift if len(batch) == 1 else 0.0)
        return [min(1.0, max(0.0, s + shift)) for s in self.inner.score_encoded(batch)]


def test_a_precision_over_the_tolerance_is_inadmissible(tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]) -> None:
    engines = {"fp32": tiny_engine, "fp16": PerturbedEngine(tiny_engine, 0.001), "bf16": PerturbedEngine(tiny_engine, 0.02)}
    results = measure_accuracy(["fp32", "fp16", "bf16"], engines.__getitem__, chinese_pairs, GUARD)

    assert results["fp32"].admissible and results["fp32"].max_abs_error == 0
    assert results["fp16"].admissible and results["fp16"].max_abs_error == pytest.approx(0.001, abs=1e-6)
    assert not results["bf16"].admissible and results["bf16"].max_abs_error == pytest.approx(0.02, abs=1e-6)
    assert all(r.pairs == len(chinese_pairs) for r in results.values())
    # Stored in the study and read back on resume: nothing is measured twice.
    stored = {f"accuracy:{p}": to_attr(r) for p, r in results.items()}
    assert measure_accuracy(["fp32", "bf16"], _never, chinese_pairs, GUARD, from_attrs(stored)) == {
        "fp32": results["fp32"],
        "bf16": results["bf16"],
    }


def test_a_precision_wrong_only_on_single_pairs_is_inadmissible(
    tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    engines = {"fp32": tiny_engine, "fp16": PerturbedEngine(tiny_engine, 0.0, alone_shift=0.02)}
    result = measure_accuracy(["fp32", "fp16"], engines.__getitem__, chinese_pairs, GUARD)["fp16"]
    assert not result.admissible and result.max_abs_error == pytest.approx(0.02, abs=1e-6)


def _never(precision: str) -> Engine:
    raise AssertionError(f"{precision} was loaded, but its accuracy was already known")


def test_an_inadmissible_precision_is_infeasible_and_never_measured(
    tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    engines = {"fp32": PerturbedEngine(tiny_engine, 0.0, max_batch_size=4), "bf16": PerturbedEngine(tiny_engine, 0.05)}
    accuracy = measure_accuracy(["fp32", "bf16"], engines.__getitem__, chinese_pairs, GUARD)
    loaded: list[str] = []

    def load(precision: str) -> PerturbedEngine:
        loaded.append(precision)
        return engines[precision]

    requests = [[pair] for pair in tiny_engine.encode(chinese_pairs)]
    with ServingRuntime(load, max_queue_pairs=4096, max_batch_tokens=None) as runtime:
        objective = Objective(
            space=SearchSpace(precisions=("fp32", "bf16"), max_batch_size=(4, 4), max_wait_ms=(1.0, 1.0)),
            runtime=runtime,
            load=LoadGenerator(requests, LoadSettings(step_seconds=0.05, probe_seconds=0.03, warmup_seconds=0.02, fractions=(0.3,), bisections=0)),
            slo_p99_ms=5000,
            guard=GUARD,
            accuracy=accuracy,
        )
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial({"precision": "bf16", "max_batch_size": 4, "max_wait_ms": 1.0})
        study.enqueue_trial({"precision": "fp32", "max_batch_size": 4, "max_wait_ms": 1.0})
        study.optimize(objective, n_trials=2)

    bf16, fp32 = study.trials
    assert bf16.params["precision"] == "bf16" and bf16.constraints["accuracy"] > 0
    assert "accuracy guard" in bf16.user_attrs["skipped"]
    assert fp32.constraints == {"accuracy": 0.0, "slo": 0.0} and fp32.value is not None and fp32.value > 0
    assert loaded == ["fp32"]  # bf16 was never loaded, let alone measured
