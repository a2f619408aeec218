"""The CRD against the examples users apply, and `structsim operator`'s command line."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kopf
import pytest
import yaml

from crd_schema import ROOT, crd_jsonschema, load_crd, openapi_schema
from similarity_operator import command
from similarity_operator.spec import parse_spec

EXAMPLES = sorted(
    path
    for path in (ROOT / "examples").glob("*.yaml")
    if any(doc and doc.get("kind") == "SimilarityService" for doc in yaml.safe_load_all(path.read_text()))
)


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2, "examples/ should hold SimilarityService examples"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_and_the_operator(path: Path) -> None:
    validator = jsonschema.Draft4Validator(crd_jsonschema(openapi_schema(load_crd()), strict=True))
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "SimilarityService":
            validator.validate({k: v for k, v in doc.items() if k != "metadata"})
            parse_spec(doc["spec"])  # and the operator's own checks


def test_a_typo_in_a_resource_is_caught_by_the_schema() -> None:
    validator = jsonschema.Draft4Validator(crd_jsonschema(openapi_schema(load_crd()), strict=True))
    bad = {"spec": {"model": {"id": "x"}, "image": "i", "autotune": {"trails": 10}, "port": 70000}}
    messages = sorted(error.message for error in validator.iter_errors(bad))
    assert messages == [
        "70000 is greater than the maximum of 65535",
        "Additional properties are not allowed ('trails' was unexpected)",
    ]


def test_printer_columns_point_at_status_fields() -> None:
    version = load_crd()["spec"]["versions"][0]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Precision", "Throughput", "P99-ms", "Age"]
    for name, path in columns.items():
        if path.startswith(".status."):
            assert path.removeprefix(".status.") in status, name


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.configure(parser)
    return parser.parse_args(list(argv))


def test_flags_and_environment_make_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = command.settings_from(parse())
    assert (defaults.resync_interval_s, defaults.tune_backoff_s, defaults.api_server) == (15.0, 60.0, None)
    monkeypatch.setenv("STRUCTSIM_OPERATOR_RESYNC_INTERVAL", "30")
    monkeypatch.setenv("STRUCTSIM_OPERATOR_API_SERVER", "http://127.0.0.1:8001")
    settings = command.settings_from(
        parse("--tune-backoff", "5", "--tune-backoff-max", "50", "--tune-priority-class", "structsim-autotune")
    )
    assert settings.tune_priority_class == "structsim-autotune" and defaults.tune_priority_class is None
    assert (settings.resync_interval_s, settings.tune_backoff_s, settings.tune_backoff_max_s) == (30.0, 5.0, 50.0)
    assert settings.api_server == "http://127.0.0.1:8001"
    assert command.settings_from(parse("--resync-interval", "2")).resync_interval_s == 2.0  # a flag beats the env
    with pytest.raises(SystemExit):
        parse("--namespace", "a", "--all-namespaces")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), {"clusterwide": True, "namespaces": [], "liveness_endpoint": "http://0.0.0.0:8080/healthz"}),
        (
            ("-n", "team-a", "--namespace", "team-b", "--liveness-port", "9090"),
            {
                "clusterwide": False,
                "namespaces": ["team-a", "team-b"],
                "liveness_endpoint": "http://0.0.0.0:9090/healthz",
            },
        ),
        (("--liveness-port", "0"), {"clusterwide": True, "namespaces": [], "liveness_endpoint": None}),
    ],
)
def test_run_starts_one_standalone_kopf(
    argv: tuple[str, ...], expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **kwargs: None)
    assert command.run(parse(*argv, "--log-level", "warning")) == 0
    (kwargs,) = calls
    assert kwargs["standalone"] is True  # one replica, no peering
    assert {key: kwargs[key] for key in expected} == expected
    assert isinstance(kwargs["registry"], kopf.OperatorRegistry)


def test_the_cli_loads_neither_kopf_nor_torch_for_help() -> None:
    code = (
        "import sys; from similarity_service.cli import main\n"
        "try:\n    main(['operator', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'kopf', 'torch', 'similarity_service.profile'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "--resync-interval" in out and out.strip().endswith("[]")


def test_the_operator_never_imports_the_service_or_torch() -> None:
    """It runs in an image without torch; only the CLI dispatcher is shared (import-linter's rule,
    checked on the source: importing every module here would take seconds of kubernetes_asyncio)."""
    package = ROOT / "operator" / "similarity_operator"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert name.split(".")[0] not in ("torch", "similarity_service", "similarity_autotune"), (
                    path.name,
                    name,
                )
