"""Attention alone on the bulk path's forwards: flash's varlen kernel vs similarity_service/triton_attention.py.

Takes the corpus x8's pairs sorted by length and split into forwards as `Engine.score` splits them (64k
tokens each), fills q, k, v with random fp16 values in the fused qkv layout, and times one attention call
per forward (CUDA events, median of repetitions): flash, the Triton kernel with its default tiles, and each
tile configuration of a small sweep; also the last layer's form (one [CLS] query per sequence). Scores do not
enter; the outputs are compared with flash's. Not a benchmark of record: a map for choosing tiles.

GPU:  python3 bench/attention_probe.py --out-dir bench/results
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from kernels_probe import timed
from provenance import git_commit
from workload import distinct_copies

from similarity_service.checkpoint import make_checkpoint
from similarity_service.corpus import load_corpus
from similarity_service.packed import cuda_varlen_attention
from similarity_service.packed_executor import split_by_tokens
from similarity_service.runner import DEFAULT_MAX_PACKED_PAIRS, DEFAULT_MAX_PACKED_TOKENS
from similarity_service.tokenization import PairTokenizer
from similarity_service.triton_attention import Tiles, launch, tiles_for

HEADS, HEAD_DIM, LAYERS = 12, 64, 12
SWEEP = [
    Tiles(block_q, block_k, warps, stages)
    for block_q, block_k, warps, stages in itertools.product((16, 32, 64, 128), (16, 32, 64, 128), (4, 8), (1, 2, 3))
    if block_k <= 2 * block_q and block_q * block_k <= 128 * 64
]


def timed_ms(fn, reps: int) -> float:
    """Median device ms of fn() over reps (kernels_probe's CUDA-event timer)."""
    return timed(fn, reps) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--no-sweep", action="store_true", help="flash and the default tiles only")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    flash = cuda_varlen_attention()
    assert flash is not None, "this torch has no varlen flash attention"
    model_dir = make_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "tiny", seed=0)  # only its vocabulary is used
    pairs = distinct_copies([p.pair for p in load_corpus()], 8)
    lengths = np.sort([len(item.input_ids) for item in PairTokenizer(model_dir, max_seq_len=512).encode(pairs)])
    cu_all = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    generator = torch.Generator(device="cuda").manual_seed(0)
    forwards, totals = [], {"flash": 0.0, "default": 0.0, "best": 0.0, "cls_flash": 0.0, "cls_default": 0.0}
    for start, end in split_by_tokens(cu_all, DEFAULT_MAX_PACKED_TOKENS, DEFAULT_MAX_PACKED_PAIRS):
        cu = torch.from_numpy(cu_all[start : end + 1] - cu_all[start]).cuda()
        tokens, max_len = int(cu[-1]), int(lengths[start:end].max())
        q, k, v = torch.randn(tokens, 3, HEADS, HEAD_DIM, generator=generator, device="cuda", dtype=torch.float16).unbind(1)
        cls_q, cls_cu = q[cu[:-1].long()], torch.arange(end - start + 1, dtype=torch.int32, device="cuda")
        expected = flash(q, k, v, cu, cu, max_len, max_len)
        row = {
            "sequences": end - start, "tokens": tokens, "max_len": max_len,
            "mean_len": float(lengths[start:end].mean()), "default_tiles": tiles_for(max_len, max_len)._asdict(),
            "flash_ms": timed_ms(lambda: flash(q, k, v, cu, cu, max_len, max_len), args.reps),
            "default_ms": timed_ms(lambda: launch(q, k, v, cu, cu, max_len, max_len), args.reps),
            "default_max_abs_vs_flash": float((launch(q, k, v, cu, cu, max_len, max_len) - expected).abs().max()),
            "cls_flash_ms": timed_ms(lambda: flash(cls_q, k, v, cls_cu, cu, 1, max_len), args.reps),
            "cls_default_ms": timed_ms(lambda: launch(cls_q, k, v, cls_cu, cu, 1, max_len), args.reps),
        }
        sweep = []
        for tiles in [] if args.no_sweep else SWEEP:
            try:
                ms = timed_ms(lambda tiles=tiles: launch(q, k, v, cu, cu, max_len, max_len, tiles), args.reps)
            except Exception as exc:  # noqa: BLE001 - a config that does not build (shared memory) is skipped
                sweep.append({"tiles": tiles._asdict(), "error": str(exc)[:120]})
                continue
            sweep.append({"tiles": tiles._asdict(), "ms": ms})
        timed = [entry for entry in sweep if "ms" in entry]
        row["best"] = min(timed, key=lambda entry: entry["ms"]) if timed else None
        row["sweep"] = sweep
        forwards.append(row)
        for key in ("flash", "default", "cls_flash", "cls_default"):
            totals[key] += row[f"{key}_ms"]
        totals["best"] += row["best"]["ms"] if row["best"] else row["default_ms"]
        print(json.dumps({key: value for key, value in row.items() if key != "sweep"}), flush=True)

    # A forward runs LAYERS - 1 full attentions and one [CLS]-query attention.
    per_pass = {
        "flash_ms": (LAYERS - 1) * totals["flash"] + totals["cls_flash"],
        "triton_default_ms": (LAYERS - 1) * totals["default"] + totals["cls_default"],
        "triton_best_per_forward_ms": (LAYERS - 1) * totals["best"] + totals["cls_default"],
    }
    report = {
        "benchmark": "attention_probe", "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "commit": git_commit(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "pairs": len(lengths), "heads": HEADS, "head_dim": HEAD_DIM, "corpus_x8_attention_per_pass": per_pass,
        "forwards": forwards,
    }
    print(json.dumps(per_pass))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"attention_probe-{report['card'].replace(' ', '-')}-{report['date'][:10]}-{report['commit']}.json"
    (args.out_dir / name).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
