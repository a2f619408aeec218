"""Autotune test fixtures: small pairs files and an in-process `structsim autotune` runner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from similarity_service.cli import main

# Generous on purpose: CI machines are shared and slow, and these tests check behaviour, not speed.
FEASIBLE_SLO_MS = "5000"
# Short windows keep a trial under about a second on a CPU.
FAST = [
    "--device", "cpu", "--max-seq-len", "64", "--step-seconds", "0.06", "--probe-seconds", "0.04", "--warmup-seconds", "0.02",
    "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory: pytest.TempPathFactory, chinese_pairs: list[tuple[str, str]]) -> Path:
    """A small JSONL pairs file (the shared Chinese pairs), for --workload and --validation."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = [json.dumps({"sentence1": a, "sentence2": b}, ensure_ascii=False) for a, b in chinese_pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


Autotune = Callable[..., int]


@pytest.fixture
def autotune(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> Autotune:
    """Run `structsim autotune` in-process on the tiny model with fast settings; returns the exit code.

    Keyword arguments become flags (`p99_ms="5"` → `--p99-ms 5`); `storage` defaults to a per-test
    SQLite file and `out` to tmp_path/profile.json.
    """

    def run(*extra: str, **flags: object) -> int:
        flags.setdefault("storage", str(tmp_path / "study.db"))
        flags.setdefault("out", str(tmp_path / "profile.json"))
        flags.setdefault("p99_ms", FEASIBLE_SLO_MS)
        flags.setdefault("workload", str(pairs_file))
        flags.setdefault("validation", str(pairs_file))
        argv = ["autotune", "--model", str(tiny_model_dir), *FAST, *extra]
        for name, value in flags.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        return main(argv)

    return run
