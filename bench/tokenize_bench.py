"""What `PairTokenizer.encode` costs per call shape, this tree against a git revision, on this CPU.

Tokenizing runs on the host's CPU whatever the device, so this runs anywhere; compare within one run only.
Call shapes, from the project's corpus (1,262 pairs, 1,561 distinct sentences among their 2,524):
one pair, a request of 4 pairs, a ranking request (one source, 100 targets), and the whole corpus in one
call. Each tree is timed in a child process of its own (its `service/` first on PYTHONPATH) in
interleaved rounds, A B B A; the report is the median per call shape, and the paired ratios. The
vocabulary is the synthetic checkpoint's (21,128 tokens in the Chinese BERT layout).

`--gc` also times what the garbage collector adds to `Engine.score`-sized calls: with a loaded engine
(torch and the tiny model: the heap a scoring process holds), `--gc-calls` tokenizing calls of the corpus
x8 in a row, each result kept until the next, as `structsim score` does; per call the median and the
slowest, and the full collections' count and time, on the heap as is and settled (`serve.settle_heap`, what
`structsim score` and `serve` run on since fe65b1d's successors).

`--after-idle` times one pair's call in this tree right after the thread slept 0, 0.5, 2 and 5 ms, beside a
fixed piece of pure Python: what a lone request's first work costs on a host whose threads went idle (every
hand-off between the event loop, the tokenizer thread and the runner wakes a thread).

    .venv/bin/python bench/tokenize_bench.py --compare HEAD~1 --out-dir bench/results
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from provenance import REPO, git_commit

RANKING_TARGETS = 100


def child(model_dir: str, calls: int) -> dict[str, float]:
    """µs per call of each shape, in this process's tree (median of 5 runs of `calls` calls)."""
    from similarity_service.corpus import load_corpus
    from similarity_service.tokenization import PairTokenizer

    tokenizer = PairTokenizer(model_dir)
    pairs = [pair.pair for pair in load_corpus()]
    shapes = {
        "one pair": pairs[3:4],
        "4 pairs": pairs[10:14],
        f"ranking, 1 x {RANKING_TARGETS}": [(pairs[0][0], second) for _, second in pairs[:RANKING_TARGETS]],
        f"corpus, {len(pairs)} pairs": pairs,
    }
    out = {}
    for name, shape in shapes.items():
        repeat = max(1, calls // len(shape))
        tokenizer.encode(shape)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeat):
                tokenizer.encode(shape)
            runs.append((time.perf_counter() - start) / repeat * 1e6)
        out[name] = statistics.median(runs)
    return out


def gc_child(model_dir: str, calls: int, settle: bool) -> dict[str, float]:
    """Tokenizing calls of the corpus x8 beside a loaded engine: per-call ms, and full collections."""
    from workload import distinct_copies

    from similarity_service.corpus import load_corpus
    from similarity_service.runner import Engine

    engine = Engine.load(model_dir, device="cpu", precision="fp32")
    pairs = distinct_copies([pair.pair for pair in load_corpus()], 8)
    if settle:
        from similarity_service.commands.serve import settle_heap

        settle_heap()
    full: list[float] = []
    started: list[float] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            else:
                full.append(time.perf_counter() - started.pop())

    gc.callbacks.append(watch)
    kept, times = None, []
    for _ in range(calls):
        start = time.perf_counter()
        kept = engine.encode(pairs)  # the last result stays alive while the next is made, as in a loop
        times.append((time.perf_counter() - start) * 1e3)
    del kept
    return {"call_ms_median": statistics.median(times), "call_ms_max": max(times),
            "full_collections": len(full), "full_collection_ms": sum(full) * 1e3}


IDLE_GAPS_MS = (0.0, 0.5, 2.0, 5.0)


