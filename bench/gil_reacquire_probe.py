"""What does each GIL release cost a runner thread while the event loop's thread is busy? (CPU only.)

The serving runner thread calls a few torch functions per forward pass that release the GIL (copy in,
graph replay, copy out, synchronize); each time it wants the GIL back while the loop's thread runs
Python, it waits until that thread yields it, which CPython forces only after the switch interval.
This probe runs a busy "loop" thread (pure Python for a given share of the time) and a "runner" thread
whose passes hold the GIL briefly and otherwise wait with the GIL released, split into N waits, and
reports how much longer a pass takes than its waits (with no loop thread: the sleeps' own overshoot):
the price of N re-acquisitions at each switch interval. A map for the serving path (issue 7), not a benchmark of the service.

    python3 bench/gil_reacquire_probe.py [--out-dir bench/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from provenance import git_commit


def busy_loop(share: float, stop: threading.Event) -> None:
    """Python work for `share` of each millisecond, sleeping (GIL released) for the rest."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < share * 1e-3:
            pass
        if share < 1.0:
            time.sleep((1.0 - share) * 1e-3)


def passes(releases: int, wait_s: float, python_s: float, count: int) -> list[float]:
    """Wall time of `count` passes, each: `releases` waits of wait_s / releases with the GIL released,
    and python_s of Python between them."""
    walls = []
    for _ in range(count):
        start = time.perf_counter()
        for _ in range(releases):
            spin = time.perf_counter()
            while time.perf_counter() - spin < python_s / releases:
                pass
            time.sleep(wait_s / releases)
        walls.append(time.perf_counter() - start)
    return walls


def measure(switch_s: float, share: float, releases: int, wait_s: float, python_s: float, count: int) -> float:
    sys.setswitchinterval(switch_s)
    stop = threading.Event()
    loop = threading.Thread(target=busy_loop, args=(share, stop), daemon=True)
    if share > 0:  # 0: no loop thread, the sleeps' own overshoot
        loop.start()
    try:
        walls = passes(releases, wait_s, python_s, count)
    finally:
        stop.set()
        if share > 0:
            loop.join()
    alone = wait_s + python_s
    return (statistics.median(walls) - alone) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-ms", type=float, default=2.0, help="GIL-released time per pass (a device pass)")
    parser.add_argument("--python-us", type=float, default=200.0, help="GIL-held time per pass")
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    original = sys.getswitchinterval()
    rows = []
    try:
        for share in (0.0, 0.5, 1.0):
            for switch_ms in (5.0, 0.5, 0.1):
                for releases in (1, 2, 4):
                    extra = measure(switch_ms / 1e3, share, releases, args.wait_ms / 1e3, args.python_us / 1e6, args.passes)
                    rows.append({"loop_busy_share": share, "switch_interval_ms": switch_ms, "releases": releases,
                                 "extra_ms_per_pass_p50": extra})
                    print(f"loop busy {share:.0%}, switch {switch_ms:4.1f} ms, {releases} releases: "
                          f"+{extra:.3f} ms a pass", flush=True)
    finally:
        sys.setswitchinterval(original)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"benchmark": "gil_reacquire_probe", "commit": git_commit(),
                  "date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": platform.processor() or platform.machine(),
                  "python": platform.python_version(), "wait_ms": args.wait_ms, "python_us": args.python_us, "rows": rows}
        (args.out_dir / f"gil_reacquire_probe-cpu-{datetime.now(UTC):%Y%m%d-%H%M%S}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
