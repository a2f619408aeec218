"""One tuning session, wired end to end: device → engines → space → study → trials → profile.

Everything before the first trial is input checking: a failure there (unknown model, precision the
device cannot run, unreadable workload) raises `TuneInputError`. A study in which no config met the
SLO and the accuracy guard raises `NoFeasibleConfig`, after the study and the plot are saved.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TextIO

import msgspec
import optuna

from similarity_service.corpus import CorpusFormatError, load_corpus, load_pairs_file
from similarity_service.model import ModelLoadError
from similarity_service.precision import DeviceError, PrecisionError
from similarity_service.profile import PrecisionAccuracy, Profile, decode_profile, encode_profile, write_profile
from similarity_service.settings import ENV_PREFIX, Settings, SettingsError, load_settings

from similarity_autotune.accuracy import AccuracyGuard
from similarity_autotune.benchmark import LoadGenerator, LoadSettings
from similarity_autotune.hardware import Hardware, detect_hardware
from similarity_autotune.objective import Objective
from similarity_autotune.plot import plot_trials
from similarity_autotune.report import ProgressReporter, best_table, study_summary
from similarity_autotune.result import build_profile, explain_no_feasible
from similarity_autotune.runtime import EngineLoader, ServingRuntime, TunableEngine
from similarity_autotune.space import SearchSpace, build_space, default_config, memory_batch_limit
from similarity_autotune.study import (
    enqueue_default,
    ensure_accuracy,
    open_storage,
    open_study,
    run_study,
    study_name,
)


# Serving settings a session takes from flags or the environment exactly as `serve` does.
SHARED_SETTINGS = (
    "model",
    "revision",
    "cache_dir",
    "offline",
    "device",
    "max_seq_len",
    "exact_thresholds",
    "max_batch_tokens",
    "max_queue_pairs",
)


class TuneInputError(ValueError):
    """The model, device, precision or a pairs file cannot be used; nothing was tuned."""


class NoFeasibleConfig(Exception):
    """The study ended without a config that meets the SLO and the accuracy guard."""


@dataclass(frozen=True, kw_only=True)
class TuneOptions:
    """Everything a session needs; `structsim autotune`'s flags map onto it one to one."""

    # Shared with `structsim serve`; None = its STRUCTSIM_* environment variable, else its default.
    model: str | None = None
    revision: str | None = None
    cache_dir: str | None = None
    offline: bool | None = None
    device: str | None = None
    max_seq_len: int | None = None
    exact_thresholds: str | None = None  # "0.5,0.8"; validated by `Settings`
    # Autotune's own.
    gpu_product: str | None = None
    precision: str = "auto"
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    p99_ms: float = 50.0
    max_abs_error: float = 0.003
    threshold: float = 0.7
    workload: str | None = None
    validation: str | None = None
    trials: int = 30
    timeout: float | None = None
    storage: str | None = None
    seed: int | None = None
    step_seconds: float = LoadSettings.step_seconds
    probe_seconds: float = LoadSettings.probe_seconds
    warmup_seconds: float = LoadSettings.warmup_seconds
    out: str | None = "profile.json"
    plot: str | None = None
    progress_bars: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: object) -> TuneOptions:
        names = {field for field in cls.__dataclass_fields__}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """A successful session."""

    profile: Profile
    profile_json: str  # compact, for the termination log
    table: str
    study: optuna.Study
    space: SearchSpace
    accuracy: dict[str, PrecisionAccuracy]


def service_settings(options: TuneOptions, env: Mapping[str, str]) -> Settings:
    """The serving settings trials run with, resolved as `structsim serve` resolves them (flag >
    STRUCTSIM_* variable > default), so the tune Job measures what its pods will serve."""
    names = {ENV_PREFIX + name.upper() for name in SHARED_SETTINGS}
    cli = {name: value for name in SHARED_SETTINGS if (value := getattr(options, name, None)) is not None}
    try:
        return load_settings(cli=cli, env={key: value for key, value in env.items() if key in names})
    except SettingsError as exc:
        raise TuneInputError(str(exc)) from exc


def trial_load_settings(options: TuneOptions) -> LoadSettings:
    """How each trial is measured: the windows from the options, the rest the defaults."""
    return LoadSettings(
        step_seconds=options.step_seconds, probe_seconds=options.probe_seconds, warmup_seconds=options.warmup_seconds
    )


def open_runtime(service: Settings, stream: TextIO) -> ServingRuntime:
    """The served path as `structsim serve` configures it: engines, batch token budget, queue bound."""
    return ServingRuntime(
        engine_loader(service, stream),
        max_queue_pairs=service.max_queue_pairs,
        max_batch_tokens=service.max_batch_tokens,
    )


