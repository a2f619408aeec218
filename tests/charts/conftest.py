"""Fixtures of the chart tests: the chart, loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helm_python import Chart

from chart_render import CHART_DIR


@pytest.fixture(scope="session")
def chart() -> Iterator[Chart]:
    with Chart.load(CHART_DIR) as loaded:
        yield loaded
