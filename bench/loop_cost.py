"""The event loop's CPU per single-pair HTTP request in `structsim serve`, and the rate where HTTP saturates.

The server runs in a child process as `structsim serve` runs it: `create_app` under uvicorn (uvloop,
httptools, no access log), serve's GIL switch interval, settled heap and draining server. Its engine
tokenizes for real (the service's `PairTokenizer` on a CJK vocabulary written on the spot) and scores
at once without holding the GIL, so what is measured is the loop's own work per request: HTTP parsing,
Litestar's routing and handler call, strict decoding, tokenizing, the batcher, metrics and the answer.
`--engine-gil-us`/`--engine-device-us` make each pass GPU-shaped instead (Python with the GIL held, then a
wait without it), and `--switch-interval-ms` sets the server's GIL switch interval: how the runner and
the loop share the GIL as they do beside a GPU, on any CPU (`pairs_per_pass` says how well batches form).
`--model-dir DIR --device cuda` serves a real checkpoint with the real engine (tokenizer and all), for
the same figures with a GPU behind the loop.

The loop thread reads its own CPU time (`time.thread_time`) when the parent asks over a pipe (a reader
on the loop), at the start and end of each run; its difference over the requests answered is the
figure reported (`loop_cpu_us_per_request`), beside the whole server process's CPU per request and the
tokenizer's (`encode_cpu_us_per_request`, in the thread that called it, without the Rust pool's threads
that a call of many pairs uses), which varies between CPUs more than the rest (their caches: hot in a tight
loop, it costs half). `pairs_per_encode_call` and `gil_free_encode_share` (the share of pairs tokenized in
calls large enough to release the GIL) tell whether tokenizing still competes with the loop for the GIL.

Load, from this process (the other core on a 2-core machine):
- closed loop (`--connections`): that many keep-alive connections, each sending single-pair
  POST /v1/similarity as soon as its last answer is in, from a minimal HTTP/1.1 client on uvloop that
  costs far less per request than the server, so the server's loop saturates first (the req/s here is
  the saturation rate on this CPU);
- open loop (`--rates`): bench/loadgen.py (aiohttp, Poisson arrivals) at rates below saturation, where
  the loop wakes for nearly every request and so pays more per request.

`--compare REV` measures the service code of git revision REV too (its `service/` extracted to a
temporary directory, first on the server's PYTHONPATH), rounds interleaved A B B A, and reports medians,
min-max spread and ratios. `--profile` adds a closed-loop run with cProfile on the loop thread of each
tree and records the top functions by own time, per request (cProfile inflates small Python calls: read
it for where time goes, the CPU figures above for how much). Writes bench/results/loop_cost-<cpu>-<date>.json.

    .venv/bin/python bench/loop_cost.py --out-dir bench/results --compare HEAD~1 --rounds 4 --profile
    .venv/bin/python bench/loop_cost.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import platform
import pstats
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# A vocabulary for the real tokenizer: BERT's specials, ASCII and the CJK block (one token per character).
CJK = range(0x4E00, 0x9FA6)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PROFILE_TOP = 60


# --- the server child ---------------------------------------------------------------------------------


class InstantEngine:
    """A ScoringEngine that tokenizes with the service's real tokenizer and scores at once (GIL not held).

    With `gil_us`/`device_us` a pass is GPU-shaped instead: `gil_us` of Python with the GIL held (packing,
    the replay call, reading the scores), then `device_us` of waiting with it released (the replay and the
    synchronize), whatever the batch's size, as a CUDA graph's pass of a few short pairs.
    """

    def __init__(self, vocab_dir: str, max_seq_len: int, gil_us: float = 0.0, device_us: float = 0.0,
                 real: Any = None) -> None:
        from similarity_service.engine_api import EngineInfo
        from similarity_service import tokenization
        from similarity_service.tokenization import PairTokenizer

        self._real = real  # a loaded Engine: it tokenizes and scores instead (`--model-dir`)
        self._tokenizer = real if real is not None else PairTokenizer(vocab_dir, max_seq_len=max_seq_len)
        self.encode_cpu_s = 0.0  # CPU time spent tokenizing, in whichever thread called `encode`
        self.encode_calls = 0
        self.encoded_pairs = 0
        self.passes = 0  # forward passes (`score_encoded` calls)
        self.scored_pairs = 0
        self.pairs_in_gil_free_calls = 0
        # calls this large release the GIL (a module constant in trees before 2a1b3b7)
        pair_tokenizer = real._tokenizer if real is not None else self._tokenizer  # noqa: SLF001
        self._gil_free_min_pairs = getattr(pair_tokenizer, "parallel_min_pairs", None) or tokenization.PARALLEL_ENCODE_MIN_PAIRS
        self._gil_s, self._device_s = gil_us / 1e6, device_us / 1e6
        self.info = EngineInfo(
            model_id="instant", revision=None, model_dir=vocab_dir, fingerprint="instant", precision="fp32",
            device="cpu", device_name="instant", compute_capability=None, max_seq_len=max_seq_len,
        ) if real is None else real.info

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[Any]:
        started = time.thread_time()
        encoded = self._tokenizer.encode(pairs)
        self.encode_cpu_s += time.thread_time() - started
        self.encode_calls += 1
        self.encoded_pairs += len(pairs)
        if len(pairs) >= self._gil_free_min_pairs:
            self.pairs_in_gil_free_calls += len(pairs)
        return encoded

    def score_encoded(self, batch: Sequence[Any]) -> list[float]:
        self.passes += 1
        self.scored_pairs += len(batch)
        if self._real is not None:
            return self._real.score_encoded(batch)  # type: ignore[no-any-return]
        if self._gil_s:
            held_until = time.perf_counter() + self._gil_s
            while time.perf_counter() < held_until:  # Python all along: the GIL stays with this thread
                pass
        if self._device_s:
            time.sleep(self._device_s)
        return [0.5] * len(batch)

    def warmup(self) -> None:
        """Nothing to warm."""


class Control:
    """Answers the parent's commands on the loop thread: its CPU clock, and cProfile on that thread."""

    def __init__(self, engine: InstantEngine) -> None:
        self._engine = engine
        self._profile: cProfile.Profile | None = None

    def on_readable(self) -> None:
        line = sys.stdin.readline()
        if not line:
            return
        command = line.split()
        answer: dict[str, Any] = {}
        if command[0] == "mark":
            answer = {"thread_s": time.thread_time(), "process_s": time.process_time(),
                      "encode_s": self._engine.encode_cpu_s, "encode_calls": self._engine.encode_calls,
                      "encoded_pairs": self._engine.encoded_pairs,
                      "passes": self._engine.passes, "scored_pairs": self._engine.scored_pairs,
                      "pairs_in_gil_free_calls": self._engine.pairs_in_gil_free_calls, "module": sys.modules["similarity_service"].__file__,
                      "gc_collections": [s["collections"] for s in gc.get_stats()]}
        elif command[0] == "profile-on":
            self._profile = cProfile.Profile()
            self._profile.enable()
        elif command[0] == "profile-off":
            assert self._profile is not None
            self._profile.disable()
            answer = top_functions(self._profile, int(command[1]))
            self._profile = None
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def top_functions(profile: cProfile.Profile, requests: int) -> dict[str, Any]:
    """cProfile's functions by own time per request, and own time summed per package."""
    stats = pstats.Stats(profile)
    rows = []
    packages: dict[str, float] = {}
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = path if path.startswith("~") else f"{_short(path)}:{line}"
        package = "builtins (C)" if path.startswith("~") else _short(path).split("/", 1)[0].removesuffix(".py")
        packages[package] = packages.get(package, 0.0) + own / requests * 1e6
        rows.append({"function": f"{name} ({where})", "calls_per_request": calls / requests,
                     "own_us_per_request": own / requests * 1e6, "cumulative_us_per_request": cumulative / requests * 1e6})
    rows.sort(key=lambda row: -row["own_us_per_request"])
    return {"own_us_per_request": sum(packages.values()),
            "by_package": dict(sorted(packages.items(), key=lambda item: -item[1])), "functions": rows[:PROFILE_TOP]}


