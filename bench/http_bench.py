"""HTTP throughput and latency of `structsim serve` under load, at several request rates.

Makes a synthetic StructBERT checkpoint (`structsim make-checkpoint`, not semantic: only its size
and shape matter here), starts `structsim serve` on it as a separate process, and drives it with
bench/loadgen.py from client processes: open-loop Poisson arrivals of single pairs at rising rates, then
closed-loop batch requests. For every run it records throughput, p50/p95/p99 and errors, and from
the server's /metrics the mean batch size and queue wait. Cold start (process start → ready), the
serving processes (`workers`), their memory after the load and the exit status after SIGTERM are
recorded too. Writes bench/results/http-<card>-<date>.json.

GPU:  python3 bench/http_bench.py                                   (base size, fp16, cuda)
CPU:  python3 bench/http_bench.py --device cpu --size tiny --quick  (checks the script, not a benchmark)
A/B:  PYTHONPATH=<other tree>/service python3 bench/http_bench.py --label other --rates 100 250 500 1000 \
      --concurrency 16 --duration 5      (the server and this script import that tree's similarity_service)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
try:
    import similarity_service  # noqa: F401 - installed (pip install -e .)?
except ImportError:  # a bare checkout (the GPU machine): run from the tree, in this process and the server's
    sys.path.insert(0, str(REPO / "service"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "service"), os.environ.get("PYTHONPATH")]))

import loadgen  # noqa: E402 - needs similarity_service importable
from provenance import git_commit  # noqa: E402

STRUCTSIM = [sys.executable, "-m", "similarity_service.cli"]
SLO_P99_MS = 50.0
RATES = (100, 250, 500, 1000, 1500, 2000, 3000, 4000, 6000)
QUICK_RATES = (20, 50)
BATCH_CONCURRENCY = (4, 16, 32)
BATCH_PAIRS = 32
# Open-loop client processes: one Python client falls behind its schedule near 2,000 single-pair
# requests/s (its lag then counts as the server's latency); four on a 16-core host, one on a small one.
CLIENT_PROCESSES = max(1, min(4, (os.cpu_count() or 1) // 4))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_checkpoint(size: str, where: Path) -> Path:
    model_dir = where / f"structbert-{size}"
    if not (model_dir / "config.json").exists():
        subprocess.run([*STRUCTSIM, "make-checkpoint", str(model_dir), "--size", size], check=True)
    return model_dir


class Server:
    """`structsim serve` in a child process, its log in a file."""

    def __init__(self, model_dir: Path, device: str, precision: str, extra: Sequence[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            *STRUCTSIM,
            "serve",
            "--model",
            str(model_dir),
            "--device",
            device,
            "--precision",
            precision,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *extra,
        ]
        self.started = time.perf_counter()
        with log.open("wb") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from process start to /readyz 200 (includes imports, load, compile, warm-up)."""
        try:
            asyncio.run(loadgen.wait_until_ready(self.url, timeout_s, alive=lambda: self.process.poll() is None))
        except TimeoutError:
            raise SystemExit(f"structsim serve did not become ready:\n{self.log.read_text()}") from None
        return time.perf_counter() - self.started

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process under it (its workers), from /proc (Linux)."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        tree, grew = {self.process.pid}, True
        while grew:
            grown = tree | {pid for pid, parent in parents.items() if parent in tree}
            grew, tree = grown != tree, grown
        total = 0
        for pid in tree:
            try:
                status = (Path("/proc") / str(pid) / "status").read_text()
            except OSError:
                continue
            total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        return total

    def stop(self) -> int:
        """SIGTERM (graceful drain); the exit status (0 expected)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def scrape(url: str) -> dict[str, float]:
    """The /metrics samples this bench reads (sums over labels)."""
    wanted = {
        "structsim_batch_size_pairs_sum",
        "structsim_batch_size_pairs_count",
        "structsim_queue_wait_seconds_sum",
        "structsim_queue_wait_seconds_count",
        "structsim_inference_duration_seconds_sum",
        "structsim_gpu_utilization_ratio",
        "structsim_gpu_memory_used_bytes",
    }
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def server_view(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float | None]:
    """What the server saw during one run: mean batch size, mean queue wait, share of time in forward passes."""
    batches = after.get("structsim_batch_size_pairs_count", 0) - before.get("structsim_batch_size_pairs_count", 0)
    waits = after.get("structsim_queue_wait_seconds_count", 0) - before.get("structsim_queue_wait_seconds_count", 0)
    delta = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    return {
        "batches": batches,
        "mean_batch_size": delta("structsim_batch_size_pairs_sum") / batches if batches else None,
        "mean_queue_wait_ms": 1000 * delta("structsim_queue_wait_seconds_sum") / waits if waits else None,
        "runner_busy_share": delta("structsim_inference_duration_seconds_sum") / seconds if seconds > 0 else None,
        "gpu_utilization_ratio_at_end": after.get("structsim_gpu_utilization_ratio"),
        "gpu_memory_used_bytes_at_end": after.get("structsim_gpu_memory_used_bytes"),
    }


def run_ladder(
    url: str, rates: Sequence[float], duration_s: float, pairs: list[tuple[str, str]], client_processes: int
) -> list[dict[str, object]]:
    """Open loop at each rate, lowest first; stops after the first rate that clearly overloads the server."""
    runs = []
    for rate in rates:
        before = scrape(url)
        if client_processes > 1:
            result = loadgen.open_loop_in_processes(url, rate, duration_s, pairs, processes=client_processes)
        else:
            result = asyncio.run(loadgen.run_open_loop(url, rate, duration_s, pairs))
        entry = {**result.to_dict(), "server": server_view(before, scrape(url), result.duration_s)}
        runs.append(entry)
        print(loadgen.format_table([result]).splitlines()[-1], flush=True)
        failed = result.sent - result.ok
        if failed > 0.05 * result.sent or (result.p99_ms or 0) > 20 * SLO_P99_MS:
            break  # overloaded: higher rates only measure the queue limit
    return runs


def run_batches(
    url: str, concurrencies: Sequence[int], duration_s: float, pairs: list[tuple[str, str]], client_processes: int
) -> list[dict[str, object]]:
    runs = []
    for concurrency in concurrencies:
        before = scrape(url)
        processes = min(client_processes, concurrency)
        if processes > 1:
            result = loadgen.closed_loop_in_processes(
                url, concurrency, duration_s, pairs, processes=processes, route="batch", pairs_per_request=BATCH_PAIRS
            )
        else:
            result = asyncio.run(
                loadgen.run_closed_loop(url, concurrency, duration_s, pairs, route="batch", pairs_per_request=BATCH_PAIRS)
            )
        runs.append({**result.to_dict(), "server": server_view(before, scrape(url), result.duration_s)})
        print(loadgen.format_table([result]).splitlines()[-1], flush=True)
    return runs


# The pause before each request of the paced series: a lone request at low load finds the server's threads,
# the host's cores and the GPU idle (bench/idle_gap_probe.py: ~2x the back-to-back time on an H100 host).
PACED_GAP_S = 0.010
SHORT_PAIR = ("今天天气怎么样", "今天天气如何")
SHORT_PAIR_BODY = json.dumps({"sentence1": SHORT_PAIR[0], "sentence2": SHORT_PAIR[1]}, ensure_ascii=False).encode()


def p50_p90(times_ms: list[float]) -> dict[str, float | int]:
    ordered = sorted(times_ms)
    return {"p50_ms": ordered[len(ordered) // 2], "p90_ms": ordered[int(len(ordered) * 0.9)], "requests": len(ordered)}


async def lone_requests(url: str, bodies: list[bytes], gap_s: float, requests: int) -> dict[str, float | int]:
    """POST `bodies` in turn to `url` (GET it when `bodies` is empty) one at a time on one connection, sleeping
    `gap_s` before each; p50/p90 of the `requests` after 50 that warm the connection. A non-200 answer ends the
    bench."""
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for turn in range(requests + 50):
            if gap_s:
                await asyncio.sleep(gap_s)
            start = time.perf_counter()
            request = (
                session.post(url, data=bodies[turn % len(bodies)], headers={"content-type": "application/json"})
                if bodies
                else session.get(url)
            )
            async with request as answer:
                await answer.read()
                if answer.status != 200:
                    raise SystemExit(f"status {answer.status} from {url}")
            if turn >= 50:
                times.append((time.perf_counter() - start) * 1000)
    return p50_p90(times)


async def round_trips(url: str, rounds: int) -> dict[str, float]:
    """Sequential requests from one aiohttp connection, /healthz and /v1/similarity interleaved: the HTTP
    round trip's floor (client, loopback and the server's framework) apart from scoring. Then one pair at a
    time with a pause of PACED_GAP_S before each request: a lone request at low load, as a user sees it; and
    /healthz paced the same way, the part of that which the idle host (waking processes, cold caches) adds to
    any request. The open-loop p50 at low load adds the client's own lateness (see `p50_from_send_ms` there)."""
    import aiohttp

    times: dict[str, list[float]] = {"healthz": [], "similarity": []}
    async with aiohttp.ClientSession() as session:
        for turn in range(rounds * 200 + 100):
            route = "healthz" if turn % 2 else "similarity"
            start = time.perf_counter()
            if route == "healthz":
                answer = await session.get(f"{url}/healthz")
            else:
                answer = await session.post(
                    f"{url}/v1/similarity", data=SHORT_PAIR_BODY, headers={"content-type": "application/json"}
                )
            await answer.read()
            if turn >= 100:  # the first ones warm the connection
                times[route].append((time.perf_counter() - start) * 1000)
    paced = await lone_requests(f"{url}/v1/similarity", [SHORT_PAIR_BODY], PACED_GAP_S, rounds * 60)
    paced_healthz = await lone_requests(f"{url}/healthz", [], PACED_GAP_S, rounds * 60)
    p50 = {route: float(sorted(values)[len(values) // 2]) for route, values in times.items()}
    return {"healthz_p50_ms": p50["healthz"], "similarity_p50_ms": p50["similarity"],
            "similarity_beyond_healthz_p50_ms": p50["similarity"] - p50["healthz"], "requests_each": len(times["healthz"]),
            "similarity_after_pause_p50_ms": paced["p50_ms"], "healthz_after_pause_p50_ms": paced_healthz["p50_ms"],
            "pause_ms": PACED_GAP_S * 1000,
            "paced_requests": paced["requests"]}


def summarize(open_loop: list[dict[str, object]]) -> dict[str, float | None]:
    """p50 at the lowest rate, and the highest rate served with p99 under the SLO and no errors."""
    good = [r for r in open_loop if r["ok"] == r["sent"] and r["p99_ms"] is not None and r["p99_ms"] <= SLO_P99_MS]  # type: ignore[operator]
    lowest = open_loop[0] if open_loop else None
    best = max(good, key=lambda r: r["throughput_rps"]) if good else None  # type: ignore[arg-type, return-value]
    return {
        "p50_ms_low_load": lowest["p50_ms"] if lowest else None,  # type: ignore[dict-item]
        "low_load_rate": lowest["target_rate"] if lowest else None,  # type: ignore[dict-item]
        "p50_from_send_ms_low_load": lowest["p50_from_send_ms"] if lowest else None,  # type: ignore[dict-item]
        "max_rate_p99_under_slo": best["target_rate"] if best else None,  # type: ignore[dict-item]
        "throughput_rps_at_that_rate": best["throughput_rps"] if best else None,  # type: ignore[dict-item]
        "p99_ms_at_that_rate": best["p99_ms"] if best else None,  # type: ignore[dict-item]
        "slo_p99_ms": SLO_P99_MS,
    }


def measure(
    model_dir: Path,
    *,
    device: str,
    precision: str,
    quick: bool,
    extra: Sequence[str] = (),
    duration_s: float | None = None,
    rates: Sequence[float] | None = None,
    concurrency: Sequence[int] | None = None,
    client_processes: int = CLIENT_PROCESSES,
) -> dict[str, object]:
    """Serve `model_dir`, run the load, stop; everything measured as a JSON-able dict (bench/perf.py calls this)."""
    duration = duration_s or (2.0 if quick else 10.0)
    pairs = loadgen.corpus_pairs()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(model_dir, device, precision, extra, Path(tmp) / "serve.log")
        try:
            cold_start_s = server.wait_ready(timeout_s=600)
            info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
            asyncio.run(loadgen.run_closed_loop(server.url, 8, 1.0 if quick else 3.0, pairs))  # warm the HTTP path
            sequential = asyncio.run(round_trips(server.url, 1 if quick else 5))
            ladder = rates or (QUICK_RATES if quick else RATES)
            open_loop = run_ladder(server.url, ladder, duration, pairs, client_processes)
            clients = concurrency or (BATCH_CONCURRENCY[:1] if quick else BATCH_CONCURRENCY)
            batches = run_batches(server.url, clients, duration, pairs, client_processes)
            rss_bytes = server.rss_bytes()
        finally:
            exit_status = server.stop()
            log_tail = server.log.read_text()[-2000:]
    return {
        "card": info["device_name"],
        "device": info["device"],
        "precision": info["precision"],
        "info": info,
        "serve_args": list(extra),
        "workers": info.get("workers", 1),
        "server_rss_bytes_after_load": rss_bytes,
        "client_processes": client_processes,
        "cold_start_s": cold_start_s,
        "summary": summarize(open_loop),
        "sequential_round_trips": sequential,
        "open_loop_single_pairs": open_loop,
        "closed_loop_batches": batches,
        "exit_status_after_sigterm": exit_status,
        "server_log_tail": log_tail,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default=None, help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--model-dir", type=Path, help="an existing checkpoint (default: make one)")
    parser.add_argument("--quick", action="store_true", help="two low rates, short runs: checks the script runs")
    parser.add_argument("--duration", type=float, help="seconds per run (default 10, quick 2)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `structsim serve` argument (repeat)")
    parser.add_argument("--rates", type=float, nargs="+", help=f"open-loop single-pair rates (default {RATES})")
    parser.add_argument("--concurrency", type=int, nargs="+", help=f"batch-request clients (default {BATCH_CONCURRENCY})")
    parser.add_argument(
        "--client-processes", type=int, default=CLIENT_PROCESSES,
        help=f"open-loop client processes (default here {CLIENT_PROCESSES}: a quarter of the cores, at most 4)",
    )
    parser.add_argument(
        "--label", default="", help="added to the result's name and record, e.g. which tree served (A/B runs)"
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    precision = args.precision or ("fp16" if args.device.startswith("cuda") else "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or make_checkpoint(args.size, Path(tmp))
        report = measure(
            model_dir,
            device=args.device,
            precision=precision,
            quick=args.quick,
            extra=args.serve_arg,
            duration_s=args.duration,
            rates=args.rates,
            concurrency=args.concurrency,
            client_processes=args.client_processes,
        )
    now = datetime.now(UTC)
    report = {
        "benchmark": "http",
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "model_size": args.size,
        "quick": args.quick,
        "label": args.label,
        **report,
    }
    card = re.sub(r"[^A-Za-z0-9]+", "-", str(report["card"])).strip("-")  # NVIDIA-H100-80GB-HBM3, as bench/ names it
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"http-{card}-{now:%Y-%m-%d}{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"workers {report['workers']}; cold start {report['cold_start_s']:.1f} s; exit status after SIGTERM {report['exit_status_after_sigterm']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
