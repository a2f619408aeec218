"""Study storage, names, and the serving settings (and engines) a session shares with `structsim serve`."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage

from similarity_autotune.accuracy import AccuracyGuard
from similarity_autotune.hardware import Hardware
from similarity_autotune.session import TuneInputError, TuneOptions, engine_loader, service_settings
from similarity_autotune.space import SearchSpace
from similarity_autotune.study import open_storage, open_study, study_name

H100 = Hardware(device="cuda", name="NVIDIA H100 80GB HBM3", compute_capability="9.0", memory_gib=79.6)


def _name(**changes: object) -> str:
    values: dict[str, object] = {
        "fingerprint": "0123456789abcdef0123",
        "max_seq_len": 512,
        "slo_p99_ms": 50.0,
        "space": SearchSpace(precisions=("fp32", "fp16")),
        "guard": AccuracyGuard(max_abs_error=0.003, threshold=0.7),
        "workload_digest": "w1",
    }
    values.update(changes)
    return study_name(H100, **values)  # type: ignore[arg-type]


def test_the_study_name_says_what_its_results_are_valid_for() -> None:
    name = _name()
    assert name.startswith("structsim-NVIDIA-H100-80GB-HBM3-0123456789abcdef-len512-p99-50ms-")
    assert _name() == name  # same inputs, same study: a rerun resumes
    for change in (
        {"slo_p99_ms": 20.0},
        {"max_seq_len": 128},
        {"fingerprint": "ffff456789abcdef0123"},
        {"space": SearchSpace(precisions=("fp16",))},  # e.g. --precision fp16
        {"guard": AccuracyGuard(max_abs_error=0.01, threshold=0.7)},
        {"workload_digest": "w2"},
    ):
        assert _name(**change) != name, change


def test_exact_thresholds_name_a_new_study_and_their_absence_keeps_the_old_name() -> None:
    # The name from before exact thresholds existed: studies tuned without them still resume.
    old = "structsim-NVIDIA-H100-80GB-HBM3-0123456789abcdef-len512-p99-50ms-cadb999d"
    assert _name() == _name(exact_thresholds=()) == old
    exact = _name(exact_thresholds=(0.5, 0.8))
    assert exact != old and exact.startswith(old[: -len("cadb999d")])
    assert _name(exact_thresholds=(0.8, 0.5)) == exact  # the same thresholds, another order: the same question
    assert _name(exact_thresholds=(0.5,)) != exact


@pytest.mark.parametrize(
    ("where", "kind"),
    [("study.db", RDBStorage), ("nested/dir/study.sqlite", RDBStorage), ("study.journal", JournalStorage)],
)
def test_storage_is_sqlite_for_db_files_and_a_journal_otherwise(tmp_path: Path, where: str, kind: type) -> None:
    storage = open_storage(str(tmp_path / where))
    assert isinstance(storage, kind)
    # Both kinds resume: a second open sees the first one's trials.
    study = open_study(storage, "s", seed=1)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = open_study(open_storage(str(tmp_path / where)), "s", seed=1)
    assert len(again.trials) == 2
    assert isinstance(again.sampler, optuna.samplers.TPESampler)


def test_an_rdb_url_is_used_as_given(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'by-url.db'}")
    assert isinstance(storage, RDBStorage) and (tmp_path / "by-url.db").exists()


def test_serving_settings_come_from_flags_then_structsim_variables() -> None:
    env = {
        "STRUCTSIM_CACHE_DIR": "/models",
        "STRUCTSIM_MAX_SEQ_LEN": "128",
        "STRUCTSIM_MAX_QUEUE_PAIRS": "512",
        "STRUCTSIM_PORT": "not-a-port",  # not a setting autotune uses: ignored
    }
    settings = service_settings(TuneOptions(model="/m", max_seq_len=64), env)
    assert (settings.model, settings.cache_dir, settings.max_seq_len, settings.max_queue_pairs) == ("/m", "/models", 64, 512)
    with pytest.raises(TuneInputError, match="STRUCTSIM_MAX_SEQ_LEN"):
        service_settings(TuneOptions(), {"STRUCTSIM_MAX_SEQ_LEN": "many"})


def test_exact_thresholds_come_from_the_flag_then_the_structsim_variable() -> None:
    env = {"STRUCTSIM_EXACT_THRESHOLDS": "0.5,0.8"}
    assert service_settings(TuneOptions(), {}).exact_threshold_values == ()
    assert service_settings(TuneOptions(), env).exact_threshold_values == (0.5, 0.8)
    assert service_settings(TuneOptions(exact_thresholds=".7"), env).exact_threshold_values == (0.7,)
    with pytest.raises(TuneInputError, match="--exact-thresholds"):
        service_settings(TuneOptions(exact_thresholds="0.5,1.5"), {})
    with pytest.raises(TuneInputError, match="STRUCTSIM_EXACT_THRESHOLDS"):
        service_settings(TuneOptions(), {"STRUCTSIM_EXACT_THRESHOLDS": "half"})


def test_engines_load_with_the_exact_thresholds_serve_would_use(tiny_model_dir: Path) -> None:
    options = TuneOptions(model=str(tiny_model_dir), device="cpu", max_seq_len=64)
    progress = io.StringIO()
    load = engine_loader(service_settings(options, {"STRUCTSIM_EXACT_THRESHOLDS": "0.5,0.8"}), progress)
    assert load("fp32").exact_thresholds == (0.5, 0.8)  # recorded; in fp32 there is nothing to rescore
    assert engine_loader(service_settings(options, {}), progress)("fp32").exact_thresholds == ()
