"""The pair tokenizer: `[CLS] a [SEP] b [SEP]` with token type ids, built from a model's `vocab.txt`.

It is the Rust `tokenizers` pipeline that Hugging Face builds for BERT (BertNormalizer with Chinese
characters split one per token, BertPreTokenizer, WordPiece), and it gives the same ids as
transformers' slow `BertTokenizer`, which is what ModelScope's `sen-sim-tokenizer` preprocessor uses
for StructBERT. Each distinct sentence of a call is tokenized once, alone, and the pairs are joined here
(the BERT pair template is exactly that join): a ranking request pairs one source with every target,
and FAQ-style corpora repeat their questions. Truncation is done here too, with the slow tokenizer's
rule: when a pair is too long, Rust's truncator would give the odd token of a balanced cut to the
*longer* sequence, the slow tokenizer gives it to the *first* one, and the model was trained and is
served by ModelScope with the slow tokenizer's cut.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from similarity_service.engine_api import EncodedPair
from similarity_service.host import usable_cores
from similarity_service.packed_pairs import PackedPairs, cu_seqlens, ragged_ranges

# BERT's special tokens; the slow tokenizer never splits them, so "[SEP]" typed in a sentence is one token.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# `[CLS]`, and `[SEP]` after each sentence.
SPECIAL_TOKENS_PER_PAIR = 3


class VocabularyError(ValueError):
    """A `vocab.txt` that cannot back a BERT tokenizer (missing special tokens, empty)."""


def read_vocab(path: Path) -> dict[str, int]:
    """Token → id, one token per line; like transformers' `load_vocab`, a repeated token keeps its last line."""
    vocab: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            vocab[line.rstrip("\n")] = index
    missing = [token for token in ("[UNK]", "[CLS]", "[SEP]") if token not in vocab]
    if missing:
        raise VocabularyError(f"{path} lacks the special token(s) {', '.join(missing)}")
    return vocab


def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """How many tokens of each sentence to keep so that both fit in `budget`.

    transformers' slow tokenizer rule: take tokens off the longer sentence until both are the same
    length, then alternately, the second sentence first (so on an odd cut the first keeps one more).
    """
    excess = len_a + len_b - budget
    if excess <= 0:
        return len_a, len_b
    unequal = min(abs(len_a - len_b), excess)
    balanced = excess - unequal
    if len_a > len_b:
        return len_a - unequal - balanced // 2, len_b - (balanced - balanced // 2)
    return len_a - balanced // 2, len_b - unequal - (balanced - balanced // 2)


