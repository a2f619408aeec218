"""Tokenized pairs as flat arrays (`PackedPairs`), and the tokenizer's numpy join into them (`encode_packed`)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from similarity_service.engine_api import EncodedPair
from similarity_service.packed_pairs import PackedPairs, ragged_ranges
from similarity_service.tokenization import PairTokenizer, truncate_longest_first, truncate_longest_first_arrays

EDGE_PAIRS = [
    ("", "你好"),  # an empty sentence: [CLS] [SEP] b [SEP]
    ("你好", ""),
    ("", ""),
    ("今天天气怎么样", "今天天气怎么样"),  # one sentence twice: tokenized once, joined twice
    ("我想退货[SEP]怎么办", "怎么申请退款"),  # a typed special token stays one token
    ("ABC abc Ünïcödé", "123 4567 8.9"),
    ("长" * 600, "短"),  # past max_seq_len alone
    ("长" * 300, "长" * 301),  # a balanced cut with an odd excess
]


def assert_same(packed: PackedPairs, items: list[EncodedPair]) -> None:
    expected = PackedPairs.of(items)
    np.testing.assert_array_equal(packed.cu, expected.cu)
    np.testing.assert_array_equal(packed.ids, expected.ids)
    np.testing.assert_array_equal(packed.types, expected.types)
    assert packed.ids.dtype == packed.types.dtype == packed.cu.dtype == np.int32


@pytest.mark.parametrize("max_seq_len", [512, 40, 8])
def test_encode_packed_gives_the_pairs_of_encode_as_arrays(
    tiny_model_dir: Path, chinese_pairs: list[tuple[str, str]], max_seq_len: int
) -> None:
    tokenizer = PairTokenizer(tiny_model_dir, max_seq_len=max_seq_len)
    pairs = chinese_pairs + EDGE_PAIRS + chinese_pairs[:50]  # repeats across the list too
    assert_same(tokenizer.encode_packed(pairs), tokenizer.encode(pairs))
    assert_same(tokenizer.encode_packed(pairs[:1]), tokenizer.encode(pairs[:1]))
    assert len(tokenizer.encode_packed([])) == 0


def test_the_array_cut_is_the_slow_tokenizers_cut() -> None:
    lengths = np.arange(0, 40)
    len_a, len_b = (grid.ravel() for grid in np.meshgrid(lengths, lengths))
    for budget in (0, 1, 7, 30, 100):
        keep_a, keep_b = truncate_longest_first_arrays(len_a, len_b, budget)
        expected = [truncate_longest_first(int(a), int(b), budget) for a, b in zip(len_a, len_b, strict=True)]
        assert list(zip(keep_a.tolist(), keep_b.tolist(), strict=True)) == expected


@pytest.fixture
def items() -> list[EncodedPair]:
    lengths = [5, 1, 9, 3, 7]
    return [EncodedPair([101 + i] * n, [0] * (n // 2) + [1] * (n - n // 2)) for i, n in enumerate(lengths)]


def test_pairs_come_back_as_encoded_pairs(items: list[EncodedPair]) -> None:
    packed = PackedPairs.of(items)
    assert len(packed) == 5
    assert list(packed) == items
    assert packed[-1] == items[-1]
    with pytest.raises(IndexError):
        packed[5]
    np.testing.assert_array_equal(packed.lengths, [5, 1, 9, 3, 7])


def test_taking_pairs_reorders_them_whole(items: list[EncodedPair]) -> None:
    order = np.array([2, 0, 4, 1, 3])
    assert list(PackedPairs.of(items).take(order)) == [items[i] for i in order]
    assert list(PackedPairs.of(items).take(np.array([3, 3]))) == [items[3], items[3]]


def test_a_block_of_pairs_is_what_the_packed_forward_takes(items: list[EncodedPair]) -> None:
    packed = PackedPairs.of(items)
    for start, end in itertools.combinations(range(6), 2):
        block, cu = packed.block(start, end)
        part = items[start:end]
        np.testing.assert_array_equal(cu, np.cumsum([0] + [len(item.input_ids) for item in part]))
        np.testing.assert_array_equal(block[0], [i for item in part for i in item.input_ids])
        np.testing.assert_array_equal(block[1], [t for item in part for t in item.token_type_ids])
        np.testing.assert_array_equal(block[2], [p for item in part for p in range(len(item.input_ids))])
        assert block.dtype == cu.dtype == np.int32


def test_ragged_ranges() -> None:
    np.testing.assert_array_equal(ragged_ranges(np.array([10, 0, 5]), np.array([3, 0, 2])), [10, 11, 12, 5, 6])
    assert ragged_ranges(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).size == 0
