"""The serving path's own cost per request, on a simulated GPU: latency beyond the engine, and loop CPU.

The engine is simulated, so only the batcher's (and the HTTP layer's) cost is measured, on any machine:
`score_encoded` holds the GIL for `--engine-gil-us` (the Python a packed engine runs: packing, launch),
then sleeps `--engine-ms` + `--engine-us-per-pair` × pairs with the GIL released (a GPU pass and its sync).

In-process: the real `Batcher` on uvloop with serve's GIL switch interval, driven open loop (Poisson
arrivals of single pre-tokenized pairs, latency from the scheduled time) at a few rates and closed loop
(`--concurrency` callers). Per run: latency p50/p99; the engine's own wall time per pass, measured in its
thread; their difference (the overhead; at low rates a pass holds one request); the event loop thread's
CPU per request, and the same for the load generator alone against a batcher that answers at once
(the generator's floor, to subtract).

HTTP (`--http`): `create_app` with the simulated engine under uvicorn (uvloop, httptools) in a child
process, as `structsim serve` runs it; one aiohttp client sends sequential requests (round trip of
/healthz, the client's and the server's fixed floor, vs /v1/similarity) and open-loop single pairs, and
the server process's CPU per request is read from /proc.

`--compare REV` measures the service code of git revision REV the same way (its `service/` extracted
to a temporary directory, put first on PYTHONPATH of the child processes), interleaved A B A B with this
tree, and reports paired ratios: this CPU is noisy, compare only within one run.

    python3 bench/batcher_overhead.py --out-dir bench/results --compare HEAD~3 --http
    python3 bench/batcher_overhead.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIL_SWITCH_INTERVAL_S = 0.0005  # as `structsim serve` sets it (commands/serve.py)


# --- the simulated engine ------------------------------------------------------------------------------


class SimEngine:
    """A ScoringEngine whose forward pass holds the GIL a while, then sleeps (GIL released) like a GPU pass."""

    def __init__(self, gil_us: float, base_ms: float, us_per_pair: float) -> None:
        from similarity_service.engine_api import EngineInfo

        self.info = EngineInfo(
            model_id="simulated",
            revision=None,
            model_dir="/nonexistent",
            fingerprint="simulated",
            precision="fp16",
            device="cpu",
            device_name="simulated GPU",
            compute_capability=None,
            max_seq_len=512,
        )
        self.max_batch_size = 1 << 20
        self._gil_s = gil_us / 1e6
        self._base_s = base_ms / 1e3
        self._per_pair_s = us_per_pair / 1e6
        self.calls: list[tuple[float, float, int]] = []  # (start, end, pairs), perf_counter in the runner thread

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        """Character codes as token ids (the real tokenizer costs ~50-70 µs a pair; not measured here)."""
        from similarity_service.engine_api import EncodedPair

        encoded = []
        for a, b in pairs:
            ids = [101, *(ord(c) % 21000 for c in a[:254]), 102, *(ord(c) % 21000 for c in b[:254]), 102]
            encoded.append(EncodedPair(input_ids=ids, token_type_ids=[0] * (len(a[:254]) + 2) + [1] * (len(b[:254]) + 1)))
        return encoded

    def score_encoded(self, batch: Sequence[Any]) -> list[float]:
        start = time.perf_counter()
        flat = [token for pair in batch for token in pair.input_ids]  # a packed engine's host-side packing
        while time.perf_counter() - start < self._gil_s:  # the rest of its Python, GIL held
            pass
        time.sleep(self._base_s + self._per_pair_s * len(batch))
        scores = [(pair.input_ids[1] % 1000) / 1000 for pair in batch]
        self.calls.append((start, time.perf_counter(), len(batch)))
        del flat
        return scores

    def warmup(self) -> None:
        """Nothing to warm."""


def engine_from(args: dict[str, Any]) -> SimEngine:
    return SimEngine(args["engine_gil_us"], args["engine_ms"], args["engine_us_per_pair"])


def corpus_requests(engine: SimEngine, limit: int = 4096) -> list[list[Any]]:
    from similarity_service.corpus import load_corpus

    return [[pair] for pair in engine.encode([row.pair for row in load_corpus()][:limit])]


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# --- in-process: one measurement per child process --------------------------------------------------


class Instant:
    """A 'batcher' that answers at once: what the load generator alone costs the loop."""

    async def submit(self, encoded: Sequence[Any]) -> list[float]:
        return [0.0] * len(encoded)


async def open_loop(submitter: Any, requests: list[list[Any]], rate: float, seconds: float) -> dict[str, Any]:
    """Poisson arrivals at `rate`; latency from each submit (and, for p99, from its scheduled time)."""
    import random

    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []  # from the submit (the batcher's cost)
    from_schedule: list[float] = []  # from the scheduled time (adds the generator's timer lateness)
    lags: list[float] = []
    pending: set[asyncio.Task[Any]] = set()
    errors = 0

    def done(task: asyncio.Task[Any], scheduled: float, sent: float) -> None:
        nonlocal errors
        pending.discard(task)
        if task.exception() is None:
            now = time.perf_counter()
            latencies.append(now - sent)
            from_schedule.append(now - scheduled)
        else:
            errors += 1

    start = time.perf_counter()
    cpu = time.thread_time()
    scheduled, index = start, 0
    while (scheduled := scheduled + rng.expovariate(rate)) < start + seconds:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter()
        lags.append(sent - scheduled)
        task = loop.create_task(submitter.submit(requests[index % len(requests)]))
        task.add_done_callback(lambda t, s=scheduled, n=sent: done(t, s, n))
        pending.add(task)
        index += 1
    while pending:
        await asyncio.sleep(0.001)
    return {"sent": index, "completed": len(latencies), "errors": errors, "elapsed_s": time.perf_counter() - start,
            "loop_cpu_s": time.thread_time() - cpu, "latencies": latencies, "send_lag_ms_p99": (pct(lags, 99) or 0) * 1e3,
            "from_schedule_ms_p99": (pct(from_schedule, 99) or 0) * 1e3}


async def closed_loop(submitter: Any, requests: list[list[Any]], concurrency: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        turn = offset
        while (sent := time.perf_counter()) < end:
            await submitter.submit(requests[turn % len(requests)])
            latencies.append(time.perf_counter() - sent)
            turn += concurrency

    start, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return {"sent": len(latencies), "completed": len(latencies), "errors": 0, "elapsed_s": time.perf_counter() - start,
            "loop_cpu_s": time.thread_time() - cpu, "latencies": latencies, "send_lag_ms_p99": 0.0}


def summarize(raw: dict[str, Any], engine: SimEngine | None, since: int) -> dict[str, Any]:
    lat = [x * 1e3 for x in raw.pop("latencies")]
    calls = engine.calls[since:] if engine is not None else []
    walls = [(end - start) * 1e3 for start, end, _ in calls]
    sizes = [n for _, _, n in calls]
    completed = raw["completed"]
    row = {
        **raw,
        "throughput_rps": completed / raw["elapsed_s"] if raw["elapsed_s"] else 0.0,
        "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
        "loop_cpu_us_per_request": raw["loop_cpu_s"] / completed * 1e6 if completed else None,
        "passes": len(calls), "pass_size_mean": statistics.fmean(sizes) if sizes else None,
        "engine_ms_p50": pct(walls, 50), "engine_ms_p99": pct(walls, 99),
        "engine_busy_share": sum(walls) / 1e3 / raw["elapsed_s"] if raw["elapsed_s"] else None,
    }
    if row["p50_ms"] is not None and row["engine_ms_p50"] is not None:
        row["overhead_ms_p50"] = row["p50_ms"] - row["engine_ms_p50"]
    return row


async def measure_inprocess(args: dict[str, Any]) -> list[dict[str, Any]]:
    from similarity_service.batching import Batcher

    engine = engine_from(args)
    requests = corpus_requests(engine)
    batcher = Batcher(engine, max_batch_size=args["max_batch_size"], max_wait_ms=args["max_wait_ms"],
                      max_batch_tokens=None, max_queue_pairs=1 << 20)
    await batcher.start()
    rows = []
    try:
        await closed_loop(batcher, requests, 64, 0.3)  # warm the path (first tasks, thread start)
        gc.collect()
        gc.freeze()
        for kind, load in args["runs"]:
            if kind == "floor":
                raw = await open_loop(Instant(), requests, load, args["seconds"])
                rows.append({"kind": kind, "load": load, **summarize(raw, None, 0)})
                continue
            since = len(engine.calls)
            if kind == "open":
                raw = await open_loop(batcher, requests, load, args["seconds"])
            else:
                raw = await closed_loop(batcher, requests, int(load), args["seconds"])
            rows.append({"kind": kind, "load": load, **summarize(raw, engine, since)})
    finally:
        await batcher.close()
    return rows


def child_main(spec: dict[str, Any]) -> None:
    import similarity_service

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    gc.set_threshold(10_000, *gc.get_threshold()[1:])  # as serve settles the heap
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rows = runner.run(measure_inprocess(spec))
    print(json.dumps({"module": similarity_service.__file__, "rows": rows}))


# --- HTTP: the app under uvicorn in a child process -------------------------------------------------


def serve_main(spec: dict[str, Any]) -> None:
    import uvicorn

    from similarity_service.app import create_app
    from similarity_service.settings import load_settings

    try:
        from similarity_service.commands.serve import settle_heap
    except ImportError:
        settle_heap = None
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    settings = load_settings({"model": "simulated", "max_batch_size": spec["max_batch_size"],
                              "max_wait_ms": spec["max_wait_ms"], "port": spec["port"], "host": "127.0.0.1"}, {})
    app = create_app(settings, engine_factory=lambda _: engine_from(spec), on_ready=settle_heap)
    uvicorn.run(app, host="127.0.0.1", port=spec["port"], loop="uvloop", http="httptools", lifespan="on",
                log_level="warning", access_log=False)


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def http_client(url: str, spec: dict[str, Any], pid: int) -> dict[str, Any]:
    import aiohttp

    sys.path.insert(0, str(REPO / "bench"))
    import loadgen

    body = json.dumps({"sentence1": "今天天气怎么样", "sentence2": "今天天气如何"}, ensure_ascii=False).encode()
    headers = {"content-type": "application/json"}
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        async def rtt(path: str, n: int) -> list[float]:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                if path == "/healthz":
                    async with session.get(url + path) as answer:
                        await answer.read()
                else:
                    async with session.post(url + path, data=body, headers=headers) as answer:
                        await answer.read()
                assert answer.status == 200, answer.status
                times.append((time.perf_counter() - start) * 1e3)
            return times

        await rtt("/v1/similarity", 200)  # warm
        healthz, similarity = [], []
        for _ in range(spec["rtt_rounds"]):  # interleaved, so drift hits both
            healthz += await rtt("/healthz", 100)
            similarity += await rtt("/v1/similarity", 100)
        out["rtt_healthz_ms_p50"] = pct(healthz, 50)
        out["rtt_similarity_ms_p50"] = pct(similarity, 50)
        out["rtt_similarity_ms_p99"] = pct(similarity, 99)
        out["scoring_beyond_healthz_ms_p50"] = out["rtt_similarity_ms_p50"] - out["rtt_healthz_ms_p50"]
    pairs = loadgen.corpus_pairs()
    out["open_loop"] = []
    for rate in spec["http_rates"]:
        cpu = process_cpu_s(pid)
        result = await loadgen.run_open_loop(url, rate, spec["seconds"], pairs)
        cpu = process_cpu_s(pid) - cpu
        out["open_loop"].append({"rate": rate, "throughput_rps": result.throughput_rps, "p50_ms": result.p50_ms,
                                 "p99_ms": result.p99_ms, "ok": result.ok, "sent": result.sent,
                                 "client_lag_p99_ms": result.client_lag_p99_ms,
                                 "server_cpu_us_per_request": cpu / result.ok * 1e6 if result.ok else None})
    return out


def measure_http(pythonpath: str, spec: dict[str, Any]) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": pythonpath}
    server = subprocess.Popen([sys.executable, __file__, "--serve", json.dumps({**spec, "port": port})], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        sys.path.insert(0, str(REPO / "bench"))
        import loadgen

        asyncio.run(loadgen.wait_until_ready(url, 60, alive=lambda: server.poll() is None))
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(http_client(url, spec, server.pid))
    finally:
        server.terminate()
        server.wait(30)


# --- the parent: trees, interleaving, the report ----------------------------------------------------


def extract_tree(rev: str, into: Path) -> Path:
    """`service/` of git revision `rev`, under `into`; returns the directory to put on PYTHONPATH."""
    archive = into / "service.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", rev, "service"], cwd=REPO, stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "service"


def run_child(pythonpath: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["run           req/s    p50 ms  p99 ms  engine p50  overhead p50  loop CPU µs/req  pass size"]
    for r in rows:
        fmt = lambda v, w=7, d=2: "-".rjust(w) if v is None else f"{v:{w}.{d}f}"  # noqa: E731
        lines.append(f"{r['kind']:6} {r['load']:>6g} {r['throughput_rps']:8.0f} {fmt(r['p50_ms'])} {fmt(r['p99_ms'])} "
                     f"{fmt(r.get('engine_ms_p50'), 10)} {fmt(r.get('overhead_ms_p50'), 12)} "
                     f"{fmt(r['loop_cpu_us_per_request'], 15, 1)} {fmt(r.get('pass_size_mean'), 9, 1)}")
    return "\n".join(lines)


def median_rows(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per run, the median of each numeric figure over rounds."""
    merged = []
    for runs in zip(*rounds, strict=True):
        row = dict(runs[0])
        for key, value in runs[0].items():
            if isinstance(value, float) and all(r.get(key) is not None for r in runs):
                row[key] = statistics.median(r[key] for r in runs)
        merged.append(row)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-ms", type=float, default=0.5, help="simulated pass, GIL released (default 0.5)")
    parser.add_argument("--engine-us-per-pair", type=float, default=2.0)
    parser.add_argument("--engine-gil-us", type=float, default=100.0, help="Python per pass, GIL held (default 100)")
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 1000, 4000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A B A B ...)")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV's service code, interleaved")
    parser.add_argument("--http", action="store_true", help="also measure over HTTP (uvicorn child process)")
    parser.add_argument("--http-rates", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--quick", action="store_true", help="short runs: checks the script, not a benchmark")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(json.loads(args.child))
    if args.serve:
        return serve_main(json.loads(args.serve))
    if args.quick:
        args.rates, args.concurrency, args.seconds, args.rounds, args.http_rates = [200], [64], 0.5, 1, [100]
    sys.path.insert(0, str(REPO / "bench"))
    from provenance import git_commit

    spec = {"engine_ms": args.engine_ms, "engine_us_per_pair": args.engine_us_per_pair,
            "engine_gil_us": args.engine_gil_us, "max_batch_size": args.max_batch_size,
            "max_wait_ms": args.max_wait_ms, "seconds": args.seconds,
            "runs": [("floor", args.rates[-1])] + [("open", r) for r in args.rates]
            + [("closed", c) for c in args.concurrency],
            "http_rates": args.http_rates, "rtt_rounds": 2 if args.quick else 5}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": str(REPO / "service")}
        if args.compare:
            trees[args.compare] = str(extract_tree(args.compare, Path(tmp)))
        rounds: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in trees}
        http: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        for k in range(args.rounds):
            for name, path in (trees.items() if k % 2 == 0 else reversed(trees.items())):
                result = run_child(path, spec)
                assert result["module"].startswith(path), (result["module"], path)
                rounds[name].append(result["rows"])
                print(f"round {k + 1}, {name}:\n{table(result['rows'])}", flush=True)
                if args.http:
                    http[name].append(measure_http(path, spec))
                    print(json.dumps(http[name][-1], indent=None), flush=True)
    report: dict[str, Any] = {
        "benchmark": "batcher_overhead", "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "quick": args.quick,
        "python": platform.python_version(), "settings": spec, "rounds": rounds, "http": http,
        "median": {name: median_rows(r) for name, r in rounds.items()},
    }
    try:
        report["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                             if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for name, rows in report["median"].items():
        print(f"\nmedian over {args.rounds} rounds, {name}:\n{table(rows)}")
    if args.compare:
        ratios = []
        for new, old in zip(report["median"]["this tree"], report["median"][args.compare], strict=True):
            ratios.append({"kind": new["kind"], "load": new["load"], **{
                f"{key}_new_over_old": new[key] / old[key] for key in
                ("p50_ms", "p99_ms", "throughput_rps", "loop_cpu_us_per_request", "overhead_ms_p50")
                if new.get(key) and old.get(key)}})
        report["ratios"] = ratios
        print("\nthis tree / " + args.compare + ":")
        for r in ratios:
            print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / f"batcher_overhead-{'quick-' if args.quick else ''}{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print("wrote", out)


if __name__ == "__main__":
    main()
