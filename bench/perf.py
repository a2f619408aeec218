"""structsim against the source article's method and plain transformers, in one run on one card.

Measures, on the same synthetic StructBERT-base checkpoint and the project's Chinese corpus:
  - structsim in-process: one pair end to end (tokenize → forward → P(similar) on the host), p50/p99;
    batch throughput over the corpus' full length mix, as a share of the card's fp16 FLOP ceiling
    (from a matmul measured here, METHOD.md);
  - the ModelScope pipeline fp32 and fp16 (`.half()`, as the article does): one pair per call, and
    `batch_size=32`;
  - transformers BertForSequenceClassification fp32/fp16 at batch 512, length-sorted;
  - accuracy of fp16/bf16/tf32 against fp32 on every corpus pair (mean/max |Δ|, flips at 0.3/0.5/0.7/0.9),
    and the pipeline's own fp16 error on the same pairs;
  - the HTTP service (bench/http_bench.py's server and bench/loadgen.py): p50 at low load, the highest
    rate with p99 ≤ 50 ms, and cold start (process start → ready).
Writes bench/results/perf-<card>-<date>.json (card, commit, date) and prints a table.

GPU:  python3 bench/perf.py --out-dir $OUT
      python3 bench/perf.py --configs fp16 --skip modelscope,transformers,http --out-dir $OUT   (the served
      configuration against fp32 only: a quick recheck of the headline's structsim figures)
CPU:  python3 bench/perf.py --device cpu --size tiny --quick     (checks the script, not a benchmark)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from provenance import git_commit
from workload import distinct_copies, settled_heap

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latency_ms(fn: Callable[[], object], n: int, device: str) -> list[float]:
    """Wall-clock milliseconds of n calls, each ending on the host (results already there)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def matmul_flops(device: str) -> float:
    """Measured dense matmul rate of this device in the serving dtype (FLOP/s)."""
    n = 8192 if device.startswith("cuda") else 1024
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.startswith("cuda") else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flop_per_pair(num_tokens: int, cfg: dict) -> float:
    """Forward FLOPs of a full BERT encoder on one sequence (the ceiling ignores structsim's shortcuts)."""
    h, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return layers * (2 * num_tokens * (4 * h * h + 2 * h * ff) + 4 * num_tokens * num_tokens * h)


def errors_against(reference: Sequence[float], other: Sequence[float]) -> dict[str, float | int | dict]:
    """|Δ| against the reference, decision flips per threshold, and how many reference scores lie within
    the max |Δ| of a threshold (the pairs that could flip at all: flips are luck below that distance)."""
    deltas = [abs(a - b) for a, b in zip(reference, other, strict=True)]
    flips = {str(t): sum((a >= t) != (b >= t) for a, b in zip(reference, other, strict=True)) for t in THRESHOLDS}
    at_risk = {str(t): sum(abs(a - t) <= max(deltas) for a in reference) for t in THRESHOLDS}
    return {"mean_abs": statistics.fmean(deltas), "max_abs": max(deltas), "flips": flips,
            "pairs_within_max_abs_of_threshold": at_risk, "pairs": len(deltas)}


# (label, Engine.load options). The first is the reference for accuracy; "fp16" is what structsim serves.
GPU_CONFIGS: list[tuple[str, dict]] = [
    ("fp32", {"precision": "fp32"}),
    ("fp16", {"precision": "fp16"}),  # what structsim serves: packed, graphs, compiled, fp32 residual, latency kernels
    ("fp16 library-kernels", {"precision": "fp16", "latency_kernels": False}),  # the smallest graphs without them
    ("fp16 flash-attention", {"precision": "fp16", "triton_attention": False}),  # flash's varlen kernel instead
    ("fp16 exact-thresholds", {"precision": "fp16", "exact_thresholds": THRESHOLDS}),  # fp32 rescoring near them
    ("fp16 fp16-residual", {"precision": "fp16", "residual_fp32": False}),
    ("fp16 eager", {"precision": "fp16", "compile_model": False}),
    ("fp16 eager no-graphs", {"precision": "fp16", "compile_model": False, "cuda_graphs": False}),
    ("fp16 padded", {"precision": "fp16", "packed": False}),
    ("bf16", {"precision": "bf16"}),
    ("tf32", {"precision": "tf32"}),
]
TIMED = {label for label, _ in GPU_CONFIGS} - {"tf32"}


