"""The benchmarks' large calls: the corpus several times over, with no string repeated between copies."""

from __future__ import annotations


def distinct_copies(pairs: list[tuple[str, str]], copies: int) -> list[tuple[str, str]]:
    """`pairs` `copies` times; copy k's first sentences end in k spaces. Tokenizers drop trailing whitespace, so
    every copy has the same tokens, but structsim's tokenizer (which tokenizes each distinct sentence of a call
    once) finds only the corpus's own repeated sentences, not the copies: the benchmark stays a corpus of
    `copies` x its size, as the baselines see it."""
    return [(first + " " * copy, second) for copy in range(copies) for first, second in pairs]
