"""Would one persistent kernel beat a CUDA graph of kernels for one pair's forward? The boundaries, measured.

One pair's forward on the latency path replays 96 kernels (7 a layer: bench/profile_engine.py) in ~0.35 ms on an
H200, each a few microseconds where its work (reading ~36 KB of weights a program) needs well under one. A
persistent kernel (a "megakernel") would run every phase in one launch, with a grid-wide barrier where a kernel
boundary is now. Letting each kernel launch early and prefetch its weights (programmatic dependent launch) gained
nothing (docs/performance.md, eighth session), so what such a kernel could save is the boundary itself: a grid's
completion and the next one's start against a software barrier (one atomic a program, then a spin).

This probe times the same chain of `--phases` dependent phases both ways, on as many programs as the GPU has SMs:
each phase, every program reads the whole activation the previous phase wrote (64 x 768 fp16, as each GEMM
program reads all of x), streams its own slice of a weight buffer from HBM (as a GEMM program its columns'
weights), and writes its share of the next activation. Chain: one kernel a phase, captured in a CUDA graph.
Persistent: one kernel, a grid barrier between phases. Both run the same phase code; their outputs must match
(a broken barrier shows as a mismatch, or a spin that gives up). Also with no work (one element a program), the
boundary alone. Device medians of graph replays (CUDA events). Not a benchmark of record: a map for a lever.

GPU:  python3 bench/persistent_chain_probe.py --out-dir $OUT   (PYTHONPATH=service:bench)
CPU:  python3 bench/persistent_chain_probe.py --check-cpu      (Triton's interpreter, one program; sets TRITON_INTERPRET=1)
"""

from __future__ import annotations

import os
import sys

if "--check-cpu" in sys.argv:  # the interpreter reads this once, when triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernels_probe import device_ms  # noqa: E402
from provenance import git_commit  # noqa: E402

ACTIVATION = 64 * 768  # one latency-path batch: 64 rows of the hidden size
WEIGHT_PER_PROGRAM = 18_432  # fp16 elements (36 KB): ffn_in's 768 x 3072 weights over 128 programs
BLOCK = 4096
SPIN_LIMIT = tl.constexpr(1 << 24)  # a barrier spin that long means the barrier is broken: give up and flag it, do not hang


@triton.jit
def _phase(src, dst, weights, n, wn, pid, programs, BLOCK: tl.constexpr):
    """Read all of src (bypassing L1, which another SM's writes do not update) and this program's wn weights;
    write its share of dst. Each element written depends on every element read."""
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        total += tl.load(src + start + offsets, mask=start + offsets < n, other=0.0, cache_modifier=".cg").to(tl.float32)
    mean = tl.sum(total, axis=0) / n
    weight_total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, wn, BLOCK):
        weight_total += tl.load(weights + start + offsets, mask=start + offsets < wn, other=0.0).to(tl.float32)
    weight_mean = tl.sum(weight_total, axis=0) / tl.maximum(wn, 1)
    share = tl.cdiv(n, programs)
    end = tl.minimum(pid * share + share, n)
    for start in range(pid * share, end, BLOCK):
        index = start + offsets
        ok = index < end
        x = tl.load(src + (index + 1) % n, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(dst + index, (0.5 * x + 0.25 * mean + weight_mean).to(tl.float16), mask=ok)


@triton.jit
def chain_kernel(buffers, weights, n, wn, phase, BLOCK: tl.constexpr):
    """One phase: reads buffer phase % 2, writes the other."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    src = buffers + (phase % 2) * n
    dst = buffers + ((phase + 1) % 2) * n
    _phase(src, dst, weights + (phase * programs + pid) * wn, n, wn, pid, programs, BLOCK)


@triton.jit
def persistent_kernel(buffers, weights, counter, gave_up, n, wn, phases, BLOCK: tl.constexpr):
    """Every phase in one launch; `counter` starts at 0 and reaches (phase + 1) * programs at each barrier."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for phase in range(phases):
        src = buffers + (phase % 2) * n
        dst = buffers + ((phase + 1) % 2) * n
        _phase(src, dst, weights + (phase * programs + pid) * wn, n, wn, pid, programs, BLOCK)
        # The grid barrier: this program's stores done (bar.sync), then one release-add by one thread
        # (Triton runs a scalar atomic once a program), then spin on acquire-reads until all have arrived.
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="release", scope="gpu")
        target = (phase + 1) * programs
        arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        spins = 0
        while (arrived < target) & (spins < SPIN_LIMIT):
            arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
            spins += 1
        if spins >= SPIN_LIMIT:
            tl.atomic_add(gave_up, 1)
        tl.debug_barrier()


