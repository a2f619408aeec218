"""What does programmatic dependent launch buy the latency kernels? One pair's graph with it and without.

A single pair's forward is a CUDA graph of ~96 small kernels, each bound by fixed costs: on an H200 the replay
took 0.375 ms for 0.305 ms of kernel time, and the GEMMs ~4 us each where reading their weights takes ~1 us
(`profile_engine-NVIDIA-H200-compiled-2026-12-02-ee567ec.json`). With dependent launch (compute capability 9.0+)
each kernel starts while the one before it runs, fetches its weights into L2, and waits for its inputs
(latency_kernels.py). This probe captures the same engine twice, with `latency_kernels.DEPENDENT_LAUNCH` off and
on, and times, in interleaved rounds: one graph replay (device-synchronized wall time), `Engine.score` of one
pair, and each graph's kernel time (torch.profiler). It checks that both score the corpus' short pairs alike.
Not a benchmark of record: a map for the next change.

GPU:  python3 bench/dependent_launch_probe.py --out-dir $OUT   (PYTHONPATH=service:bench)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from profile_engine import kernel_breakdown
from provenance import git_commit

from similarity_service import latency_kernels
from similarity_service.checkpoint import make_checkpoint
from similarity_service.corpus import load_corpus
from similarity_service.packed_executor import LATENCY_MAX_TOKENS, graph_bucket, pack
from similarity_service.runner import Engine

ROUNDS = 5
CALLS = 400  # per round and measure


def p50_ms(call, count: int = CALLS) -> float:
    times = []
    for _ in range(count):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    model_dir = make_checkpoint(Path(tempfile.mkdtemp()) / "base", "base", seed=0)
    pairs = [p.pair for p in load_corpus()]

    engines: dict[str, Engine] = {}
    for name, dependent in (("plain", False), ("dependent launch", True)):
        latency_kernels.DEPENDENT_LAUNCH = dependent  # read when the graphs are captured, in warmup
        engine = Engine.load(model_dir, precision="fp16", device="cuda", compile_model=False)
        engine.warmup()
        engines[name] = engine
    latency_kernels.DEPENDENT_LAUNCH = True

    first = engines["plain"]
    short = [pair for pair, item in zip(pairs, first.encode(pairs), strict=True) if item.num_tokens <= LATENCY_MAX_TOKENS]
    one = first.encode(short[:1])
    bucket = graph_bucket(one[0].num_tokens, 1, first.info.max_seq_len)
    graphs = {}
    for name, engine in engines.items():
        executor = engine._packed  # noqa: SLF001 - a probe looks inside
        assert executor._latency is not None, "the latency kernels did not load"  # noqa: SLF001
        executor._launch(*pack(one), bucket)  # noqa: SLF001 - fills the bucket's input buffer for the replays
        graphs[name] = executor._graphs[bucket]  # noqa: SLF001

    # One pair at a time through each, so every score comes from the latency graphs.
    scores = {name: [engine.score([pair])[0] for pair in short[:300]] for name, engine in engines.items()}
    max_abs = max(abs(a - b) for a, b in zip(scores["plain"], scores["dependent launch"], strict=True))
    print(f"{len(short[:300])} short pairs one at a time: max |score difference| {max_abs:.2e}", flush=True)

    rounds: dict[str, dict[str, list[float]]] = {name: {"replay_ms": [], "score_ms": []} for name in engines}
    for turn in range(ROUNDS):
        for name, engine in engines.items():
            engine._packed._launch(*pack(one), bucket)  # noqa: SLF001 - the shared input buffer: this engine's
            rounds[name]["replay_ms"].append(p50_ms(graphs[name].replay))
            rounds[name]["score_ms"].append(p50_ms(lambda engine=engine: engine.score([short[0]])))
        print(f"round {turn}: " + "  ".join(f"{n} replay {r['replay_ms'][-1]:.3f} score {r['score_ms'][-1]:.3f}" for n, r in rounds.items()), flush=True)
    kernels = {}
    for name, engine in engines.items():
        engine._packed._launch(*pack(one), bucket)  # noqa: SLF001
        kernels[name] = kernel_breakdown(graphs[name])
    summary = {
        name: {
            "replay_p50_ms": statistics.median(measures["replay_ms"]),
            "score_p50_ms": statistics.median(measures["score_ms"]),
            "kernel_time_us": kernels[name]["kernel_time_us"],
            "kernels": kernels[name]["kernels"],
        }
        for name, measures in rounds.items()
    }
    for name, row in summary.items():
        print(f"{name:18s} replay {row['replay_p50_ms']:.3f} ms  score {row['score_p50_ms']:.3f} ms  "
              f"kernels {row['kernels']} taking {row['kernel_time_us']:.0f} us")

    card = torch.cuda.get_device_name()
    record = {
        "benchmark": "dependent_launch_probe", "card": card, "commit": git_commit(), "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "model": "synthetic StructBERT-base (seed 0; not semantic)",
        "one_pair_tokens": one[0].num_tokens, "bucket": list(bucket), "max_abs_score_difference": max_abs,
        "pairs_compared": len(short[:300]), "summary": summary, "rounds": rounds, "kernel_breakdown": kernels,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"dependent_launch_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
