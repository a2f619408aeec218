"""The bundled example corpus (content and shape) and the pairs-file loaders (their errors)."""

from __future__ import annotations

import json
import re
import statistics
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from similarity_service.corpus import (
    CATEGORIES,
    CorpusFormatError,
    CorpusPair,
    SentencePair,
    bundled_corpus_path,
    load_corpus,
    load_pairs_file,
)

EXAMPLES_FILE = Path(__file__).resolve().parents[2] / "examples" / "pairs.jsonl"

# The share of each category the corpus is written to, and how far it may drift.
TARGET_SHARE = {"paraphrase": 0.35, "related": 0.30, "unrelated": 0.20, "long": 0.10, "short": 0.05}
SHARE_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def corpus() -> list[CorpusPair]:
    return load_corpus()


def _normalized(sentence: str) -> str:
    """What a reader would call the same sentence: full-width folded, case, spaces and punctuation ignored."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", sentence).casefold())


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "pairs.jsonl"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- the bundled corpus -------------------------------------------------------------------------


def test_corpus_is_large_and_every_category_is_in_proportion(corpus: list[CorpusPair]) -> None:
    assert len(corpus) >= 1000
    counts = Counter(pair.category for pair in corpus)
    assert set(counts) == set(CATEGORIES) == set(TARGET_SHARE)
    for category, share in TARGET_SHARE.items():
        assert abs(counts[category] / len(corpus) - share) <= SHARE_TOLERANCE, (category, counts)


def test_labels_follow_the_category(corpus: list[CorpusPair]) -> None:
    labels: dict[str, Counter[int]] = {category: Counter() for category in CATEGORIES}
    for pair in corpus:
        labels[pair.category][pair.label] += 1
    assert set(labels["paraphrase"]) == {1}
    assert set(labels["related"]) == set(labels["unrelated"]) == {0}
    # long and short pairs are mixed, so that both answers are exercised at both extremes of length
    for category in ("long", "short"):
        assert min(labels[category][0], labels[category][1]) >= 0.25 * sum(labels[category].values())


def test_ids_are_unique_and_sequential(corpus: list[CorpusPair]) -> None:
    ids = [pair.id for pair in corpus]
    assert ids == [f"cs-{n:04d}" for n in range(1, len(corpus) + 1)]


def test_no_pair_repeats_even_reordered_or_repunctuated(corpus: list[CorpusPair]) -> None:
    keys = Counter(frozenset((_normalized(p.sentence1), _normalized(p.sentence2))) for p in corpus)
    repeated = [key for key, n in keys.items() if n > 1]
    assert not repeated
    assert all(_normalized(p.sentence1) != _normalized(p.sentence2) for p in corpus)


def test_sentences_are_clean_chinese_text(corpus: list[CorpusPair]) -> None:
    for pair in corpus:
        for sentence in pair.pair:
            assert sentence == sentence.strip() and "\n" not in sentence and "\t" not in sentence, pair.id
            # a very short pair may be all Latin or digits ("5G" / "4G"), as users type them
            assert pair.category == "short" or re.search(r"[\u4e00-\u9fff]", sentence), pair.id


def test_lengths_cover_short_pairs_and_pairs_past_512_tokens(corpus: list[CorpusPair]) -> None:
    short = [p for p in corpus if p.category == "short"]
    assert all(2 <= len(s) <= 6 for p in short for s in p.pair)
    long = [p for p in corpus if p.category == "long"]
    assert all(len(p.sentence1) + len(p.sentence2) >= 150 for p in long)
    # Chinese tokenizes about one token per character, so these exercise truncation at 512 tokens.
    assert sum(len(p.sentence1) + len(p.sentence2) > 512 for p in corpus) >= 10
    assert sum(max(len(p.sentence1), len(p.sentence2)) > 300 for p in corpus) >= 10
    questions = [len(s) for p in corpus if p.category in ("paraphrase", "related", "unrelated") for s in p.pair]
    assert 6 <= statistics.median(questions) <= 20 and max(questions) >= 30


def test_text_varies_as_users_type(corpus: list[CorpusPair]) -> None:
    text = [s for p in corpus for s in p.pair]
    assert sum(bool(re.search(r"[0-9０-９]", s)) for s in text) >= 50  # digits: prices, order numbers
    assert sum(bool(re.search(r"[A-Za-z]", s)) for s in text) >= 50  # brand names: iPhone, Apple Pay
    assert sum(bool(re.search(r"[Ａ-Ｚａ-ｚ０-９]", s)) for s in text) >= 3  # full-width letters and digits
    assert sum(s.endswith(("？", "?")) for s in text) >= 200
    assert sum(not s.endswith(("？", "?", "！", "!", "。", "~")) for s in text) >= 200
    assert len(set(text)) >= 1200


def test_bundled_file_is_where_the_loader_says(corpus: list[CorpusPair]) -> None:
    assert Path(bundled_corpus_path()).name == "pairs.jsonl"
    assert load_corpus(bundled_corpus_path()) == corpus


def test_example_pairs_are_drawn_from_the_corpus(corpus: list[CorpusPair]) -> None:
    examples = load_pairs_file(EXAMPLES_FILE)
    assert len(examples) == 10
    assert {p.pair for p in examples} <= {p.pair for p in corpus}
    for line in EXAMPLES_FILE.read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"sentence1", "sentence2"}


# --- load_pairs_file: a user's workload ---------------------------------------------------------


def test_pairs_file_needs_only_the_two_sentences(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '\ufeff{"sentence1": "怎么退款", "sentence2": "退款多久到账"}\n'
        "\n"
        '{"sentence1": "你好", "sentence2": "您好", "label": 1, "category": "mine", "score": 0.9}\n',
    )
    pairs = load_pairs_file(path)
    assert pairs == [
        SentencePair("怎么退款", "退款多久到账"),
        SentencePair("你好", "您好", category="mine", label=1),
    ]
    assert [p.pair for p in pairs] == [("怎么退款", "退款多久到账"), ("你好", "您好")]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('{"sentence1": "a", "sentence2": "b"}\n{"sentence1": "怎么退款"}\n', 2, "missing required field `sentence2`"),
        ('{"sentence1": "a", "sentence2": "b"}\n\n{"sentence1": "a", "sentence2": 3}\n', 3, "Expected `str`"),
        ('{"sentence1": "a", "sentence2": "b"\n', 1, "not a JSON object"),
        ('["怎么退款", "退款多久到账"]\n', 1, "Expected `object`, got `array`"),
        ('{"sentence1": "  ", "sentence2": "b"}\n', 1, "sentence1"),
        ('{"sentence1": "a", "sentence2": "b", "label": 2}\n', 1, "label"),
    ],
)
def test_pairs_file_errors_name_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CorpusFormatError) as caught:
        load_pairs_file(path)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert message in str(caught.value)


def test_pairs_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, b'{"sentence1": "a", "sentence2": "b"}\n' + '{"sentence1": "退款"}'.encode("gbk"))
    with pytest.raises(CorpusFormatError, match=r":2: not UTF-8 text"):
        load_pairs_file(path)


def test_empty_pairs_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n  \n")
    with pytest.raises(CorpusFormatError, match="holds no pairs") as caught:
        load_pairs_file(path)
    assert caught.value.line is None


def test_missing_pairs_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_pairs_file(tmp_path / "absent.jsonl")


# --- load_corpus on another file: every field is required ---------------------------------------


def test_corpus_rows_need_every_field_and_a_known_category(tmp_path: Path) -> None:
    good = {"id": "x-1", "sentence1": "你好", "sentence2": "您好", "category": "short", "label": 1}
    path = _write(
        tmp_path, json.dumps(good, ensure_ascii=False) + "\n" + json.dumps({**good, "id": "x-2", "category": "chat"})
    )
    with pytest.raises(CorpusFormatError, match=r":2: invalid pair: .*category"):
        load_corpus(path)
    path = _write(tmp_path, json.dumps({k: v for k, v in good.items() if k != "label"}))
    with pytest.raises(CorpusFormatError, match=r":1: .*missing required field `label`"):
        load_corpus(path)
    path = _write(tmp_path, json.dumps({**good, "extra": 1}))
    with pytest.raises(CorpusFormatError, match=r":1: .*unknown field `extra`"):
        load_corpus(path)


def test_corpus_ids_must_be_unique(tmp_path: Path) -> None:
    row = {"id": "x-1", "sentence1": "你好", "sentence2": "您好", "category": "short", "label": 1}
    path = _write(
        tmp_path, "\n".join(json.dumps({**row, "sentence2": s}, ensure_ascii=False) for s in ("您好", "在吗", "哈喽"))
    )
    with pytest.raises(CorpusFormatError, match=r":2: id 'x-1' repeats the id on line 1"):
        load_corpus(path)