class Chain:
    """The buffers of one configuration and the two ways to run its phases."""

    def __init__(self, device: str, programs: int, phases: int, n: int, wn: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(0)
        self.programs, self.phases, self.n, self.wn = programs, phases, n, wn
        self.start = torch.randn(n, generator=generator).to(device, torch.float16)
        self.buffers = torch.empty(2 * n, device=device, dtype=torch.float16)
        weight_count = max(phases * programs * wn, 1)
        self.weights = (torch.rand(weight_count, generator=generator) * 1e-3).to(device, torch.float16)
        self.counter = torch.zeros(1, device=device, dtype=torch.int32)
        self.gave_up = torch.zeros(1, device=device, dtype=torch.int32)

    def run_chain(self) -> None:
        self.buffers[: self.n].copy_(self.start)
        for phase in range(self.phases):
            chain_kernel[(self.programs,)](self.buffers, self.weights, self.n, self.wn, phase, BLOCK=BLOCK)

    def run_persistent(self) -> None:
        self.buffers[: self.n].copy_(self.start)
        self.counter.zero_()
        persistent_kernel[(self.programs,)](
            self.buffers, self.weights, self.counter, self.gave_up, self.n, self.wn, self.phases, BLOCK=BLOCK
        )

    def result(self) -> torch.Tensor:
        last = self.phases % 2
        return self.buffers[last * self.n : (last + 1) * self.n].float().cpu()


def graph_replay_ms(run, reps: int = 50) -> float:
    """Median device ms of one replay of `run` captured in a CUDA graph."""
    run()  # builds the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return device_ms(graph.replay, reps)


def check_cpu() -> None:
    """The phase code and the barrier's bookkeeping, one program, in the interpreter: both ways agree."""
    for n, wn in ((300, 50), (1, 0)):
        chain = Chain("cpu", programs=1, phases=5, n=n, wn=wn)
        chain.run_chain()
        by_chain = chain.result()
        chain.run_persistent()
        assert int(chain.gave_up) == 0 and int(chain.counter) == 5, (int(chain.gave_up), int(chain.counter))
        assert torch.equal(chain.result(), by_chain), float((chain.result() - by_chain).abs().max())
    print("--check-cpu: one program, chain and persistent kernels agree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=96, help="the kernels of one pair's replay (default 96)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--check-cpu", action="store_true", help="run both in Triton's interpreter, one program")
    args = parser.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    cases = []
    for name, n, wn in (("one pair's shapes", ACTIVATION, WEIGHT_PER_PROGRAM), ("activation only", ACTIVATION, 0),
                        ("no work", programs, 0)):
        chain = Chain("cuda", programs, args.phases, n, wn)
        chain.run_chain()
        by_chain = chain.result()
        chain.run_persistent()
        torch.cuda.synchronize()
        case = {
            "case": name, "activation_elements": n, "weight_elements_per_program": wn,
            "max_abs_persistent_vs_chain": float((chain.result() - by_chain).abs().max()),
            "chain_ms": graph_replay_ms(chain.run_chain), "persistent_ms": graph_replay_ms(chain.run_persistent),
            "persistent_spins_given_up": int(chain.gave_up),
        }
        case["chain_us_per_phase"] = case["chain_ms"] * 1e3 / args.phases
        case["persistent_us_per_phase"] = case["persistent_ms"] * 1e3 / args.phases
        print(json.dumps(case), flush=True)
        cases.append(case)
    card = torch.cuda.get_device_name()
    record = {
        "benchmark": "persistent_chain_probe", "card": card, "commit": git_commit(), "torch": torch.__version__,
        "triton": triton.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds"), "programs": programs,
        "phases": args.phases, "cases": cases,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"persistent_chain_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
