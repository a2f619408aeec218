"""`structsim autotune`: find the serving config with the most throughput under a p99 SLO on this device.

Exit codes: 0 a profile was written; 3 no config met the SLO and the accuracy guard (the message says
why); 2 bad usage or input (unknown model, unsupported precision, unreadable workload). Heavy imports
(torch, optuna, matplotlib) happen inside `run`, so `structsim --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_FEASIBLE = 3

PRECISION_CHOICES = ("auto", "fp32", "tf32", "fp16", "bf16")


def _bounded(kind: type[float] | type[int], low: float, high: float, *, low_open: bool = False):  # type: ignore[no-untyped-def]
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if (value <= low if low_open else value < low) or value > high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"{value} is outside {bracket}{low:g}, {high:g}]")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    """The autotune flags (the operator's tune Job passes these)."""
    model = parser.add_argument_group(
        "model and device", "as `structsim serve` takes them: unset flags fall back to STRUCTSIM_* variables"
    )
    model.add_argument("--model", default=None, help="ModelScope hub id or local checkpoint directory [STRUCTSIM_MODEL]")
    model.add_argument("--revision", default=None, help="hub revision (tag or commit) [STRUCTSIM_REVISION]")
    model.add_argument("--cache-dir", default=None, help="model download cache directory [STRUCTSIM_CACHE_DIR]")
    model.add_argument(
        "--offline", action=argparse.BooleanOptionalAction, default=None, help="never contact the model hub [STRUCTSIM_OFFLINE]"
    )
    model.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N [STRUCTSIM_DEVICE; default auto]")
    model.add_argument(
        "--max-seq-len", type=_bounded(int, 8, 512), default=None, help="tokens per pair [STRUCTSIM_MAX_SEQ_LEN; default 512]"
    )
    model.add_argument(
        "--exact-thresholds",
        default=None,
        help="decision thresholds, comma-separated (e.g. 0.5,0.8), at which fp16/bf16/tf32 decide as fp32: pairs "
        "scored near one are scored again in fp32, in the accuracy guard and the trials alike "
        "[STRUCTSIM_EXACT_THRESHOLDS; default unset]",
    )
    model.add_argument(
        "--gpu-product",
        default=None,
        help="the node's nvidia.com/gpu.product label, recorded in the profile (default: derived from the GPU name)",
    )

    space = parser.add_argument_group("search space")
    space.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="auto",
        help="auto = search every precision the device supports; a named one pins it",
    )
    space.add_argument("--max-batch-size", type=_bounded(int, 1, 4096), default=None, help="pin the batch size")
    space.add_argument("--max-wait-ms", type=_bounded(float, 0, 1000), default=None, help="pin the batching wait (ms)")

    goal = parser.add_argument_group("objective and guard")
    goal.add_argument("--p99-ms", type=_bounded(float, 0, 1e6, low_open=True), default=50.0, help="p99 latency SLO (default: 50)")
    goal.add_argument(
        "--max-abs-error",
        type=_bounded(float, 0, 1),
        default=0.003,
        help="largest mean and max |Δ P(similar)| against fp32 a precision may have (default: 0.003)",
    )
    goal.add_argument(
        "--threshold",
        type=_bounded(float, 0, 1),
        default=0.7,
        help="decision threshold at which no validation pair may flip (default: 0.7)",
    )
    goal.add_argument("--workload", default=None, help="JSONL pairs to load the service with (default: the bundled corpus)")
    goal.add_argument(
        "--validation", default=None, help="JSONL pairs for the accuracy guard (default: the bundled corpus)"
    )

    study = parser.add_argument_group("study")
    study.add_argument("--trials", type=_bounded(int, 1, 10_000), default=30, help="trials this run (default: 30)")
    study.add_argument("--timeout", type=_bounded(float, 0, 1e7, low_open=True), default=None, help="stop starting trials after S seconds")
    study.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: an RDB URL, a .db/.sqlite file, or a journal file path "
        "(default: ~/.cache/structsim/autotune.db)",
    )
    study.add_argument("--seed", type=int, default=None, help="sampler seed (default: random)")
    study.add_argument(
        "--step-seconds",
        type=_bounded(float, 0, 60, low_open=True),
        default=0.45,
        help="measured time per open-loop rate step, in 3 windows after a lead-in window (default: 0.45)",
    )
    study.add_argument(
        "--probe-seconds",
        type=_bounded(float, 0, 60, low_open=True),
        default=0.3,
        help="measured time of the closed-loop capacity probe, in 3 windows after a warm-up (default: 0.3)",
    )
    study.add_argument(
        "--warmup-seconds",
        type=_bounded(float, 0, 60),
        default=0.2,
        help="unmeasured full batches before each trial's probe, at least 3 (default: 0.2)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--out", default="profile.json", help="profile JSON to write (default: profile.json)")
    output.add_argument("--termination-log", default=None, help="also write the profile (or the failure) here")
    output.add_argument("--plot", default=None, help="PNG of throughput vs p99 over all trials")


def run(args: argparse.Namespace) -> int:
    """Tune, print the table, write the profile. Returns the exit code."""
    import optuna

    from similarity_autotune.session import NoFeasibleConfig, TuneInputError, TuneOptions, tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own per-trial lines say more
    options = TuneOptions.from_args(args, progress_bars=sys.stderr.isatty())
    try:
        outcome = tune(options, stream=sys.stderr)
    except TuneInputError as exc:
        print(f"structsim autotune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NoFeasibleConfig as exc:
        print(f"structsim autotune: {exc}", file=sys.stderr)
        _write_termination_log(args.termination_log, str(exc))
        return EXIT_NO_FEASIBLE
    print(outcome.table)
    print(f"profile written to {args.out}", file=sys.stderr)
    _write_termination_log(args.termination_log, outcome.profile_json)
    return EXIT_OK


def _write_termination_log(path: str | None, text: str) -> None:
    """The pod's termination message (Kubernetes keeps up to 4 KiB of it in the pod status)."""
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
