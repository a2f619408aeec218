"""How good is `structsim autotune`? Its best config against an exhaustive grid over the same space.

On the synthetic StructBERT-base checkpoint and the project's Chinese corpus, in one run on one card:
  1. the autotuner as `structsim autotune` runs it (default trial budget and windows, fresh SQLite
     study), timed end to end: model loads, accuracy guard and trials;
  2. a grid over the same space (every precision × log-spaced batch sizes × waits), measured by the
     same objective (so the same load generator, SLO, accuracy guard and pruning of configs whose
     capacity cannot beat the best so far), sized to fit the time left in the run;
  3. the two winners re-measured `--rounds` times each, interleaved (A B, B A, A B, …: the order
     alternates, so a drift of the machine favours neither), each time as a trial measures (warm-up,
     probe, rate steps) but with `--confirm-stretch` times longer windows, so the ratio compares them under the same conditions rather than
     across two noisy runs. Each winner's value is the median of its rounds, with min and max; the
     ratio is the ratio of the medians, with the per-round (paired) ratios as its uncertainty.
Targets: the autotuner's confirmed throughput >= 0.95 of the grid's, and tuning wall time <= 600 s.
Writes bench/results/autotune_vs_grid-<card>-<date>.json (card, commit, date, every confirmation
round's steps) and prints a table.

GPU:  python3 bench/autotune_vs_grid.py --out-dir $OUT            (fits one device call of < 9 min)
CPU:  python3 bench/autotune_vs_grid.py --device cpu --quick      (checks the script, not a benchmark)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "service"), str(REPO / "autotune")]  # runs from a plain checkout too

import msgspec  # noqa: E402
import optuna  # noqa: E402
from provenance import git_commit  # noqa: E402
from similarity_service.corpus import load_corpus  # noqa: E402
from similarity_service.engine_api import EncodedPair  # noqa: E402

from similarity_autotune.accuracy import AccuracyGuard  # noqa: E402
from similarity_autotune.benchmark import LoadGenerator, LoadSettings, Measurement  # noqa: E402
from similarity_autotune.objective import ATTR_SKIPPED, ATTR_UPPER, BelowBestPruner, Objective  # noqa: E402
from similarity_autotune.report import ProgressReporter  # noqa: E402
from similarity_autotune.runtime import ServingRuntime  # noqa: E402
from similarity_autotune.session import (  # noqa: E402
    TuneOptions,
    TuneResult,
    trial_load_settings,
    open_runtime,
    service_settings,
    tune,
)
from similarity_autotune.space import SearchSpace, ServingConfig  # noqa: E402
from similarity_autotune.study import best_trial  # noqa: E402

TARGET_RATIO = 0.95
TARGET_TUNE_S = 600.0
# Grid shapes tried, densest first: (batch sizes per precision, waits in ms). The first whose
# estimated time fits what is left of the budget is run.
GRID_SHAPES: tuple[tuple[int, tuple[float, ...]], ...] = (
    (11, (0.0, 1.0, 2.0, 5.0, 10.0, 20.0)),
    (11, (0.0, 2.0, 5.0, 10.0, 20.0)),
    (11, (0.0, 2.0, 5.0, 20.0)),
    (6, (0.0, 2.0, 5.0, 20.0)),
    (6, (0.0, 2.0, 10.0)),
    (4, (0.0, 5.0)),
)
CONFIRM_ROUNDS = 5  # each winner measured this many times, interleaved (--quick: 3)
# Confirmation windows are this many times a trial's: near a config's capacity one stall of a few tens of
# ms fails a 0.15 s window outright, and the two winners differ by less than such a step of the ladder.
CONFIRM_STRETCH = 3.0


def synthetic_model(size: str) -> Path:
    """The synthetic checkpoint, made once into .cache/models (as `make serve` does)."""
    from similarity_service.checkpoint import make_checkpoint

    path = REPO / ".cache" / "models" / f"synthetic-{size}"
    if not (path / "config.json").exists():
        print(f"making the {size} synthetic checkpoint in {path} …", file=sys.stderr, flush=True)
        make_checkpoint(path, size)  # type: ignore[arg-type]
    return path


def trial_seconds(study: optuna.Study, *, unpruned: bool = False) -> list[float]:
    """Wall time of the tuner's measured trials (pruned ones included unless `unpruned`; those the
    accuracy guard skipped excluded)."""
    return [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.trials
        if t.datetime_start is not None
        and t.datetime_complete is not None
        and ATTR_SKIPPED not in t.user_attrs
        and not (unpruned and t.state == optuna.trial.TrialState.PRUNED)
    ]


def choose_grid(space: SearchSpace, seconds_left: float, per_config_s: float) -> list[ServingConfig]:
    """The densest grid whose estimated time fits; the coarsest one otherwise. `space` holds only the
    admissible precisions: the others are infeasible at every grid point."""
    for batch_points, waits in GRID_SHAPES:
        grid = space.grid(batch_points, waits)
        if len(grid) * per_config_s <= seconds_left:
            return grid
    batch_points, waits = GRID_SHAPES[-1]
    return space.grid(batch_points, waits)


def config_of(params: dict[str, object]) -> ServingConfig:
    return ServingConfig(
        precision=str(params["precision"]),
        max_batch_size=int(params["max_batch_size"]),  # type: ignore[call-overload]
        max_wait_ms=float(params["max_wait_ms"]),  # type: ignore[arg-type]
    )


def run_grid(
    options: TuneOptions,
    tuned: TuneResult,
    grid: list[ServingConfig],
    load: LoadGenerator,
    runtime: ServingRuntime,
    seconds_left: float,
) -> tuple[optuna.Study, float]:
    """Every grid point through the autotuner's own objective (GridSampler instead of TPE)."""
    guard = AccuracyGuard(max_abs_error=options.max_abs_error, threshold=options.threshold)
    objective = Objective(
        space=tuned.space,
        runtime=runtime,
        load=load,
        slo_p99_ms=options.p99_ms,
        guard=guard,
        accuracy=tuned.accuracy,
        observer=ProgressReporter(sys.stderr, bars=False),
    )
    search_space = {
        "precision": sorted({c.precision for c in grid}),
        "max_batch_size": sorted({c.max_batch_size for c in grid}),
        "max_wait_ms": sorted({c.max_wait_ms for c in grid}),
    }
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.GridSampler(search_space, seed=0), pruner=BelowBestPruner()
    )
    started = time.perf_counter()
    # The deadline keeps the run inside one device call; a grid cut short says so in the results.
    study.optimize(objective, n_trials=len(grid), timeout=max(seconds_left, 1.0))
    return study, time.perf_counter() - started


