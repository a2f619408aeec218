"""What the batcher, the HTTP layer and autotune know of the engine. No torch here.

The engine (runner.py) implements `ScoringEngine`; everything above it depends only on this module,
so the batcher and the HTTP layer are testable without a model and never import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec


class EncodedPair(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One tokenized pair: `[CLS] a [SEP] b [SEP]`, truncated longest-first to the engine's max length.

    Not tracked by the garbage collector (`gc=False`: two lists of ints cannot hold a reference cycle): a
    10k-pair call makes 10k of them, and each tracked object brings the next collection closer.
    """

    input_ids: list[int]
    token_type_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class EngineOutOfMemory(RuntimeError):
    """The device ran out of memory for a batch even after the engine split it; the engine stays usable.

    The engine raises a subclass; the HTTP layer answers 503 with Retry-After (the pressure passes, or
    another replica answers), and it does not count as a broken device.
    """


class EngineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Facts about a loaded engine, shown by /v1/info and recorded in tuned profiles."""

    model_id: str  # hub id or local path, as the user gave it
    revision: str | None  # hub revision, None for a local directory
    model_dir: str  # resolved local directory the weights were read from
    fingerprint: str  # stable hash of the weights + config + max_seq_len (names studies and profiles)
    precision: str  # fp32 | tf32 | fp16 | bf16 (never "auto": that is resolved at load)
    device: str  # "cuda:0" or "cpu"
    device_name: str  # "NVIDIA H100 80GB HBM3" or the CPU model
    compute_capability: str | None  # "9.0"; None on CPU
    max_seq_len: int


class ScoringEngine(Protocol):
    """A synchronous scorer. Called from one dedicated thread; never from the event loop."""

    @property
    def info(self) -> EngineInfo: ...

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        """Tokenize pairs (thread-safe; cheap enough to run per request before queueing)."""
        ...

    def score_encoded(self, batch: Sequence[EncodedPair]) -> list[float]:
        """P(similar) for each encoded pair, in the order given. Any batch size; the engine splits."""
        ...
