"""What a benchmark result records about where it came from. Imported by the scripts in bench/."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit measured: $STRUCTSIM_COMMIT where the tree travelled without .git, else git's HEAD, else "unknown"."""
    if os.environ.get("STRUCTSIM_COMMIT"):
        return os.environ["STRUCTSIM_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()