def confirm(
    runtime: ServingRuntime,
    requests: list[list[EncodedPair]],
    settings: LoadSettings,
    configs: dict[str, ServingConfig],
    slo_p99_ms: float,
    rounds: int,
) -> dict[str, list[Measurement]]:
    """Measure each named config `rounds` times as a trial does, interleaved, the order alternating
    each round; each round has its own arrival seed, the same for every config."""
    results: dict[str, list[Measurement]] = {name: [] for name in configs}
    names = list(configs)
    for round_ in range(rounds):
        load = LoadGenerator(requests, replace(settings, seed=1 + round_))
        for name in names if round_ % 2 == 0 else reversed(names):
            config = configs[name]
            measured = runtime.run(
                load.measure(
                    runtime.batcher(config),
                    slo_p99_ms=slo_p99_ms,
                    max_batch_size=config.max_batch_size,
                    probe_concurrency=min(2 * config.max_batch_size, runtime.max_queue_pairs),
                )
            )
            results[name].append(measured)
            print(
                f"confirm round {round_} {name}: {config.label()}: {measured.throughput:,.0f} pairs/s "
                f"(at most {measured.upper:,.0f}), p99 {measured.best.p99_ms if measured.best else math.inf:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    return results


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and (max - min) / median of repeated measurements."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "relative_spread": (max(values) - min(values)) / median if median > 0 else math.inf,
    }


