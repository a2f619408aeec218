"""Where does the served path lose the engine's speed? The batcher and the engine in-process, measured apart.

Part 1, the engine alone in the calling thread: per forward-pass size (pairs of the corpus, pre-tokenized),
the wall time and the thread's CPU time of `score_encoded` (CPU time is time the GIL may be held).
Part 2, the batcher driven open loop by the autotuner's load generator (single-pair requests, as a
trial sends them) at fixed rates: per forward pass its size and the runner thread's wall and CPU time;
the event loop's lag (a 1 ms ticker's overshoot); collections; torch.compile recompilations. Not a
benchmark of record: a map for the next change (METHOD.md).

GPU:  python3 bench/served_path_probe.py --out-dir $OUT
CPU:  python3 bench/served_path_probe.py --device cpu --size tiny --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "service"), str(REPO / "autotune")]

import numpy as np  # noqa: E402
from provenance import git_commit  # noqa: E402
from similarity_service.batching import Batcher  # noqa: E402
from similarity_service.checkpoint import make_checkpoint  # noqa: E402
from similarity_service.corpus import load_corpus  # noqa: E402
from similarity_service.runner import Engine  # noqa: E402

from similarity_autotune.benchmark import LoadGenerator, LoadSettings  # noqa: E402
from similarity_autotune.runtime import ServingRuntime  # noqa: E402
from similarity_autotune.space import ServingConfig  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class TimedEngine:
    """The engine, with each call's thread-side start, end and CPU time recorded."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.calls: list[tuple[float, float, float, int]] = []  # (start, end, cpu s, pairs)

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.engine.max_batch_size = value

    def encode(self, pairs):  # noqa: ANN001, ANN201
        return self.engine.encode(pairs)

    def score_encoded(self, batch):  # noqa: ANN001, ANN201
        start, cpu = time.perf_counter(), time.thread_time()
        scores = self.engine.score_encoded(batch)
        self.calls.append((start, time.perf_counter(), time.thread_time() - cpu, len(batch)))
        return scores


def engine_alone(engine: Engine, encoded: list, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for size in sizes:
        batch = [encoded[i] for i in rng.integers(0, len(encoded), size=size)]
        served = engine.score_encoded(batch)  # a CUDA graph where one holds the batch
        executor = engine._packed  # noqa: SLF001 - a probe looks inside
        plain = executor.run(batch, max_tokens=1 << 30, max_pairs=1 << 30, use_graphs=False) if executor else served
        agreement = float(np.max(np.abs(np.asarray(served) - np.asarray(plain))))
        walls, cpus = [], []
        for _ in range(reps):
            batch = [encoded[i] for i in rng.integers(0, len(encoded), size=size)]
            start, cpu = time.perf_counter(), time.thread_time()
            engine.score_encoded(batch)
            walls.append(time.perf_counter() - start)
            cpus.append(time.thread_time() - cpu)
        wall = statistics.median(walls) * 1e3
        rows.append({"pairs": size, "max_abs_diff_vs_no_graph": agreement, "wall_ms_p50": wall, "wall_ms_max": max(walls) * 1e3,
                     "cpu_ms_p50": statistics.median(cpus) * 1e3, "pairs_per_s": size / wall * 1e3})
        print(f"engine alone, {size:5d} pairs: {wall:8.2f} ms wall, {rows[-1]['cpu_ms_p50']:7.2f} ms CPU, "
              f"{rows[-1]['pairs_per_s']:9,.0f} pairs/s; max |Δ| vs no graph {agreement:.2g}", flush=True)
    return rows


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - before - 0.001) * 1e3)


def recompilations() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(sum(counters["stats"].values())) if "stats" in counters else 0