def after_idle(model_dir: str, calls: int = 400) -> dict[str, dict[str, float]]:
    """Median µs of one pair's `encode`, and of a fixed Python loop, each right after sleeping each gap."""
    from similarity_service.corpus import load_corpus
    from similarity_service.tokenization import PairTokenizer

    tokenizer = PairTokenizer(model_dir)
    one = [load_corpus()[3].pair]
    work = {"one pair's encode": lambda: tokenizer.encode(one), "sum(range(2000))": lambda: sum(range(2000))}
    out: dict[str, dict[str, float]] = {}
    for name, call in work.items():
        out[name] = {}
        for gap_ms in IDLE_GAPS_MS:
            times = []
            for _ in range(calls):
                if gap_ms:
                    time.sleep(gap_ms / 1e3)
                start = time.perf_counter()
                call()
                times.append((time.perf_counter() - start) * 1e6)
            out[name][f"after {gap_ms:g} ms idle"] = statistics.median(times)
    return out


def run_child(pythonpath: str, model_dir: str, calls: int, gc_mode: str | None = None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, str(REPO / "bench")])}
    mode = ["--gc-child", gc_mode] if gc_mode else []
    done = subprocess.run([sys.executable, __file__, "--child", model_dir, "--calls", str(calls), *mode], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="REV", required=False, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=4000, help="pairs tokenized per timed run and shape (about)")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--gc", action="store_true", help="also time the collector's share of corpus-x8 calls")
    parser.add_argument("--gc-calls", type=int, default=12)
    parser.add_argument("--after-idle", action="store_true", help="also time a lone call after the thread slept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gc-child", choices=["as is", "settled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = gc_child(args.child, args.calls, args.gc_child == "settled") if args.gc_child else child(args.child, args.calls)
        print(json.dumps(result))
        return
    from batcher_overhead import extract_tree

    from similarity_service.checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_checkpoint(Path(tmp) / "tiny", "tiny", seed=0))
        trees = {"this tree": str(REPO / "service")}
        if args.compare:
            trees[args.compare] = str(extract_tree(args.compare, Path(tmp)))
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for k in range(args.rounds):
            order = list(trees.items())
            for name, path in order if k % 2 == 0 else reversed(order):
                rounds[name].append(run_child(path, model_dir, args.calls))
        collector: dict[str, dict[str, dict[str, float]]] = {}
        if args.gc:
            for name, path in trees.items():
                collector[name] = {heap: run_child(path, model_dir, args.gc_calls, heap) for heap in ("as is", "settled")}
        idle = after_idle(model_dir) if args.after_idle else {}
    shapes = list(rounds["this tree"][0])
    medians = {name: {shape: statistics.median(r[shape] for r in runs) for shape in shapes} for name, runs in rounds.items()}
    report: dict[str, Any] = {
        "benchmark": "tokenize_bench", "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "rounds": args.rounds,
        "us_per_call": rounds, "median_us_per_call": medians, "corpus_x8_calls": collector, "after_idle_us": idle,
    }
    for name, values in medians.items():
        print(f"{name}: " + ", ".join(f"{shape} {us:,.1f} µs" for shape, us in values.items()))
    if args.compare:
        ratios = {shape: [new[shape] / old[shape] for new, old in zip(rounds["this tree"], rounds[args.compare], strict=True)]
                  for shape in shapes}
        report["time_ratio_new_over_old"] = {shape: {"median": statistics.median(r), "range": [min(r), max(r)]}
                                             for shape, r in ratios.items()}
        print(f"time, this tree / {args.compare} (median, min-max over rounds):")
        for shape, r in ratios.items():
            print(f"  {shape}: x{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})")
    for name, heaps in collector.items():
        for heap, row in heaps.items():
            print(f"{name}, heap {heap}: {args.gc_calls} corpus-x8 calls, median {row['call_ms_median']:.0f} ms, slowest "
                  f"{row['call_ms_max']:.0f} ms; {row['full_collections']} full collections, {row['full_collection_ms']:.0f} ms")
    for name, gaps in idle.items():
        print(f"{name}: " + ", ".join(f"{gap} {us:,.1f} µs" for gap, us in gaps.items()))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"tokenize_bench-cpu-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
