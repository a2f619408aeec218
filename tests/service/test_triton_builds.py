"""Every Triton kernel of the service builds for a Hopper GPU: compiled here, with no GPU (compile_triton_kernels.py).

The other tests run the kernels in Triton's interpreter, which never compiles them; a kernel can pass there and
still fail to build on the device, where the engine then serves with library kernels (slower; only a warning).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # a dev dependency on Linux x86_64, where CI runs

HERE = Path(__file__).resolve().parent


def test_every_kernel_builds_for_sm90() -> None:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1] / "service"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(HERE / "compile_triton_kernels.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built = done.stdout.splitlines()
    assert len(built) == 9 and all(line.startswith("built ") for line in built), done.stdout
