"""What every scoring route does, without HTTP: check limits, tokenize, queue, rank. No torch here.

Routes translate wire types to these calls and back; limits over the configured bounds raise
`TooLarge` (413). Pairs are tokenized before they are queued, so the batcher knows every pair's
token count (as text-embeddings-inference does): off the event loop, but for a request of a few pairs
that is alone in the batcher, for which a thread's hand-off costs more than the tokenizing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec

from similarity_service.batching import Batcher
from similarity_service.encoding import Encoder
from similarity_service.engine_api import ScoringEngine
from similarity_service.errors import BadRequest, TooLarge
from similarity_service.settings import Settings

# Requests this small are tokenized by the shared tokenizer thread, merged with others (on the loop itself
# when alone in the batcher); a larger one in a thread of its own, so that it does not hold up small ones.
SHARED_ENCODE_MAX_PAIRS = 4


class Ranked(msgspec.Struct, frozen=True):
    index: int  # position in the request's targets
    sentence: str
    similarity: float


def rank(targets: Sequence[str], scores: Sequence[float], top_k: int | None = None) -> list[Ranked]:
    """Targets by descending similarity; equal scores keep request order; the best `top_k` (all if None)."""
    order = sorted(range(len(targets)), key=lambda i: -scores[i])
    return [Ranked(i, targets[i], scores[i]) for i in order[:top_k]]


class Scorer:
    """Scores pairs through the batcher; one per served model."""

    def __init__(self, engine: ScoringEngine, encoder: Encoder, batcher: Batcher, settings: Settings) -> None:
        self.engine = engine
        self.encoder = encoder
        self.batcher = batcher
        self._settings = settings

    async def similarity(self, sentence1: str, sentence2: str) -> float:
        self._check_length("sentence1", sentence1)
        self._check_length("sentence2", sentence2)
        (score,) = await self._score([(sentence1, sentence2)])
        return score

    async def batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores in the order of `pairs`."""
        self._check_count("pairs", len(pairs), self._settings.max_pairs_per_request)
        for i, (sentence1, sentence2) in enumerate(pairs):
            self._check_length(f"pairs[{i}].sentence1", sentence1)
            self._check_length(f"pairs[{i}].sentence2", sentence2)
        return await self._score(pairs)

    async def rank(self, source: str, targets: Sequence[str], top_k: int | None = None) -> list[Ranked]:
        limit = self._settings.max_rank_targets
        self._check_count("targets", len(targets), limit)
        if top_k is not None and top_k > limit:
            raise BadRequest("invalid_request", f"top_k is {top_k}; it can be at most max_rank_targets ({limit})")
        self._check_length("source", source)
        for i, target in enumerate(targets):
            self._check_length(f"targets[{i}]", target)
        scores = await self._score([(source, target) for target in targets])
        return rank(targets, scores, top_k)

    async def _score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        # Admitted before tokenizing: a drain that begins meanwhile still scores this request.
        with self.batcher.admission():
            if len(pairs) > SHARED_ENCODE_MAX_PAIRS:
                encoded = await asyncio.to_thread(self.engine.encode, pairs)
            elif self.batcher.idle:
                # Alone (low load): a few pairs cost the loop tens of µs here, while the tokenizer thread's
                # hand-off and answer cost 0.18-0.24 ms on the H200 hosts (bench/one_pair_path.py).
                encoded = self.engine.encode(pairs)
            else:
                encoded = await self.encoder.encode(pairs)
            return await self.batcher.submit(encoded, admitted=True)

    def _check_count(self, what: str, count: int, limit: int) -> None:
        if count > limit:
            raise TooLarge("too_many_pairs", f"{count} {what} in one request; the limit is {limit}")

    def _check_length(self, where: str, sentence: str) -> None:
        limit = self._settings.max_chars_per_sentence
        if len(sentence) > limit:
            raise TooLarge("sentence_too_long", f"{where} has {len(sentence)} characters; the limit is {limit}")
