"""GPU smoke test of the scoring engine: each precision on a synthetic StructBERT, and the capability check.

Makes the synthetic checkpoint from a seed (base = BERT-base size, ~400 MB, so it is generated on the
machine rather than carried), loads the engine in fp32, tf32, fp16 and bf16 (those the card has),
scores ~300 corpus pairs of every category, and prints, per precision: |Δ| of the scores against
fp32 (mean, max, decisions flipped at 0.5/0.7), load and warm-up time, batch throughput over the
pairs, and single-pair latency. Then it simulates a compute capability 7.5 card (a T4) and shows the
engine refusing bf16 with its error message. Writes bench/results/gpu_engine_smoke-<card>-<date>.json
(card, commit, date, every number printed). The scores of a synthetic model mean nothing semantically.

GPU:  python3 bench/gpu_engine_smoke.py --out-dir $OUT
CPU:  python3 bench/gpu_engine_smoke.py --device cpu --size tiny --quick     (checks the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
try:
    import similarity_service  # noqa: F401 - installed (pip install -e .)?
except ImportError:  # a bare checkout (the GPU machine): import the package from the source tree
    sys.path.insert(0, str(REPO / "service"))

import torch
from provenance import git_commit

from similarity_service.checkpoint import make_checkpoint
from similarity_service.corpus import load_corpus
from similarity_service.precision import (
    PRECISIONS,
    PrecisionError,
    describe_device,
    resolve_device,
    resolve_precision,
    supported_precisions,
)
from similarity_service.runner import Engine
from similarity_service.tokenization import PairTokenizer

SIMULATED_CAPABILITY = (7, 5)  # a Tesla T4: fp16 Tensor Cores, no bf16/tf32
THRESHOLDS = (0.5, 0.7)


def sample_pairs(count: int) -> list[tuple[str, str]]:
    """`count` corpus pairs spread evenly over the corpus (every category, every length)."""
    corpus = load_corpus()
    step = max(1, len(corpus) // count)
    return [row.pair for row in corpus[::step][:count]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_precision(
    model_dir: Path, precision: str, device: str, pairs: list[tuple[str, str]], repeats: int
) -> dict[str, Any]:
    """Load, warm up and time one precision; returns its scores and timings."""
    started = time.perf_counter()
    engine = Engine.load(model_dir, precision=precision, device=device)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - started
    scores = engine.score(pairs)  # also the first, untimed pass over these shapes
    batch_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.score(pairs)
        batch_s.append(time.perf_counter() - started)
    single_ms = []
    for pair in pairs[: 10 * repeats]:
        started = time.perf_counter()
        engine.score([pair])
        single_ms.append((time.perf_counter() - started) * 1e3)
    result = {
        "precision": engine.info.precision,
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3),
        "batch_pairs_per_s": round(len(pairs) / statistics.median(batch_s), 1),
        "single_pair_ms_p50": round(percentile(single_ms, 50), 3),
        "single_pair_ms_p99": round(percentile(single_ms, 99), 3),
        "scores": scores,
    }
    del engine
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def accuracy(scores: list[float], reference: list[float]) -> dict[str, Any]:
    deltas = [abs(a - b) for a, b in zip(scores, reference, strict=True)]
    flips = {str(t): sum((a >= t) != (b >= t) for a, b in zip(scores, reference, strict=True)) for t in THRESHOLDS}
    return {"mean_abs_delta": statistics.fmean(deltas), "max_abs_delta": max(deltas), "flips": flips}


def capability_refusal(device: str, device_name: str) -> dict[str, Any]:
    """What the engine says when the card reports a capability of 7.5 and bf16 is asked for."""
    simulated = {"capability": ".".join(map(str, SIMULATED_CAPABILITY)), "device_name": device_name}
    simulated["supported"] = supported_precisions("cuda", capability=SIMULATED_CAPABILITY)
    simulated["auto"] = resolve_precision("auto", "cuda", capability=SIMULATED_CAPABILITY)
    try:
        resolve_precision(
            "bf16",
            device if device.startswith("cuda") else "cuda:0",
            capability=SIMULATED_CAPABILITY,
            device_name=device_name,
        )
    except PrecisionError as exc:
        simulated["bf16_refused"] = str(exc)
    else:
        simulated["bf16_refused"] = None
    return simulated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--size", choices=("tiny", "base"), default="base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--checkpoint", type=Path, help="reuse this checkpoint directory instead of making one")
    parser.add_argument("--quick", action="store_true", help="fewer pairs and repeats: checks the script")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    count, repeats = (40, 1) if args.quick else (args.pairs, 5)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model_dir = args.checkpoint or make_checkpoint(Path(tmp) / f"structbert-{args.size}", args.size, seed=args.seed)
        make_s = time.perf_counter() - started
        pairs = sample_pairs(count)
        mean_tokens = statistics.fmean(len(item.input_ids) for item in PairTokenizer(model_dir).encode(pairs))
        facts = describe_device(resolve_device(args.device))
        device, device_name = str(facts.device), facts.name
        capability = ".".join(map(str, facts.capability)) if facts.capability else None
        supported = supported_precisions(facts.device)
        results: dict[str, Any] = {}
        for precision in PRECISIONS:
            if precision in supported:
                results[precision] = run_precision(model_dir, precision, device, pairs, repeats)
            else:
                try:
                    Engine.load(model_dir, precision=precision, device=device)
                    results[precision] = {"refused": None}
                except PrecisionError as exc:
                    results[precision] = {"refused": str(exc)}

    reference = results["fp32"]["scores"]
    for result in results.values():
        if "scores" in result:
            result["accuracy_vs_fp32"] = accuracy(result["scores"], reference)
    report = {
        "benchmark": "gpu_engine_smoke",
        "card": device_name,
        "compute_capability": capability,
        "device": device,
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model": f"synthetic StructBERT {args.size}, seed {args.seed} (random weights: scores are not semantic)",
        "make_checkpoint_s": round(make_s, 1),
        "pairs": len(pairs),
        "mean_tokens_per_pair": round(mean_tokens, 1),
        "results": {p: {k: v for k, v in r.items() if k != "scores"} for p, r in results.items()},
        "simulated_capability_7_5": capability_refusal(device, device_name),
    }
    print_report(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    card = "".join(c if c.isalnum() else "-" for c in device_name).strip("-")
    path = args.out_dir / f"gpu_engine_smoke-{card}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    return 0


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['card']} (capability {report['compute_capability']}), torch {report['torch']}, commit {report['commit']}"
    )
    print(
        f"{report['model']}; {report['pairs']} corpus pairs, {report['mean_tokens_per_pair']} tokens on average; "
        f"checkpoint made in {report['make_checkpoint_s']} s"
    )
    header = f"{'precision':9} {'mean|Δ|':>9} {'max|Δ|':>9} {'flips@.5/.7':>11} {'pairs/s':>9} {'1 pair p50/p99 ms':>18} {'load s':>7} {'warm-up s':>9}"
    print(header)
    for precision, result in report["results"].items():
        if "refused" in result:
            print(f"{precision:9} refused: {result['refused']}")
            continue
        acc = result["accuracy_vs_fp32"]
        flips = "/".join(str(acc["flips"][str(t)]) for t in THRESHOLDS)
        print(
            f"{precision:9} {acc['mean_abs_delta']:9.2e} {acc['max_abs_delta']:9.2e} {flips:>11} "
            f"{result['batch_pairs_per_s']:9.1f} {result['single_pair_ms_p50']:8.2f}/{result['single_pair_ms_p99']:<9.2f} "
            f"{result['load_s']:7.2f} {result['warmup_s']:9.2f}"
        )
    simulated = report["simulated_capability_7_5"]
    print(
        f"\nsimulated capability {simulated['capability']}: supports {', '.join(simulated['supported'])}; auto = {simulated['auto']}"
    )
    print(f"bf16 asked for: {simulated['bf16_refused']}")


if __name__ == "__main__":
    sys.exit(main())
