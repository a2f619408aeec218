"""Does settling the heap after warm-up (serve.settle_heap: gc.freeze + a higher gen-0 threshold) lower p99?

Starts `structsim serve` once per variant, side by side on the same synthetic checkpoint, and drives
each in turn with bench/loadgen.py at one steady open-loop rate, round after round in rotating order,
so the machine's load drifts over all variants alike; medians over rounds are compared. Each server
also times every garbage collection it runs (gc.callbacks, by generation) and reports them at exit.

Variants (the launcher patches the serve command before it runs):
  off       Python's collector as is (no freeze, threshold 700)
  freeze    gc.collect + gc.freeze after warm-up, threshold 700
  settled   what `structsim serve` does: freeze and gen-0 threshold serve.GC_GEN0_THRESHOLD

CPU:  python3 bench/serve_gc.py --rate 150 --duration 10 --rounds 5
GPU:  python3 bench/serve_gc.py --device cuda --size base --precision fp16 --rate 1000
Quick check of the script: python3 bench/serve_gc.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
try:
    import similarity_service  # noqa: F401 - installed (pip install -e .)?
except ImportError:  # a bare checkout: run from the tree, in this process and the servers'
    sys.path.insert(0, str(REPO / "service"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "service"), os.environ.get("PYTHONPATH")]))

import loadgen  # noqa: E402 - needs similarity_service importable
from http_bench import STRUCTSIM, free_port  # noqa: E402
from provenance import git_commit  # noqa: E402

VARIANTS = ("off", "freeze", "settled")

# Runs `structsim serve` with the variant's heap handling, timing every collection; writes them as
# JSON to $STRUCTSIM_GC_LOG at exit. Collections before readiness (the load) are not counted.
LAUNCHER = """
import atexit, gc, json, os, sys, time
from similarity_service.cli import main
from similarity_service.commands import serve

variant = os.environ["STRUCTSIM_GC_VARIANT"]
pauses = {0: [], 1: [], 2: []}
state = {"ready": False, "t": 0.0}

def timed(phase, info):
    if phase == "start":
        state["t"] = time.perf_counter()
    elif state["ready"]:
        pauses[info["generation"]].append(time.perf_counter() - state["t"])

settle = serve.settle_heap
def on_ready():
    if variant == "freeze":
        serve.GC_GEN0_THRESHOLD = gc.get_threshold()[0]
    if variant != "off":
        settle()
    state["ready"] = True

serve.settle_heap = on_ready
gc.callbacks.append(timed)
atexit.register(lambda: open(os.environ["STRUCTSIM_GC_LOG"], "w").write(json.dumps(
    {"objects_tracked": len(gc.get_objects()), "frozen": gc.get_freeze_count(),
     "threshold": gc.get_threshold(), "pauses_s": pauses})))
sys.exit(main(sys.argv[1:]))
"""


def make_checkpoint(size: str, where: Path) -> Path:
    """A synthetic checkpoint; make-checkpoint's message goes to stderr, so stdout is the JSON alone."""
    model_dir = where / f"structbert-{size}"
    subprocess.run([*STRUCTSIM, "make-checkpoint", str(model_dir), "--size", size], check=True, stdout=sys.stderr)
    return model_dir


class Server:
    """One variant's `structsim serve` child process."""

    def __init__(self, variant: str, model_dir: Path, args: argparse.Namespace, workdir: Path) -> None:
        self.variant = variant
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"serve-{variant}.log"
        self.gc_log = workdir / f"gc-{variant}.json"
        env = {**os.environ, "STRUCTSIM_GC_VARIANT": variant, "STRUCTSIM_GC_LOG": str(self.gc_log)}
        command = [sys.executable, "-c", LAUNCHER, "serve", "--model", str(model_dir), "--device", args.device]
        command += ["--precision", args.precision, "--port", str(self.port), "--log-level", "warning"]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.variant} server exited:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.variant} server not ready after {timeout_s} s")

    def stop(self) -> dict[str, object]:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        return json.loads(self.gc_log.read_text()) if self.gc_log.exists() else {}


def summarize_pauses(report: dict[str, object]) -> dict[str, object]:
    pauses = report.get("pauses_s", {})
    assert isinstance(pauses, dict)
    by_generation = {}
    for generation, values in sorted(pauses.items()):
        by_generation[f"gen{generation}"] = {
            "count": len(values),
            "max_ms": round(max(values) * 1000, 2) if values else None,
            "total_ms": round(sum(values) * 1000, 1),
        }
    return {
        "objects_tracked_at_exit": report.get("objects_tracked"),
        "frozen": report.get("frozen"),
        "threshold": report.get("threshold"),
        "collections": by_generation,
    }


async def measure(servers: list[Server], args: argparse.Namespace) -> dict[str, list[dict[str, object]]]:
    pairs = loadgen.corpus_pairs()
    for server in servers:  # unmeasured lead-in: first requests, lazy imports, allocator warm-up
        await loadgen.run_open_loop(server.url, rate=args.rate, duration_s=args.warmup, pairs=pairs)
    runs: dict[str, list[dict[str, object]]] = {server.variant: [] for server in servers}
    for round_index in range(args.rounds):
        order = servers[round_index % len(servers) :] + servers[: round_index % len(servers)]
        for server in order:
            result = await loadgen.run_open_loop(
                server.url, rate=args.rate, duration_s=args.duration, pairs=pairs, seed=round_index
            )
            row = {"round": round_index, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "ok": result.ok}
            row.update({"sent": result.sent, "errors": result.errors, "client_lag_p99_ms": result.client_lag_p99_ms})
            runs[server.variant].append(row)
            print(f"round {round_index} {server.variant:8s} p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
                  f"  client lag p99 {result.client_lag_p99_ms:6.2f} ms  errors {result.errors}", file=sys.stderr)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="tiny", help="synthetic checkpoint size (make-checkpoint --size)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rate", type=float, default=150.0, help="open-loop requests/s (single pairs)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unmeasured load per server first")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="check the script: 2 rounds of 1 s")
    parser.add_argument("--out-dir", type=Path, help="write the JSON result here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup, args.rate = 2, 1.0, 0.5, 50.0

    with tempfile.TemporaryDirectory(prefix="structsim-gc-") as tmp:
        workdir = Path(tmp)
        model_dir = make_checkpoint(args.size, workdir)
        servers = [Server(variant, model_dir, args, workdir) for variant in args.variants]
        try:
            for server in servers:
                server.wait_ready()
            runs = asyncio.run(measure(servers, args))
        finally:
            reports = {server.variant: server.stop() for server in servers}

    result: dict[str, object] = {
        "bench": "serve_gc",
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "conditions": {
            "device": args.device,
            "size": args.size,
            "precision": args.precision,
            "rate": args.rate,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "python": sys.version.split()[0],
        },
        "variants": {},
    }
    for variant, rows in runs.items():
        p99s = [float(row["p99_ms"]) for row in rows if row["p99_ms"] is not None]  # type: ignore[arg-type]
        p50s = [float(row["p50_ms"]) for row in rows if row["p50_ms"] is not None]  # type: ignore[arg-type]
        result["variants"][variant] = {  # type: ignore[index]
            "median_p99_ms": statistics.median(p99s) if p99s else None,
            "median_p50_ms": statistics.median(p50s) if p50s else None,
            "runs": rows,
            "gc": summarize_pauses(reports.get(variant, {})),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        (args.out_dir / f"serve_gc-{args.device}-{args.size}-{stamp}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
