"""Is a lone request slower when the server was idle before it? One pair per request, one at a time, with gaps.

bench/http_bench.py's one-pair figures disagree: one request at a time back to back takes ~0.9-1.6 ms p50,
while open-loop single pairs at 100 req/s take ~2-3 ms from send. They differ in three ways: the gap before
each request (threads asleep, cores in deep idle states), the pairs (a fixed short pair vs the corpus,
55 tokens on average) and the client (one connection vs client processes). This probe varies the first two
with one connection: each (pairs, gap) series sends 400 requests one after another, sleeping `gap`
between an answer and the next request, against `structsim serve` with 1 and with 3 workers. It also times
one pair in-process (`Engine.score`, no HTTP, the same pairs and gaps), which tells the server's idle cost
apart from the device's and the host's own.

GPU:  python3 bench/idle_gap_probe.py --out-dir $OUT   (PYTHONPATH=service:bench)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from http_bench import SHORT_PAIR, SHORT_PAIR_BODY, Server, lone_requests, make_checkpoint, p50_p90
from loadgen import corpus_pairs
from provenance import git_commit

GAPS_MS = (0.0, 2.0, 10.0)
REQUESTS = 400


def in_process(model_dir: Path, device: str, precision: str) -> list[dict[str, object]]:
    """`Engine.score` of one pair at a time with the same gaps (compile_model off: one pair replays a graph)."""
    from similarity_service.runner import Engine

    engine = Engine.load(model_dir, precision=precision, device=device, compile_model=False)
    engine.warmup()
    runs = []
    for label, pairs in (("short pair", [SHORT_PAIR]), ("corpus", corpus_pairs())):
        for gap in GAPS_MS:
            times = []
            for turn in range(REQUESTS + 50):  # as `lone_requests`: the first 50 warm up
                if gap:
                    time.sleep(gap / 1000)
                start = time.perf_counter()
                engine.score([pairs[turn % len(pairs)]])
                if turn >= 50:
                    times.append((time.perf_counter() - start) * 1000)
            run = {"workers": "in-process", "pairs": label, "gap_ms": gap, **p50_p90(times)}
            print(json.dumps(run), flush=True)
            runs.append(run)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    short = [SHORT_PAIR_BODY]
    corpus = [json.dumps({"sentence1": a, "sentence2": b}, ensure_ascii=False).encode() for a, b in corpus_pairs()]
    record: dict[str, object] = {"benchmark": "idle_gap_probe", "commit": git_commit(),
                                 "date": datetime.now(UTC).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_checkpoint("base", Path(scratch))
        record["runs"] = in_process(model_dir, args.device, args.precision)
        for workers in args.workers:
            server = Server(model_dir, args.device, args.precision, ["--workers", str(workers)], Path(scratch) / "log")
            try:
                server.wait_ready(600)
                url = server.url + "/v1/similarity"
                for label, bodies in (("short pair", short), ("corpus", corpus)):
                    for gap in GAPS_MS:
                        result = asyncio.run(lone_requests(url, bodies, gap / 1000, REQUESTS))
                        run = {"workers": workers, "pairs": label, "gap_ms": gap, **result}
                        record["runs"].append(run)  # type: ignore[union-attr]
                        print(json.dumps(run), flush=True)
            finally:
                server.stop()
    import torch

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record["card"] = card
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"idle_gap_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
