"""Multi-GPU scaling: throughput and latency with 1 replica against N replicas, same load, same run.

Makes a synthetic StructBERT checkpoint (`structsim make-checkpoint`: not semantic, only its size and
shape matter), loads one engine per device exactly as `structsim serve --devices` does (the lifespan's
`load_replicas`, one after another, each warmed up), and drives the service's own batcher in-process
with closed-loop clients sending pre-tokenized corpus requests (so the clients cost little Python and
the numbers show what the replicas add, not the HTTP layer's per-request cost). For each replica count
it records pairs/s, request p50/p99 and each replica's share of the batches; before measuring, it
checks every replica scores the same pairs as replica 0 (a replica on a second GPU that computes
wrongly would otherwise just look fast). Writes bench/results/multi_gpu-<card>-<date>.json with the
card, the commit and the date; the issue's target is ≥ 1.85× throughput with 2 GPUs and p99 no worse.

GPU (≥ 2 GPUs):  python3 bench/multi_gpu.py                              (base size, fp16, cuda:0 vs cuda:0+1)
CPU check:       python3 bench/multi_gpu.py --device cpu --quick          (two CPU replicas: checks the script)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import similarity_service  # noqa: F401 - installed (pip install -e .)?
except ImportError:  # a bare checkout (the GPU machine): run from the tree
    sys.path.insert(0, str(REPO / "service"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "service"), os.environ.get("PYTHONPATH")]))

import loadgen  # noqa: E402 - needs similarity_service importable
from provenance import git_commit  # noqa: E402
from similarity_service.batching import Batcher  # noqa: E402
from similarity_service.commands.serve import GIL_SWITCH_INTERVAL_S  # noqa: E402
from similarity_service.engine_api import EncodedPair, ScoringEngine  # noqa: E402
from similarity_service.lifespan import load_engine, load_replicas  # noqa: E402
from similarity_service.settings import Settings  # noqa: E402

STRUCTSIM = [sys.executable, "-m", "similarity_service.cli"]
SCORE_TOLERANCE = 2e-3  # fp16 on two GPUs of one product: same kernels, tiny nondeterminism at most


def make_checkpoint(size: str, where: Path) -> Path:
    model_dir = where / f"structbert-{size}"
    if not (model_dir / "config.json").exists():
        subprocess.run([*STRUCTSIM, "make-checkpoint", str(model_dir), "--size", size], check=True)
    return model_dir


def check_replicas_agree(engines: Sequence[ScoringEngine], sample: list[EncodedPair]) -> float:
    """Largest |score difference| of any replica against replica 0 on `sample`; raises past the tolerance."""
    reference = engines[0].score_encoded(sample)
    worst = 0.0
    for engine in engines[1:]:
        scores = engine.score_encoded(sample)
        worst = max(worst, max(abs(a - b) for a, b in zip(reference, scores, strict=True)))
    if worst > SCORE_TOLERANCE:
        raise SystemExit(f"replicas disagree: max |Δ| {worst:.2e} > {SCORE_TOLERANCE} (a device computes wrongly)")
    return worst


async def closed_loop(
    engines: Sequence[ScoringEngine],
    requests: list[list[EncodedPair]],
    settings: Settings,
    clients: int,
    seconds: float,
) -> dict[str, object]:
    """`clients` callers, each submitting its next request as soon as the last is answered, for `seconds`."""
    batcher = Batcher(
        engines,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_batch_tokens=settings.max_batch_tokens,
        max_queue_pairs=max(settings.max_queue_pairs, clients * max(map(len, requests))),
    )
    await batcher.start()
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    pairs_done = 0

    async def client(seed: int, until: float, record: bool) -> None:
        nonlocal pairs_done
        rng = random.Random(seed)
        while loop.time() < until:
            request = requests[rng.randrange(len(requests))]
            started = loop.time()
            await batcher.submit(request)
            if record:
                latencies.append(loop.time() - started)
                pairs_done += len(request)

    try:
        warm = loop.time() + min(2.0, seconds / 4)  # fill the pipeline before counting
        await asyncio.gather(*(client(i, warm, False) for i in range(clients)))
        before = batcher.replicas
        started = loop.time()
        await asyncio.gather(*(client(1000 + i, started + seconds, True) for i in range(clients)))
        elapsed = loop.time() - started
        after = batcher.replicas
    finally:
        await batcher.close()
    latencies.sort()
    return {
        "replicas": [engine.info.device for engine in engines],
        "pairs_per_s": pairs_done / elapsed,
        "requests": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "batches_per_replica": [a.batches_run - b.batches_run for a, b in zip(after, before, strict=True)],
        "busy_share_per_replica": [
            (a.inference_s - b.inference_s) / elapsed for a, b in zip(after, before, strict=True)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the second configuration (GPUs)")
    parser.add_argument("--size", default="base", help="make-checkpoint size (base = BERT-base, tiny for checks)")
    parser.add_argument("--model-dir", type=Path, help="an existing checkpoint instead of a synthetic one")
    parser.add_argument("--precision", default=None, help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--pairs-per-request", type=int, nargs="+", default=[1, 32], help="one run per value")
    parser.add_argument("--clients", type=int, default=64, help="concurrent closed-loop callers")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per configuration")
    parser.add_argument("--quick", action="store_true", help="tiny model, short runs: checks the script")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.quick:
        args.size, args.seconds, args.clients, args.pairs_per_request = "tiny", 1.0, 8, [4]
    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `structsim serve` sets it: replica threads share the GIL
    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.replicas:
            raise SystemExit(
                f"{args.replicas} replicas need {args.replicas} GPUs; torch sees {torch.cuda.device_count()}"
            )
        devices = [f"cuda:{index}" for index in range(args.replicas)]
    else:
        devices = ["cpu"] * args.replicas  # the script's check: replicas share the cores, no speed-up expected

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_checkpoint(args.size, Path(tmp))
        settings = Settings(
            model=str(model_dir),
            precision=precision,
            devices=",".join(devices),
            max_seq_len=128,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
        )
        loading = time.perf_counter()
        engines = load_replicas(load_engine, settings)
        load_s = time.perf_counter() - loading
        pairs = loadgen.corpus_pairs()
        sample = engines[0].encode(pairs[:256])
        agreement = check_replicas_agree(engines, sample)
        runs = []
        for per_request in args.pairs_per_request:
            rng = random.Random(per_request)
            requests = [engines[0].encode(rng.sample(pairs, per_request)) for _ in range(512)]
            for count in (1, len(engines)):
                run = asyncio.run(closed_loop(engines[:count], requests, settings, args.clients, args.seconds))
                run["pairs_per_request"] = per_request
                runs.append(run)
                print(
                    f"{per_request:>4} pairs/request, {count} replica(s): {run['pairs_per_s']:,.0f} pairs/s, "
                    f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, batches {run['batches_per_replica']}",
                    flush=True,
                )
    by_size: dict[int, list[dict[str, object]]] = {}
    for run in runs:
        by_size.setdefault(int(run["pairs_per_request"]), []).append(run)  # type: ignore[call-overload]
    scaling = {
        str(size): {
            "throughput_ratio": float(pair[1]["pairs_per_s"]) / float(pair[0]["pairs_per_s"]),  # type: ignore[arg-type]
            "p99_ratio": float(pair[1]["p99_ms"]) / float(pair[0]["p99_ms"]),  # type: ignore[arg-type]
        }
        for size, pair in by_size.items()
    }
    info = engines[0].info
    report = {
        "benchmark": "multi_gpu",
        "card": info.device_name,
        "devices": [engine.info.device_name for engine in engines],
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "size": args.size if args.model_dir is None else str(args.model_dir),
            "synthetic": args.model_dir is None,
        },
        "precision": info.precision,
        "config": {
            "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms,
            "max_seq_len": 128,
            "clients": args.clients,
            "seconds": args.seconds,
            "gil_switch_interval_s": GIL_SWITCH_INTERVAL_S,
            "load": "in-process closed loop through the service's batcher, pre-tokenized corpus requests",
        },
        "load_s": load_s,
        "replica_max_abs_diff": agreement,
        "runs": runs,
        "scaling": scaling,
        "target": "throughput_ratio >= 1.85 and p99_ratio <= 1.0 with 2 GPUs",
        "quick": args.quick,
    }
    card = re.sub(r"[^A-Za-z0-9]+", "-", info.device_name).strip("-")
    now = datetime.now(UTC)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"multi_gpu-{card}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(scaling, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
