"""Sentence-pair files: the bundled example corpus and a user's own workload file. No torch here.

Both are JSON Lines, one object per line::

    {"id": "cs-0001", "sentence1": "怎么退款", "sentence2": "退款多久到账", "category": "related", "label": 0}

The bundled corpus (`data/pairs.jsonl`, written for this project) carries every field, with `label`
a human judgement: 1 = same meaning (the same question, so one answer serves both). A user's workload
file needs only `sentence1` and `sentence2`; other fields are optional and unknown ones are ignored,
so files made for other tools load as is. Every bad row is reported with its file and line number;
nothing is skipped silently except blank lines.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

import msgspec

Category = Literal["paraphrase", "related", "unrelated", "long", "short"]
CATEGORIES: tuple[str, ...] = get_args(Category)

# A sentence must hold at least one non-blank character (msgspec patterns search, not match).
Sentence = Annotated[str, msgspec.Meta(pattern=r"\S")]

_BUNDLED_PACKAGE = "similarity_service"
_BUNDLED_NAME = "pairs.jsonl"


class CorpusFormatError(ValueError):
    """A pairs file that cannot be read: names the file, the line (1-based) and what is wrong."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source
        self.line = line
        self.reason = reason
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")


class CorpusPair(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One labelled pair of the bundled corpus."""

    id: Annotated[str, msgspec.Meta(min_length=1)]
    sentence1: Sentence
    sentence2: Sentence
    category: Category
    label: Literal[0, 1]  # human judgement: 1 = same meaning

    @property
    def pair(self) -> tuple[str, str]:
        """The two sentences, as the engine's `encode` takes them."""
        return (self.sentence1, self.sentence2)


class SentencePair(msgspec.Struct, frozen=True):
    """One pair of a user's workload file: only the two sentences are required."""

    sentence1: Sentence
    sentence2: Sentence
    id: str | None = None
    category: str | None = None
    label: Literal[0, 1] | None = None

    @property
    def pair(self) -> tuple[str, str]:
        """The two sentences, as the engine's `encode` takes them."""
        return (self.sentence1, self.sentence2)


_Row = TypeVar("_Row", CorpusPair, SentencePair)


def bundled_corpus_path() -> str:
    """Where the bundled corpus lives, for messages and for tools that want a path (e.g. `--pairs`)."""
    return str(resources.files(_BUNDLED_PACKAGE) / "data" / _BUNDLED_NAME)


def load_corpus(path: str | Path | None = None) -> list[CorpusPair]:
    """Read a fully labelled corpus: the bundled one by default, or one in the same shape at `path`.

    Raises `CorpusFormatError` for a bad row (naming its line), a repeated id, or an empty file;
    `OSError` if `path` cannot be read.
    """
    if path is None:
        source = bundled_corpus_path()
        data = (resources.files(_BUNDLED_PACKAGE) / "data" / _BUNDLED_NAME).read_bytes()
    else:
        source = str(path)
        data = Path(path).read_bytes()
    rows = _decode_rows(data, source, CorpusPair)
    first_line: dict[str, int] = {}
    for line, row in rows:
        if row.id in first_line:
            raise CorpusFormatError(source, line, f"id {row.id!r} repeats the id on line {first_line[row.id]}")
        first_line[row.id] = line
    return [row for _, row in rows]


def load_pairs_file(path: str | Path) -> list[SentencePair]:
    """Read a user's workload file: JSON Lines with at least `sentence1` and `sentence2` per row.

    Raises `CorpusFormatError` for a bad row (naming its line) or a file with no pairs;
    `OSError` if `path` cannot be read.
    """
    return [row for _, row in _decode_rows(Path(path).read_bytes(), str(path), SentencePair)]


def _decode_rows(data: bytes, source: str, row_type: type[_Row]) -> list[tuple[int, _Row]]:
    decoder = msgspec.json.Decoder(row_type)
    rows: list[tuple[int, _Row]] = []
    for line, raw in _numbered_lines(data, source):
        try:
            rows.append((line, decoder.decode(raw)))
        except msgspec.ValidationError as exc:
            raise CorpusFormatError(source, line, f"invalid pair: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise CorpusFormatError(source, line, f"not a JSON object: {exc}") from exc
    if not rows:
        raise CorpusFormatError(source, None, "holds no pairs (expected one JSON object per line)")
    return rows


def _numbered_lines(data: bytes, source: str) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers; a UTF-8 byte-order mark (Windows editors) is dropped."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            # msgspec would report this as a JSON error; saying "not UTF-8" points at the real fix.
            raise CorpusFormatError(source, number, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        yield number, raw
