"""Do the bulk forward's GEMMs run as fast as this card allows? cuBLAS's heuristic pick against tuned choices.

In a large packed fp16 call the GEMMs take ~62 % of kernel time and run at ~640 TFLOP/s on an H200, against
~757 for an 8192³ matmul (`profile_engine-NVIDIA-H200-compiled-2026-12-02.json`). BERT-base's four linears have
K = 768 or 3072 and N = 768–3072, and M is a sub-batch's token count. For each (linear, M) this probe times
F.linear (fp16, bias) as the engine runs it (cuBLAS/cuBLASLt's heuristic), with PyTorch's TunableOp tuning it
(every registered implementation benchmarked, the fastest kept), and under torch.compile max-autotune with static
shapes (Inductor's Triton GEMM templates, persistent TMA ones included, against cuBLAS). Each tuned output is
checked against the default one. Device medians from CUDA events. Not a benchmark of record: a map for the next
change.

GPU:  python3 bench/bulk_gemm_probe.py --out-dir $OUT   (PYTHONPATH=service:bench)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from kernels_probe import device_ms
from provenance import git_commit

# (name, in_features, out_features) of one BERT-base layer's linears, each run once per layer.
LINEARS = (("qkv", 768, 2304), ("attention_out", 768, 768), ("ffn_in", 768, 3072), ("ffn_out", 3072, 768))
ROWS = (16_384, 62_203, 65_536)  # 62,203: a sub-batch's odd token count, as the engine's are
AUTOTUNE_ROWS = 65_536


def tflops(rows: int, k: int, n: int, ms: float) -> float:
    return 2 * rows * k * n / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--skip-autotune", action="store_true", help="no torch.compile max-autotune variant")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.float16
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    ceiling = 2 * 8192**3 / device_ms(lambda: a @ a) / 1e9
    del a
    print(f"matmul 8192³: {ceiling:.0f} TFLOP/s", flush=True)

    cases = []
    for name, k, n in LINEARS:
        weight = torch.randn(n, k, device=device, dtype=dtype) * k**-0.5
        bias = torch.randn(n, device=device, dtype=dtype) * 0.1
        for rows in ROWS:
            x = torch.randn(rows, k, device=device, dtype=dtype)
            expected = F.linear(x, weight, bias)
            case = {"linear": name, "rows": rows, "k": k, "n": n, "ms": {}, "max_abs_vs_default": {}}
            case["ms"]["default"] = device_ms(lambda: F.linear(x, weight, bias))
            cases.append((case, x, weight, bias, expected))

    # TunableOp: one tuning pass over every case, then each is timed with its tuned choice.
    with tempfile.TemporaryDirectory() as scratch:
        torch.cuda.tunable.set_filename(str(Path(scratch) / "tunableop.csv"))
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        started = time.perf_counter()
        for case, x, weight, bias, _ in cases:
            F.linear(x, weight, bias)
        tuning_s = time.perf_counter() - started
        torch.cuda.tunable.tuning_enable(False)
        for case, x, weight, bias, expected in cases:
            case["ms"]["tunableop"] = device_ms(lambda: F.linear(x, weight, bias))
            case["max_abs_vs_default"]["tunableop"] = float((F.linear(x, weight, bias) - expected).abs().max())
        tunable_results = [list(row) for row in torch.cuda.tunable.get_results()]
        torch.cuda.tunable.enable(False)

    if not args.skip_autotune:
        import torch._inductor.config as inductor_config

        inductor_config.triton.enable_persistent_tma_matmul = True
        for case, x, weight, bias, expected in cases:
            if case["rows"] != AUTOTUNE_ROWS:
                continue
            compiled = torch.compile(
                lambda t, w=weight, b=bias: F.linear(t, w, b), mode="max-autotune-no-cudagraphs", dynamic=False
            )
            case["ms"]["max_autotune"] = device_ms(lambda: compiled(x))
            case["max_abs_vs_default"]["max_autotune"] = float((compiled(x) - expected).abs().max())

    # One layer at M rows: the four linears once each.
    per_layer: dict[int, dict[str, float]] = {}
    for case, *_ in cases:
        variants = per_layer.setdefault(case["rows"], {})
        for variant, ms in case["ms"].items():
            variants[variant] = variants.get(variant, 0.0) + ms
        best = min(case["ms"], key=case["ms"].get)
        print(
            f"{case['linear']:14s} M={case['rows']:6d}  "
            + "  ".join(f"{v} {ms:.3f} ms ({tflops(case['rows'], case['k'], case['n'], ms):.0f} TFLOP/s)" for v, ms in case["ms"].items())
            + f"  best: {best}",
            flush=True,
        )
    for rows, variants in per_layer.items():
        print(f"one layer, M={rows}: " + "  ".join(f"{v} {ms:.3f} ms" for v, ms in variants.items()))
    print(f"TunableOp tuning took {tuning_s:.1f} s; its choices: {tunable_results}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    record = {
        "benchmark": "bulk_gemm_probe", "card": card, "commit": git_commit(), "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "matmul_8192_tflop_s": ceiling,
        "cases": [case for case, *_ in cases], "one_layer_ms": per_layer,
        "tunableop_tuning_s": tuning_s, "tunableop_results": tunable_results,
    }
    path = args.out_dir / f"bulk_gemm_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
