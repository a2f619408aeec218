"""Can a hand-written Triton GEMM with a fused epilogue beat cuBLAS for BERT-base's linear layers at one pair's rows?

One pair's forward is a CUDA-graph replay of ~127 kernels, 418 us of kernel time on an H200; its 45 cuBLAS
GEMMs (nvjet) take 4.1-5.3 us each (+ a 2.1 us split-K reduce for ffn_out) where reading their fp16 weights
takes 0.35-1.4 us. This probe times y = act(x @ W^T + b) (fp16 in/out, fp32 accumulation, W in nn.Linear's
[N, K] layout) for each layer shape at M = 64 rows (the graph's token bucket for one pair) and 32:

- F.linear (cuBLASLt, torch's default) and, for ffn_in, F.linear then exact GELU (what the graph runs, roughly);
- the engine's Triton kernel (latency_kernels.linear_kernel), one program per BLOCK_N output columns with
  all M rows in one BLOCK_M tile, bias and GELU fused, swept over a small config grid;
- its split-K form (SPLIT_K 2 or 4): partial sums tl.atomic_add'ed into an fp32 buffer, then a small bias +
  act + fp16 cast kernel; timed with the buffer's zeroing and that kernel, as a real layer would pay them
  (the best one is also timed with the epilogue re-zeroing the buffer instead of a memset).

Each variant is replayed REPS times inside one CUDA graph (small_gemm_probe.device_us), cycling through
copies of the weights (> 2x the L2 together) so they come from HBM as in a forward, where 12 layers'
weights do not fit the L2; cuBLAS is also timed on one hot weight. Every config's output is checked against
an fp32 reference before it is timed; one off by more than 1e-2 of the output's scale is excluded, printed
as WRONG and makes the probe exit 1 (after writing the JSON). Not a benchmark of record: it decides
whether a Triton small-M GEMM path is worth building.

GPU:  python3 bench/triton_gemm_probe.py --out-dir $OUT        (PYTHONPATH=service:bench; ~1-2 min,
      most of it Triton compiles, spread over --jobs processes)
CPU:  PYTHONPATH=service:bench python3 bench/triton_gemm_probe.py --check-cpu
      (runs the kernels on small shapes through Triton's interpreter and asserts they match torch;
      sets TRITON_INTERPRET=1 itself, before triton is imported)
"""

from __future__ import annotations

import os
import sys

if "--check-cpu" in sys.argv:  # the interpreter reads this once, when triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from provenance import git_commit  # noqa: E402
from small_gemm_probe import REPS, SHAPES, device_us  # noqa: E402

from similarity_service.latency_kernels import linear_kernel  # noqa: E402 - the engine's own GEMM kernel

LAYERS = 12
HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, for the weights-read floor printed beside each shape
L2_ROTATE_BYTES = 128 << 20  # weight copies cycled through per timing: > 2x the H200's 50 MB L2
TOLERANCE = 1e-2  # max |y - fp32 reference| / max |reference|, on the GPU
CPU_TOLERANCE = 2e-3  # the interpreter's small shapes land at ~3e-4: tighter, to catch subtler slips
GRID_BLOCK_N = (16, 32, 64)
GRID_BLOCK_K = (64, 128, 256)
GRID_WARPS = (2, 4)
GRID_STAGES = (3, 4)
GRID_SPLIT_K = (1, 2, 4)
ACTS = {"none": 0, "gelu": 1}
DEVICE = "cuda"  # the sweep's device; a CPU smoke test of the sweep's plumbing may point it elsewhere


@triton.jit
def _bias_act_kernel(acc_ptr, b_ptr, out_ptr, numel, N, ACT: tl.constexpr, RESET: tl.constexpr, BLOCK: tl.constexpr):
    """Split-K's epilogue on a contiguous [M, N] fp32 buffer: out = fp16(act(acc + b)); RESET zeroes acc after."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    y = tl.load(acc_ptr + offs, mask=ok, other=0.0) + tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    if ACT == 1:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    tl.store(out_ptr + offs, y.to(tl.float16), mask=ok)
    if RESET:  # leaves the buffer zeroed for the next call: no memset kernel
        tl.store(acc_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=ok)


EPILOGUE_BLOCK = 1024


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int

    def name(self) -> str:
        return f"n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}_split{self.split_k}"


def block_m_for(rows: int) -> int:
    """All rows in one tile: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(rows))