def truncate_longest_first_arrays(len_a: np.ndarray, len_b: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """`truncate_longest_first` for arrays of pairs."""
    excess = np.maximum(len_a + len_b - budget, 0)
    unequal = np.minimum(np.abs(len_a - len_b), excess)
    balanced = excess - unequal
    first_cut = balanced // 2  # the second sentence loses the odd token
    a_longer = len_a > len_b
    keep_a = np.where(a_longer, len_a - unequal - first_cut, len_a - first_cut)
    keep_b = np.where(a_longer, len_b - (balanced - first_cut), len_b - unequal - (balanced - first_cut))
    return keep_a, keep_b


def parallel_encode_min_pairs(cores: int) -> int:
    """From how many pairs `PairTokenizer.encode` makes the Rust batch call, for a process with `cores` CPUs.

    One pair is always encoded in the calling thread, holding the GIL (15-60 µs; the batch call wakes a
    thread pool, ~150 µs on a 16-core host). The batch call releases the GIL for its whole duration, and
    beside the event loop GIL held while tokenizing is GIL the loop waits for: served single pairs on a
    16-core H200 host, batch calls from 2 pairs on (instead of 8) took x1.21-1.23 the saturated requests/s
    with the real engine behind (x1.29-1.46 with a GPU-shaped stand-in).
    Its pool takes the host's cores, though: on a 2-core host the same change gave x1.16 with 16
    connections but x0.84 with 64 (bench/loop_cost.py), so few cores keep the threshold of 8.
    """
    return 2 if cores >= 8 else 8


class PairTokenizer:
    """Encodes sentence pairs for a BERT cross-encoder. Thread-safe: the Rust tokenizer holds no Python state."""

    def __init__(self, model_dir: str | Path, *, max_seq_len: int = 512, parallel_min_pairs: int | None = None) -> None:
        model_dir = Path(model_dir)
        if max_seq_len < SPECIAL_TOKENS_PER_PAIR:
            raise ValueError(f"max_seq_len must be at least {SPECIAL_TOKENS_PER_PAIR}, got {max_seq_len}")
        vocab = read_vocab(model_dir / "vocab.txt")
        lowercase, strip_accents = _casing(model_dir)
        tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
        )
        tokenizer.pre_tokenizer = BertPreTokenizer()
        tokenizer.add_special_tokens([token for token in SPECIAL_TOKENS if token in vocab])
        self._tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        # calls of this many pairs or more release the GIL; None: what suits this host's CPUs
        self.parallel_min_pairs = parallel_min_pairs or parallel_encode_min_pairs(usable_cores())
        self.vocab_size = len(vocab)
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.pad_id = vocab.get("[PAD]", 0)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        """Tokenize pairs, each distinct sentence once; long pairs are cut longest-first to `max_seq_len`."""
        if not pairs:
            return []
        sentences = list(dict.fromkeys(sentence for pair in pairs for sentence in pair))
        if len(pairs) < self.parallel_min_pairs:  # see parallel_encode_min_pairs
            encodings = [self._tokenizer.encode(sentence, add_special_tokens=False) for sentence in sentences]
        else:
            encodings = self._tokenizer.encode_batch_fast(sentences, add_special_tokens=False)
        ids = {sentence: encoding.ids for sentence, encoding in zip(sentences, encodings, strict=True)}
        return [self._join(ids[a], ids[b]) for a, b in pairs]

    def encode_packed(self, pairs: Sequence[tuple[str, str]]) -> PackedPairs:
        """`encode`'s pairs as flat arrays, joined and cut with numpy rather than a Python object per pair
        (the bulk path's input: packed_pairs.py)."""
        sentences = list(dict.fromkeys(sentence for pair in pairs for sentence in pair))
        id_lists = [encoding.ids for encoding in self._tokenizer.encode_batch_fast(sentences, add_special_tokens=False)]
        sentence_lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
        sentence_starts = cu_seqlens(sentence_lengths)[:-1]
        tokens = np.fromiter(itertools.chain.from_iterable(id_lists), np.int32, int(sentence_lengths.sum()))
        index = {sentence: position for position, sentence in enumerate(sentences)}
        first = np.fromiter((index[a] for a, _ in pairs), dtype=np.int64, count=len(pairs))
        second = np.fromiter((index[b] for _, b in pairs), dtype=np.int64, count=len(pairs))
        keep_a, keep_b = truncate_longest_first_arrays(
            sentence_lengths[first], sentence_lengths[second], self.max_seq_len - SPECIAL_TOKENS_PER_PAIR
        )
        cu = cu_seqlens(keep_a + keep_b + SPECIAL_TOKENS_PER_PAIR)
        ids = np.empty(int(cu[-1]), dtype=np.int32)
        types = np.zeros(int(cu[-1]), dtype=np.int32)
        first_sep = cu[:-1] + 1 + keep_a
        ids[cu[:-1]] = self.cls_id
        ids[first_sep] = self.sep_id
        ids[cu[1:] - 1] = self.sep_id
        ids[ragged_ranges(cu[:-1] + 1, keep_a)] = tokens[ragged_ranges(sentence_starts[first], keep_a)]
        second_tokens = ragged_ranges(first_sep + 1, keep_b)
        ids[second_tokens] = tokens[ragged_ranges(sentence_starts[second], keep_b)]
        types[second_tokens] = 1
        types[cu[1:] - 1] = 1
        return PackedPairs(ids, types, cu)

    def _join(self, ids_a: list[int], ids_b: list[int]) -> EncodedPair:
        """`[CLS] a [SEP] b [SEP]`, type ids 0 up to the first [SEP] and 1 after, cut to fit `max_seq_len`."""
        keep_a, keep_b = truncate_longest_first(len(ids_a), len(ids_b), self.max_seq_len - SPECIAL_TOKENS_PER_PAIR)
        return EncodedPair(
            [self.cls_id, *ids_a[:keep_a], self.sep_id, *ids_b[:keep_b], self.sep_id],
            [0] * (keep_a + 2) + [1] * (keep_b + 1),
        )


def _casing(model_dir: Path) -> tuple[bool, bool | None]:
    """(lowercase, strip_accents) as transformers' BertTokenizer would read them from tokenizer_config.json.

    Without that file (as in ModelScope's StructBERT), BertTokenizer lowercases and strips accents.
    """
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return True, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VocabularyError(f"{path} is not readable JSON: {exc}") from exc
    return bool(config.get("do_lower_case", True)), config.get("strip_accents")
