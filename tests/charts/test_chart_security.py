"""Every pod the chart runs is locked down, and the operator's RBAC is least privilege."""

from __future__ import annotations

import re
from typing import Any

import pytest
from helm_python import Chart

from chart_render import (
    CHART_DIR,
    NON_DEFAULT_VALUES,
    VALUE_SETS,
    assert_locked_down,
    of_kind,
    pod_templates,
    render_objects,
)

# Values that loosen what the chart lets a user loosen (the UID), to show the rest still holds.
LOOSEST_VALUES = {"operator": {"runAsUser": None, "runAsGroup": None}}
ALL_VALUE_SETS = {**VALUE_SETS, "no-fixed-uid": LOOSEST_VALUES}

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
# Cluster-scoped or sensitive resources the operator may only read.
READ_ONLY = {("", "nodes"), ("", "namespaces"), ("", "pods"), ("apiextensions.k8s.io", "customresourcedefinitions")}


@pytest.mark.parametrize("value_set", ALL_VALUE_SETS)
def test_every_pod_is_locked_down(chart: Chart, value_set: str) -> None:
    pods = pod_templates(render_objects(chart, ALL_VALUE_SETS[value_set]))
    assert pods, "the chart runs at least the operator"
    for name, pod in pods:
        assert_locked_down(name, pod)


def test_lockdown_check_catches_a_loose_pod(chart: Chart) -> None:
    ((name, pod),) = pod_templates(render_objects(chart))
    pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    with pytest.raises(AssertionError):
        assert_locked_down(name, pod)


def test_read_only_root_has_a_writable_tmp(chart: Chart) -> None:
    """With readOnlyRootFilesystem, Python's tempfile needs somewhere to write: a small emptyDir."""
    ((_, pod),) = pod_templates(render_objects(chart))
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[mount["name"]]


def _rules(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for role in of_kind(objs, "ClusterRole") + of_kind(objs, "Role") for rule in role["rules"]]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rbac_has_no_wildcards(chart: Chart, value_set: str) -> None:
    rules = _rules(render_objects(chart, VALUE_SETS[value_set]))
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert all("*" not in item for item in rule.get(field, [])), rule
        assert "nonResourceURLs" not in rule, rule


def _grants(objs: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    rules = _rules(objs)
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rbac_is_least_privilege(chart: Chart, value_set: str) -> None:
    grants = _grants(render_objects(chart, VALUE_SETS[value_set]))
    # Never secrets, never RBAC itself, never escalation verbs.
    assert not any(r == "secrets" for _, r, _ in grants)
    assert not any(g == "rbac.authorization.k8s.io" for g, _, _ in grants)
    assert not any(v in {"escalate", "bind", "impersonate"} for _, _, v in grants)
    # Nodes, namespaces, pods and CRDs are read, never written.
    assert not {(g, r, v) for g, r, v in grants if (g, r) in READ_ONLY and v in WRITE_VERBS}
    # The resource is never created, updated or deleted by its operator (users own it); status is
    # patched; `update` only on the finalizers subresource (see the rule's comment).
    assert {(r, v) for g, r, v in grants if g == "structsim.io" and v in {"create", "delete", "update"}} == {
        ("similarityservices/finalizers", "update")
    }
    assert ("structsim.io", "similarityservices/status", "patch") in grants
    # What the reconciler must do at all: watch GPU nodes and the resource, manage its children.
    needed = {("", "nodes", "watch"), ("structsim.io", "similarityservices", "watch"),
              ("apps", "daemonsets", "create"), ("batch", "jobs", "create"), ("", "services", "create")}  # fmt: skip
    assert needed <= grants


def test_every_rbac_rule_says_why() -> None:
    """Each rule in the template is introduced by a comment giving its reason."""
    lines = (CHART_DIR / "templates" / "_helpers.tpl").read_text().splitlines()
    rule_lines = [i for i, line in enumerate(lines) if re.match(r"^- apiGroups:", line)]
    assert len(rule_lines) >= 10
    for i in rule_lines:
        above = lines[i - 1].strip()
        # Consecutive rules for one purpose (events in two API groups) share the comment above them.
        assert above.startswith("#") or (above.startswith("verbs:") and lines[i - 4].strip().startswith("#")), lines[i]


def test_namespaced_mode_grants_namespaced_rights_only_where_served(chart: Chart) -> None:
    objs = render_objects(chart, NON_DEFAULT_VALUES)
    roles = {role["metadata"]["name"]: role for role in of_kind(objs, "ClusterRole")}
    assert set(roles) == {"simop-operator", "simop-operator-cluster"}
    namespaced = {r for rule in roles["simop-operator"]["rules"] for r in rule["resources"]}
    cluster = {r for rule in roles["simop-operator-cluster"]["rules"] for r in rule["resources"]}
    assert cluster == {"nodes", "namespaces", "customresourcedefinitions"}
    assert namespaced.isdisjoint(cluster)
    (cluster_binding,) = of_kind(objs, "ClusterRoleBinding")
    assert cluster_binding["roleRef"]["name"] == "simop-operator-cluster"
    bindings = of_kind(objs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "simop-operator"
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "simop-sa", "namespace": "structsim-system"}]


def test_all_namespaces_mode_is_one_role_one_binding(chart: Chart) -> None:
    objs = render_objects(chart)
    (role,) = of_kind(objs, "ClusterRole")
    (binding,) = of_kind(objs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert of_kind(objs, "RoleBinding") == []
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert {"nodes", "similarityservices", "daemonsets", "jobs"} <= resources
