"""Old against new trial measurement, interleaved in one process, so both see the same machine load.

Measures one config round after round with (a) a baseline `similarity_autotune/benchmark.py` from an
earlier commit, on plain asyncio with Python's default 5 ms GIL switch interval (how trials ran
before), (b) the current benchmark on that same loop, and (c) the current benchmark in the current
`ServingRuntime` (serve's event loop and switch interval). Reports each arm's median, min, max and
stdev/median over the rounds, and the garbage collections seen.

    git show 18ec4ca:autotune/similarity_autotune/benchmark.py > /tmp/benchmark_18ec4ca.py
    python3 bench/autotune_method_ab.py --baseline /tmp/benchmark_18ec4ca.py --simulate --batch 128

`--simulate` (see bench/autotune_repeatability.py) replaces the forward pass by a sleep of a GPU's
length, so a CPU machine sees GPU request rates.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "service"), str(REPO / "autotune"), str(REPO / "bench")]  # runs from a plain checkout too

from autotune_repeatability import GcPauses, SimulatedDevice  # noqa: E402
from autotune_vs_grid import synthetic_model  # noqa: E402
from provenance import git_commit  # noqa: E402
from similarity_service.batching import Batcher  # noqa: E402
from similarity_service.corpus import load_corpus  # noqa: E402

from similarity_autotune.benchmark import LoadGenerator, LoadSettings  # noqa: E402
from similarity_autotune.runtime import ServingRuntime  # noqa: E402
from similarity_autotune.space import ServingConfig  # noqa: E402

OLD_SWITCH_INTERVAL_S = 0.005  # Python's default, which the study ran with before


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="an earlier similarity_autotune/benchmark.py")
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--wait-ms", type=float, default=2.0)
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()

    from similarity_service.runner import Engine

    baseline = load_module(args.baseline)
    real = Engine.load(str(synthetic_model("tiny")), device="cpu", max_seq_len=128)
    engine = SimulatedDevice(real) if args.simulate else real
    requests = [[pair] for pair in real.encode([row.pair for row in load_corpus()])]
    config = ServingConfig(precision="fp32", max_batch_size=args.batch, max_wait_ms=args.wait_ms)
    concurrency = 2 * args.batch

    async def start() -> Batcher:
        batcher = Batcher(engine, max_batch_size=args.batch, max_wait_ms=args.wait_ms, max_batch_tokens=None, max_queue_pairs=4096)
        await batcher.start()
        return batcher

    plain = asyncio.Runner()  # as ServingRuntime was before: asyncio's own loop
    plain_batcher = plain.run(start())
    runtime = ServingRuntime(lambda _precision: engine, max_queue_pairs=4096, max_batch_tokens=None)
    runtime_batcher = runtime.batcher(config)
    arms = {
        "baseline": (plain, plain_batcher, baseline.LoadGenerator(requests, baseline.LoadSettings()), OLD_SWITCH_INTERVAL_S),
        "current_on_plain_asyncio": (plain, plain_batcher, LoadGenerator(requests, LoadSettings()), OLD_SWITCH_INTERVAL_S),
        "current": (runtime, runtime_batcher, LoadGenerator(requests, LoadSettings()), sys.getswitchinterval()),
    }
    values: dict[str, list[float]] = {name: [] for name in arms}
    with GcPauses() as pauses:
        for round_ in range(args.rounds):
            line = []
            for name, (loop, batcher, load, interval) in arms.items():
                sys.setswitchinterval(interval)
                measured = loop.run(
                    load.measure(batcher, slo_p99_ms=args.p99_ms, max_batch_size=args.batch, probe_concurrency=concurrency)
                )
                values[name].append(float(measured.throughput))
                line.append(f"{name} {measured.throughput:,.0f}")
            print(f"round {round_}: " + ", ".join(line) + f"; load average {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    runtime.close()
    plain.run(plain_batcher.close())
    plain.close()

    summary = {
        name: {
            "median": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "stdev_over_median": statistics.stdev(v) / statistics.median(v) if statistics.median(v) else None,
            "values": v,
        }
        for name, v in values.items()
    }
    card = ("simulated-" if args.simulate else "") + real.info.device_name.replace(" ", "-")
    now = datetime.now(UTC)
    record = {
        "benchmark": "autotune_method_ab",
        "card": card,
        "commit": git_commit(),
        "baseline": str(args.baseline),
        "date": now.isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg(),
        "config": {"batch": args.batch, "wait_ms": args.wait_ms, "p99_ms": args.p99_ms, "rounds": args.rounds},
        "arms": summary,
        "gc_during_rounds": pauses.summary(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"autotune_method_ab-{card}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for name, s in summary.items():
        print(f"{name}: median {s['median']:,.0f} pairs/s, min {s['min']:,.0f}, max {s['max']:,.0f}, stdev/median {s['stdev_over_median']:.1%}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
