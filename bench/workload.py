"""What the benchmarks run on: the corpus several times over (no string repeated between copies), on a
heap settled as structsim's commands settle theirs."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def distinct_copies(pairs: list[tuple[str, str]], copies: int) -> list[tuple[str, str]]:
    """`pairs` `copies` times; copy k's first sentences end in k spaces. Tokenizers drop trailing whitespace, so
    every copy has the same tokens, but structsim's tokenizer (which tokenizes each distinct sentence of a call
    once) finds only the corpus's own repeated sentences, not the copies: the benchmark stays a corpus of
    `copies` x its size, as the baselines see it."""
    return [(first + " " * copy, second) for copy in range(copies) for first, second in pairs]


@contextmanager
def settled_heap() -> Iterator[None]:
    """The heap frozen and the young generation widened, as `structsim serve` and `structsim score` run once
    loaded (`serve.settle_heap`); the collector is given back as it was afterwards."""
    from similarity_service.commands.serve import settle_heap

    threshold = gc.get_threshold()
    settle_heap()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