def k_chunk_for(k: int, cfg: Config) -> int:
    """K per split, a whole number of BLOCK_K steps (the last split may get fewer)."""
    return triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k


def skip_reason(k: int, cfg: Config) -> str | None:
    """Configs not worth compiling for this K (known before any launch)."""
    if cfg.split_k > 1 and triton.cdiv(k, k_chunk_for(k, cfg)) < cfg.split_k:
        return f"K={k} has fewer BLOCK_K={cfg.block_k} steps than splits: a split would add zeros"
    return None


class TritonLinear:
    """One configured layer call: preallocated output (and fp32 buffer for split-K), launch only."""

    def __init__(self, rows: int, n: int, k: int, act: str, cfg: Config, device: torch.device | str,
                 reset: bool = False) -> None:  # fmt: skip
        self.rows, self.n, self.k, self.act, self.cfg, self.reset = rows, n, k, ACTS[act], cfg, reset
        self.block_m = block_m_for(rows)
        self.k_chunk = k_chunk_for(k, cfg)
        self.even_k = k % cfg.block_k == 0
        self.out = torch.empty(rows, n, device=device, dtype=torch.float16)
        self.acc = torch.zeros(rows, n, device=device, dtype=torch.float32) if cfg.split_k > 1 else None
        self.grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        split = self.acc is not None
        if split and not self.reset:
            self.acc.zero_()  # a memset node in the graph, timed with the GEMM
        linear_kernel[self.grid](
            x, w, b, self.acc if split else self.out,
            self.rows, self.n, self.k, self.k_chunk,
            x.stride(0), w.stride(0), self.n,
            GELU=not split and self.act == ACTS["gelu"], ACCUMULATE=split, EVEN_K=self.even_k,  # split-K: act in the epilogue
            BLOCK_M=self.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if split:
            numel = self.rows * self.n
            _bias_act_kernel[(triton.cdiv(numel, EPILOGUE_BLOCK),)](
                self.acc, b, self.out, numel, self.n, ACT=self.act, RESET=self.reset, BLOCK=EPILOGUE_BLOCK, num_warps=4
            )
        return self.out


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """fp32 product of the same fp16 inputs."""
    y = F.linear(x.float(), w.float(), b.float())
    return F.gelu(y) if act == "gelu" else y


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


# --- CPU: the kernels through Triton's interpreter ------------------------------------------------------


def check_cpu() -> None:
    """Small shapes that hit every path: padded M, masked N, masked K, both acts, split-K with and without reset."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 must be set before triton is imported"
    torch.manual_seed(0)
    cases = [  # (M, K, N, act, Config, reset)
        (20, 64, 48, "none", Config(16, 32, 4, 3, 1), False),
        (20, 64, 48, "gelu", Config(32, 32, 4, 3, 1), False),  # N=48 over BLOCK_N=32: masked columns
        (20, 64, 48, "none", Config(16, 16, 2, 3, 2), False),
        (20, 64, 48, "gelu", Config(32, 16, 4, 4, 4), False),
        (20, 64, 48, "gelu", Config(16, 32, 4, 3, 2), True),
        (20, 80, 48, "gelu", Config(16, 32, 4, 3, 1), False),  # K=80 over BLOCK_K=32: masked K
        (20, 80, 48, "none", Config(16, 32, 4, 3, 2), False),  # split-K with a partial last step
        (64, 128, 64, "gelu", Config(64, 64, 4, 3, 1), False),  # M = BLOCK_M: no padding
        (32, 128, 64, "none", Config(32, 32, 2, 3, 4), True),
    ]
    for rows, k, n, act, cfg, reset in cases:
        x = torch.randn(rows, k, dtype=torch.float16)
        w = (torch.randn(n, k) * 0.1).half()
        b = (torch.randn(n) * 0.1).half()
        layer = TritonLinear(rows, n, k, act, cfg, "cpu", reset=reset)
        ref = reference(x, w, b, act)
        for call in range(2 if reset else 1):  # a second call proves the epilogue left the buffer zeroed
            err = rel_err(layer(x, w, b), ref)
            label = f"M={rows} K={k} N={n} act={act} {cfg.name()}{' reset' if reset else ''} call {call}"
            assert err <= CPU_TOLERANCE, f"{label}: relative error {err:.2e} > {CPU_TOLERANCE}"
            print(f"ok  {label}: relative error {err:.1e}", flush=True)
    print(f"--check-cpu: {len(cases)} cases match torch within {CPU_TOLERANCE} (triton {triton.__version__})")


# --- GPU: compile in parallel, check, time --------------------------------------------------------------


def grid_configs() -> list[Config]:
    return [Config(*c) for c in itertools.product(GRID_BLOCK_N, GRID_BLOCK_K, GRID_WARPS, GRID_STAGES, GRID_SPLIT_K)]


def layer_act(name: str) -> str:
    return "gelu" if name == "ffn_in" else "none"


def _warm_worker(tasks: list[tuple[int, int, int, str, Config]]) -> list[str]:
    """In a spawned process: compile each (rows, k, n, act, cfg) into Triton's on-disk cache, launching nothing.

    The arguments match the real launch's specialization (pointer dtypes, ints divisible by 16), so the main
    process then loads each kernel from the cache instead of compiling it. Errors are only reported: the main
    process meets them again at the first launch and records them there.
    """
    errors = []
    for rows, k, n, act, cfg in tasks:
        try:
            layer = TritonLinear(rows, n, k, act, cfg, DEVICE)
            x = torch.empty(rows, k, device=DEVICE, dtype=torch.float16)
            w = torch.empty(n, k, device=DEVICE, dtype=torch.float16)
            b = torch.empty(n, device=DEVICE, dtype=torch.float16)
            split = layer.acc is not None
            linear_kernel.warmup(
                x, w, b, layer.acc if split else layer.out, rows, n, k, layer.k_chunk, k, k, n,
                GELU=not split and layer.act == ACTS["gelu"], ACCUMULATE=split, EVEN_K=layer.even_k, BLOCK_M=layer.block_m,
                BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, grid=layer.grid,
            )  # fmt: skip
            for epilogue_act, reset in itertools.product((0, 1), (False, True)) if split else ():
                _bias_act_kernel.warmup(
                    layer.acc, b, layer.out, rows * n, n, ACT=epilogue_act, RESET=reset, BLOCK=EPILOGUE_BLOCK,
                    num_warps=4, grid=(1,),
                )  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{cfg.name()} M={rows} act={act}: {type(exc).__name__}: {str(exc)[:200]}")
    return errors


def warm_compile(rows_list: list[int], configs: list[Config], jobs: int) -> dict:
    """Compile every distinct kernel variant over `jobs` processes; returns what it did, for the record."""
    seen, tasks = set(), []
    for rows in rows_list:
        for name, (k, n) in SHAPES.items():
            for cfg in configs:
                if skip_reason(k, cfg):
                    continue
                act = layer_act(name) if cfg.split_k == 1 else "none"  # split-K's act lives in the epilogue
                # One compile serves every shape with the same constexprs (all sizes here are multiples of 16).
                key = (block_m_for(rows), act, cfg.split_k > 1, k % cfg.block_k == 0, cfg.block_n, cfg.block_k,
                       cfg.num_warps, cfg.num_stages)  # fmt: skip
                if key not in seen:
                    seen.add(key)
                    tasks.append((rows, k, n, act, cfg))
    t0 = time.perf_counter()
    errors: list[str] = []
    if jobs > 1:
        chunks = [tasks[i::jobs] for i in range(jobs)]
        try:
            with multiprocessing.get_context("spawn").Pool(jobs) as pool:
                for errs in pool.map(_warm_worker, chunks):
                    errors.extend(errs)
        except Exception as exc:  # noqa: BLE001 - a failed pool only costs time: the sweep compiles serially
            errors.append(f"pool failed, compiling serially instead: {type(exc).__name__}: {exc}")
            print(f"warning: {errors[-1]}", flush=True)
    seconds = time.perf_counter() - t0
    print(f"compiled {len(tasks)} kernel variants over {jobs} processes in {seconds:.1f} s, {len(errors)} errors"
          + "".join(f"\n  {error}" for error in errors[:3]), flush=True)  # fmt: skip
    return {"variants": len(tasks), "jobs": jobs, "seconds": round(seconds, 1), "errors": errors}


def rotating(w: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Copies of w cycled call by call (each captured call reads its own), together > 2x the L2: cold weights."""
    copies = [w] + [w.clone() for _ in range(min(REPS, math.ceil(L2_ROTATE_BYTES / (w.numel() * 2))) - 1)]
    counter = itertools.count()
    return lambda: copies[next(counter) % len(copies)]


def sweep_shape(name: str, k: int, n: int, rows: int, configs: list[Config]) -> dict:
    """cuBLAS and every Triton config for one layer shape at `rows` rows."""
    act = layer_act(name)
    weight = torch.randn(n, k, device=DEVICE, dtype=torch.float16) * 0.02
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16) * 0.02
    x = torch.randn(rows, k, device=DEVICE, dtype=torch.float16)
    ref = reference(x, weight, bias, act)
    cold = rotating(weight)
    row: dict = {"layer": name, "rows": rows, "k": k, "n": n, "act": act,
                 "weights_read_us": weight.numel() * 2 / HBM_BYTES_PER_S * 1e6}  # fmt: skip
    row["cublas_us"] = device_us(lambda t: F.linear(t, cold(), bias), x)
    row["cublas_hot_us"] = device_us(lambda t: F.linear(t, weight, bias), x)
    if act == "gelu":
        row["cublas_gelu_us"] = device_us(lambda t: F.gelu(F.linear(t, cold(), bias)), x)
        row["cublas_gelu_hot_us"] = device_us(lambda t: F.gelu(F.linear(t, weight, bias)), x)
    baseline = row.get("cublas_gelu_us", row["cublas_us"])  # what the graph runs for this layer, GELU included
    sweep, wrong = [], []
    for cfg in configs:
        entry: dict = {"config": asdict(cfg)}
        sweep.append(entry)
        if reason := skip_reason(k, cfg):
            entry["skipped"] = reason
            continue
        try:
            layer = TritonLinear(rows, n, k, act, cfg, DEVICE)
            entry["rel_err"] = rel_err(layer(x, weight, bias), ref)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - out of shared memory and the like: recorded, not fatal
            entry["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            continue
        if not entry["rel_err"] <= TOLERANCE:  # NaN counts as wrong
            entry["wrong"] = True
            wrong.append(f"WRONG {name} M={rows} {cfg.name()}: relative error {entry['rel_err']:.2e} > {TOLERANCE}")
            print(wrong[-1], flush=True)
            continue
        entry["us"] = device_us(lambda t, layer=layer: layer(t, cold(), bias), x)
    timed = [e for e in sweep if "us" in e]
    row["sweep"] = sweep
    row["wrong"] = wrong
    row["configs_timed"] = len(timed)
    if not timed:
        return row
    best = min(timed, key=lambda e: e["us"])
    cfg = Config(**best["config"])
    best_layer = TritonLinear(rows, n, k, act, cfg, DEVICE)
    row["triton_best"] = {**best, "name": cfg.name(),
                          "hot_us": device_us(lambda t: best_layer(t, weight, bias), x),
                          "max_abs_diff": float((best_layer(x, weight, bias).float() - ref).abs().max())}  # fmt: skip
    split = [e for e in timed if e["config"]["split_k"] > 1]
    variants = {cfg.name(): best["us"]}
    if split:  # the best split-K config again, its epilogue re-zeroing the buffer instead of a memset node
        scfg = Config(**min(split, key=lambda e: e["us"])["config"])
        reset_layer = TritonLinear(rows, n, k, act, scfg, DEVICE, reset=True)
        errs = [rel_err(reset_layer(x, weight, bias), ref) for _ in range(2)]  # 2nd call: buffer was re-zeroed
        torch.cuda.synchronize()
        row["splitk_reset"] = {"name": scfg.name(), "rel_err": max(errs), "memset_us": min(e["us"] for e in split)}
        if not max(errs) <= TOLERANCE:
            wrong.append(f"WRONG {name} M={rows} {scfg.name()} reset: relative error {max(errs):.2e}")
            print(wrong[-1], flush=True)
        else:
            row["splitk_reset"]["us"] = device_us(lambda t: reset_layer(t, cold(), bias), x)
            variants[f"{scfg.name()}_reset"] = row["splitk_reset"]["us"]
    row["triton_variant"] = min(variants, key=variants.get)  # the sweep's best, or the reset split-K if faster
    row["triton_us"] = variants[row["triton_variant"]]
    row["triton_rel_err"] = row["splitk_reset"]["rel_err"] if row["triton_variant"].endswith("_reset") else best["rel_err"]
    row["ratio_vs_cublas"] = row["triton_us"] / baseline  # < 1: faster than what the graph runs for this layer
    if act == "gelu":
        row["ratio_vs_cublas_linear_only"] = row["triton_us"] / row["cublas_us"]
    return row


def print_table(results: list[dict]) -> None:
    """One line per shape and M: device us per call, the ratio against what the graph runs (F.linear, +GELU)."""
    print(f"\n{'layer':14s} {'M':>3s} {'K':>5s} {'N':>5s} {'W read':>7s} {'cuBLAS':>7s} {'+GELU':>7s} {'Triton':>7s} "
          f"{'ratio':>6s} {'rel err':>8s}  best Triton variant")  # fmt: skip
    for r in results:
        gelu = f"{r['cublas_gelu_us']:7.2f}" if "cublas_gelu_us" in r else f"{'':7s}"
        if "triton_us" in r:
            triton_text = (f"{r['triton_us']:7.2f} {r['ratio_vs_cublas']:6.2f} {r['triton_rel_err']:8.1e}  "
                           f"{r['triton_variant']}")  # fmt: skip
        else:
            triton_text = f"{'-':>7s} {'-':>6s} {'-':>8s}  no config ran"
        print(f"{r['layer']:14s} {r['rows']:3d} {r['k']:5d} {r['n']:5d} {r['weights_read_us']:7.2f} {r['cublas_us']:7.2f} "
              f"{gelu} {triton_text}")  # fmt: skip
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 32])
    parser.add_argument("--check-cpu", action="store_true", help="run the kernels in Triton's interpreter on CPU")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling the kernels ahead of the sweep (1: compile as it goes)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    t0 = time.perf_counter()
    torch.manual_seed(0)
    configs = grid_configs()
    compile_record = warm_compile(args.rows, configs, args.jobs)
    results = []
    with torch.inference_mode():
        for rows in args.rows:
            for name, (k, n) in SHAPES.items():
                row = sweep_shape(name, k, n, rows, configs)
                results.append(row)
                gelu = f", +GELU {row['cublas_gelu_us']:5.2f}" if "cublas_gelu_us" in row else ""
                best = row.get("triton_best")
                triton_text = (f"Triton {row['triton_us']:5.2f} us (x{row['ratio_vs_cublas']:.2f}; "
                               f"{row['triton_variant']}, hot {best['hot_us']:5.2f}, err {best['rel_err']:.1e})"
                               if best else "Triton: no config ran")  # fmt: skip
                print(f"{name:14s} M={rows:3d}: cuBLAS {row['cublas_us']:5.2f} us (hot {row['cublas_hot_us']:5.2f}"
                      f"{gelu}), {triton_text}; weights read {row['weights_read_us']:.2f} us "
                      f"[{row['configs_timed']} configs timed]", flush=True)  # fmt: skip
    print_table(results)
    by_shape = {r["layer"]: r for r in results if r["rows"] == 64}
    forward = None
    if len(by_shape) == len(SHAPES) and all("triton_us" in r for r in by_shape.values()):
        cublas = LAYERS * sum(r.get("cublas_gelu_us", r["cublas_us"]) for r in by_shape.values())
        cublas_no_gelu = LAYERS * sum(r["cublas_us"] for r in by_shape.values())
        best = LAYERS * sum(r["triton_us"] for r in by_shape.values())
        forward = {"rows": 64, "layers": LAYERS, "cublas_us": cublas, "cublas_without_gelu_us": cublas_no_gelu,
                   "triton_best_us": best, "saving_us": cublas - best}  # fmt: skip
        print(f"one forward's {LAYERS * len(SHAPES)} GEMMs at M=64: cuBLAS {cublas:.0f} us (incl. ffn_in's GELU; "
              f"{cublas_no_gelu:.0f} without), best Triton {best:.0f} us: saves {cublas - best:.0f} us", flush=True)  # fmt: skip
    wrong = [w for r in results for w in r["wrong"]]
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name().replace(" ", "-")
        record = {"benchmark": "triton_gemm_probe", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "triton": triton.__version__, "commit": git_commit(),
                  "date": datetime.now(UTC).isoformat(timespec="seconds"), "reps": REPS, "tolerance": TOLERANCE,
                  "compile": compile_record, "forward_estimate": forward, "wrong": wrong, "results": results}  # fmt: skip
        path = args.out_dir / f"triton_gemm_probe-{card}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}", flush=True)
    if wrong:
        sys.exit(f"{len(wrong)} config(s) gave wrong results (see WRONG above): the kernel has a bug")


if __name__ == "__main__":
    main()
