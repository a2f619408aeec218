"""Where one pair's time goes at low load: the served path's layers, each timed on its own.

One request at a time (the next sent `gap` after the last was answered), the same pair, each stage p50 and
p90, for each gap in `--gaps-ms` (0: back to back; 10: threads asleep and cores idle before each request):
  engine         `Engine.score([pair])` in this thread: tokenize, replay, read back (perf.py's "single")
  encode         `Engine.encode([pair])` alone: the tokenizing
  replay         the pair's CUDA graph replayed and waited for, inputs already in place: the device's part as
                 the host sees it; replay_device: the same replay's device time (CUDA events)
  encoder_hop    the tokenizer thread (`Encoder`), then `score_encoded` here
  batcher_hop    tokenize here, then `Batcher.submit`: the runner thread runs the forward
  scorer         `Scorer.similarity`: the tokenizer thread and the batcher, as a request uses them
  scorer_inline  the same with the batcher's `inline_max_pairs`: alone and after a quiet spell, the forward runs
                 on the event loop, no thread hand-off
  http_*         `structsim serve` in a child process: /healthz and /v1/similarity, from a stdlib
                 http.client keep-alive connection and from aiohttp (http_bench's client)
The differences between the stages price each hop. Not a benchmark of record: a map for the next change.

GPU:  python3 bench/one_pair_path.py --out-dir $OUT   (add --gaps-ms 0 10 --requests 400 for the idle cost)
CPU:  python3 bench/one_pair_path.py --device cpu --size tiny --requests 200   (checks the script)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "service")]

import aiohttp  # noqa: E402
import http_bench  # noqa: E402
from provenance import git_commit  # noqa: E402
from similarity_service.batching import Batcher  # noqa: E402
from similarity_service.checkpoint import make_checkpoint  # noqa: E402
from similarity_service.encoding import Encoder  # noqa: E402
from similarity_service.runner import Engine  # noqa: E402
from similarity_service.scoring import SHARED_ENCODE_MAX_PAIRS, Scorer  # noqa: E402
from similarity_service.settings import Settings  # noqa: E402

PAIR = ("今天天气怎么样", "今天天气如何")
BODY = json.dumps({"sentence1": PAIR[0], "sentence2": PAIR[1]}, ensure_ascii=False).encode()
WARMUP = 100


def summary(times_ms: list[float]) -> dict[str, float]:
    kept = sorted(times_ms[WARMUP:])
    return {"p50_ms": statistics.median(kept), "p90_ms": kept[int(0.9 * len(kept))], "requests": len(kept)}


def gap_suffix(gap_ms: float) -> str:
    """Stage names keep their old form back to back; a gap is named after it."""
    return f"_after_{gap_ms:g}ms" if gap_ms else ""


def timed_sync(call: Callable[[], object], count: int, gap_s: float) -> dict[str, float]:
    times = []
    for _ in range(count + WARMUP):
        if gap_s:
            time.sleep(gap_s)
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return summary(times)


async def timed_async(call: Callable[[], Awaitable[object]], count: int, gap_s: float) -> dict[str, float]:
    times = []
    for _ in range(count + WARMUP):
        if gap_s:
            await asyncio.sleep(gap_s)  # the loop sleeps in its selector, as a server's does between requests
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1e3)
    return summary(times)


def replayed(engine: Engine, count: int, gap_s: float) -> dict[str, dict[str, float]]:
    """The pair's graph replay alone, host-timed and device-timed; {} off the packed CUDA path."""
    import torch

    executor = engine._packed  # noqa: SLF001 - a probe looks inside
    if executor is None or not engine.info.device.startswith("cuda"):
        return {}
    graph = executor._graphs[executor._fill_one(engine.encode([PAIR])[0])]  # noqa: SLF001
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host, device = [], []
    for _ in range(count + WARMUP):
        if gap_s:
            time.sleep(gap_s)
        began = time.perf_counter()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        host.append((time.perf_counter() - began) * 1e3)
        device.append(start.elapsed_time(end))
    return {"replay": summary(host), "replay_device": summary(device)}


