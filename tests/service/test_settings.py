"""Settings: precedence (flag > environment > profile > default), clear errors, the CLI and the docs table."""

from __future__ import annotations

import argparse
import gc
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from similarity_service.cli import main
from similarity_service.commands import serve
from similarity_service.profile import Profile, write_profile
from similarity_service.settings import Settings, SettingsError, load_settings, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    profile = Profile(
        device="cuda",
        gpu_product="NVIDIA-H100-80GB-HBM3",
        device_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        memory_gib=80.0,
        precision="fp16",
        max_batch_size=256,  # not the default, so the profile's value is seen
        max_wait_ms=4.0,
        throughput=20_000.0,
        p50_ms=3.0,
        p99_ms=12.0,
        slo_p99_ms=50.0,
        model_id="iic/x",
        fingerprint="abc",
        trials=30,
        tuned_at="2026-11-25T12:00:00Z",
        structsim_version="0.1.0",
    )
    path = tmp_path / "profile.json"
    write_profile(profile, path)
    return path


def parse(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    serve.configure(parser)
    return vars(parser.parse_args(argv))


def test_defaults() -> None:
    assert load_settings({}, {}) == Settings()


def test_flag_beats_environment_beats_profile_beats_default(profile_file: Path) -> None:
    env = {"STRUCTSIM_PROFILE": str(profile_file), "STRUCTSIM_MAX_BATCH_SIZE": "64", "STRUCTSIM_MAX_WAIT_MS": "2.5"}
    settings = load_settings(parse("--max-wait-ms", "1"), env)
    assert settings.precision == "fp16"  # profile
    assert settings.max_batch_size == 64  # environment over profile
    assert settings.max_wait_ms == 1.0  # flag over environment and profile
    assert settings.max_queue_pairs == 4096  # default
    assert settings.profile == str(profile_file)
    assert load_settings(parse("--profile", str(profile_file)), {}).max_batch_size == 256


def test_a_profile_sets_only_the_tuned_knobs(profile_file: Path) -> None:
    settings = load_settings({"profile": str(profile_file)}, {})
    assert (settings.precision, settings.max_batch_size, settings.max_wait_ms) == ("fp16", 256, 4.0)
    assert settings.model == Settings().model and settings.device == "auto"


def test_environment_values_are_parsed_and_empty_ones_ignored() -> None:
    env = {
        "STRUCTSIM_OFFLINE": "true",
        "STRUCTSIM_MAX_BATCH_TOKENS": "8192",
        "STRUCTSIM_REVISION": "",
        "STRUCTSIM_PORT": "8080",
    }
    settings = load_settings({}, env)
    assert (settings.offline, settings.max_batch_tokens, settings.revision, settings.port) == (True, 8192, None, 8080)


@pytest.mark.parametrize(
    ("cli", "env", "names"),
    [
        ({}, {"STRUCTSIM_MAX_BATCH_SIZE": "lots"}, "STRUCTSIM_MAX_BATCH_SIZE"),
        ({"max_batch_size": "0"}, {}, "--max-batch-size"),
        ({"precision": "fp8"}, {}, "--precision"),
        ({"device": "gpu"}, {}, "--device"),
        ({}, {"STRUCTSIM_OFFLINE": "maybe"}, "STRUCTSIM_OFFLINE"),
        ({"max_queue_pairs": "8"}, {}, "max_pairs_per_request"),
        ({"profile": "/nonexistent/profile.json"}, {}, "/nonexistent/profile.json"),
        ({"exact_thresholds": "0.5,1"}, {}, "--exact-thresholds"),
        ({}, {"STRUCTSIM_EXACT_THRESHOLDS": "half"}, "STRUCTSIM_EXACT_THRESHOLDS"),
    ],
)
def test_errors_name_their_source(cli: dict[str, object], env: dict[str, str], names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        load_settings(cli, env)


def test_exact_thresholds_are_read_as_numbers() -> None:
    assert load_settings(parse("--exact-thresholds", "0.5,.85"), {}).exact_threshold_values == (0.5, 0.85)
    assert load_settings({}, {}).exact_threshold_values == ()


def test_a_profile_that_is_not_a_profile(tmp_path: Path) -> None:
    bad = tmp_path / "profile.json"
    bad.write_text('{"precision": "fp16"}')
    with pytest.raises(SettingsError, match="not a valid structsim profile"):
        load_settings({"profile": str(bad)}, {})


def test_every_setting_has_a_flag_and_unset_flags_stay_unset() -> None:
    assert parse() == {}
    given = parse("--model", "/m", "--offline", "--max-batch-tokens", "4096", "--log-level", "debug")
    assert given == {"model": "/m", "offline": True, "max_batch_tokens": "4096", "log_level": "debug"}
    assert parse("--no-offline") == {"offline": False}
    with pytest.raises(SystemExit):
        parse("--log-level", "loud")  # choices come from the type


def test_serve_refuses_bad_settings_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size" in capsys.readouterr().err


@pytest.fixture
def keep_switch_interval() -> Iterator[None]:
    """`structsim serve` shortens the GIL switch interval for its process; give the test process its own back."""
    interval = sys.getswitchinterval()
    yield
    sys.setswitchinterval(interval)


@pytest.mark.usefixtures("keep_switch_interval")
def test_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    missing = tmp_path / "no-model-here"
    argv = [
        "serve",
        "--model",
        str(missing),
        "--offline",
        "--device",
        "cpu",
        "--port",
        str(port),
        "--log-level",
        "critical",
    ]
    assert main(argv) == 1


def test_settling_the_heap_freezes_it_and_raises_the_young_threshold() -> None:
    threshold = gc.get_threshold()
    try:
        serve.settle_heap()
        assert gc.get_freeze_count() > 10_000  # the test process's modules, at least
        assert gc.get_threshold() == (serve.GC_GEN0_THRESHOLD, *threshold[1:])
    finally:  # give the test process its collector back
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_docs_list_every_setting_as_the_struct_says() -> None:
    text = DOCS.read_text()
    start = text.index("<!-- settings table: start -->\n") + len("<!-- settings table: start -->\n")
    end = text.index("<!-- settings table: end -->")
    assert text[start:end] == markdown_table(), "docs/configuration.md is stale: python -m similarity_service.settings"
