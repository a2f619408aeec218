"""docs/kubernetes.md stays true to the repository: the files it names exist, the RBAC table is the
chart's ClusterRole, and the values it names are the chart's values."""

from __future__ import annotations

import re

import yaml
from helm_python import Chart

from chart_render import CHART_DIR, ROOT, of_kind, render, render_objects

DOC = ROOT / "docs" / "kubernetes.md"


def test_every_file_the_doc_and_notes_name_exists(chart: Chart) -> None:
    notes = render(chart)["structsim/templates/NOTES.txt"]
    text = DOC.read_text() + notes
    paths = set(re.findall(r"(?<![\w/.])((?:examples|charts|images|operator|docs|tests)/[\w./-]*\w)", text))
    assert len(paths) > 10
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []


def _doc_rbac_rows() -> set[tuple[str, str, str]]:
    grants = set()
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`") and cells[1].startswith("`"):
            groups = [g.strip("` ") for g in cells[0].split(",")]
            resources = [r.strip("` ") for r in cells[1].split(",")]
            verbs = [v.strip() for v in cells[2].split(",")]
            grants |= {(g.strip('"'), r, v) for g in groups for r in resources for v in verbs}
    return grants


def test_doc_rbac_table_is_the_chart_cluster_role(chart: Chart) -> None:
    (role,) = of_kind(render_objects(chart), "ClusterRole")
    rendered = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert _doc_rbac_rows() == rendered


def test_doc_names_real_values() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    named = set(re.findall(r"`((?:operator|networkPolicy|podDisruptionBudget|image|serviceAccount|rbac|tunePriorityClass)\.[\w.]+)`",
                           DOC.read_text()))  # fmt: skip
    assert named
    for path in named:
        node = values
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, path
            node = node[key]