def _short(path: str) -> str:
    """A source path from its package down (`litestar/routes/http.py`)."""
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in path:
            return path.split(marker, 1)[1]
    if "similarity_service/" in path:
        return "similarity_service/" + path.split("similarity_service/", 1)[1]
    return path


def serve_main(spec: dict[str, Any]) -> None:
    import uvicorn

    from similarity_service.app import create_app
    from similarity_service.commands.serve import GIL_SWITCH_INTERVAL_S, SHUTDOWN_GRACE_S, settle_heap
    from similarity_service.server import DrainingServer
    from similarity_service.settings import load_settings

    sys.setswitchinterval(spec["switch_interval_ms"] / 1000 if spec["switch_interval_ms"] else GIL_SWITCH_INTERVAL_S)
    settings = load_settings({"model": "instant", "host": "127.0.0.1", "port": spec["port"], "log_level": "warning",
                              "max_batch_size": spec["max_batch_size"], "max_wait_ms": 0.0}, {})
    real = None
    if spec["model_dir"]:
        from similarity_service.lifespan import load_engine

        real = load_engine(load_settings({"model": spec["model_dir"], "device": spec["device"]}, {}))  # serve's defaults
    engine = InstantEngine(spec["vocab_dir"], spec["max_seq_len"], spec["engine_gil_us"], spec["engine_device_us"], real)
    app = create_app(settings, engine_factory=lambda _: engine, on_ready=settle_heap)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.log_level == "debug", lifespan="on",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)  # as commands/serve.py builds it
    server = DrainingServer(config, app.state.service)
    control = Control(engine)

    async def main() -> None:
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), control.on_readable)
        await server.serve()

    loop_factory = config.get_loop_factory()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


