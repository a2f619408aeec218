"""The process's usable CPU cores: the affinity mask, capped by a cgroup CPU quota (a Kubernetes CPU limit)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from similarity_service.host import cgroup_cpu_quota, cgroup_memory_limit, usable_cores


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu.max": "150000 100000\n"}, 1.5),  # v2, limits.cpu: 1500m
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # v1, 4 CPUs
        ({"cpu.max": "garbage\n"}, None),
        ({}, None),  # no cgroup files: not in a container
    ],
)
def test_the_cgroup_cpu_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cgroup_cpu_quota(_cgroup(tmp_path, files)) == quota


def test_usable_cores_are_the_affinity_mask_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    mask = len(os.sched_getaffinity(0))
    assert usable_cores(_cgroup(tmp_path / "none", {})) == mask
    assert usable_cores(_cgroup(tmp_path / "small", {"cpu.max": "50000 100000"})) == 1  # half a CPU: one core
    assert usable_cores(_cgroup(tmp_path / "large", {"cpu.max": f"{100000 * (mask + 4)} 100000"})) == mask


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "max\n"}, None),  # v2, no limit
        ({"memory.max": "8589934592\n"}, 8 << 30),  # v2, limits.memory: 8Gi
        ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1, no limit
        ({"memory/memory.limit_in_bytes": "4294967296\n"}, 4 << 30),  # v1, 4Gi
        ({"memory.max": "garbage\n"}, None),
        ({}, None),  # not in a container
    ],
)
def test_the_cgroup_memory_limit(tmp_path: Path, files: dict[str, str], limit: int | None) -> None:
    assert cgroup_memory_limit(_cgroup(tmp_path, files)) == limit
