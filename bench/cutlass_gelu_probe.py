"""Can ffn_in and its exact GELU run as one GEMM, faster than cuBLAS then ATen's GELU? CUTLASS epilogues, timed.

The bulk forward spends ~29 of 234 ms of kernel time in the exact GELU after ffn_in (bench/profile_engine.py on an
H200), and no separate GELU kernel is faster than ATen's (bench/gelu_probe.py). cuBLASLt can fuse only the tanh
GELU; CUTLASS's epilogue GELU is the erf one. This probe builds bench/cutlass_linear_gelu.cu (sm_90a, nvcc, the
CUTLASS headers of the `nvidia-cutlass` wheel) and times y = gelu(x W^T + b) on BERT-base's ffn_in shapes:
cuBLAS with its bias epilogue, cuBLAS + ATen's GELU (the engine's path, packed.linear_gelu), and CUTLASS with bias
+ GELU fused (four tile shapes and schedules), plus CUTLASS with the bias alone (its GEMM against cuBLAS's). Each output's max |Δ|
against an fp32 reference. Device medians (CUDA events). Not a benchmark of record: a map for the next change.

GPU:  python3 bench/cutlass_gelu_probe.py --out-dir $OUT   (PYTHONPATH=service:bench; nvcc and nvidia-cutlass)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from kernels_probe import device_ms
from provenance import git_commit

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cutlass_linear_gelu.cu"
ROWS = (16_384, 62_203, 65_536)  # a bulk forward's tokens: 16k, the corpus x8's largest forwards, 64k
HIDDEN, INNER = 768, 3072
# cutlass_linear_gelu.cu's entry points: name in the results, and whether its epilogue applies the GELU
CUTLASS_VARIANTS = {
    "gelu_coop": ("cutlass_bias_gelu_cooperative", True),
    "gelu_pingpong": ("cutlass_bias_gelu_pingpong", True),
    "gelu_pingpong_128": ("cutlass_bias_gelu_pingpong_128x128", True),
    "gelu_coop_256x128": ("cutlass_bias_gelu_cooperative_256x128", True),
    "bias_coop": ("cutlass_bias_cooperative", False),
}


def build(library: Path) -> None:
    import cutlass_library  # the nvidia-cutlass wheel: CUTLASS's C++ headers under source/

    headers = Path(cutlass_library.__file__).parent / "source"
    library.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr", "-DNDEBUG",
        "-Xcompiler", "-fPIC", "-shared", f"-I{headers / 'include'}", f"-I{headers / 'tools/util/include'}",
        str(SOURCE), "-o", str(library),
    ]  # fmt: skip
    subprocess.run(command, check=True)


class CutlassLinear:
    """One entry point pair of the built library: `name`_workspace and `name`_run."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self._workspace = getattr(library, f"{name}_workspace")
        self._workspace.restype = ctypes.c_size_t
        self._workspace.argtypes = [ctypes.c_int] * 3
        self._run = getattr(library, f"{name}_run")
        self._run.restype = ctypes.c_int
        self._run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2
        self.name = name

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        m, k = x.shape
        n = weight.shape[0]
        workspace = torch.empty(max(self._workspace(m, n, k), 1), dtype=torch.uint8, device=x.device)
        status = self._run(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), m, n, k,
                           workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)  # fmt: skip
        if status:
            raise RuntimeError(f"{self.name}: CUTLASS status {status}")
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=HERE / ".build" / "libcutlass_linear_gelu.so",
                        help="the built library (built here when missing)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not args.library.exists():
        build(args.library)
    library = ctypes.CDLL(str(args.library))
    cutlass = {name: (CutlassLinear(library, entry), gelu) for entry, (name, gelu) in CUTLASS_VARIANTS.items()}
    torch.manual_seed(0)
    weight = (torch.randn(INNER, HIDDEN, device="cuda") * 0.03).half()
    bias = (torch.randn(INNER, device="cuda") * 0.1).half()
    cases = []
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, device="cuda").half()
        out = torch.empty(rows, INNER, device="cuda", dtype=torch.float16)
        reference_linear = x.float() @ weight.float().T + bias.float()
        reference = F.gelu(reference_linear)
        ways = {
            "cublas_bias": (lambda: F.linear(x, weight, bias), reference_linear),
            "cublas_bias_then_aten_gelu": (lambda: F.gelu(F.linear(x, weight, bias)), reference),
        }
        for name, (kernel, gelu) in cutlass.items():
            ways[name] = (lambda kernel=kernel: kernel(x, weight, bias, out), reference if gelu else reference_linear)
        case = {"rows": rows, "ms": {}, "tflop_s": {}, "max_abs_vs_fp32": {}}
        for name, (run, expected) in ways.items():
            case["max_abs_vs_fp32"][name] = float((run().float() - expected).abs().max())
            case["ms"][name] = device_ms(run)
            case["tflop_s"][name] = 2 * rows * HIDDEN * INNER / case["ms"][name] / 1e9
            print(f"rows {rows:6d}  {name:38s} {case['ms'][name]:.3f} ms  {case['tflop_s'][name]:.0f} TFLOP/s  "
                  f"max |Δ| vs fp32 {case['max_abs_vs_fp32'][name]:.1e}", flush=True)  # fmt: skip
        cases.append(case)
    card = torch.cuda.get_device_name()
    record = {
        "benchmark": "cutlass_gelu_probe", "card": card, "commit": git_commit(), "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cases": cases,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"cutlass_gelu_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
