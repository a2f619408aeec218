"""How much of tokenizing does `Engine.score` hide behind the device? Its variants A/B, interleaved.

`Engine.score` tokenizes a long list chunk by chunk in a helper thread while the device scores the
chunks before it, and launches each chunk before it reads the one before back; only the first chunk's
tokenizing is not overlapped. This times `score` on the corpus x8 (the whole length mix, ~10k pairs per
call) as it is, with chunks tokenized into `EncodedPair` lists (as before the packed-pairs path), and
with each chunk read back before the next is launched (as before 32469d4), rounds interleaved, against
`score_encoded` on the same pairs pre-tokenized (the bound: tokenizing fully hidden). Three more variants
ask whether the tokenizer thread slows the launching thread through the GIL (on an H100 the device idled
106 of 336 ms of a `score` call: bench/profile_engine.py's device timeline): `score`'s loop on chunks
tokenized beforehand (no tokenizer beside it), with the chunks tokenized in a separate process instead of a
thread, and `score` with a 0.5 ms GIL switch interval instead of 5 ms. `--ramps` times `score` with other chunk
ramps instead (first chunk, growth factor: runner.FIRST_SCORE_CHUNK_PAIRS and SCORE_CHUNK_GROWTH), beside the
loop on chunks tokenized beforehand: with the read-back fixed, an H200's device still idled 15 of 243 ms of a
call, all in its first 25 ms (bench/profile_engine.py's timeline). Writes
bench/results/score_overlap-<card>-<date>.json (card, commit, date).

GPU:  python3 bench/score_overlap.py --out-dir $OUT   [--ramps 256x2 256x1.5 128x1.5 512x1.5]
CPU:  python3 bench/score_overlap.py --device cpu --size tiny --rounds 1   (checks the script)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import torch
from provenance import git_commit
from workload import distinct_copies, settled_heap

from similarity_service import runner
from similarity_service.checkpoint import make_checkpoint
from similarity_service.corpus import load_corpus
from similarity_service.packed_pairs import PackedPairs
from similarity_service.runner import Engine
from similarity_service.tokenization import PairTokenizer

_process_tokenizer: PairTokenizer | None = None


def _start_tokenizer(model_dir: str, max_seq_len: int) -> None:
    global _process_tokenizer
    _process_tokenizer = PairTokenizer(model_dir, max_seq_len=max_seq_len)


def _encode_in_process(chunk: list[tuple[str, str]]) -> PackedPairs:
    assert _process_tokenizer is not None
    return _process_tokenizer.encode_packed(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--precision", default=None, help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=8, help="the corpus this many times per call")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--ramps", nargs="+", metavar="FIRSTxGROWTH",
                        help="time `score` with these chunk ramps (e.g. 256x2 128x1.5) instead of the variants")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")

    model_dir = make_checkpoint(Path(tempfile.mkdtemp()) / f"synthetic-{args.size}", args.size, seed=0)
    engine = Engine.load(model_dir, device=args.device, precision=args.precision or ("fp16" if cuda else "fp32"))
    engine.warmup()
    pairs = distinct_copies([pair.pair for pair in load_corpus()], args.copies)
    encoded = engine.encode(pairs)

    def timed(call: object) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()  # type: ignore[operator]
        if cuda:
            torch.cuda.synchronize()
        return len(pairs) / (time.perf_counter() - start)

    names = ["ramped", "ramped, EncodedPair lists", "ramped, each chunk read back first", "ramped, graph replays",
             "pre-tokenized bound", "pre-tokenized, graph replays", "score's loop on chunks tokenized beforehand",
             "ramped, tokenized in a process", "ramped, switch interval 0.5 ms"]
    if args.ramps:
        names = [f"ramp {ramp}" for ramp in args.ramps] + ["score's loop on chunks tokenized beforehand"]
    rates: dict[str, list[float]] = {name: [] for name in names}

    def with_ramp(ramp: str) -> list[float]:
        first, growth = ramp.split("x")
        before = runner.FIRST_SCORE_CHUNK_PAIRS, runner.SCORE_CHUNK_GROWTH
        runner.FIRST_SCORE_CHUNK_PAIRS, runner.SCORE_CHUNK_GROWTH = int(first), float(growth)
        try:
            return engine.score(pairs)
        finally:
            runner.FIRST_SCORE_CHUNK_PAIRS, runner.SCORE_CHUNK_GROWTH = before

    def with_encoded_pair_lists() -> list[float]:
        """`score` as it was before the packed-pairs path: each chunk tokenized into `EncodedPair` lists, then
        packed into arrays again before its launch."""
        tokenizer = engine._tokenizer  # noqa: SLF001
        tokenizer.encode_packed = lambda chunk: PackedPairs.of(tokenizer.encode(chunk))  # type: ignore[method-assign]
        try:
            return engine.score(pairs)
        finally:
            del tokenizer.encode_packed

    def chunk_by_chunk(*, bulk: bool) -> list[float]:
        """`score` as it was before 32469d4: each chunk scored and read back before the next is launched
        (`bulk=False`: with the served path's graph replays rather than op by op)."""
        chunks = [pairs[start:end] for start, end in runner.score_chunks(len(pairs))]
        scores: list[float] = []
        with ThreadPoolExecutor(max_workers=1) as tokenizer_thread:
            for batch in tokenizer_thread.map(engine.encode, chunks):
                scores += engine.score_encoded(batch, bulk=bulk)
        return scores

    chunks = [pairs[start:end] for start, end in runner.score_chunks(len(pairs))]
    packed_chunks = [engine._tokenizer.encode_packed(chunk) for chunk in chunks]  # noqa: SLF001

    def launch_and_read_back(encoded_chunks: Iterable[PackedPairs]) -> list[float]:
        """`Engine.score`'s loop (exact thresholds off): launch each chunk, then read the one before back."""
        scores: list[float] = []
        in_flight = None
        for chunk in encoded_chunks:
            launched = engine._launch_bulk(chunk)  # noqa: SLF001
            if in_flight is not None:
                scores += in_flight()
            in_flight = launched
        return scores + (in_flight() if in_flight is not None else [])

    def with_switch_interval(seconds: float) -> list[float]:
        before = sys.getswitchinterval()
        sys.setswitchinterval(seconds)
        try:
            return engine.score(pairs)
        finally:
            sys.setswitchinterval(before)

    engine.score(pairs)  # first call of this size: allocator and kernel choices settle
    with settled_heap():  # as `structsim score` runs
        if args.ramps:
            for _ in range(args.rounds):
                for ramp in args.ramps:
                    rates[f"ramp {ramp}"].append(timed(lambda ramp=ramp: with_ramp(ramp)))
                rates["score's loop on chunks tokenized beforehand"].append(timed(lambda: launch_and_read_back(packed_chunks)))
        else:
            with ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_tokenizer,
                initargs=(str(model_dir), engine.info.max_seq_len),
            ) as tokenizer_process:  # fmt: skip
                tokenizer_process.submit(len, []).result()  # started and the tokenizer loaded
                for _ in range(args.rounds):
                    rates["ramped"].append(timed(lambda: engine.score(pairs)))
                    rates["ramped, EncodedPair lists"].append(timed(with_encoded_pair_lists))
                    rates["ramped, each chunk read back first"].append(timed(lambda: chunk_by_chunk(bulk=True)))
                    rates["ramped, graph replays"].append(timed(lambda: chunk_by_chunk(bulk=False)))
                    rates["pre-tokenized bound"].append(timed(lambda: engine.score_encoded(encoded, bulk=True)))
                    rates["pre-tokenized, graph replays"].append(timed(lambda: engine.score_encoded(encoded)))
                    rates["score's loop on chunks tokenized beforehand"].append(timed(lambda: launch_and_read_back(packed_chunks)))
                    rates["ramped, tokenized in a process"].append(
                        timed(lambda: launch_and_read_back(tokenizer_process.map(_encode_in_process, chunks)))
                    )
                    rates["ramped, switch interval 0.5 ms"].append(timed(lambda: with_switch_interval(0.0005)))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:36s} median {medians[name]:9,.0f} pairs/s  (rounds {min(values):,.0f}-{max(values):,.0f})")

    card = torch.cuda.get_device_name() if cuda else "cpu"
    now = datetime.now(UTC)
    report = {
        "benchmark": "score_overlap", "card": card, "commit": git_commit(), "date": now.isoformat(timespec="seconds"),
        "torch": torch.__version__, "model": f"synthetic StructBERT-{args.size} (seed 0; not semantic)",
        "precision": engine.info.precision, "pairs_per_call": len(pairs), "rounds": args.rounds,
        "pairs_per_s": rates, "median_pairs_per_s": medians,
    }
    if not args.ramps:
        report |= {
            "packed_pairs_over_encoded_pair_lists": medians["ramped"] / medians["ramped, EncodedPair lists"],
            "ramped_share_of_bound": medians["ramped"] / medians["pre-tokenized bound"],
            "pipelined_over_each_chunk_read_back_first": medians["ramped"] / medians["ramped, each chunk read back first"],
            "replays_over_op_by_op_tokenizing": medians["ramped, graph replays"] / medians["ramped, each chunk read back first"],
            "tokenized_in_a_process_over_ramped": medians["ramped, tokenized in a process"] / medians["ramped"],
            "switch_interval_0_5_ms_over_ramped": medians["ramped, switch interval 0.5 ms"] / medians["ramped"],
            "loop_on_tokenized_chunks_over_ramped": medians["score's loop on chunks tokenized beforehand"] / medians["ramped"],
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"score_overlap-{card.replace(' ', '-')}-{now:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