# --- the closed-loop client -------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection sending request after request; answers are read by Content-Length."""

    def __init__(self, requests: list[bytes], offset: int, end: float, latencies: list[float],
                 errors: list[int], closed: asyncio.Future[None]) -> None:
        self._requests, self._turn, self._end = requests, offset, end
        self._latencies, self._errors, self._closed = latencies, errors, closed
        self._buffer = b""
        self._sent = 0.0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        self._sent = time.perf_counter()
        self._transport.write(self._requests[self._turn % len(self._requests)])
        self._turn += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self._buffer[:head_end].lower()
        length = next(int(line[15:]) for line in head.split(b"\r\n") if line.startswith(b"content-length:"))
        if len(self._buffer) < head_end + 4 + length:
            return
        now = time.perf_counter()
        if head.startswith(b"http/1.1 200"):
            self._latencies.append(now - self._sent)
        else:
            self._errors.append(int(head[9:12]))
        self._buffer = self._buffer[head_end + 4 + length:]
        if now < self._end:
            self._send()
        else:
            assert self._transport is not None
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


def request_bytes(pairs: Sequence[tuple[str, str]], port: int, seed: int = 0) -> list[bytes]:
    """Single-pair POST /v1/similarity requests, with the headers aiohttp sends."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    requests = []
    for a, b in order:
        body = json.dumps({"sentence1": a, "sentence2": b}, ensure_ascii=False).encode()
        head = (f"POST /v1/similarity HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\n"
                f"Accept-Encoding: gzip, deflate\r\nUser-Agent: loop_cost\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        requests.append(head.encode() + body)
    return requests


async def closed_loop(port: int, requests: list[bytes], connections: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    closed = [loop.create_future() for _ in range(connections)]
    for k in range(connections):
        await loop.create_connection(
            lambda k=k: _Connection(requests, k * 97, start + seconds, latencies, errors, closed[k]), "127.0.0.1", port)
    await asyncio.gather(*closed)
    elapsed = time.perf_counter() - start
    return {"answered": len(latencies), "errors": len(errors), "elapsed_s": elapsed,
            "throughput_rps": len(latencies) / elapsed, "p50_ms": pct(latencies, 50) * 1e3,
            "p99_ms": pct(latencies, 99) * 1e3}


async def open_loop(url: str, rate: float, seconds: float, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    import loadgen

    result = await loadgen.run_open_loop(url, rate, seconds, pairs)
    return {"answered": result.ok, "errors": sum(result.errors.values()), "elapsed_s": result.duration_s,
            "throughput_rps": result.throughput_rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms,
            "client_lag_p99_ms": result.client_lag_p99_ms}


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


# --- the parent -------------------------------------------------------------------------------------


class Server:
    """The server child process and its control pipe."""

    def __init__(self, pythonpath: str, spec: dict[str, Any]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.pythonpath = pythonpath
        # the tree first; then what this process was given (where the wheels are, on the GPU machine)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", json.dumps({**spec, "port": self.port})],
            env=env, preexec_fn=(lambda: os.sched_setaffinity(0, spec["server_cpus"])) if spec.get("server_cpus") else None, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def ask(self, *command: object) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(" ".join(map(str, command)) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


async def measure(server: Server, kind: str, load: float, seconds: float, pairs: list[tuple[str, str]],
                  requests: list[bytes], profile: bool = False) -> dict[str, Any]:
    if profile:
        server.ask("profile-on")
    before = server.ask("mark")
    assert before["module"].startswith(server.pythonpath), (before["module"], server.pythonpath)  # the tree asked for
    if kind == "closed":
        row = await closed_loop(server.port, requests, int(load), seconds)
    else:
        row = await open_loop(server.url, load, seconds, pairs)
    after = server.ask("mark")
    answered = row["answered"] or 1

    def delta(key: str) -> float:
        return after[key] - before[key]  # type: ignore[no-any-return]

    row = {"kind": kind, "load": load, **row,
           "loop_cpu_us_per_request": delta("thread_s") / answered * 1e6,
           "process_cpu_us_per_request": delta("process_s") / answered * 1e6,
           "encode_cpu_us_per_request": delta("encode_s") / answered * 1e6,
           "pairs_per_encode_call": delta("encoded_pairs") / max(1, delta("encode_calls")),
           "pairs_per_pass": delta("scored_pairs") / max(1, delta("passes")),
           "gil_free_encode_share": delta("pairs_in_gil_free_calls") / max(1, delta("encoded_pairs")),
           "loop_busy_share": delta("thread_s") / row["elapsed_s"],
           "gc_collections": [a - b for a, b in zip(after["gc_collections"], before["gc_collections"], strict=True)]}
    if profile:
        row["profile"] = server.ask("profile-off", answered)
    return row


def run_tree(pythonpath: str, spec: dict[str, Any], runs: list[tuple[str, float]], seconds: float,
             profile: bool = False) -> list[dict[str, Any]]:
    """One fresh server of the tree at `pythonpath`, warmed, then each run measured (and profiled if asked)."""
    import loadgen
    import uvloop

    server = Server(pythonpath, spec)
    try:
        pairs = loadgen.corpus_pairs()
        requests = request_bytes(pairs, server.port)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            ready_s = 600 if spec["model_dir"] else 60  # a real engine compiles and captures its graphs first
            runner.run(loadgen.wait_until_ready(server.url, ready_s, alive=lambda: server.process.poll() is None))
            runner.run(closed_loop(server.port, requests, 16, 1.0))  # warm: first calls, caches, branches
            rows = [runner.run(measure(server, kind, load, seconds, pairs, requests)) for kind, load in runs]
            if profile:
                rows.append(runner.run(measure(server, *runs[0], seconds, pairs, requests, profile=True)))
        return rows
    finally:
        server.stop()


def write_vocab(into: Path) -> str:
    words = SPECIALS + [chr(c) for c in range(33, 127)] + [chr(c) for c in CJK]
    (into / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return str(into)


def summary(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per run: the median and min-max of each figure over rounds."""
    out = []
    for runs in zip(*rounds, strict=True):
        row: dict[str, Any] = {"kind": runs[0]["kind"], "load": runs[0]["load"], "rounds": len(runs)}
        for key in ("loop_cpu_us_per_request", "encode_cpu_us_per_request", "process_cpu_us_per_request",
                    "pairs_per_encode_call", "gil_free_encode_share", "throughput_rps", "p50_ms", "p99_ms",
                    "loop_busy_share"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
                row[key + "_range"] = [min(values), max(values)]
        out.append(row)
    return out


def paired_ratios(new: list[list[dict[str, Any]]], old: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per run: new/old of each round's figures (the two trees ran next to each other, so drift of this
    machine's speed cancels), their median and min-max."""
    out = []
    for new_runs, old_runs in zip(zip(*new, strict=True), zip(*old, strict=True), strict=True):
        row: dict[str, Any] = {"kind": new_runs[0]["kind"], "load": new_runs[0]["load"]}
        for key in ("loop_cpu_us_per_request", "process_cpu_us_per_request", "throughput_rps", "p99_ms"):
            ratios = [a[key] / b[key] for a, b in zip(new_runs, old_runs, strict=True)]
            row[f"{key}_new_over_old"] = {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)],
                                          "rounds": ratios}
        out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["run           req/s   p50 ms   p99 ms   loop CPU µs/req   tokenizing   process CPU µs/req   loop busy"
             "   pairs/tokenizer call   pairs/pass"]
    for r in rows:
        lines.append(f"{r['kind']:6} {r['load']:>6g} {r['throughput_rps']:7.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
                     f"{r['loop_cpu_us_per_request']:17.1f} {r['encode_cpu_us_per_request']:12.1f} "
                     f"{r['process_cpu_us_per_request']:20.1f} "
                     f"{r['loop_busy_share']:11.2f} {r['pairs_per_encode_call']:22.1f} {r.get('pairs_per_pass', 0):12.1f}")
    return "\n".join(lines)


