"""Where does a packed fp16 call spend its time? Host stages vs device time, one call at a time.

Splits `Engine.score_encoded` on the packed path into its stages (sort + pack on the host, the copy,
the forwards, the read-back) and times each with a device sync in between, for a large call (the
corpus x8) and for one pair; also the device time of the forwards alone (CUDA events) and of one
graph replay; and, in one profiled `Engine.score` call, where the device idles and which of the host's
stages (tokenizing, launching, reading back) run meanwhile. Not a benchmark of record: a map for the next optimization (METHOD.md).

GPU:  python3 bench/profile_engine.py [--compile] --out-dir bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from provenance import git_commit
from workload import distinct_copies

from similarity_service.checkpoint import make_checkpoint
from similarity_service.corpus import load_corpus
from similarity_service.packed_executor import PendingScores, graph_bucket, pack, split_by_tokens
from similarity_service.packed_pairs import PackedPairs
from similarity_service.runner import Engine


def timed(fn, reps: int = 5) -> float:
    """Median wall ms of fn() with the device synchronized before and after."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def kernel_breakdown(graph: torch.cuda.CUDAGraph) -> dict:
    """Device time per kernel of one replay of a single pair's graph: is the replay's time in the kernels
    themselves or between them?"""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event.name[:90], []).append(event.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {
        "kernels": len(kernels),
        "kernel_time_us": sum(e.device_time for e in kernels),
        "top": [{"name": name, "count": len(times), "total_us": sum(times), "mean_us": sum(times) / len(times)}
                for name, times in top],
    }


KERNEL_KINDS = (  # substrings of kernel names, first match wins
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "splitkreduce")),
    ("triton (Inductor's fused elementwise)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other")


def forwards_breakdown(forwards) -> dict:
    """Device time per kernel kind and per kernel over one run of the large call's forwards: where the
    batch throughput goes."""
    from torch.profiler import ProfilerActivity, profile

    forwards()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        forwards()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower()]
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_kind[kernel_kind(event.name)] = by_kind.get(kernel_kind(event.name), 0.0) + event.device_time
        by_name.setdefault(event.name[:110], []).append(event.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {
        "kernels": len(kernels),
        "kernel_time_ms": sum(e.device_time for e in kernels) / 1e3,
        "by_kind_ms": {kind: us / 1e3 for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name, "kind": kernel_kind(name), "count": len(times), "total_ms": sum(times) / 1e3}
                for name, times in top],
    }


HOST_STAGES = ("tokenize", "launch", "read_back", "rescore")


