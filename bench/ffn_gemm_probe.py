"""What is the fastest exact ffn_in + GELU for the bulk forward's row counts? cuBLAS, Inductor, or a fused Triton GEMM.

In a large packed fp16 call under torch.compile (dynamic shapes), ffn_in's GELU is its own Inductor kernel,
which reads and writes every [tokens, 3072] activation once more: 36 of 238 ms of kernel time on an H100
(`profile_engine-NVIDIA-H100-80GB-HBM3-compiled-2026-12-02-a3d877c.json`). cuBLASLt's GELU epilogue is the tanh
approximation, not BERT's erf GELU, so an exact fusion needs a GEMM of our own that runs about as fast as cuBLAS.
For y = gelu(x @ W^T + b), x [M, 768] fp16, W [3072, 768] (nn.Linear's layout), this probe times:

- `cublas+gelu`: F.linear then ATen's F.gelu; `compiled` / `compiled_dynamic`: the same under torch.compile with
  static / dynamic shapes (cuBLAS plus Inductor's GELU kernel); `custom_op_dynamic`: packed.linear_gelu (the
  engine's op: F.linear then ATen's GELU, opaque to Inductor) under torch.compile with dynamic shapes;
- `cublas_only`: F.linear alone, the floor of any unfused version; `cublaslt_tanh`: torch._addmm_activation
  with cuBLASLt's (approximate) GELU epilogue, what a library fusion costs;
- `triton …`: bench/triton_ffn_in.py's fused kernels (plain, and persistent with TMA) over a grid of tiles.

Every Triton output is checked against an fp32 reference (within 2e-2 absolute; outputs of magnitude ~3) before
it is timed. Times are device medians from CUDA events over repeated launches. Not a benchmark of record: it
chose the engine's ffn_in (packed.linear_gelu).

GPU:  python3 bench/ffn_gemm_probe.py --out-dir $OUT   (PYTHONPATH=service:bench)
CPU:  PYTHONPATH=service:bench python3 bench/ffn_gemm_probe.py --check-cpu
      (the Triton kernels on small shapes in Triton's interpreter, against torch; sets TRITON_INTERPRET=1 itself)
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
from provenance import git_commit  # noqa: E402
from kernels_probe import device_ms  # noqa: E402
from triton_ffn_in import LinearTiles, linear  # noqa: E402

from similarity_service.packed import linear_gelu  # noqa: E402

ROWS = (2048, 8192, 32768, 65536)
HIDDEN, INNER = 768, 3072
TILES = [
    LinearTiles(*tiles)
    for tiles in (
        (128, 256, 64, 8, 3),
        (128, 256, 32, 8, 4),
        (256, 128, 64, 8, 3),
        (128, 256, 64, 8, 3, True),
        (128, 256, 64, 8, 4, True, True),
        (128, 256, 64, 8, 3, True, True),
        (128, 128, 64, 8, 4, True),
        (128, 128, 64, 4, 4, True),
        (128, 128, 64, 4, 5, True),
        (256, 128, 64, 8, 3, True),
        (128, 256, 32, 8, 5, True, True),
    )
]


def check_cpu() -> None:
    """Each kernel form on shapes with partial row and column tiles, both epilogues, against torch in fp32."""
    torch.manual_seed(0)
    cases = 0
    for tiles in (LinearTiles(16, 32, 16, 4, 2), LinearTiles(16, 32, 16, 4, 2, True), LinearTiles(16, 32, 16, 4, 2, True, True)):
        for rows in (1, 37, 130):
            x, weight, bias = torch.randn(rows, 64), torch.randn(80, 64) * 0.1, torch.randn(80)
            for gelu in (True, False):
                expected = F.linear(x, weight, bias)
                expected = F.gelu(expected) if gelu else expected
                error = float((linear(x, weight, bias, gelu=gelu, tiles=tiles) - expected).abs().max())
                assert error < 1e-4, (tiles, rows, gelu, error)
                cases += 1
    print(f"--check-cpu: {cases} cases match torch (triton {triton.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--check-cpu", action="store_true", help="run the Triton kernels in Triton's interpreter")
    args = parser.parse_args()
    if args.check_cpu:
        check_cpu()
        return
    torch.manual_seed(0)
    weight = (torch.randn(INNER, HIDDEN, device="cuda") * 0.03).half()
    bias = (torch.randn(INNER, device="cuda") * 0.1).half()
    compiled = torch.compile(lambda x: F.gelu(F.linear(x, weight, bias)), dynamic=False)
    compiled_dynamic = torch.compile(lambda x: F.gelu(F.linear(x, weight, bias)), dynamic=True)
    custom_op_dynamic = torch.compile(lambda x: linear_gelu(x, weight, bias, "none"), dynamic=True)
    results = []
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, device="cuda").half()
        reference = F.gelu(F.linear(x.float(), weight.float(), bias.float()))
        flops = 2 * rows * HIDDEN * INNER
        row: dict[str, object] = {"rows": rows}
        row["cublas+gelu"] = device_ms(lambda: F.gelu(F.linear(x, weight, bias)))
        row["compiled"] = device_ms(lambda: compiled(x))
        row["compiled_dynamic"] = device_ms(lambda: compiled_dynamic(x))
        row["custom_op_dynamic"] = device_ms(lambda: custom_op_dynamic(x))
        row["cublas_only"] = device_ms(lambda: F.linear(x, weight, bias))
        row["cublaslt_tanh"] = device_ms(lambda: torch._addmm_activation(bias, x, weight.t(), use_gelu=True))
        triton_ms = {}
        for tiles in TILES:
            label = "triton {}x{}x{} w{} s{}".format(*tiles) + (" persistent" if tiles.persistent else "") + (
                " subtile" if tiles.subtile else ""
            )
            try:
                got = linear(x, weight, bias, gelu=True, tiles=tiles)
                error = float((got.float() - reference).abs().max())
            except Exception as exc:  # noqa: BLE001 - a config that does not build (shared memory): recorded
                triton_ms[label] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                continue
            if not error <= 2e-2:
                triton_ms[label] = f"WRONG: max |error| {error:.3g}"
                continue
            triton_ms[label] = device_ms(lambda tiles=tiles: linear(x, weight, bias, gelu=True, tiles=tiles))
        row["triton"] = triton_ms
        correct = {k: v for k, v in triton_ms.items() if isinstance(v, float)}
        if correct:
            best = min(correct, key=correct.__getitem__)
            row["triton_best"] = best
            row["triton_best_ms"] = correct[best]
            row["triton_best_vs_compiled"] = row["compiled_dynamic"] / correct[best]
        row["tflops"] = {
            k: flops / (v * 1e9) for k, v in row.items() if isinstance(v, float) and k.endswith(("gelu", "compiled", "dynamic", "only", "tanh", "ms"))
        }
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    card = torch.cuda.get_device_name()
    record = {
        "benchmark": "ffn_gemm_probe",
        "card": card,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "shape": {"in": HIDDEN, "out": INNER},
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out_dir / f"ffn_gemm_probe-{card.replace(' ', '-')}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