async def open_loop_run(batcher: Batcher, timed: TimedEngine, load: LoadGenerator, rate: float, seconds: float) -> dict:
    records = []
    batcher._on_batch = records.append  # noqa: SLF001 - a probe looks inside
    timed.calls.clear()
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    pauses: list[float] = []
    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[info["generation"]] = time.perf_counter()
        elif info["generation"] in started:
            pauses.append((time.perf_counter() - started.pop(info["generation"])) * 1e3)

    gc.callbacks.append(on_gc)
    compiles = recompilations()
    try:
        step = await load.open_loop(batcher, rate=rate, seconds=seconds, seed=7)
    finally:
        gc.callbacks.remove(on_gc)
        stop.set()
        await tick
    sizes = [r.size for r in records]
    walls = [(end - start) * 1e3 for start, end, _, _ in timed.calls]
    cpus = [cpu * 1e3 for _, _, cpu, _ in timed.calls]
    gaps = [(b[0] - a[1]) * 1e3 for a, b in zip(timed.calls, timed.calls[1:])]
    span = timed.calls[-1][1] - timed.calls[0][0] if timed.calls else 0.0
    row = {
        "rate": rate, "completed": step.completed, "offered": step.offered, "throughput": step.throughput,
        "p50_ms": step.p50_ms, "p99_ms": step.p99_ms, "window_p99_ms": step.window_p99_ms,
        "window_backlog": step.window_backlog, "send_lag_ms_p99": step.send_lag_ms,
        "batches": len(records), "batch_size_p50": pct(sizes, 50), "batch_size_p99": pct(sizes, 99),
        "batch_size_max": max(sizes, default=0),
        "thread_wall_ms_p50": pct(walls, 50), "thread_wall_ms_p99": pct(walls, 99), "thread_wall_ms_max": max(walls, default=0),
        "thread_cpu_ms_p50": pct(cpus, 50), "thread_cpu_ms_p99": pct(cpus, 99),
        "idle_gap_ms_p50": pct(gaps, 50), "idle_gap_ms_p99": pct(gaps, 99),
        "runner_busy_share": sum(walls) / 1e3 / span if span else 0.0,
        "loop_lag_ms_p50": pct(lags, 50), "loop_lag_ms_p99": pct(lags, 99), "loop_lag_ms_max": max(lags, default=0),
        "gc_pauses": len(pauses), "gc_ms_max": max(pauses, default=0.0), "gc_ms_total": sum(pauses),
        "recompilations": recompilations() - compiles,
        "slowest_batches": sorted(({"pairs": s, "thread_wall_ms": w, "thread_cpu_ms": c} for s, w, c in zip(sizes, walls, cpus)),
                                  key=lambda b: -b["thread_wall_ms"])[:5],
    }
    print(f"  {rate:7,.0f}/s: {step.throughput:7,.0f} pairs/s p50 {step.p50_ms:6.1f} p99 {step.p99_ms:6.1f} ms; "
          f"{len(records)} batches, size p50 {row['batch_size_p50']:.0f} max {row['batch_size_max']}; thread wall p50 "
          f"{row['thread_wall_ms_p50']:.2f} p99 {row['thread_wall_ms_p99']:.2f} max {row['thread_wall_ms_max']:.1f} ms, CPU p50 "
          f"{row['thread_cpu_ms_p50']:.2f}; runner busy "
          f"{row['runner_busy_share']:.0%}; loop lag p99 {row['loop_lag_ms_p99']:.1f} max {row['loop_lag_ms_max']:.1f}; "
          f"gc {len(pauses)}x max {row['gc_ms_max']:.1f} ms; recompiles {row['recompilations']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="base")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 3000, 6000, 10000])
    parser.add_argument("--configs", nargs="+", default=["128:0", "1024:2"], help="max_batch_size:max_wait_ms")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds = [50.0], 0.3

    model_dir = make_checkpoint(Path(tempfile.mkdtemp()) / args.size, args.size, seed=0)
    engine = Engine.load(model_dir, precision=args.precision, device=args.device, compile_model=not args.no_compile)
    warmup_started = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - warmup_started
    print(f"warm-up (graph captures) {warmup_s:.1f} s", flush=True)
    encoded = engine.encode([pair.pair for pair in load_corpus()])
    sizes = [1, 8, 32, 64, 100, 128, 200, 256, 384, 512, 1024] if not args.quick else [1, 8]
    report: dict = {
        "benchmark": "served_path_probe", "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device_name": engine.info.device_name, "precision": args.precision, "compile": not args.no_compile,
        "size": args.size, "switch_interval_s": None, "warmup_s": warmup_s,
        "engine_alone": engine_alone(engine, encoded, sizes, reps=3 if args.quick else 15),
        "batcher": [],
    }
    timed = TimedEngine(engine)
    runtime = ServingRuntime(lambda precision: timed, max_queue_pairs=16384, max_batch_tokens=None)  # type: ignore[arg-type, return-value]
    report["switch_interval_s"] = sys.getswitchinterval()
    report["event_loop"] = runtime.event_loop
    report["threads"] = threading.active_count()
    load = LoadGenerator([[pair] for pair in encoded], LoadSettings(windows=4))
    try:
        for spec in args.configs:
            batch, wait = spec.split(":")
            config = ServingConfig(precision=args.precision, max_batch_size=int(batch), max_wait_ms=float(wait))
            batcher = runtime.batcher(config)
            print(f"batcher: max_batch_size {batch}, max_wait_ms {wait}", flush=True)
            gc.collect()
            gc.freeze()
            for rate in args.rates:
                row = runtime.run(open_loop_run(batcher, timed, load, rate, args.seconds))
                report["batcher"].append({"max_batch_size": int(batch), "max_wait_ms": float(wait), **row})
    finally:
        runtime.close()
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        name = f"served_path_probe-{engine.info.device_name.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        (args.out_dir / name).write_text(json.dumps(report, indent=1))
        print("written", args.out_dir / name)


if __name__ == "__main__":
    main()