@contextlib.contextmanager
def host_stages(engine: Engine) -> Iterator[None]:
    """`Engine.score`'s host stages as profiler ranges (HOST_STAGES): a chunk's tokenizing (its own thread),
    its launch (sort, pack, copy and the forwards' kernels), its read-back, and the fp32 rescoring at the end."""
    from torch.profiler import record_function

    def ranged(name: str, fn):
        def wrapper(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    tokenizer = engine._tokenizer  # noqa: SLF001 - a profile looks inside
    patched = [(tokenizer, "encode_packed", "tokenize"), (engine, "_launch_bulk", "launch"),
               (engine, "_rescore", "rescore")]
    for owner, attribute, name in patched:
        setattr(owner, attribute, ranged(name, getattr(owner, attribute)))
    collect = PendingScores.collect
    PendingScores.collect = ranged("read_back", collect)
    try:
        yield
    finally:
        PendingScores.collect = collect
        for owner, attribute, _ in patched:
            delattr(owner, attribute)  # the class's method shows through again


def device_timeline(call, engine: Engine | None = None) -> dict:
    """Where the device waits during one `call()`: kernel and copy intervals from the profiler, merged, and the
    idle gaps between them (the host's part of a large call that does not overlap the device's). With `engine`,
    also the host stages (`host_stages`) that overlap each gap and every stage's interval, ms from the first
    device event; profiling the host's ops too slows the host, so its gaps are an upper bound."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if engine is None else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with host_stages(engine) if engine is not None else contextlib.nullcontext(), profile(activities=activities) as prof:
        call()
        torch.cuda.synchronize()
    events = prof.events()
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    origin = spans[0][0]
    stages = sorted((e.time_range.start - origin, e.time_range.end - origin, e.name, e.thread)
                    for e in events if e.device_type.name == "CPU" and e.name in HOST_STAGES)
    busy, gaps, (start, end) = 0.0, [], spans[0]
    for lo, hi in spans[1:]:
        if lo > end:
            busy += end - start
            gaps.append((lo - end, end - origin))
            start, end = lo, hi
        else:
            end = max(end, hi)
    busy += end - start
    span_us = end - origin

    def during(at: float, gap: float) -> list[str]:
        return [f"{name} ({lo / 1e3:.2f}-{hi / 1e3:.2f} ms)" for lo, hi, name, _ in stages if lo < at + gap and hi > at]

    timeline = {
        "first_to_last_ms": span_us / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (span_us - busy) / 1e3,
        "gaps_over_0_2_ms": [{"at_ms": at / 1e3, "ms": gap / 1e3} for gap, at in sorted(gaps) if gap > 200][::-1][:20],
        "idle_ms_by_quarter": [sum(gap for gap, at in gaps if quarter * span_us / 4 <= at < (quarter + 1) * span_us / 4) / 1e3
                               for quarter in range(4)],
    }
    if engine is not None:
        for gap in timeline["gaps_over_0_2_ms"]:
            gap["host_stages"] = during(gap["at_ms"] * 1e3, gap["ms"] * 1e3)
        threads = {thread: index for index, thread in enumerate(dict.fromkeys(thread for *_, thread in stages))}
        timeline["host_stages"] = [{"stage": name, "thread": threads[thread], "from_ms": round(lo / 1e3, 3),
                                    "to_ms": round(hi / 1e3, 3)} for lo, hi, name, thread in stages]
    return timeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp16-residual", action="store_true")
    parser.add_argument("--no-latency-kernels", action="store_true", help="library kernels in the smallest graphs too")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    model_dir = make_checkpoint(Path(tempfile.mkdtemp()) / "base", "base", seed=0)
    engine = Engine.load(model_dir, precision="fp16", device="cuda", compile_model=args.compile,
                         residual_fp32=not args.fp16_residual, latency_kernels=not args.no_latency_kernels)
    engine.warmup()
    executor = engine._packed  # noqa: SLF001 - a profile looks inside
    pairs = distinct_copies([p.pair for p in load_corpus()], 8)
    items = engine.encode(pairs)
    report: dict = {
        "benchmark": "profile_engine", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "pairs": len(items), "compile": args.compile, "fp16_residual": args.fp16_residual,
        "latency_kernels": executor._latency is not None,  # noqa: SLF001
    }

    report["encode_ms"] = timed(lambda: engine.encode(pairs), 3)
    # the whole offline call as bench/perf.py times it (tokenizing in chunks, overlapped with the forwards)
    report["score_ms"] = timed(lambda: engine.score(pairs), 3)
    report["score_pairs_s"] = len(pairs) / (report["score_ms"] / 1e3)
    report["score_device_timeline"] = device_timeline(lambda: engine.score(pairs))
    report["score_device_timeline_with_host_stages"] = device_timeline(lambda: engine.score(pairs), engine)
    report["score_encoded_ms"] = timed(lambda: engine.score_encoded(items), 3)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    report["sort_ms"] = timed(lambda: sorted(range(len(items)), key=lambda i: len(items[i].input_ids)), 3)
    ordered = [items[i] for i in order]
    report["pack_ms"] = timed(lambda: pack(ordered), 3)
    block, cu = pack(ordered)
    ranges = split_by_tokens(cu, engine.max_batch_tokens, engine.max_batch_size)
    report["sub_batches"] = len(ranges)
    with torch.inference_mode():  # as `run` does
        report["run_eager_ms"] = timed(
            lambda: executor._launch_eager(PackedPairs.of(ordered), engine.max_batch_tokens, engine.max_batch_size).cpu(), 3
        )

    # device-resident inputs: the forwards alone
    dev = torch.from_numpy(block).cuda()
    subs = [(dev[:, cu[s]:cu[e]], torch.from_numpy(cu[s:e + 1] - cu[s]).cuda(), int(np.diff(cu[s:e + 1]).max()))
            for s, e in ranges]

    def forwards() -> None:
        with torch.inference_mode():
            for b, c, m in subs:
                executor._call(b, c, m)

    report["forwards_only_ms"] = timed(forwards, 5)
    report["forwards_only_pairs_s"] = len(items) / (report["forwards_only_ms"] / 1e3)
    report["score_encoded_pairs_s"] = len(items) / (report["score_encoded_ms"] / 1e3)
    report["forwards_kernels"] = breakdown = forwards_breakdown(forwards)
    # the encoder's matmul FLOPs as this forward runs them (the last layer's [CLS] rows only, bar k and v)
    config = engine._module.config  # noqa: SLF001
    hidden, inner = config.hidden_size, config.intermediate_size
    tokens_total, layers = int(cu[-1]), config.num_hidden_layers
    per_row = 2 * hidden * (3 * hidden + hidden + 2 * inner)
    gemm_flops = (layers - 1) * tokens_total * per_row + tokens_total * 2 * hidden * 3 * hidden \
        + len(items) * 2 * hidden * (hidden + 2 * inner)
    report["tokens"] = tokens_total
    report["gemm_tflop_s"] = gemm_flops / (breakdown["by_kind_ms"].get("gemm", float("nan")) / 1e3) / 1e12

    # one pair
    one = items[:1]
    tokens = len(one[0].input_ids)
    bucket = graph_bucket(tokens, 1, engine.info.max_seq_len)
    graph = executor._graphs[bucket]  # noqa: SLF001 - a probe looks inside
    report["one_pair_tokens"] = tokens
    report["one_pair_bucket"] = bucket
    executor._launch(*pack(one), bucket)  # the graph reads the shared pinned input buffer: fill it for this bucket
    report["replay_only_ms"] = timed(graph.replay, 200)
    report["one_score_encoded_ms"] = timed(lambda: engine.score_encoded(one), 200)
    report["one_score_ms"] = timed(lambda: engine.score([pairs[0]]), 200)
    report["one_encode_ms"] = timed(lambda: engine.encode([pairs[0]]), 200)
    report["one_pack_ms"] = timed(lambda: pack(one), 200)
    report["one_pair_kernels"] = kernel_breakdown(graph)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"profile_engine-{report['card'].replace(' ', '-')}-{'compiled' if args.compile else 'eager'}{'' if report['latency_kernels'] else '-library'}-{report['date'][:10]}.json"
    (args.out_dir / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
