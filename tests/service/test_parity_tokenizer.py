"""The Rust pair tokenizer gives exactly the ids of transformers' slow BertTokenizer (ModelScope's
`sen-sim-tokenizer` uses it for StructBERT), truncation included."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from similarity_service.corpus import load_corpus
from similarity_service.tokenization import PairTokenizer, parallel_encode_min_pairs, truncate_longest_first

if TYPE_CHECKING:  # transformers is slow to import: only the fixture that needs it imports it
    from transformers import BertTokenizer

# Inputs where tokenizers differ if anything does: specials typed in text, accents, full-width forms,
# control and zero-width characters, an empty side, an over-long word, emoji and CJK Extension B.
EDGE_PAIRS = [
    ("你好[SEP]吗", "[sep][CLS] [PAD]x"),
    ("Café ÀÉÎ naïve", "ＡＢＣ１２３！"),
    ("\u200b零宽\u0000控制\x07字符\ufffd", "tab\t换行\n回车\r"),
    ("", "只有第二句"),
    ("a" * 150, "supercalifragilistic iPhone15"),
    ("emoji😀表情🎉", "𠀀扩展B"),
    ("   ", "x"),
    # Balanced cuts of odd size: the slow tokenizer keeps one more token of the first sentence.
    ("一二三四五六七八九十", "甲乙丙丁戊己庚辛壬癸"),
    ("一二三四五六七八九十", "甲乙丙丁戊己庚辛壬癸子"),
    ("一二三四五六七八九十子", "甲乙丙丁戊己庚辛壬癸"),
]


@pytest.fixture(scope="module")
def slow_tokenizer(tiny_model_dir: Path) -> BertTokenizer:
    from transformers import BertTokenizer

    # It warns (through logging) that overflowing tokens are not returned for pairs; irrelevant here.
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    return BertTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("max_seq_len", [512, 64, 33, 18, 9, 3])
def test_ids_and_type_ids_equal_the_slow_bert_tokenizer(
    slow_tokenizer: BertTokenizer, tiny_model_dir: Path, max_seq_len: int
) -> None:
    pairs = [pair.pair for pair in load_corpus()][::4] + EDGE_PAIRS
    ours = PairTokenizer(tiny_model_dir, max_seq_len=max_seq_len).encode(pairs)
    truncated = 0
    for (first, second), encoded in zip(pairs, ours, strict=True):
        expected = slow_tokenizer(first, second, truncation="longest_first", max_length=max_seq_len)
        assert encoded.input_ids == expected["input_ids"], (first, second)
        assert encoded.token_type_ids == expected["token_type_ids"], (first, second)
        truncated += len(encoded.input_ids) == max_seq_len
    assert truncated > 0  # every setting exercises truncation (512: the corpus's long passages)


def test_balanced_odd_cut_keeps_the_extra_token_in_the_first_sentence(tiny_model_dir: Path) -> None:
    encoded = PairTokenizer(tiny_model_dir, max_seq_len=18).encode([EDGE_PAIRS[-3]])[0]
    assert encoded.token_type_ids.count(0) - 2 == 8  # [CLS] + 8 + [SEP]
    assert encoded.token_type_ids.count(1) - 1 == 7  # 7 + [SEP]


@pytest.mark.parametrize(
    ("lengths", "budget", "kept"),
    [
        ((5, 3), 10, (5, 3)),
        ((10, 2), 8, (6, 2)),
        ((2, 10), 8, (2, 6)),
        ((10, 10), 15, (8, 7)),
        ((11, 10), 15, (8, 7)),
        ((10, 11), 15, (8, 7)),
        ((7, 0), 3, (3, 0)),
    ],
)
def test_truncate_longest_first(lengths: tuple[int, int], budget: int, kept: tuple[int, int]) -> None:
    assert truncate_longest_first(*lengths, budget) == kept


def test_max_seq_len_below_the_special_tokens_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        PairTokenizer(tiny_model_dir, max_seq_len=2)


class _CallLog:
    """Wraps the Rust tokenizer and records which of its calls `PairTokenizer.encode` makes."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.calls: list[tuple[str, int]] = []

    def encode(self, *args: object, **kwargs: object) -> object:
        self.calls.append(("one sentence, GIL held", 1))
        return self._inner.encode(*args, **kwargs)  # type: ignore[attr-defined]

    def encode_batch_fast(self, sentences: list[str], **kwargs: object) -> object:
        self.calls.append(("batch, GIL released", len(sentences)))
        return self._inner.encode_batch_fast(sentences, **kwargs)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("cores", "min_pairs"), [(2, 8), (4, 8), (8, 2), (16, 2), (128, 2)])
def test_the_gil_releasing_batch_call_starts_at_two_pairs_on_hosts_of_eight_cores(cores: int, min_pairs: int) -> None:
    assert parallel_encode_min_pairs(cores) == min_pairs


def test_from_parallel_min_pairs_on_sentences_are_tokenized_in_the_call_that_releases_the_gil(
    tiny_model_dir: Path,
) -> None:
    # Beside the event loop a call that holds the GIL stalls the loop; one pair alone is cheaper held.
    tokenizer = PairTokenizer(tiny_model_dir, parallel_min_pairs=2)  # a many-core host's (this one may have 2)
    pairs = [("第一句", "第二句"), ("第三句", "第四句"), ("第五句", "第六句")]
    expected = [tokenizer.encode([pair])[0] for pair in pairs]
    log = _CallLog(tokenizer._tokenizer)  # noqa: SLF001 - the test watches the Rust calls
    tokenizer._tokenizer = log  # type: ignore[assignment]  # noqa: SLF001
    assert tokenizer.encode(pairs[:1]) == expected[:1]
    assert tokenizer.encode(pairs[:2]) == expected[:2]
    assert tokenizer.encode(pairs) == expected
    assert log.calls == [("one sentence, GIL held", 1)] * 2 + [("batch, GIL released", 4), ("batch, GIL released", 6)]


def test_each_distinct_sentence_is_tokenized_once_a_call(tiny_model_dir: Path) -> None:
    tokenizer = PairTokenizer(tiny_model_dir, max_seq_len=40, parallel_min_pairs=2)  # short: some pairs truncate
    targets = [pair.pair[1] for pair in load_corpus()[:40]]
    source = "怎么修改绑定的手机号码？我换了新号码，旧号码已经停用了"
    ranking = [(source, target) for target in targets] + [(targets[0], source), (source, source)]
    expected = [tokenizer.encode([pair])[0] for pair in ranking]  # each pair alone: no sharing
    log = _CallLog(tokenizer._tokenizer)  # noqa: SLF001 - the test watches the Rust calls
    tokenizer._tokenizer = log  # type: ignore[assignment]  # noqa: SLF001
    assert tokenizer.encode(ranking) == expected
    assert log.calls == [("batch, GIL released", len({source, *targets}))]
    assert any(item.num_tokens == 40 for item in expected) and any(item.num_tokens < 40 for item in expected)
