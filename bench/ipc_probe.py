"""What would handing tokenized pairs to an engine process cost? A Unix-socket round trip, per request.

Single pairs over HTTP cap near 2,000-2,800 requests/s on the H200 hosts because one process's Python
(event loop, tokenizer thread, runner) shares one GIL (docs/performance.md). The structural fix is several
HTTP processes per GPU that tokenize and hand their pairs to one process owning the engine and its batcher.
This probe prices that hand-off before it is built: an "owner" process serves length-prefixed msgspec
msgpack frames (a request id and its encoded pairs) on a Unix socket under uvloop and answers each at once
(an instant engine), while "worker" processes send single pairs, each over its own connection with
`--in-flight` requests outstanding. Reported: requests/s, the owner's CPU per request (what bounds one
owner: 1e6 / that µs is its ceiling in requests/s), the workers' CPU per request, and the round trip's
p50/p99 with one request in flight (the latency a hand-off adds).

    .venv/bin/python bench/ipc_probe.py --out-dir bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import struct
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from provenance import git_commit

HEADER = struct.Struct("<I")  # frame length


class Request(msgspec.Struct, array_like=True):
    id: int
    pairs: list[tuple[list[int], list[int]]]  # (input_ids, token_type_ids) per pair


class Answer(msgspec.Struct, array_like=True):
    id: int
    scores: list[float]


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    return await reader.readexactly(length)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def owner_main(path: str, ready: Any, control: Any) -> None:  # noqa: ANN401 - multiprocessing primitives
    import uvloop

    decode, encode = msgspec.msgpack.Decoder(Request).decode, msgspec.msgpack.Encoder().encode

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = decode(await read_frame(reader))
                writer.write(frame(encode(Answer(request.id, [0.5] * len(request.pairs)))))
        except asyncio.IncompleteReadError:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path)
        ready.set()
        async with server:
            while True:  # the parent asks for this process's CPU time over the pipe
                await asyncio.to_thread(control.recv)  # one idle thread, parked between asks
                control.send(time.process_time())

    uvloop.run(main())


def worker_main(path: str, in_flight: int, seconds: float, pair: tuple[list[int], list[int]], out: Any) -> None:  # noqa: ANN401
    import uvloop

    encode, decode = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder(Answer).decode

    async def main() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(path)
        waiting: dict[int, asyncio.Future[Answer]] = {}
        latencies: list[float] = []

        async def receive() -> None:
            while True:
                answer = decode(await read_frame(reader))
                waiting.pop(answer.id).set_result(answer)

        receiver = asyncio.create_task(receive())
        next_id = 0
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal next_id
            loop = asyncio.get_running_loop()
            while time.perf_counter() < deadline:
                next_id += 1
                future = waiting[next_id] = loop.create_future()
                start = time.perf_counter()
                writer.write(frame(encode(Request(next_id, [pair]))))
                await future
                latencies.append(time.perf_counter() - start)

        cpu0 = time.process_time()
        await asyncio.gather(*(client() for _ in range(in_flight)))
        cpu = time.process_time() - cpu0
        receiver.cancel()
        writer.close()
        return {"requests": len(latencies), "cpu_s": cpu, "latencies": latencies}

    out.put(uvloop.run(main()))


def run(workers: int, in_flight: int, seconds: float, pair: tuple[list[int], list[int]]) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "owner.sock")
        ready, results = context.Event(), context.Queue()
        control, owner_end = context.Pipe()
        owner = context.Process(target=owner_main, args=(path, ready, owner_end), daemon=True)
        owner.start()
        ready.wait(30)

        def owner_cpu_s() -> float:
            control.send("cpu")
            return control.recv()

        owner_cpu0 = owner_cpu_s()
        started = time.perf_counter()
        procs = [context.Process(target=worker_main, args=(path, in_flight, seconds, pair, results)) for _ in range(workers)]
        for proc in procs:
            proc.start()
        rows = [results.get(timeout=seconds + 60) for _ in procs]
        elapsed = time.perf_counter() - started
        owner_cpu = owner_cpu_s() - owner_cpu0
        for proc in procs:
            proc.join(10)
        owner.kill()
    requests = sum(row["requests"] for row in rows)
    latencies = sorted(latency for row in rows for latency in row["latencies"])
    return {
        "workers": workers, "in_flight_per_worker": in_flight, "requests": requests,
        "requests_per_s": requests / elapsed,  # includes the workers' start-up: a lower bound
        "owner_cpu_us_per_request": owner_cpu / requests * 1e6,
        "worker_cpu_us_per_request": sum(row["cpu_s"] for row in rows) / requests * 1e6,
        "p50_us": latencies[len(latencies) // 2] * 1e6, "p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tokens", type=int, default=46, help="tokens of the pair sent (the corpus' mean is 46-55)")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    pair = ([101] + [2000 + i for i in range(args.tokens - 2)] + [102], [0] * (args.tokens // 2) + [1] * (args.tokens - args.tokens // 2))
    shapes = [(1, 1), (1, 16), (2, 16)]  # (workers, in flight each): latency alone, then load
    rows = []
    for workers, in_flight in shapes:
        row = run(workers, in_flight, args.seconds, pair)
        rows.append(row)
        print(f"{workers} worker(s) x {in_flight:2d} in flight: {row['requests_per_s']:8,.0f} req/s, owner "
              f"{row['owner_cpu_us_per_request']:5.1f} µs CPU/req, workers {row['worker_cpu_us_per_request']:5.1f}, "
              f"round trip p50 {row['p50_us']:6.1f} µs p99 {row['p99_us']:7.1f}", flush=True)
    report = {
        "benchmark": "ipc_probe", "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "tokens": args.tokens,
        "seconds": args.seconds, "runs": rows,
        "owner_ceiling_requests_per_s": 1e6 / statistics.median(row["owner_cpu_us_per_request"] for row in rows[1:]),
    }
    print(f"one owner's ceiling at that CPU per request: {report['owner_ceiling_requests_per_s']:,.0f} req/s")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"ipc_probe-cpu-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(report, indent=1) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
