"""What `PairTokenizer.encode` costs per call shape, this tree against a git revision, on this CPU.

Tokenizing runs on the host's CPU whatever the device, so this runs anywhere; compare within one run only.
Call shapes, from the project's corpus (1,262 pairs, 1,561 distinct sentences among their 2,524):
one pair, a request of 4 pairs, a ranking request (one source, 100 targets), and the whole corpus in one
call. Each tree is timed in a child process of its own (its `service/` first on PYTHONPATH) in
interleaved rounds, A B B A; the report is the median per call shape, and the paired ratios. The
vocabulary is the synthetic checkpoint's (21,128 tokens in the Chinese BERT layout).

    .venv/bin/python bench/tokenize_bench.py --compare HEAD~1 --out-dir bench/results
"""

from __future__ import annotations

import argparse
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


def run_child(pythonpath: str, model_dir: str, calls: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, str(REPO / "bench")])}
    done = subprocess.run([sys.executable, __file__, "--child", model_dir, "--calls", str(calls)], env=env,
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.calls)))
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
    shapes = list(rounds["this tree"][0])
    medians = {name: {shape: statistics.median(r[shape] for r in runs) for shape in shapes} for name, runs in rounds.items()}
    report: dict[str, Any] = {
        "benchmark": "tokenize_bench", "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "rounds": args.rounds,
        "us_per_call": rounds, "median_us_per_call": medians,
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
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"tokenize_bench-cpu-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
