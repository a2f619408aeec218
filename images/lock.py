#!/usr/bin/env python3
"""Write the pinned requirement files the container images install (images/*.lock.txt).

    python3 images/lock.py            # refresh both lock files from pyproject.toml
    python3 images/lock.py --check    # exit 1 if a lock file no longer covers pyproject.toml

The pins come from pip's own resolver (`pip install --dry-run --report`) run in isolated mode, so
the machine's pip configuration (a local torch wheel, constraints) does not leak in: the service
image gets PyPI's CUDA build of torch. Run it on Linux x86_64 with Python 3.11, the platform of the
images, whenever pyproject.toml's dependencies change; commit the result.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"

# torch for the service image: PyPI's Linux x86_64 wheel of this release is built for CUDA 13.0
# (its nvidia-* dependencies carry the CUDA runtime, cuBLAS and cuDNN), so the image needs no CUDA
# base image, only an NVIDIA driver >= 580 on the node.
SERVICE_TORCH = "torch==2.13.0"
# The extras the service image serves, tunes and downloads models with.
SERVICE_EXTRAS = ("service", "autotune", "modelscope")
# The operator image has no torch: it installs structsim with --no-deps, then its `operator` extra
# and only those core dependencies that the operator's imports reach.
OPERATOR_CORE = ("msgspec",)


def requirement_name(requirement: str) -> str:
    """The normalised project name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def project_requirements() -> dict[str, list[str]]:
    """pyproject.toml's dependency lists: "core" and one entry per extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"core": project["dependencies"], **project["optional-dependencies"]}


def image_inputs() -> dict[str, list[str]]:
    """What each image asks the resolver for (structsim itself is installed from source)."""
    reqs = project_requirements()
    operator_core = [r for r in reqs["core"] if requirement_name(r) in OPERATOR_CORE]
    return {
        "service": [SERVICE_TORCH, f"{ROOT}[{','.join(SERVICE_EXTRAS)}]"],
        "operator": [*reqs["operator"], *operator_core],
    }


def resolve(requirements: list[str]) -> list[str]:
    """Pin every distribution pip would install for `requirements`, structsim excluded."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--isolated", "--quiet", "--disable-pip-version-check",
             "--dry-run", "--ignore-installed", "--report", str(report), *requirements],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    pins = {
        requirement_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in installs
        if requirement_name(item["metadata"]["name"]) != "structsim"
    }
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def lock_path(image: str) -> Path:
    return IMAGES / f"{image}.lock.txt"


def read_lock(image: str) -> dict[str, str]:
    """name -> pinned version from a lock file."""
    pins = {}
    for line in lock_path(image).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[requirement_name(name)] = version
    return pins


def missing_from_lock(image: str) -> list[str]:
    """Requirements an image needs (by name) that its lock file does not pin."""
    reqs = project_requirements()
    if image == "service":
        wanted = [SERVICE_TORCH, *reqs["core"]]
        for extra in SERVICE_EXTRAS:
            wanted += [r for r in reqs[extra] if not r.startswith("structsim[")]
    else:
        wanted = image_inputs()["operator"]
    pinned = read_lock(image)
    return sorted({requirement_name(r) for r in wanted} - set(pinned))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the lock files' coverage")
    args = parser.parse_args()
    if args.check:
        problems = {image: missing_from_lock(image) for image in ("service", "operator")}
        for image, missing in problems.items():
            if missing:
                print(f"{lock_path(image)} lacks {', '.join(missing)}: run python3 images/lock.py")
        return 1 if any(problems.values()) else 0
    for image, requirements in image_inputs().items():
        header = (
            f"# Pinned requirements of images/{image}.Dockerfile, written by images/lock.py from\n"
            f"# {' '.join(str(r).replace(str(ROOT), '.') for r in requirements)}\n"
            "# for Linux x86_64, CPython 3.11. Do not edit by hand: rerun the script.\n"
        )
        lock_path(image).write_text(header + "\n".join(resolve(requirements)) + "\n")
        print(f"wrote {lock_path(image).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