async def in_process(engine: Engine, count: int, gap_s: float) -> dict[str, dict[str, float]]:
    settings = Settings()
    batcher = Batcher(
        engine, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
        max_batch_tokens=settings.max_batch_tokens, max_queue_pairs=settings.max_queue_pairs,
    )
    inline_batcher = Batcher(
        engine, max_batch_size=settings.max_batch_size, max_wait_ms=0,
        max_batch_tokens=settings.max_batch_tokens, max_queue_pairs=settings.max_queue_pairs,
        inline_max_pairs=SHARED_ENCODE_MAX_PAIRS,
    )
    encoder = Encoder(engine.encode)
    await encoder.start()
    await batcher.start()
    await inline_batcher.start()
    scorer = Scorer(engine, encoder, batcher, settings)
    inline_scorer = Scorer(engine, encoder, inline_batcher, settings)

    async def encoder_hop() -> None:
        engine.score_encoded(await encoder.encode([PAIR]))

    stages = {
        "engine": timed_sync(lambda: engine.score([PAIR]), count, gap_s),
        "encode": timed_sync(lambda: engine.encode([PAIR]), count, gap_s),
        **replayed(engine, count, gap_s),
        "encoder_hop": await timed_async(encoder_hop, count, gap_s),
        "batcher_hop": await timed_async(lambda: batcher.submit(engine.encode([PAIR])), count, gap_s),
        "scorer": await timed_async(lambda: scorer.similarity(*PAIR), count, gap_s),
        "scorer_inline": await timed_async(lambda: inline_scorer.similarity(*PAIR), count, gap_s),
    }
    for each in (batcher, inline_batcher):
        await each.drain()
        await each.close()
    await encoder.close()
    return stages


def over_http(url: str, count: int, gap_s: float) -> dict[str, dict[str, float]]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port))
    headers = {"content-type": "application/json"}

    def get(path: str, body: bytes | None = None) -> None:
        connection.request("POST" if body else "GET", path, body=body, headers=headers if body else {})
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200, answer.status

    stages = {
        "http_stdlib_healthz": timed_sync(lambda: get("/healthz"), count, gap_s),
        "http_stdlib_similarity": timed_sync(lambda: get("/v1/similarity", BODY), count, gap_s),
    }
    connection.close()

    async def with_aiohttp() -> None:
        async with aiohttp.ClientSession() as session:

            async def healthz() -> None:
                async with session.get(f"{url}/healthz") as answer:
                    await answer.read()

            async def similarity() -> None:
                async with session.post(f"{url}/v1/similarity", data=BODY, headers=headers) as answer:
                    await answer.read()

            stages["http_aiohttp_healthz"] = await timed_async(healthz, count, gap_s)
            stages["http_aiohttp_similarity"] = await timed_async(similarity, count, gap_s)

    asyncio.run(with_aiohttp())
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=("tiny", "base"), default="base")
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--loops", nargs="+", choices=("asyncio", "uvloop"), default=["asyncio"],
                        help="event loops to run the in-process stages on (uvicorn picks uvloop where installed)")
    parser.add_argument("--gaps-ms", type=float, nargs="+", default=[0.0],
                        help="pause before each request; every stage runs once per gap")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)  # serve's
    precision = "fp16" if args.device == "cuda" else "fp32"
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_checkpoint(Path(scratch) / f"structbert-{args.size}", args.size, seed=0)
        engine = Engine.load(model_dir, device=args.device, precision=precision)
        engine.warmup()
        card = engine.info.device_name
        stages = {}
        for loop in args.loops:
            factory = __import__("uvloop").new_event_loop if loop == "uvloop" else None
            prefix = "" if loop == "asyncio" else "uvloop_"
            for gap_ms in args.gaps_ms:
                with asyncio.Runner(loop_factory=factory) as runner:
                    ran = runner.run(in_process(engine, args.requests, gap_ms / 1000))
                stages |= {prefix + name + gap_suffix(gap_ms): stage for name, stage in ran.items()}
        del engine
        if not args.skip_http:
            server = http_bench.Server(model_dir, args.device, precision, [], Path(scratch) / "serve.log")
            try:
                server.wait_ready(600)
                for gap_ms in args.gaps_ms:
                    ran = over_http(server.url, args.requests, gap_ms / 1000)
                    stages |= {name + gap_suffix(gap_ms): stage for name, stage in ran.items()}
            finally:
                server.stop()
    for name, stage in stages.items():
        print(f"{name:40s} p50 {stage['p50_ms']:.3f} ms  p90 {stage['p90_ms']:.3f} ms", flush=True)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "one_pair_path", "card": card, "commit": git_commit(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": args.device, "precision": precision,
            "model": f"synthetic StructBERT-{args.size} (seed 0; not semantic)", "stages": stages,
        }
        path = args.out_dir / f"one_pair_path-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