def profile_table(profile: dict[str, Any]) -> str:
    packages = ", ".join(f"{name} {us:.0f}" for name, us in list(profile["by_package"].items())[:10])
    lines = [f"cProfile, loop thread: {profile['own_us_per_request']:.0f} µs/request in all; by package: {packages}",
             "  own µs/req   cum µs/req   calls/req  function"]
    for r in profile["functions"]:
        lines.append(f"  {r['own_us_per_request']:10.2f}   {r['cumulative_us_per_request']:10.2f}   "
                     f"{r['calls_per_request']:9.2f}  {r['function']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="*", default=[16], help="closed-loop runs (default 16)")
    parser.add_argument("--rates", type=float, nargs="*", default=[500], help="open-loop runs, requests/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers per tree, interleaved A B B A")
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--engine-gil-us", type=float, default=0.0,
                        help="a GPU-shaped pass: this long with the GIL held (default 0: instant)")
    parser.add_argument("--engine-device-us", type=float, default=0.0,
                        help="a GPU-shaped pass: then this long waiting with the GIL released")
    parser.add_argument("--switch-interval-ms", type=float, help="the server's GIL switch interval (default serve's)")
    parser.add_argument("--model-dir", help="serve this checkpoint with the real engine instead (tokenizer included)")
    parser.add_argument("--device", default="cpu", help="the real engine's device (with --model-dir)")
    parser.add_argument("--compare", metavar="REV", help="also measure git revision REV's service code (or a service directory's)")
    parser.add_argument("--profile", action="store_true", help="cProfile the loop thread in one more first run per tree")
    parser.add_argument("--pin", action="store_true", help="server on the last CPU, the client on the others")
    parser.add_argument("--quick", action="store_true", help="short runs: checks the script, not a benchmark")
    parser.add_argument("--label", help="added to the output file's name")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_main(json.loads(args.serve))
    if args.quick:
        args.seconds, args.rounds, args.rates = 1.0, 1, [200]
    from batcher_overhead import extract_tree
    from provenance import git_commit

    runs = [("closed", float(c)) for c in args.connections] + [("open", r) for r in args.rates]
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"vocab_dir": write_vocab(Path(tmp)), "max_batch_size": args.max_batch_size,
                "max_seq_len": args.max_seq_len, "server_cpus": None, "engine_gil_us": args.engine_gil_us,
                "engine_device_us": args.engine_device_us, "switch_interval_ms": args.switch_interval_ms,
                "model_dir": args.model_dir, "device": args.device}
        if args.pin:  # the server on the last CPU, this process (the client) on the others
            cpus = sorted(os.sched_getaffinity(0))
            spec["server_cpus"] = cpus[-1:]
            os.sched_setaffinity(0, cpus[:-1])
        trees = {"this tree": str(REPO / "service")}
        if args.compare:  # a revision, or a service directory as is (a variant not committed)
            compare_dir = Path(args.compare)
            trees[args.compare] = str(compare_dir.resolve() if compare_dir.is_dir() else extract_tree(args.compare, Path(tmp)))
        rounds: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in trees}
        for k in range(args.rounds):
            order = list(trees.items())
            for name, path in order if k % 2 == 0 else reversed(order):
                rows = run_tree(path, spec, runs, args.seconds)
                rounds[name].append(rows)
                print(f"round {k + 1}, {name}:\n{table(rows)}", flush=True)
        profiles = {}
        if args.profile:
            for name, path in trees.items():
                row = run_tree(path, spec, runs[:1], args.seconds, profile=True)[-1]
                profiles[name] = row
                print(f"\nprofile, {name} ({row['throughput_rps']:.0f} req/s under cProfile):\n"
                      f"{profile_table(row['profile'])}", flush=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "service", "bench/loop_cost.py"], cwd=REPO,
                           capture_output=True, text=True, check=False).stdout.strip()
    report: dict[str, Any] = {
        "benchmark": "loop_cost", "commit": git_commit(), "uncommitted_changes": bool(dirty),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "quick": args.quick,
        "settings": {**{k: v for k, v in spec.items() if k != "vocab_dir"}, "seconds": args.seconds, "runs": runs},
        "summary": {name: summary(r) for name, r in rounds.items()}, "rounds": rounds, "profiles": profiles,
    }
    for name, rows in report["summary"].items():
        print(f"\nmedian of {args.rounds} rounds, {name} (loop CPU µs/req min-max):")
        for r in rows:
            lo, hi = r["loop_cpu_us_per_request_range"]
            print(f"  {r['kind']:6} {r['load']:>6g}: {r['throughput_rps']:7.0f} req/s  loop {r['loop_cpu_us_per_request']:6.1f}"
                  f" µs/req ({lo:.1f}-{hi:.1f}), tokenizing {r['encode_cpu_us_per_request']:5.1f} "
                  f"({r['pairs_per_encode_call']:.1f} pairs a call), process {r['process_cpu_us_per_request']:6.1f}, "
                  f"p99 {r['p99_ms']:.2f} ms")
    if args.compare:
        report["ratios"] = paired_ratios(rounds["this tree"], rounds[args.compare])
        print(f"\nthis tree / {args.compare}, paired by round (median, min-max):")
        for r in report["ratios"]:
            print(f"  {r['kind']:6} {r['load']:>6g}: " + ", ".join(
                f"{key.removesuffix('_new_over_old')} x{value['median']:.3f} ({value['range'][0]:.3f}-{value['range'][1]:.3f})"
                for key, value in r.items() if key.endswith("_new_over_old")))
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        label = f"-{args.label}" if args.label else ""
        out = args.out_dir / f"loop_cost-cpu{'-quick' if args.quick else ''}{label}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print("wrote", out)


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
