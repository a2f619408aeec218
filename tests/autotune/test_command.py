"""`structsim autotune` end to end on the tiny model: profile, resume, no feasible config, bad input."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from similarity_service.commands import serve
from similarity_service.profile import read_profile
from similarity_service.settings import Settings, load_settings

Autotune = Callable[..., int]  # the `autotune` fixture (tests/autotune/conftest.py)


def _study(storage: Path) -> optuna.Study:
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{storage}")
    return optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{storage}")


def test_small_study_writes_a_profile_that_serve_accepts(autotune: Autotune, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    termination_log = tmp_path / "termination-log"
    plot = tmp_path / "trials.png"
    code = autotune("--max-batch-size", "8", trials=3, termination_log=termination_log, plot=plot)

    assert code == 0
    profile = read_profile(tmp_path / "profile.json")  # validates the schema
    assert profile.device == "cpu" and profile.gpu_product is None
    assert profile.precision == "fp32"
    assert profile.max_batch_size == 8  # pinned
    assert 0 <= profile.max_wait_ms <= 20
    assert profile.throughput > 0 and 0 < profile.p50_ms <= profile.p99_ms <= profile.slo_p99_ms
    assert profile.trials == 3
    assert [a.precision for a in profile.accuracy] == ["fp32"]
    assert profile.accuracy[0].admissible and profile.accuracy[0].max_abs_error == 0.0
    # The termination message is the same profile, compact (the pod status keeps 4 KiB).
    assert read_profile(termination_log) == profile
    assert len(termination_log.read_bytes()) < 4096
    assert plot.read_bytes().startswith(b"\x89PNG")

    # `structsim serve --profile FILE` accepts it: serve's own flags, then its settings loader.
    serve_flags = argparse.ArgumentParser()
    serve.configure(serve_flags)
    settings = load_settings(vars(serve_flags.parse_args(["--profile", str(tmp_path / "profile.json")])), {})
    assert (settings.precision, settings.max_batch_size, settings.max_wait_ms) == (
        profile.precision,
        profile.max_batch_size,
        profile.max_wait_ms,
    )

    out = capsys.readouterr()
    assert "max_batch_size" in out.out and "pairs/s" in out.out  # the table of the best configs
    assert "trial 0:" in out.err and "trial 2:" in out.err  # one line per trial


def test_rerun_resumes_the_study_with_the_default_as_trial_0(autotune: Autotune, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert autotune(trials=2, max_batch_size=4) == 0
    assert autotune(trials=2, max_batch_size=4) == 0

    study = _study(tmp_path / "study.db")
    assert len(study.trials) == 4
    default = Settings()
    expected = {"precision": "fp32", "max_batch_size": 4, "max_wait_ms": default.max_wait_ms}  # batch pinned to 4
    assert study.trials[0].params == expected
    assert sum(t.params == expected for t in study.trials) == 1  # not enqueued again on resume
    assert "resuming after 2 trials" in capsys.readouterr().err
    # The accuracy guard ran once and its result lives in the study.
    assert set(study.user_attrs) == {"accuracy:fp32"}
    assert read_profile(tmp_path / "profile.json").trials == 4


def test_the_default_config_is_trial_0_when_nothing_is_pinned(autotune: Autotune, tmp_path: Path) -> None:
    # One trial only: the default batch of 32 would be slow to probe many times on a CPU.
    assert autotune(trials=1) == 0
    (trial,) = _study(tmp_path / "study.db").trials
    default = Settings()
    assert trial.params == {"precision": "fp32", "max_batch_size": default.max_batch_size, "max_wait_ms": default.max_wait_ms}


def test_an_impossible_slo_is_no_feasible_config(autotune: Autotune, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    termination_log = tmp_path / "termination-log"
    code = autotune(trials=2, max_batch_size=4, p99_ms="0.001", termination_log=termination_log)

    assert code == 3
    err = capsys.readouterr().err
    assert "no feasible config in 2 trials" in err and "SLO of 0.001 ms" in err
    assert "no feasible config" in termination_log.read_text()
    assert not (tmp_path / "profile.json").exists()


def test_exact_thresholds_tune_a_study_of_their_own(autotune: Autotune, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert autotune(trials=1, max_batch_size=4) == 0
    assert "exact thresholds" not in capsys.readouterr().err
    assert autotune(trials=1, max_batch_size=4, exact_thresholds="0.5,0.8") == 0
    err = capsys.readouterr().err
    assert "exact thresholds: 0.5, 0.8" in err and "resuming" not in err  # not the study tuned without them
    assert len(optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'study.db'}")) == 2


def test_bad_exact_thresholds_are_a_usage_error(autotune: Autotune, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert autotune(trials=1, exact_thresholds="0.5,1.5") == 2
    assert "--exact-thresholds" in capsys.readouterr().err
    monkeypatch.setenv("STRUCTSIM_EXACT_THRESHOLDS", "half")
    assert autotune(trials=1) == 2
    assert "STRUCTSIM_EXACT_THRESHOLDS='half'" in capsys.readouterr().err


def test_a_precision_the_device_cannot_run_is_a_usage_error(autotune: Autotune, capsys: pytest.CaptureFixture[str]) -> None:
    assert autotune(trials=1, precision="fp16") == 2
    assert "fp16 is not available on the CPU" in capsys.readouterr().err


def test_a_missing_model_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from similarity_service.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["autotune", "--model", str(missing), "--device", "cpu", "--storage", str(tmp_path / "s.db")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_a_bad_workload_file_is_a_usage_error(autotune: Autotune, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence1": "你好"}\n', encoding="utf-8")
    assert autotune(trials=1, workload=bad) == 2
    assert f"{bad}:1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--p99-ms", "0"], ["--threshold", "1.5"], ["--trials", "0"], ["--max-batch-size", "0"]])
def test_out_of_range_flags_exit_2(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from similarity_service.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["autotune", *flag])
    assert exc.value.code == 2
    assert "outside" in capsys.readouterr().err