def timed_section(engine: Any, pairs: list[tuple[str, str]], device: str, quick: bool) -> dict:
    """One pair's latency, and the throughput of a whole-corpus-x8 call, tokenizing and pre-tokenized."""
    entry: dict = {}
    singles = pairs[: 100 if quick else 1000]
    for pair in singles[:50]:
        engine.score([pair])
    lat = latency_ms(lambda it=iter(singles): engine.score([next(it)]), len(singles), device)
    entry |= {"single_p50_ms": percentile(lat, 50), "single_p99_ms": percentile(lat, 99)}
    big = distinct_copies(pairs, 1 if quick else 8)  # the corpus' full length mix, ~10k pairs per call
    engine.score(big)
    times = []
    for _ in range(2 if quick else 5):
        t0 = time.perf_counter()
        engine.score(big)
        sync(device)
        times.append(time.perf_counter() - t0)
    entry["batch_pairs_s"] = len(big) / statistics.median(times)
    encoded = engine.encode(big)
    times = []
    for _ in range(2 if quick else 5):  # the median, as for the tokenizing calls (one call varied 29-36k)
        t0 = time.perf_counter()
        engine.score_encoded(encoded, bulk=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    entry["batch_pretokenized_pairs_s"] = len(big) / statistics.median(times)
    return entry


def structsim_section(model_dir: Path, pairs: list[tuple[str, str]], device: str, quick: bool,
                      only: set[str] | None = None) -> dict:
    from similarity_service.runner import Engine

    results: dict = {}
    configs = GPU_CONFIGS if device.startswith("cuda") else [("fp32", {"precision": "fp32"})]
    if only:  # fp32 always: the accuracy reference
        configs = [(label, options) for label, options in configs if label == "fp32" or label in only]
    scores: dict[str, list[float]] = {}  # one call of every pair
    singles: dict[str, list[float]] = {}  # one call per pair
    for label, options in configs:
        t0 = time.perf_counter()
        engine = Engine.load(model_dir, device=device, **options)
        engine.warmup()
        sync(device)
        entry: dict = {"load_and_warmup_s": time.perf_counter() - t0}
        scores[label] = engine.score(pairs)
        entry["rescored_pairs_of_one_call"] = engine.rescored_pairs  # exact_thresholds: scored again in fp32
        # one pair per call takes the small-batch path (CUDA graphs; the latency kernels up to 64 tokens):
        # it must score what batches score, and it has its own accuracy against fp32
        singles[label] = [engine.score([pair])[0] for pair in pairs]
        entry["single_vs_batch_max_abs"] = max(abs(a - b) for a, b in zip(singles[label], scores[label], strict=True))
        if label in TIMED:
            with settled_heap():  # as `structsim score` and `serve` run
                entry |= timed_section(engine, pairs, device, quick)
        results[label] = entry
        print(label, json.dumps(entry), flush=True)
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    results["accuracy_vs_fp32"] = {p: errors_against(scores["fp32"], s) for p, s in scores.items() if p != "fp32"}
    results["accuracy_vs_fp32_one_pair_calls"] = {
        p: errors_against(scores["fp32"], s) for p, s in singles.items() if p != "fp32"}
    results["_scores_fp32"] = scores["fp32"]
    return results


def modelscope_section(model_dir: Path, pairs: list[tuple[str, str]], device: str, quick: bool,
                       fp32_scores: Sequence[float]) -> dict:
    from modelscope.pipelines import pipeline

    results: dict = {}
    pipe = pipeline("sentence-similarity", model=str(model_dir), device="gpu" if device.startswith("cuda") else "cpu")

    def p_similar(out: dict) -> float:
        return float(out["scores"][out["labels"].index("1")])

    for precision in ("fp32", "fp16") if device.startswith("cuda") else ("fp32",):
        if precision == "fp16":
            pipe.model.half()  # the source article's method
        singles = pairs[: 30 if quick else 200]
        for pair in singles[:5]:
            pipe(input=pair)
        lat = latency_ms(lambda it=iter(singles): pipe(input=next(it)), len(singles), device)
        batch_pairs = pairs[: 64 if quick else 1000]
        t0 = time.perf_counter()
        outs = pipe(input=[list(p) for p in batch_pairs], batch_size=32)
        sync(device)
        elapsed = time.perf_counter() - t0
        entry = {"single_p50_ms": percentile(lat, 50), "single_p99_ms": percentile(lat, 99),
                 "batch32_pairs_s": len(batch_pairs) / elapsed}
        if precision == "fp16":
            outs_all = pipe(input=[list(p) for p in pairs], batch_size=32)
            entry["accuracy_vs_structsim_fp32"] = errors_against(fp32_scores, [p_similar(o) for o in outs_all])
        else:
            entry["first_scores_parity_max_abs"] = max(
                abs(p_similar(o) - s) for o, s in zip(outs, fp32_scores[: len(outs)], strict=False))
        results[precision] = entry
    return results


def transformers_section(model_dir: Path, pairs: list[tuple[str, str]], device: str, quick: bool) -> dict:
    from transformers import BertForSequenceClassification, BertTokenizerFast

    bert_dir = Path(tempfile.mkdtemp()) / "bert"
    bert_dir.mkdir(parents=True)
    cfg = json.loads((model_dir / "config.json").read_text()) | {"model_type": "bert"}
    (bert_dir / "config.json").write_text(json.dumps(cfg))
    for name in ("vocab.txt", "pytorch_model.bin"):
        (bert_dir / name).symlink_to(model_dir / name)
    tok = BertTokenizerFast(str(model_dir / "vocab.txt"))
    model = BertForSequenceClassification.from_pretrained(bert_dir, attn_implementation="sdpa").eval().to(device)
    ordered = sorted(pairs, key=lambda p: len(p[0]) + len(p[1]))
    results = {}
    for precision in ("fp32", "fp16") if device.startswith("cuda") else ("fp32",):
        if precision == "fp16":
            model.half()
        big = ordered * (1 if quick or precision == "fp32" else 4)
        big.sort(key=lambda p: len(p[0]) + len(p[1]))

        def tokenize(chunk: list[tuple[str, str]]) -> dict:
            return tok([a for a, _ in chunk], [b for _, b in chunk], padding=True, truncation="longest_first",
                       max_length=512, return_tensors="pt")

        def run_all(pretokenized: list[dict] | None = None) -> None:
            with torch.inference_mode():
                for n, i in enumerate(range(0, len(big), 512)):
                    enc = (pretokenized[n] if pretokenized else tokenize(big[i:i + 512])).to(device)
                    torch.softmax(model(**enc).logits.float(), -1)[:, 1].cpu()

        run_all()
        t0 = time.perf_counter()
        run_all()
        entry = {"batch512_sorted_pairs_s": len(big) / (time.perf_counter() - t0)}
        encoded = [tokenize(big[i:i + 512]) for i in range(0, len(big), 512)]
        t0 = time.perf_counter()
        run_all(encoded)
        entry["batch512_sorted_pretokenized_pairs_s"] = len(big) / (time.perf_counter() - t0)
        results[precision] = entry
    return results


def http_section(model_dir: Path, device: str, quick: bool) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    import http_bench  # the HTTP engineer's harness: starts `structsim serve`, drives bench/loadgen.py

    # 5 s a load level, as the headline's separate http_bench runs; the service's default workers (`auto`).
    return http_bench.measure(model_dir, device=device, precision="fp16" if device.startswith("cuda") else "fp32",
                              quick=quick, duration_s=None if quick else 5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="few repetitions: checks the script runs")
    parser.add_argument("--skip", default="", help="comma list of sections to skip: modelscope,transformers,http")
    parser.add_argument("--configs", default="", help="comma list of structsim configurations to run besides fp32 "
                        "(labels of GPU_CONFIGS, e.g. 'fp16'; default all)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from similarity_service.checkpoint import make_checkpoint
    from similarity_service.corpus import load_corpus
    from similarity_service.tokenization import PairTokenizer

    model_dir = make_checkpoint(Path(tempfile.mkdtemp()) / f"synthetic-{args.size}", args.size, seed=args.seed)
    corpus = load_corpus()
    pairs = [(p.sentence1, p.sentence2) for p in corpus][: 200 if args.quick else None]
    cfg = json.loads((model_dir / "config.json").read_text())
    lengths = [e.num_tokens for e in PairTokenizer(model_dir, max_seq_len=512).encode(pairs)]
    rate = matmul_flops(args.device)
    ceiling_pairs_s = len(lengths) / (sum(flop_per_pair(n, cfg) for n in lengths) / rate)
    report: dict = {
        "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__, "model": f"synthetic StructBERT-{args.size} (seed {args.seed}; not semantic)",
        "pairs": len(pairs), "tokens_mean": statistics.fmean(lengths), "tokens_median": statistics.median(lengths),
        "tokens_p90": percentile(lengths, 90), "matmul_tflops": rate / 1e12, "ceiling_pairs_s": ceiling_pairs_s,
    }
    only = set(filter(None, args.configs.split(",")))
    unknown = only - {label for label, _ in GPU_CONFIGS}
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; known: {[label for label, _ in GPU_CONFIGS]}")
    report["structsim"] = structsim_section(model_dir, pairs, args.device, args.quick, only)
    fp32_scores = report["structsim"].pop("_scores_fp32")
    if "modelscope" not in skip:
        report["modelscope_pipeline"] = modelscope_section(model_dir, pairs, args.device, args.quick, fp32_scores)
    if "transformers" not in skip:
        report["transformers"] = transformers_section(model_dir, pairs, args.device, args.quick)
    if "http" not in skip:
        report["http"] = http_section(model_dir, args.device, args.quick)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"perf-{report['card'].replace(' ', '-')}-{report['date'][:10]}.json"
    (args.out_dir / name).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
