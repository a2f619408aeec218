"""Open (or resume) the study for this device and model, and run it.

Storage: an embedded SQLite file under the user cache by default; any Optuna RDB URL
(`postgresql://…`, `mysql+pymysql://…`, `sqlite:///…`) shares a study between machines; any other path
is an Optuna journal file (safe on NFS-style volumes). The study is named by what makes its results
valid: device product, model fingerprint (weights, config and max length), the SLO, and a hash of the
rest (search ranges, accuracy tolerance, workload, exact thresholds if any), so rerunning the same
command resumes it and changing any of those starts a new one. The untuned default config is enqueued
first (trial 0 of a new study), so the best found is never worse than the default; no feasible config
is a result.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from similarity_service.profile import PrecisionAccuracy

from similarity_autotune.accuracy import AccuracyGuard, attr_key, from_attrs, measure_accuracy, to_attr
from similarity_autotune.hardware import Hardware
from similarity_autotune.objective import ATTR_P99, NEAR_TIE, BelowBestPruner, Objective, is_feasible
from similarity_autotune.runtime import ServingRuntime
from similarity_autotune.space import SearchSpace, ServingConfig

STARTUP_TRIALS = 8  # random trials (the default included) before TPE models the results
# A crashed run leaves its trial RUNNING; the heartbeat marks it failed and the callback retries it once.
HEARTBEAT_S = 10
GRACE_S = 30
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def default_storage_path() -> Path:
    """`$XDG_CACHE_HOME/structsim/autotune.db` (or ~/.cache/…)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "structsim" / "autotune.db"


def open_storage(url: str | None) -> BaseStorage:
    """An Optuna storage for `url`: None → the default SQLite file; `scheme://…` → an RDB;
    a path ending .db/.sqlite/.sqlite3 → SQLite; any other path → a journal file."""
    if url is None:
        url = str(default_storage_path())
    if "://" not in url:
        path = Path(url).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in _SQLITE_SUFFIXES:
            return JournalStorage(JournalFileBackend(str(path)))
        url = f"sqlite:///{path}"
    with warnings.catch_warnings():
        # Heartbeats are marked experimental, but they are how a killed run's trial gets retried.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )


def study_name(
    hardware: Hardware,
    *,
    fingerprint: str,
    max_seq_len: int,
    slo_p99_ms: float,
    space: SearchSpace,
    guard: AccuracyGuard,
    workload_digest: str,
    exact_thresholds: tuple[float, ...] = (),
) -> str:
    """`structsim-<product>-<fingerprint>-len<L>-p99-<X>ms-<hash of the rest>`."""
    rest = f"{space.key()}|{guard.max_abs_error!r}|{guard.threshold!r}|{workload_digest}"
    if exact_thresholds:  # only when set, so studies run without them keep their names (and resume)
        rest += f"|exact={sorted(set(exact_thresholds))!r}"
    digest = hashlib.sha256(rest.encode()).hexdigest()[:8]
    product = re.sub(r"[^A-Za-z0-9._-]+", "-", hardware.product)
    return f"structsim-{product}-{fingerprint[:16]}-len{max_seq_len}-p99-{slo_p99_ms:g}ms-{digest}"


def open_study(storage: BaseStorage, name: str, *, seed: int | None = None) -> optuna.Study:
    """Create the study, or load it if it exists (resume)."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=_sampler(seed),
        pruner=BelowBestPruner(),
        load_if_exists=True,
    )
    if seed is not None and study.trials:
        # A resumed study seeded as before would draw the same random startup points again.
        study.sampler = _sampler(seed + len(study.trials))
    return study


def _sampler(seed: int | None) -> optuna.samplers.BaseSampler:
    # TPE handles the categorical precision, constraints (set_constraint) and pruned trials; multivariate
    # because batch size and wait interact. Random for the first trials after the default.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=STARTUP_TRIALS)


def ensure_accuracy(
    study: optuna.Study,
    runtime: ServingRuntime,
    precisions: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    guard: AccuracyGuard,
) -> dict[str, PrecisionAccuracy]:
    """Each precision's errors against fp32, measured once per study and kept in its user attributes."""
    known = from_attrs(study.user_attrs)
    results = measure_accuracy(precisions, runtime.engine, pairs, guard, known)
    for precision, accuracy in results.items():
        if precision not in known:
            study.set_user_attr(attr_key(precision), to_attr(accuracy))
    return results


def enqueue_default(study: optuna.Study, default: ServingConfig) -> None:
    """Queue the untuned config first; on resume it is not queued again."""
    study.enqueue_trial(default.params(), skip_if_exists=True)


@dataclass(frozen=True, kw_only=True)
class StudyOutcome:
    """What a run left in the study."""

    study: optuna.Study
    best: FrozenTrial | None  # the best feasible trial, None if no config met the SLO and the guard
    accuracy: dict[str, PrecisionAccuracy]
    trials_run: int  # this run's trials


def run_study(
    study: optuna.Study,
    objective: Objective,
    *,
    trials: int,
    timeout_s: float | None,
) -> StudyOutcome:
    """Run `trials` more trials (or until `timeout_s`), then pick the best feasible one."""
    before = len(study.trials)
    study.optimize(objective, n_trials=trials, timeout=timeout_s, gc_after_trial=False)
    return StudyOutcome(
        study=study,
        best=best_trial(study.trials),
        accuracy=objective.accuracy,
        trials_run=len(study.trials) - before,
    )


def best_trial(trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The feasible trial with the most throughput, or None.

    Trials within `NEAR_TIE` of the most are ties, as the measurement cannot tell them apart; of those
    the one with the lowest p99 wins (more headroom under the SLO, so it holds up when re-measured),
    then the smaller batch, then the earlier trial.
    """
    feasible = [t for t in trials if is_feasible(t) and (t.value or 0) > 0]
    if not feasible:
        return None
    most = max(t.value or 0.0 for t in feasible)
    tied = [t for t in feasible if (t.value or 0.0) >= most * (1 - NEAR_TIE)]
    return min(tied, key=lambda t: (_p99(t), t.params.get("max_batch_size", 0), t.number))


def _p99(trial: FrozenTrial) -> float:
    value = trial.user_attrs.get(ATTR_P99)
    return value if isinstance(value, float) and math.isfinite(value) else math.inf

