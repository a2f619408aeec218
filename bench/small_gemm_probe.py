"""Which GEMM kernels serve a single pair fastest? BERT-base's four linear layers at a few-token M.

One pair's forward is ~116 kernels, and its 48 GEMMs take ~240 us of a ~500 us CUDA-graph replay on an
H100 (bench/profile_engine.py), ~5 us each where reading the weights takes 1-1.5 us. This probe times
each layer shape at M rows (fp16, bias) per variant: cuBLASLt (PyTorch's default), cuBLAS, and Inductor's
max-autotune GEMM templates (static shapes), each replayed 200x inside one CUDA graph so launch gaps
do not count. Not a benchmark of record: it decides whether a small-batch compile mode is worth building.

`--pooler` times the fp32 pooler (768 -> 768 on one [CLS] row per pair, few rows for a single pair)
instead: cuBLAS picks a split-K GEMM and a separate 14.6 us reduce kernel for it on an H100 (one pair's
profile), against ways to spell the same product.

GPU:  python3 bench/small_gemm_probe.py --out-dir $OUT
      python3 bench/small_gemm_probe.py --pooler --rows 1 2 4 8 16 64 512 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from provenance import git_commit

SHAPES = {"qkv": (768, 2304), "attention_out": (768, 768), "ffn_in": (768, 3072), "ffn_out": (3072, 768)}
REPS = 200


def device_us(fn, x: torch.Tensor) -> float:  # noqa: ANN001
    """Mean device time of fn(x), from a CUDA graph of REPS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * REPS)


def pooler_rows(rows: int, hidden: int = 768) -> dict[str, float]:
    """Device us of the pooler's product at `rows` rows, per spelling (fp32 out, tanh after, as packed.py)."""
    weight = torch.randn(hidden, hidden, device="cuda") * 0.02
    bias = torch.randn(hidden, device="cuda") * 0.02
    weight_t = weight.t().contiguous()
    weight16, bias16 = weight.half(), bias.half()
    x = torch.randn(rows, hidden, device="cuda")
    row: dict[str, float] = {"rows": rows}
    for library in ("cublaslt", "cublas"):
        torch.backends.cuda.preferred_blas_library(library)
        row[f"fp32_linear_{library}"] = device_us(lambda t: torch.tanh(F.linear(t, weight, bias)), x)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    row["fp32_addmm_pretransposed"] = device_us(lambda t: torch.tanh(torch.addmm(bias, t, weight_t)), x)
    row["fp32_matvec_rows"] = device_us(lambda t: torch.tanh((t.unsqueeze(1) * weight).sum(-1) + bias), x)
    row["fp16_in_fp32_out_addmm"] = device_us(
        lambda t: torch.tanh(torch.addmm(bias, t.half(), weight16.t(), out_dtype=torch.float32)), x
    )
    row["fp16_linear_then_float"] = device_us(lambda t: torch.tanh(F.linear(t.half(), weight16, bias16).float()), x)
    exact = torch.tanh(F.linear(x.double(), weight.double(), bias.double()))
    row["fp16_in_fp32_out_max_abs_err"] = float(
        (torch.tanh(torch.addmm(bias, x.half(), weight16.t(), out_dtype=torch.float32)) - exact).abs().max()
    )
    row["fp32_max_abs_err"] = float((torch.tanh(F.linear(x, weight, bias)) - exact).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--pooler", action="store_true", help="time the fp32 pooler's spellings instead")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    with torch.inference_mode():
        for rows in args.rows if args.pooler else ():
            results.append(pooler_rows(rows))
            print(" ".join(f"{key}={value:.3g}" for key, value in results[-1].items()), flush=True)
        for name, (k, n) in () if args.pooler else SHAPES.items():
            weight = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
            bias = torch.randn(n, device="cuda", dtype=torch.float16) * 0.02
            ideal_us = weight.numel() * 2 / 3.35e12 * 1e6  # reading the weights at H100 HBM3 bandwidth
            for rows in args.rows:
                x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
                row = {"layer": name, "rows": rows, "k": k, "n": n, "weights_read_us": ideal_us}
                for library in ("cublaslt", "cublas"):
                    torch.backends.cuda.preferred_blas_library(library)
                    row[library] = device_us(lambda t: F.linear(t, weight, bias), x)
                torch.backends.cuda.preferred_blas_library("cublaslt")
                torch._dynamo.reset()
                compiled = torch.compile(
                    lambda t: F.linear(t, weight, bias), mode="max-autotune-no-cudagraphs", dynamic=False
                )
                row["inductor_max_autotune"] = device_us(compiled, x)
                results.append(row)
                print(
                    f"{name:14s} M={rows:4d}: cuBLASLt {row['cublaslt']:6.2f} us, cuBLAS {row['cublas']:6.2f} us, "
                    f"max-autotune {row['inductor_max_autotune']:6.2f} us (weights read {ideal_us:.2f} us)",
                    flush=True,
                )
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name().replace(" ", "-")
        record = {"benchmark": "small_gemm_probe", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"), "results": results}
        (args.out_dir / f"small_gemm_probe{'-pooler' if args.pooler else ''}-{card}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