def tune(
    options: TuneOptions,
    *,
    stream: TextIO,
    env: Mapping[str, str] | None = None,
    runtime: ServingRuntime | None = None,
) -> TuneResult:
    """Run the session; see the module docstring for what it raises. `env` defaults to os.environ.

    A `runtime` passed in (from `open_runtime`) is used and left open, so a caller can measure more
    configs on the engines the session loaded; otherwise the session opens and closes its own.
    """
    service = service_settings(options, os.environ if env is None else env)
    guard = AccuracyGuard(max_abs_error=options.max_abs_error, threshold=options.threshold)
    with nullcontext(runtime) if runtime is not None else open_runtime(service, stream) as runtime:
        try:
            hardware = detect_hardware(service.device, gpu_product=options.gpu_product)
            workload = _pairs(options.workload)
            validation = _pairs(options.validation)
            reference = runtime.engine("fp32")
            info = reference.info
            space = build_space(
                hardware,
                precision=options.precision,
                max_batch_size=options.max_batch_size,
                max_wait_ms=options.max_wait_ms,
                batch_limit=memory_batch_limit(hardware, info.model_dir, service.max_seq_len),
            )
        except (ModelLoadError, PrecisionError, DeviceError, CorpusFormatError, OSError, ValueError) as exc:
            raise TuneInputError(str(exc)) from exc

        print(
            _describe(hardware, info.model_id, info.fingerprint, space.precisions, service.exact_threshold_values),
            file=stream,
        )
        name = study_name(
            hardware,
            fingerprint=info.fingerprint,
            max_seq_len=service.max_seq_len,
            slo_p99_ms=options.p99_ms,
            space=space,
            guard=guard,
            workload_digest=_digest(workload),
            exact_thresholds=service.exact_threshold_values,
        )
        study = open_study(open_storage(options.storage), name, seed=options.seed)
        resumed = len(study.trials)
        print(f"study {name}" + (f" (resuming after {resumed} trials)" if resumed else ""), file=stream)
        accuracy = ensure_accuracy(study, runtime, space.precisions, validation, guard)
        for result in accuracy.values():
            verdict = "ok" if result.admissible else "over the tolerance: infeasible"
            print(
                f"accuracy {result.precision}: mean |Δ| {result.mean_abs_error:.2g}, max |Δ| "
                f"{result.max_abs_error:.2g}, {result.flips} flips at {result.threshold:g}: {verdict}",
                file=stream,
            )
        enqueue_default(study, default_config(hardware, space))
        load = LoadGenerator(
            [[pair] for pair in reference.encode(workload)],
            trial_load_settings(options),
        )
        objective = Objective(
            space=space,
            runtime=runtime,
            load=load,
            slo_p99_ms=options.p99_ms,
            guard=guard,
            accuracy=accuracy,
            observer=ProgressReporter(stream, bars=options.progress_bars),
        )
        outcome = run_study(study, objective, trials=options.trials, timeout_s=options.timeout)

    trials = study.trials
    print(study_summary(trials), file=stream)
    if options.plot:
        title = f"{hardware.product} · {info.model_id} · p99 ≤ {options.p99_ms:g} ms"
        plot_trials(trials, chosen=outcome.best, slo_p99_ms=options.p99_ms, title=title, path=options.plot)
    if outcome.best is None:
        raise NoFeasibleConfig(
            explain_no_feasible(
                trials, list(accuracy.values()), slo_p99_ms=options.p99_ms, max_abs_error=options.max_abs_error
            )
        )
    profile = build_profile(
        outcome.best,
        hardware=hardware,
        info=info,
        accuracy=list(accuracy.values()),
        slo_p99_ms=options.p99_ms,
        trials=len(trials),
    )
    profile = decode_profile(encode_profile(profile))  # validated exactly as `serve --profile` will read it
    if options.out:
        write_profile(profile, options.out)
    return TuneResult(
        profile=profile,
        profile_json=msgspec.json.encode(profile).decode(),
        table=best_table(trials, chosen=outcome.best),
        study=study,
        space=space,
        accuracy=accuracy,
    )


def engine_loader(service: Settings, stream: TextIO) -> EngineLoader:
    """Loads (and warms up) one engine per precision exactly as `structsim serve` would."""

    def load(precision: str) -> TunableEngine:
        from similarity_service.runner import Engine  # torch: only when a session runs

        print(f"loading {service.model} in {precision} …", file=stream, flush=True)
        # As `structsim serve` loads it (lifespan.load_engine); trials then set max_batch_size.
        engine = Engine.load(
            service.model,
            revision=service.revision,
            cache_dir=service.cache_dir,
            offline=service.offline,
            precision=precision,
            device=service.device,
            max_seq_len=service.max_seq_len,
            # Pairs near these are rescored in fp32, as in the pods: the accuracy guard sees the decisions
            # they serve and every trial pays the rescoring they pay.
            exact_thresholds=service.exact_threshold_values,
        )
        engine.warmup()
        return engine

    return load


def _pairs(path: str | None) -> list[tuple[str, str]]:
    rows = load_corpus() if path is None else load_pairs_file(path)
    return [row.pair for row in rows]


def _digest(pairs: list[tuple[str, str]]) -> str:
    return hashlib.sha256(msgspec.json.encode(pairs)).hexdigest()[:12]


def _describe(
    hardware: Hardware,
    model_id: str,
    fingerprint: str,
    precisions: tuple[str, ...],
    exact_thresholds: tuple[float, ...],
) -> str:
    if hardware.device == "cuda":
        where = (
            f"{hardware.name} (compute capability {hardware.compute_capability}, "
            f"{hardware.memory_gib} GiB, driver {hardware.driver or 'unknown'})"
        )
    else:
        where = f"{hardware.name} ({hardware.cpu_cores} cores)"
    line = f"tuning {model_id} [{fingerprint[:12]}] on {where}; precisions: {', '.join(precisions)}"
    if exact_thresholds:
        line += f"; exact thresholds: {', '.join(f'{threshold:g}' for threshold in exact_thresholds)}"
    return line
