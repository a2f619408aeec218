"""How repeatable is one autotune trial? The same config measured N times in a row, as a trial measures it.

Loads one engine as `structsim autotune` does, sets its batcher to one config, and runs the trial's
measurement (`LoadGenerator.measure`, the study's default windows unless overridden) N times back to
back. Reports each run's value (sustained pairs/s under the SLO), their median, min/max, and the
spread (max-min)/median, plus the garbage collections that ran during the measurements (count and
longest pause), as a collection is the kind of stall a short window's p99 cannot absorb.

    python3 bench/autotune_repeatability.py --device cpu --quick              # tiny model, here
    python3 bench/autotune_repeatability.py --device cpu --quick --simulate --batch 128  # GPU-like rates, here
    python3 bench/autotune_repeatability.py --precision fp16 --batch 128 --wait-ms 2 --runs 8   # a GPU

`--simulate` keeps the real tokenizer, batcher and load generator but replaces the forward pass by a
sleep as long as an H100's fp16 forward of BERT-base (fixed cost plus a cost per token, the GIL
released as in a CUDA sync): the requests per second, hence the event loop's and the collector's
work, are a GPU's, while the "device" itself is noiseless, so what varies is the measurement.

Writes bench/results/autotune_repeatability-<card>-<date>.json with the commit and every run's steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "service"), str(REPO / "autotune"), str(REPO / "bench")]  # runs from a plain checkout too

from autotune_vs_grid import synthetic_model  # noqa: E402
from provenance import git_commit  # noqa: E402
from similarity_service.corpus import load_corpus  # noqa: E402
from similarity_service.engine_api import EncodedPair, EngineInfo  # noqa: E402

from similarity_autotune.benchmark import LoadGenerator, LoadSettings  # noqa: E402
from similarity_autotune.runtime import ServingRuntime, TunableEngine  # noqa: E402
from similarity_autotune.session import TuneOptions, open_runtime, service_settings  # noqa: E402
from similarity_autotune.space import ServingConfig  # noqa: E402


# The simulated device: seconds per forward and per real token (about an H100's fp16 BERT-base
# packed forward: a few thousand pairs of ~60 tokens take some 30 ms).
SIMULATED_FIXED_S = 0.002
SIMULATED_PER_TOKEN_S = 0.5e-6


class SimulatedDevice:
    """A real engine's tokenizer and info; its forward pass is a sleep of a fixed, known length."""

    def __init__(self, real: TunableEngine) -> None:
        self._real = real
        self.max_batch_size = real.max_batch_size

    @property
    def info(self) -> EngineInfo:
        return self._real.info

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        return self._real.encode(pairs)

    def score_encoded(self, batch: Sequence[EncodedPair]) -> list[float]:
        tokens = sum(pair.num_tokens for pair in batch)
        time.sleep(SIMULATED_FIXED_S + SIMULATED_PER_TOKEN_S * tokens)  # releases the GIL, as a CUDA sync does
        return [0.5] * len(batch)


class GcPauses:
    """Times every collection the interpreter runs (gc.callbacks), by generation."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._started: float | None = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))
            self._started = None

    def summary(self) -> dict[str, object]:
        by_gen = {g: [s for gen, s in self.pauses if gen == g] for g in (0, 1, 2)}
        return {
            f"gen{g}": {"count": len(s), "max_ms": round(1000 * max(s), 2) if s else 0.0, "total_ms": round(1000 * sum(s), 1)}
            for g, s in by_gen.items()
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the synthetic one, made here)")
    parser.add_argument("--quick", action="store_true", help="tiny model at 128 tokens (the --quick bench's setup)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size")
    parser.add_argument("--wait-ms", type=float, default=2.0, help="max_wait_ms")
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--simulate", action="store_true", help="a sleep instead of the forward pass (see above)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=None, help="default: the study's")
    parser.add_argument("--probe-seconds", type=float, default=None, help="default: the study's")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    model = args.model or str(synthetic_model("tiny" if args.quick else "base"))
    options = TuneOptions(model=model, device=args.device, max_seq_len=128 if args.quick else None)
    windows = {k: v for k, v in (("step_seconds", args.step_seconds), ("probe_seconds", args.probe_seconds)) if v}
    settings = LoadSettings(**windows)
    config = ServingConfig(precision=args.precision, max_batch_size=args.batch, max_wait_ms=args.wait_ms)
    values: list[float] = []
    runs: list[dict[str, object]] = []
    service = service_settings(options, os.environ)
    runtime = open_runtime(service, sys.stderr)
    if args.simulate:
        real = runtime.engine(config.precision)
        runtime.close()
        runtime = ServingRuntime(
            lambda _precision: SimulatedDevice(real),
            max_queue_pairs=service.max_queue_pairs,
            max_batch_tokens=service.max_batch_tokens,
        )
    with runtime:
        engine = runtime.engine(config.precision)
        info = engine.info
        requests = [[pair] for pair in engine.encode([row.pair for row in load_corpus()])]
        load = LoadGenerator(requests, settings)
        batcher = runtime.batcher(config)
        with GcPauses() as pauses:
            for run in range(args.runs):
                started = time.perf_counter()
                measured = runtime.run(
                    load.measure(
                        batcher,
                        slo_p99_ms=args.p99_ms,
                        max_batch_size=config.max_batch_size,
                        probe_concurrency=min(2 * config.max_batch_size, runtime.max_queue_pairs),
                    )
                )
                values.append(measured.throughput)
                runs.append({"value": measured.throughput, "seconds": time.perf_counter() - started, **measured.evidence()})
                print(f"run {run}: {measured.throughput:,.0f} pairs/s ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else float("nan")
    card = ("simulated-" if args.simulate else "") + (info.device_name or info.device).replace(" ", "-")
    now = datetime.now(UTC)
    record = {
        "benchmark": "autotune_repeatability",
        "card": card,
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "simulated": args.simulate,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "config": asdict(config),
        "slo_p99_ms": args.p99_ms,
        "load_settings": asdict(settings),
        "values": values,
        "median": median,
        "min": min(values),
        "max": max(values),
        "relative_spread": spread,
        "relative_stdev": statistics.stdev(values) / median if len(values) > 1 and median else float("nan"),
        "gc_during_runs": pauses.summary(),
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"autotune_repeatability-{card}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    print(
        f"{config.label()} on {card}, {args.runs} runs: median {median:,.0f} pairs/s, "
        f"min {min(values):,.0f}, max {max(values):,.0f}, spread (max-min)/median {spread:.1%}, "
        f"stdev/median {record['relative_stdev']:.1%}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    print(f"gc during the runs: {json.dumps(record['gc_during_runs'])}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
