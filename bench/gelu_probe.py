"""How fast can the bulk forward's exact GELU run? ATen's kernel against plain Triton ones, as memory bandwidth.

In a large packed fp16 call, ffn_in's GELU (ATen's, after cuBLAS: packed.linear_gelu) took 27.9 of 225 ms of kernel
time on an H200, moving its [tokens, 3072] fp16 activations at ~3.1 TB/s where the residual + LayerNorm kernels
reach ~4.4 (`profile_engine-NVIDIA-H200-compiled-2026-12-02-ee567ec.json`). GELU reads and writes each element
once, so at LayerNorm's rate it would take ~20 ms. This probe times y = gelu(x) (erf form, fp32 math, fp16 in and
out) on [rows, 3072] for: ATen out of place, ATen in place, and a Triton kernel over a small grid of block sizes
and warps; each Triton output is checked against ATen's (at most one fp16 rounding step apart). Device medians
from CUDA events, reported in TB/s (bytes read + written). Not a benchmark of record: a map for the next change.

GPU:  python3 bench/gelu_probe.py --out-dir $OUT   (PYTHONPATH=service:bench)
CPU:  python3 bench/gelu_probe.py --check-cpu      (the Triton kernel in Triton's interpreter; sets TRITON_INTERPRET=1)
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
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from kernels_probe import device_ms  # noqa: E402
from provenance import git_commit  # noqa: E402

ROWS = (16_384, 65_536)
INNER = 3072
CONFIGS = [(block, warps) for block in (1024, 2048, 4096, 8192) for warps in (4, 8)]


@triton.jit
def gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = 0.5 x (1 + erf(x / sqrt 2)) in fp32, over BLOCK contiguous elements a program."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < n
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=ok)


def triton_gelu(x: torch.Tensor, block: int, warps: int, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(x) if out is None else out
    n = x.numel()
    gelu_kernel[(triton.cdiv(n, block),)](x, out, n, BLOCK=block, num_warps=warps)
    return out


def check_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(37, 300) * 3
    for block, warps in ((64, 4), (1024, 4)):
        got = triton_gelu(x, block, warps)
        assert torch.allclose(got, F.gelu(x), atol=1e-5), (block, float((got - F.gelu(x)).abs().max()))
    print("--check-cpu: the Triton GELU matches F.gelu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--check-cpu", action="store_true", help="run the Triton kernel in Triton's interpreter")
    args = parser.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    torch.manual_seed(0)
    cases = []
    for rows in ROWS:
        x = torch.randn(rows, INNER, device="cuda", dtype=torch.float16) * 2
        reference = F.gelu(x)
        scratch = torch.empty_like(x)
        moved = 2 * x.numel() * x.element_size()  # read once, written once

        def tb_s(ms: float) -> float:
            return moved / ms / 1e9

        case = {"rows": rows, "ms": {}, "tb_s": {}, "max_abs_vs_aten": {}}
        case["ms"]["aten"] = device_ms(lambda: F.gelu(x))
        # in place on a copy of the input, the copy's own time subtracted
        case["ms"]["aten_in_place"] = device_ms(lambda: torch.ops.aten.gelu_(scratch.copy_(x))) - device_ms(
            lambda: scratch.copy_(x)
        )
        for block, warps in CONFIGS:
            name = f"triton block {block} warps {warps}"
            case["max_abs_vs_aten"][name] = float((triton_gelu(x, block, warps).float() - reference.float()).abs().max())
            case["ms"][name] = device_ms(lambda block=block, warps=warps: triton_gelu(x, block, warps, scratch))
        case["tb_s"] = {name: tb_s(ms) for name, ms in case["ms"].items()}
        for name, ms in case["ms"].items():
            print(f"rows {rows:6d}  {name:28s} {ms:.3f} ms  {case['tb_s'][name]:.2f} TB/s  "
                  f"max |Δ| vs ATen {case['max_abs_vs_aten'].get(name, 0.0):.1e}", flush=True)
        cases.append(case)

    card = torch.cuda.get_device_name()
    record = {
        "benchmark": "gelu_probe", "card": card, "commit": git_commit(), "torch": torch.__version__,
        "triton": triton.__version__, "date": datetime.now(UTC).isoformat(timespec="seconds"), "cases": cases,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"gelu_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
