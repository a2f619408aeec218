"""Calls past the largest CUDA graph: graph-sized replays against one op-by-op forward, A/B in one process.

A call of more than GRAPH_TOKEN_BUCKETS[-1] tokens (a 512-pair batch of the corpus is ~28k) used to run
op by op; packed_executor now replays graphs on graph-sized chunks of it. For the same pre-tokenized
calls this measures, alternating the two paths: the scores' largest difference; the wall time of one call
of 256/512/1,024 pairs, alone and with a thread that runs Python all the time beside it (as the serving
event loop does: op-by-op launches need the GIL ~200 times a forward, a replay twice); and the pairs/s of
`score_encoded` on the whole corpus (the offline path: calls of up to 65k tokens a forward op by op).
Not a benchmark of record: it decides which path big calls take.

GPU:  python3 bench/graph_chunks_probe.py --out-dir $OUT
CPU:  no (CUDA graphs)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "service")]

import torch  # noqa: E402
from provenance import git_commit  # noqa: E402
from similarity_service.checkpoint import make_checkpoint  # noqa: E402
from similarity_service.corpus import load_corpus  # noqa: E402
from similarity_service.runner import Engine  # noqa: E402


class BusyThread:
    """A thread that runs pure Python (holding the GIL but for the switch interval) while in `with`."""

    def __enter__(self) -> BusyThread:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()
        return self

    def _spin(self) -> None:
        total = 0
        while not self._stop.is_set():
            total += sum(range(200))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def median_ms(call: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args()
    sys.setswitchinterval(0.0005)  # serve's
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "structbert-base"
        make_checkpoint(model_dir, "base", seed=0)
        engine = Engine.load(model_dir, device="cuda", precision="fp16")
        engine.warmup()
    executor = engine._packed  # noqa: SLF001 - the probe drives both of its paths
    assert executor is not None
    pairs = [pair.pair for pair in load_corpus()]
    encoded = engine.encode(pairs)
    while len(encoded) < 8_000:
        encoded = encoded + encoded
    limits = {"max_tokens": engine.max_batch_tokens, "max_pairs": engine.max_batch_size}

    def run(items: list, graphs: bool) -> list[float]:  # noqa: ANN001 - EncodedPair list
        with engine._lock:  # noqa: SLF001
            return executor.run(items, use_graphs=graphs, **limits)

    chunked, eager = run(encoded[:2_000], True), run(encoded[:2_000], False)
    max_abs = max(abs(a - b) for a, b in zip(chunked, eager, strict=True))
    print(f"2,000 pairs: max |chunked - op by op| = {max_abs:.2e}", flush=True)

    calls: dict[str, dict[str, list[float]]] = {}
    for size in (256, 512, 1024):
        items = encoded[:size]
        tokens = sum(len(item.input_ids) for item in items)
        for busy in (False, True):
            key = f"{size} pairs ({tokens} tokens){' + busy thread' if busy else ''}"
            calls[key] = {"chunked_ms": [], "op_by_op_ms": []}
            for _ in range(args.rounds):
                for graphs, name in ((True, "chunked_ms"), (False, "op_by_op_ms")):
                    if busy:
                        with BusyThread():
                            calls[key][name].append(median_ms(lambda: run(items, graphs), args.reps))
                    else:
                        calls[key][name].append(median_ms(lambda: run(items, graphs), args.reps))
            print(key, {name: [round(v, 2) for v in values] for name, values in calls[key].items()}, flush=True)

    offline: dict[str, list[float]] = {"chunked_pairs_s": [], "op_by_op_pairs_s": []}
    for _ in range(args.rounds):
        for graphs, name in ((True, "chunked_pairs_s"), (False, "op_by_op_pairs_s")):
            engine.cuda_graphs = graphs
            start = time.perf_counter()
            engine.score_encoded(encoded)
            offline[name].append(len(encoded) / (time.perf_counter() - start))
    engine.cuda_graphs = True
    print(f"score_encoded, {len(encoded)} pairs:", {k: [round(v) for v in vs] for k, vs in offline.items()}, flush=True)

    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        card = torch.cuda.get_device_name()
        record = {
            "benchmark": "graph_chunks_probe", "card": card, "torch": torch.__version__, "commit": git_commit(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": "synthetic StructBERT-base (seed 0; not semantic), fp16, compiled",
            "max_abs_chunked_vs_op_by_op_2000_pairs": max_abs, "calls": calls,
            "score_encoded_pairs": len(encoded), "score_encoded": offline,
        }
        path = args.out_dir / f"graph_chunks_probe-{card.replace(' ', '-')}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        path.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