def ratio_summary(tuner: list[float], grid: list[float]) -> dict[str, object]:
    """The ratio of the medians, and each round's own ratio (both measured minutes apart at most).

    A round whose grid winner sustained nothing under the SLO has no ratio (NaN), and a grid median of
    zero leaves the ratio undetermined (NaN): the measurement failed, the autotuner did not win.
    """
    paired = [a / g if g > 0 else math.nan for a, g in zip(tuner, grid, strict=True)]
    defined = [ratio for ratio in paired if math.isfinite(ratio)]
    grid_median = statistics.median(grid)
    return {
        "ratio": statistics.median(tuner) / grid_median if grid_median > 0 else math.nan,
        "paired": paired,
        "paired_median": statistics.median(defined) if defined else math.nan,
        "paired_min": min(defined, default=math.nan),
        "paired_max": max(defined, default=math.nan),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the synthetic one, made here)")
    parser.add_argument("--p99-ms", type=float, default=50.0, help="SLO (default: 50, the resource's default)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="whole run, so one device call fits (default 510; --quick 120)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the autotuner's sampler seed")
    parser.add_argument("--quick", action="store_true", help="tiny model, few trials, short windows: checks the script")
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"confirmation rounds per winner (default {CONFIRM_ROUNDS}; --quick 3)"
    )
    parser.add_argument(
        "--confirm-stretch", type=float, default=CONFIRM_STRETCH, help="confirmation windows / a trial's (default 3)"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    budget_s = args.budget_s or (120.0 if args.quick else 510.0)
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    model = args.model or str(synthetic_model("tiny" if args.quick else "base"))
    work = Path(tempfile.mkdtemp(prefix="autotune-vs-grid-"))
    quick = {"trials": 4, "step_seconds": 0.1, "probe_seconds": 0.05, "max_seq_len": 128} if args.quick else {}
    options = TuneOptions(
        model=model,
        device=args.device,
        p99_ms=args.p99_ms,
        seed=args.seed,
        storage=str(work / "study.db"),  # a fresh SQLite study: the default storage kind
        out=str(work / "profile.json"),
        **quick,  # type: ignore[arg-type]
    )

    rounds = args.rounds or (3 if args.quick else CONFIRM_ROUNDS)
    settings = trial_load_settings(options)
    with open_runtime(service_settings(options, os.environ), sys.stderr) as runtime:
        # 1. The autotuner, as the CLI runs it; its time includes loading the engines it tries.
        tune_started = time.perf_counter()
        tuned = tune(options, stream=sys.stderr, runtime=runtime)
        tune_s = time.perf_counter() - tune_started
        print(tuned.table, file=sys.stderr)
        tuner_best = best_trial(tuned.study.trials)
        assert tuner_best is not None  # tune() raises NoFeasibleConfig otherwise

        # 2. The grid on the same engines, sized to the time left (minus the confirmation's share: a
        #    confirmation is a full, unpruned trial, so as long as the tuner's longest).
        per_config_s = statistics.fmean(trial_seconds(tuned.study) or [5.0])
        measure_s = 1.25 * args.confirm_stretch * statistics.median(trial_seconds(tuned.study, unpruned=True) or [5.0])
        requests = [[pair] for pair in runtime.engine("fp32").encode([row.pair for row in load_corpus()])]
        confirm_reserve_s = 2 * rounds * measure_s + 20
        seconds_left = budget_s - (time.perf_counter() - started) - confirm_reserve_s
        admissible = tuple(p for p in tuned.space.precisions if tuned.accuracy[p].admissible)
        grid = choose_grid(replace(tuned.space, precisions=admissible), seconds_left, per_config_s)
        print(
            f"grid: {len(grid)} configs (about {per_config_s:.1f} s each, {seconds_left:.0f} s left)",
            file=sys.stderr,
            flush=True,
        )
        grid_study, grid_s = run_grid(options, tuned, grid, LoadGenerator(requests, settings), runtime, seconds_left)
        grid_best = best_trial(grid_study.trials)
        if grid_best is None:
            print("the grid found no feasible config", file=sys.stderr)
            return 1

        # 3. Both winners, interleaved.
        winners = {"autotune": config_of(tuner_best.params), "grid": config_of(grid_best.params)}
        confirm_started = time.perf_counter()
        # The rounds that fit what is left of the budget (at least one), so the run stays in one call.
        rounds_left = int((budget_s - (time.perf_counter() - started) - 10) // (2 * measure_s))
        stretched = replace(
            settings,
            step_seconds=settings.step_seconds * args.confirm_stretch,
            probe_seconds=settings.probe_seconds * args.confirm_stretch,
        )
        confirmed = confirm(runtime, requests, stretched, winners, options.p99_ms, max(1, min(rounds, rounds_left)))
        confirm_s = time.perf_counter() - confirm_started
        event_loop = runtime.event_loop

    values = {name: [m.throughput for m in measured] for name, measured in confirmed.items()}
    ratios = ratio_summary(values["autotune"], values["grid"])
    ratio = float(ratios["ratio"])  # type: ignore[arg-type]
    raw_ratio = (tuner_best.value or 0.0) / (grid_best.value or float("nan"))
    profile = tuned.profile
    card = profile.gpu_product or f"cpu-{profile.device_name}"
    now = datetime.now(UTC)
    record = {
        "benchmark": "autotune_vs_grid",
        "card": card,
        "device_name": profile.device_name,
        "compute_capability": profile.compute_capability,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "model": {"path": model, "fingerprint": profile.fingerprint, "synthetic": args.model is None},
        "slo_p99_ms": options.p99_ms,
        "accuracy_guard": {"max_abs_error": options.max_abs_error, "threshold": options.threshold},
        "accuracy": msgspec.to_builtins(profile.accuracy),
        "load_settings": asdict(settings),
        "confirm_stretch": args.confirm_stretch,
        "event_loop": event_loop,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "autotune": {
            "trials": len(tuned.study.trials),
            "wall_s": round(tune_s, 1),
            "best": tuner_best.params,
            "throughput": tuner_best.value,
            "p99_ms": tuner_best.user_attrs.get("p99_ms"),
            "upper": tuner_best.user_attrs.get(ATTR_UPPER),
        },
        "grid": {
            "configs": len(grid),
            "measured": len(grid_study.trials),  # fewer than configs if the deadline cut the grid short
            "batch_sizes": sorted({c.max_batch_size for c in grid}),
            "waits_ms": sorted({c.max_wait_ms for c in grid}),
            "precisions": sorted({c.precision for c in grid}),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in grid_study.trials),
            "wall_s": round(grid_s, 1),
            "best": grid_best.params,
            "throughput": grid_best.value,
            "p99_ms": grid_best.user_attrs.get("p99_ms"),
            "upper": grid_best.user_attrs.get(ATTR_UPPER),
        },
        "confirmed": {
            "rounds": len(values["grid"]),
            "order": "interleaved, alternating (A B, B A, ...); each round its own arrival seed",
            "wall_s": round(confirm_s, 1),
            "autotune_pairs_per_s": values["autotune"],
            "grid_pairs_per_s": values["grid"],
            "autotune": spread(values["autotune"]),
            "grid": spread(values["grid"]),
            "paired_ratios": ratios["paired"],
            "measurements": {name: [m.evidence() for m in measured] for name, measured in confirmed.items()},
        },
        "ratio_confirmed": round(ratio, 4),
        "ratio_paired": {
            "median": round(float(ratios["paired_median"]), 4),  # type: ignore[arg-type]
            "min": round(float(ratios["paired_min"]), 4),  # type: ignore[arg-type]
            "max": round(float(ratios["paired_max"]), 4),  # type: ignore[arg-type]
        },
        "ratio_own_runs": round(raw_ratio, 4),
        "targets": {
            "ratio": TARGET_RATIO,
            "ratio_met": math.isfinite(ratio) and ratio >= TARGET_RATIO,
            "tune_wall_s": TARGET_TUNE_S,
            "tune_wall_met": tune_s <= TARGET_TUNE_S,
        },
        "run_wall_s": round(time.perf_counter() - started, 1),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"autotune_vs_grid-{card.replace(' ', '-')}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(_finite(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(table(record))
    print(f"\nwritten {out}")
    return 0


def table(record: dict) -> str:  # type: ignore[type-arg]
    """A markdown table for docs/performance.md."""

    def cfg(best: dict) -> str:  # type: ignore[type-arg]
        return f"{best['precision']}, batch {best['max_batch_size']}, wait {best['max_wait_ms']:.2f} ms"

    a, g, c, p = record["autotune"], record["grid"], record["confirmed"], record["ratio_paired"]
    rows = [
        f"autotune vs grid on {record['device_name']} ({record['card']}), commit {record['commit']}, "
        f"{record['date']}, p99 SLO {record['slo_p99_ms']:g} ms, event loop {record['event_loop']}"
        + (" [QUICK: not a benchmark]" if record["quick"] else ""),
        "",
        "| | autotune | grid |",
        "| --- | --- | --- |",
        f"| configs measured | {a['trials']} trials | {g['measured']} of a {g['configs']}-point grid "
        f"({g['pruned']} pruned) |",
        f"| wall time | {a['wall_s']:.0f} s (loads, accuracy guard, trials) | {g['wall_s']:.0f} s (trials only) |",
        f"| best config | {cfg(a['best'])} | {cfg(g['best'])} |",
        f"| best throughput, own run | {a['throughput']:,.0f} pairs/s | {g['throughput']:,.0f} pairs/s |",
        f"| re-measured, {c['rounds']} interleaved rounds, windows x{record['confirm_stretch']:g}: median (min–max) | {_spread(c['autotune'])} "
        f"| {_spread(c['grid'])} |",
        "",
        f"autotune / grid: {_ratio(record['ratio_confirmed'])} re-measured (per-round ratios "
        f"{_ratio(p['min'])}–{_ratio(p['max'])}, median {_ratio(p['median'])}), {_ratio(record['ratio_own_runs'])} "
        f"from their own runs (target >= {TARGET_RATIO}: {'met' if record['targets']['ratio_met'] else 'NOT met'}); "
        f"time to tune {a['wall_s']:.0f} s (target <= {TARGET_TUNE_S:.0f} s: "
        f"{'met' if record['targets']['tune_wall_met'] else 'NOT met'})",
    ]
    return "\n".join(rows)


def _ratio(value: float | None) -> str:
    """A ratio, or why there is none (None: not finite, as `_finite` writes it)."""
    return f"{value:.3f}" if value is not None and math.isfinite(value) else "undetermined"


def _spread(summary: dict) -> str:  # type: ignore[type-arg]
    return f"{summary['median']:,.0f} ({summary['min']:,.0f}–{summary['max']:,.0f}) pairs/s"


def _finite(value: object) -> object:
    """JSON has no infinity: unanswered requests' latencies become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
