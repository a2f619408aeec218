"""Tokenized pairs as flat arrays: the packed forward's input, without a Python object per pair.

`Engine.score` tokenizes long lists straight into this form (`PairTokenizer.encode_packed`) and launches
forwards on slices of it. Building an `EncodedPair` (two lists) per pair and flattening them back into
arrays cost ~5 µs of Python a pair, holding the GIL (on a 2-core CPU, twice that on an H200's host),
beside the forwards' launches, which need it too.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from similarity_service.engine_api import EncodedPair


@dataclass(frozen=True, slots=True)
class PackedPairs:
    """Pair i is `ids[cu[i]:cu[i + 1]]` (`[CLS] a [SEP] b [SEP]`) with its type ids in `types`; all int32."""

    ids: np.ndarray  # [T]
    types: np.ndarray  # [T]
    cu: np.ndarray  # [N + 1], cu[0] == 0

    @classmethod
    def of(cls, items: Sequence[EncodedPair]) -> PackedPairs:
        lengths = np.fromiter((len(item.input_ids) for item in items), dtype=np.int32, count=len(items))
        cu = cu_seqlens(lengths)
        total = int(cu[-1])
        ids = np.fromiter(itertools.chain.from_iterable(item.input_ids for item in items), np.int32, total)
        types = np.fromiter(itertools.chain.from_iterable(item.token_type_ids for item in items), np.int32, total)
        return cls(ids, types, cu)

    def __len__(self) -> int:
        return len(self.cu) - 1

    def __getitem__(self, index: int) -> EncodedPair:
        """One pair as an `EncodedPair` (for the few that need one: rescoring, fallbacks)."""
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start, end = int(self.cu[index]), int(self.cu[index + 1])
        return EncodedPair(self.ids[start:end].tolist(), self.types[start:end].tolist())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.cu)

    def take(self, order: np.ndarray) -> PackedPairs:
        """The pairs in `order` (indices into these pairs)."""
        lengths = self.lengths[order]
        tokens = ragged_ranges(self.cu[:-1][order], lengths)
        return PackedPairs(self.ids[tokens], self.types[tokens], cu_seqlens(lengths))

    def block(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Pairs start:end as the packed forward takes them: (ids, types, positions) as one [3, T] int32
        array, and their cu_seqlens [end - start + 1] from 0."""
        first, last = int(self.cu[start]), int(self.cu[end])
        cu = self.cu[start : end + 1] - first
        block = np.empty((3, last - first), dtype=np.int32)
        block[0] = self.ids[first:last]
        block[1] = self.types[first:last]
        block[2] = np.arange(last - first, dtype=np.int32) - np.repeat(cu[:-1], np.diff(cu))
        return block, cu


def cu_seqlens(lengths: np.ndarray) -> np.ndarray:
    """cu_seqlens: [0, l0, l0 + l1, ...] as int32."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return cu


def ragged_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """range(starts[0], starts[0] + counts[0]), range(starts[1], ...), ... end to end, as one int64 array."""
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    within = np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(ends - counts, counts)
    return np.repeat(np.asarray(starts, dtype=np.int64), counts) + within
