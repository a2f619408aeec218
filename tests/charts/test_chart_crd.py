"""The chart installs exactly the operator's CRD (one source of truth), and it is a valid CRD."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart

from chart_render import CRD_COPY, CRD_FILE, CRD_SOURCE, KUBE_VERSIONS, ROOT

REFRESH = f"cp {CRD_SOURCE.relative_to(ROOT)} {CRD_COPY.parent.relative_to(ROOT)}/"


def test_chart_crd_is_a_copy_of_the_operator_crd() -> None:
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), f"the chart's CRD is stale; refresh it: {REFRESH}"


def test_chart_ships_only_that_crd(chart: Chart) -> None:
    """Helm installs crds/ before the templates, and only on first install (docs/kubernetes.md: upgrades)."""
    (crd,) = chart.crds
    assert crd["name"] == f"crds/{CRD_FILE}"
    assert crd["data"] == CRD_SOURCE.read_text()


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_crd_is_valid_for_kubernetes(kube_version: str) -> None:
    crd = yaml.safe_load(CRD_COPY.read_text())
    kubernetes_validate.validate(crd, kube_version, strict=True)
    assert crd["metadata"]["name"] == "similarityservices.structsim.io"
    assert crd["spec"]["names"]["shortNames"] == ["simsvc"]
    served = [v for v in crd["spec"]["versions"] if v["served"]]
    assert [v["name"] for v in served] == ["v1alpha1"]
    assert served[0]["subresources"] == {"status": {}}  # the operator writes status through /status
