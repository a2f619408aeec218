"""`structsim score [FILE|-]`: score sentence pairs from a JSONL, CSV or TSV file (or stdin).

Input: JSON Lines with `sentence1` and `sentence2` in each object, or CSV/TSV with a header naming
those two columns (other fields and columns are kept). Output, in input order, one row per pair:
the input row plus `similarity` = P(similar) in [0, 1], as JSON Lines or CSV, to stdout or --output.
Every row is checked before any scoring: bad rows are all reported with their line numbers and the
command exits 2 without scoring, so nothing is dropped silently.

Exit status: 0 scored; 1 the model could not be loaded or run; 2 bad input or flags.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

FORMATS_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
}
REQUIRED = ("sentence1", "sentence2")
SCORE_FIELD = "similarity"
PROGRESS_MIN_PAIRS = 1000  # shorter inputs finish before a progress bar would tell anything
MAX_REPORTED_ERRORS = 20


class InputError(ValueError):
    """Input that cannot be scored; the message lists every bad row (up to a limit) by line number."""


@dataclass
class Rows:
    """The parsed input: each row's fields (all kept for the output) and the pairs to score."""

    records: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)


def configure(parser: argparse.ArgumentParser) -> None:
    from similarity_service.settings import DEFAULT_MODEL  # a constant; no heavy imports here

    parser.add_argument("input", nargs="?", default="-", metavar="FILE", help="pairs file; - or nothing: stdin")
    parser.add_argument(
        "--input-format",
        choices=("jsonl", "csv", "tsv"),
        help="input format; default: from the file's extension (.jsonl/.csv/.tsv), jsonl for stdin",
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("STRUCTSIM_MODEL", DEFAULT_MODEL),
        help="ModelScope hub id or local model directory [env STRUCTSIM_MODEL; default %(default)s]",
    )
    parser.add_argument("--revision", help="hub revision (tag or commit); ignored for a local directory")
    parser.add_argument("--cache-dir", help="directory for downloaded models (default: ModelScope's cache)")
    parser.add_argument("--offline", action="store_true", help="never contact the hub: use the cache or a local dir")
    parser.add_argument(
        "--precision", default="auto", help="auto, fp32, tf32, fp16 or bf16 (GPU modes need a GPU that has them)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, help="pairs per forward pass (default: the engine's)")
    parser.add_argument(
        "--max-seq-len", type=positive_int, default=512, help="tokens per pair, truncated longest-first"
    )
    parser.add_argument(
        "--exact-thresholds",
        type=thresholds,
        default=(),
        metavar="T[,T...]",
        help="decision thresholds at which fp16/bf16/tf32 decide as fp32: pairs scored near one are scored "
        "again by an fp32 copy of the model",
    )
    parser.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default jsonl)")
    parser.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"progress bar on stderr (default: for {PROGRESS_MIN_PAIRS}+ pairs when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        rows = read_rows(args.input, args.input_format)
    except InputError as exc:
        print(f"structsim score: {exc}", file=sys.stderr)
        return 2

    from similarity_service.commands.serve import settle_heap
    from similarity_service.model import ModelLoadError
    from similarity_service.precision import DeviceError, PrecisionError
    from similarity_service.runner import Engine, EngineOOMError

    try:
        engine = Engine.load(
            args.model,
            revision=args.revision,
            cache_dir=args.cache_dir,
            offline=args.offline,
            precision=args.precision,
            device=args.device,
            max_seq_len=args.max_seq_len,
            max_batch_size=args.batch_size,
            exact_thresholds=args.exact_thresholds,
        )
    except (PrecisionError, DeviceError, ValueError) as exc:
        print(f"structsim score: {exc}", file=sys.stderr)
        return 2
    except ModelLoadError as exc:
        print(f"structsim score: {exc}", file=sys.stderr)
        return 1

    # The input's rows and the model live to the end: frozen, as serve freezes its heap once warm, they are
    # not scanned again by every full collection while scoring (each one took ~0.2 s with the tiny model).
    settle_heap()
    started = time.perf_counter()
    try:
        with _open_output(args.output) as out:
            _score_and_write(engine, rows, out, args.format, progress_setting(args.progress, len(rows.pairs)))
    except EngineOOMError as exc:
        print(f"structsim score: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"structsim score: cannot write {args.output or 'stdout'}: {exc}", file=sys.stderr)
        return 1
    info = engine.info
    print(
        f"structsim score: {len(rows.pairs)} pairs in {time.perf_counter() - started:.2f} s "
        f"({info.model_id}, {info.precision} on {info.device})",
        file=sys.stderr,
    )
    return 0


def read_rows(source: str, input_format: str | None) -> Rows:
    """Parse and check every row of `source` (a path or "-" for stdin); InputError lists the bad ones."""
    name = "stdin" if source == "-" else source
    if input_format is None:
        input_format = "jsonl" if source == "-" else FORMATS_BY_SUFFIX.get(Path(source).suffix.lower())
        if input_format is None:
            raise InputError(f"{name}: cannot tell the format from the extension; pass --input-format jsonl|csv|tsv")
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{name}, line {line}: not UTF-8 text ({exc.reason})") from exc

    rows, errors = Rows(), []
    records = _jsonl_records(text) if input_format == "jsonl" else _delimited_records(text, input_format)
    for line, record in records:
        problem = record if isinstance(record, str) else _check(record)
        if problem:
            errors.append(f"line {line}: {problem}")
            continue
        assert isinstance(record, dict)
        rows.records.append(record)
        rows.pairs.append((record["sentence1"], record["sentence2"]))
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise InputError(f"{name}: {len(errors)} bad row(s), nothing scored:\n  " + "\n  ".join(shown) + more)
    if not rows.pairs:
        raise InputError(f"{name}: no pairs to score")
    return rows


def _jsonl_records(text: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, object or problem) per non-blank line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            yield number, f"not valid JSON ({exc})"
            continue
        yield number, record if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"


def _delimited_records(text: str, input_format: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row or problem) per CSV/TSV record after the header (quoted fields may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if input_format == "tsv" else ",")
    try:
        header = next(reader, None)
    except csv.Error as exc:
        yield 1, f"unreadable header ({exc})"
        return
    if header is None:
        return
    missing = [column for column in REQUIRED if column not in header]
    if missing:
        yield 1, f"the header lacks column(s) {', '.join(missing)} (it has: {', '.join(header) or 'nothing'})"
        return
    start = reader.line_num + 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, f"unreadable row ({exc})"
            return
        if values and any(value.strip() for value in values):
            if len(values) != len(header):
                yield start, f"expected {len(header)} fields as in the header, found {len(values)}"
            else:
                yield start, dict(zip(header, values, strict=True))
        start = reader.line_num + 1


def _check(record: dict[str, Any]) -> str | None:
    for key in REQUIRED:
        if key not in record:
            return f"missing {key!r}"
        value = record[key]
        if not isinstance(value, str):
            return f"{key!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"{key!r} is empty"
    return None


def _score_and_write(engine: Any, rows: Rows, out: TextIO, output_format: str, progress: bool | None) -> None:
    from tqdm import tqdm

    writer = _writer(out, output_format, rows.records)
    # Pairs per engine call: the progress bar's step (~0.5 s on a fast GPU, seconds on a CPU). On a GPU each
    # call starts its tokenizing ramp and drains the device again (runner.score_chunks): small calls would
    # leave the device idle.
    chunk = 16_384 if engine.info.device.startswith("cuda") else 1_024
    # disable=None lets tqdm decide: a bar only when stderr is a terminal.
    with tqdm(
        total=len(rows.pairs), unit="pair", file=sys.stderr, disable=None if progress is None else not progress
    ) as bar:
        for start in range(0, len(rows.pairs), chunk):
            scores = engine.score(rows.pairs[start : start + chunk])
            for record, score in zip(rows.records[start : start + chunk], scores, strict=True):
                writer({**record, SCORE_FIELD: score})
            bar.update(len(scores))


def _writer(out: TextIO, output_format: str, records: list[dict[str, Any]]) -> Any:
    if output_format == "jsonl":
        return lambda record: out.write(json.dumps(record, ensure_ascii=False) + "\n")
    columns = list(dict.fromkeys(key for record in records for key in record if key != SCORE_FIELD))
    csv_writer = csv.DictWriter(out, fieldnames=[*columns, SCORE_FIELD], lineterminator="\n")
    csv_writer.writeheader()

    def write(record: dict[str, Any]) -> None:
        csv_writer.writerow(
            {
                key: value if isinstance(value, str | int | float) else json.dumps(value, ensure_ascii=False)
                for key, value in record.items()
            }
        )

    return write


def progress_setting(flag: bool | None, count: int) -> bool | None:
    """True/False as asked; by default None (tqdm: only on a terminal) for long inputs, False for short ones."""
    if flag is not None:
        return flag
    return None if count >= PROGRESS_MIN_PAIRS else False


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[TextIO]:
    """stdout, or a file opened for writing (UTF-8)."""
    if path is None:
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8", newline="") as handle:
        yield handle


def thresholds(value: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers strictly between 0 and 1."""
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by commas, got {value!r}") from None
    if not all(0 < number < 1 for number in numbers):
        raise argparse.ArgumentTypeError(f"each threshold must lie strictly between 0 and 1, got {value!r}")
    return numbers


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number
