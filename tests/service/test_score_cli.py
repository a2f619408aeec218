"""`structsim score`: through the installed console script (subprocess) and in-process (cli.main)."""

from __future__ import annotations

import csv
import gc
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from similarity_service.cli import main
from similarity_service.commands.score import PROGRESS_MIN_PAIRS, progress_setting
from similarity_service.commands.serve import GC_GEN0_THRESHOLD
from similarity_service.corpus import bundled_corpus_path
from similarity_service.runner import Engine


@pytest.fixture(autouse=True)
def _collector_given_back() -> Iterator[None]:
    """`score` settles the heap of the process it runs in; in-process runs must give the test process its collector back."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def _structsim() -> str:
    """The console script installed beside this interpreter (what `pip install` puts on PATH)."""
    script = Path(sys.executable).parent / "structsim"
    return str(script) if script.exists() else shutil.which("structsim") or pytest.fail("structsim is not installed")


def _jsonl(pairs: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"sentence1": a, "sentence2": b}, ensure_ascii=False) + "\n" for a, b in pairs)


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_structsim(), "score", *args], input=stdin, capture_output=True, text=True, timeout=120, env={**os.environ}
    )


def test_console_script_scores_a_jsonl_file_in_order(
    tmp_path: Path, tiny_model_dir: Path, tiny_engine: Engine, chinese_pairs: list[tuple[str, str]]
) -> None:
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(_jsonl(chinese_pairs), encoding="utf-8")
    result = _run("--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "7", str(pairs_file))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["sentence1"], row["sentence2"]) for row in rows] == chinese_pairs
    scores = [row["similarity"] for row in rows]
    assert all(0.0 <= score <= 1.0 for score in scores)
    # Other sub-batches (--batch-size 7) pad differently: equal up to fp32 rounding.
    assert scores == pytest.approx(tiny_engine.score(chinese_pairs), abs=1e-5)
    assert f"{len(chinese_pairs)} pairs in" in result.stderr
    assert "fp32 on cpu" in result.stderr


def test_console_script_reads_stdin_and_writes_csv(tiny_model_dir: Path, tiny_engine: Engine) -> None:
    pairs = [("今天天气怎么样", "今天会下雨吗"), ("我要退货", "怎么申请退款"), ("猫", "狗")]
    result = _run("--model", str(tiny_model_dir), "--device", "cpu", "--format", "csv", stdin=_jsonl(pairs))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(row["sentence1"], row["sentence2"]) for row in rows] == pairs
    assert [float(row["similarity"]) for row in rows] == pytest.approx(tiny_engine.score(pairs), abs=1e-6)
    assert "pair/s" not in result.stderr  # no progress bar by default on a short input: the summary line only
    assert result.stderr.count("\n") == 1


def test_console_script_shows_a_progress_bar_when_asked(tmp_path: Path, tiny_model_dir: Path) -> None:
    pairs_file = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in Path(bundled_corpus_path()).read_text(encoding="utf-8").splitlines()[:300]]
    pairs_file.write_text(_jsonl([(row["sentence1"], row["sentence2"]) for row in rows]), encoding="utf-8")
    common = ("--model", str(tiny_model_dir), "--device", "cpu", "--max-seq-len", "64", str(pairs_file))
    result = _run("--progress", *common)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 300
    assert "300/300" in result.stderr and "pair/s" in result.stderr


def test_progress_bar_by_default_only_for_long_inputs() -> None:
    assert progress_setting(None, PROGRESS_MIN_PAIRS) is None  # tqdm then shows it on a terminal only
    assert progress_setting(None, PROGRESS_MIN_PAIRS - 1) is False
    assert progress_setting(True, 1) is True
    assert progress_setting(False, 10**6) is False


def test_csv_and_tsv_keep_extra_columns_and_multiline_fields(
    tmp_path: Path, tiny_model_dir: Path, tiny_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = [("多行\n句子", "第二句"), ("你好", "再见")]
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('id,sentence1,sentence2\nA,"多行\n句子",第二句\nB,你好,再见\n', encoding="utf-8")
    tsv_file = tmp_path / "pairs.tsv"
    tsv_file.write_text("sentence1\tsentence2\tid\n多行 句子\t第二句\tA\n你好\t再见\tB\n", encoding="utf-8")
    expected = tiny_engine.score(pairs)

    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", str(csv_file)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["id"] for row in rows] == ["A", "B"]
    assert [row["sentence1"] for row in rows] == ["多行\n句子", "你好"]
    assert [row["similarity"] for row in rows] == pytest.approx(expected, abs=1e-6)

    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", "--format", "csv", str(tsv_file)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0]) == ["sentence1", "sentence2", "id", "similarity"]
    assert [row["id"] for row in rows] == ["A", "B"]


def test_output_file(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(_jsonl([("你好", "您好")]) + "\n\n", encoding="utf-8")  # blank lines are not pairs
    target = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", "-o", str(target), str(source)]) == 0
    assert capsys.readouterr().out == ""
    assert len(target.read_text(encoding="utf-8").splitlines()) == 1


def test_scoring_runs_on_a_settled_heap(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the input's rows and the model are frozen before scoring, so full collections do not scan them again
    source = tmp_path / "in.jsonl"
    source.write_text(_jsonl([("你好", "您好")]), encoding="utf-8")
    assert gc.get_freeze_count() == 0
    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", str(source)]) == 0
    assert gc.get_freeze_count() > 10_000  # torch and the model, at least
    assert gc.get_threshold()[0] == GC_GEN0_THRESHOLD
    assert json.loads(capsys.readouterr().out)["similarity"] > 0


def test_bad_rows_are_all_reported_with_line_numbers_and_nothing_is_scored(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(
        "\n".join(
            [
                '{"sentence1": "好", "sentence2": "行"}',
                "",
                '{"sentence1": "缺第二句"}',
                "[1, 2]",
                '{"sentence1": 3, "sentence2": "数字"}',
                "not json",
                '{"sentence1": "  ", "sentence2": "空白"}',
            ]
        ),
        encoding="utf-8",
    )
    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", str(source)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{source}: 5 bad row(s), nothing scored:" in captured.err
    for expected in (
        "line 3: missing 'sentence2'",
        "line 4: expected a JSON object, got list",
        "line 5: 'sentence1' must be a string, got int",
        "line 6: not valid JSON",
        "line 7: 'sentence1' is empty",
    ):
        assert expected in captured.err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("no-header.csv", "a,b\n你好,再见\n", "line 1: the header lacks column(s) sentence1, sentence2 (it has: a, b)"),
        (
            "ragged.csv",
            "sentence1,sentence2\n你好,再见\n只有一列\n",
            "line 3: expected 2 fields as in the header, found 1",
        ),
        ("empty.jsonl", "\n\n", "no pairs to score"),
        ("pairs.txt", "x", "cannot tell the format from the extension; pass --input-format"),
    ],
)
def test_bad_files(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str], name: str, content: str, message: str
) -> None:
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    assert main(["score", "--model", str(tiny_model_dir), str(source)]) == 2
    assert message in capsys.readouterr().err


def test_non_utf8_input_names_the_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "gbk.jsonl"
    source.write_bytes(_jsonl([("好", "行")]).encode() + '{"sentence1": "你好", "sentence2": "再见"}\n'.encode("gbk"))
    assert main(["score", "--model", str(tiny_model_dir), str(source)]) == 2
    assert f"{source}, line 2: not UTF-8 text" in capsys.readouterr().err


def test_input_format_flag_overrides_the_extension(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "pairs.txt"
    source.write_text("sentence1\tsentence2\n你好\t再见\n", encoding="utf-8")
    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", "--input-format", "tsv", str(source)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_missing_model_exits_1_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(_jsonl([("你好", "您好")]), encoding="utf-8")
    assert main(["score", "--model", str(tmp_path / "nowhere"), str(source)]) == 1
    assert f"model directory {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_unsupported_precision_exits_2(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(_jsonl([("你好", "您好")]), encoding="utf-8")
    assert main(["score", "--model", str(tiny_model_dir), "--device", "cpu", "--precision", "fp16", str(source)]) == 2
    assert "precision fp16 is not available on the CPU" in capsys.readouterr().err


def test_missing_input_file(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--model", str(tiny_model_dir), str(tmp_path / "absent.jsonl")]) == 2
    assert f"cannot read {tmp_path / 'absent.jsonl'}: No such file or directory" in capsys.readouterr().err


def test_exact_thresholds_flag(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps({"sentence1": "你好", "sentence2": "您好"}, ensure_ascii=False) + "\n")
    args = ["score", "--model", str(tiny_model_dir), "--device", "cpu", str(source)]
    assert main([*args, "--exact-thresholds", "0.5,0.9"]) == 0  # fp32 on the CPU: accepted, nothing to rescore
    assert json.loads(capsys.readouterr().out)["similarity"] > 0
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--exact-thresholds", "0.5,1.5"])
    assert exit_info.value.code == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
