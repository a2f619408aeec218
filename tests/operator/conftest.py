"""Fixtures of the operator tests: a strict in-memory API server, the operator running against it,
and a check after every test that the chart's RBAC allows each API call the operator made."""

from __future__ import annotations

from collections.abc import AsyncIterator

import kmock
import pytest_asyncio

from crd_schema import load_crd
from kube_harness import Cluster, OperatorThread, fast_settings, operator_calls, rbac_gaps, render_chart
from strict_kmock import StrictEmulator


@pytest_asyncio.fixture
async def kube() -> AsyncIterator[StrictEmulator]:
    """StrictEmulator on a loopback port, serving the SimilarityService CRD."""
    async with StrictEmulator() as emulator, kmock.Server(emulator):
        emulator.add_crd(load_crd())
        yield emulator


@pytest_asyncio.fixture
async def cluster(kube: StrictEmulator) -> Cluster:
    """The user's and the controllers' side, working in namespace team-a (which it creates)."""
    await Cluster(kube).create("/api/v1/namespaces", {"metadata": {"name": "team-a"}})
    return Cluster(kube, namespace="team-a")


@pytest_asyncio.fixture
async def operator(kube: StrictEmulator) -> AsyncIterator[OperatorThread]:
    """The operator, all namespaces; after the test, every call it made must be allowed by the
    chart's default RBAC (one ClusterRole bound cluster-wide)."""
    running = await OperatorThread(fast_settings(str(kube.url))).start()
    try:
        yield running
    finally:
        await running.stop()
    gaps = rbac_gaps(operator_calls(kube), render_chart({}))
    assert not gaps, f"the chart's RBAC refuses calls the operator made: {gaps}"
