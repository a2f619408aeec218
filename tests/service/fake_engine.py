"""A fake `ScoringEngine` for batcher and HTTP tests that need a slow, failing or gated engine."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from similarity_service.engine_api import EncodedPair, EngineInfo


def pair(key: int, tokens: int = 4) -> EncodedPair:
    """A pair the fake engine scores as key / 10_000, so every caller can check it got its own scores."""
    return EncodedPair(input_ids=[key] * tokens, token_type_ids=[0] * tokens)


def expected(pairs: Sequence[EncodedPair]) -> list[float]:
    return [p.input_ids[0] / 10_000 for p in pairs]


class FakeEngine:
    """Records each forward pass; can be held at a gate (a slow GPU) or made to fail.

    `encode` keys a text pair by its total length, so `("ab", "c")` scores 0.0003.
    """

    info = EngineInfo(
        model_id="fake",
        revision=None,
        model_dir="/nonexistent",
        fingerprint="fake",
        precision="fp32",
        device="cpu",
        device_name="fake",
        compute_capability=None,
        max_seq_len=512,
    )

    def __init__(self) -> None:
        self.batches: list[list[EncodedPair]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()  # set when a forward pass begins
        self.threads: set[str] = set()
        self.thread_of_pass: list[str] = []  # the thread that ran each forward pass, in order
        self.fail_on_key: int | None = None
        self.failure: Exception = RuntimeError("CUDA error: device-side assert (fake)")  # raised on fail_on_key
        self.short_by = 0

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        return [pair(len(a) + len(b)) for a, b in pairs]

    def score_encoded(self, batch: Sequence[EncodedPair]) -> list[float]:
        self.threads.add(threading.current_thread().name)
        self.thread_of_pass.append(threading.current_thread().name)
        self.started.set()
        self.gate.wait(timeout=30)
        self.batches.append(list(batch))
        if self.fail_on_key is not None and any(p.input_ids[0] == self.fail_on_key for p in batch):
            raise self.failure
        return expected(batch)[: len(batch) - self.short_by]

    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]
