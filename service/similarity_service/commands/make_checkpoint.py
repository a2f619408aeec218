"""`structsim make-checkpoint OUT --size tiny|base [--seed N]`: write a synthetic StructBERT checkpoint.

The directory has the on-disk format of ModelScope's sentence-similarity StructBERT, so everything
that loads the real model loads it; its weights are random and its scores NOT semantic.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="directory to write (created; its model files replaced)")
    parser.add_argument(
        "--size",
        choices=("tiny", "base"),
        default="tiny",
        help="tiny: 2 layers, hidden 128 (fast CPU tests); base: BERT-base, 12 layers, hidden 768 (~400 MB)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes")


def run(args: argparse.Namespace) -> int:
    from similarity_service.checkpoint import make_checkpoint

    try:
        out = make_checkpoint(args.out, args.size, seed=args.seed)
    except OSError as exc:
        print(f"structsim make-checkpoint: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote a synthetic {args.size} StructBERT checkpoint (seed {args.seed}; random weights, not semantic) to {out}"
    )
    return 0
