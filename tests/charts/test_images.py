"""The container images: Dockerfiles pass hadolint, run as a non-root user, keep the model cache on a
volume, and install exactly the pinned versions in images/*.lock.txt, which cover pyproject.toml.
(No Docker engine runs here, so the images are linted and checked, not built: docs/kubernetes.md
lists the build steps.)"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from chart_render import CHART_DIR, ROOT

IMAGES = ROOT / "images"
DOCKERFILES = {"service": IMAGES / "service.Dockerfile", "operator": IMAGES / "operator.Dockerfile"}
HADOLINT = Path(sys.executable).parent / "hadolint"


def _lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("structsim_images_lock", IMAGES / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _final_stage(image: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the last build stage, continuation lines joined, comments dropped."""
    text = DOCKERFILES[image].read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    last_from = max(i for i, ins in enumerate(instructions) if ins[0] == "FROM")
    return [(ins[0], ins[1] if len(ins) > 1 else "") for ins in instructions[last_from:]]


def _env(image: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _final_stage(image):
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_passes_hadolint(image: str) -> None:
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", DOCKERFILES[image]],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the test above against a linter that passes everything."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = subprocess.run([HADOLINT, bad], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_runs_as_the_chart_and_operator_user(image: str) -> None:
    users = [args for instruction, args in _final_stage(image) if instruction == "USER"]
    assert users == ["10001:10001"]
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["operator"]["runAsUser"] == values["operator"]["runAsGroup"] == 10001
    (entrypoint,) = [json.loads(args) for instruction, args in _final_stage(image) if instruction == "ENTRYPOINT"]
    assert entrypoint == ["structsim"]


def test_service_image_keeps_models_on_a_volume() -> None:
    stage = _final_stage("service")
    assert ("VOLUME", '["/models"]') in stage
    env = _env("service")
    assert env["STRUCTSIM_CACHE_DIR"] == env["MODELSCOPE_CACHE"] == "/models"
    assert env["STRUCTSIM_HOST"] == "0.0.0.0"  # reachable from outside the container
    (cmd,) = [json.loads(args) for instruction, args in stage if instruction == "CMD"]
    assert cmd == ["serve"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_base_image_is_pinned(image: str) -> None:
    text = DOCKERFILES[image].read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    assert f"-r /tmp/{image}.lock.txt" in text  # dependencies only from the lock file
    assert "pip install --no-deps ." in text  # structsim itself adds nothing unpinned


def test_lock_files_pin_every_dependency_exactly() -> None:
    lock = _lock_module()
    for image in DOCKERFILES:
        assert lock.missing_from_lock(image) == [], f"run: python3 images/lock.py ({image})"
        lines = [line for line in lock.lock_path(image).read_text().splitlines() if not line.startswith("#")]
        assert lines and all(re.fullmatch(r"[a-z0-9-]+==[\w.+!-]+", line) for line in lines), image


def test_operator_image_has_no_torch() -> None:
    lock = _lock_module()
    pinned = lock.read_lock("operator")
    assert "kopf" in pinned
    assert not {"torch", "numpy", "tokenizers"} & set(pinned)
    assert lock.read_lock("service")["torch"] == lock.SERVICE_TORCH.split("==")[1]


def test_lock_check_notices_a_missing_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = _lock_module()
    stale = tmp_path / "operator.lock.txt"
    stale.write_text("\n".join(line for line in lock.lock_path("operator").read_text().splitlines()
                               if not line.startswith("kopf==")))  # fmt: skip
    monkeypatch.setattr(lock, "lock_path", lambda image: stale)
    assert lock.missing_from_lock("operator") == ["kopf"]


def test_build_context_includes_what_the_dockerfiles_copy() -> None:
    kept = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for image, path in DOCKERFILES.items():
        for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", path.read_text(), re.M):
            for source in match.group(1).split():
                assert any(source == k or re.fullmatch(k.replace("*", "[^/]*"), source) for k in kept), (image, source)
