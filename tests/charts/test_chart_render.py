"""The chart renders offline, with default and non-default values, into objects that a current
Kubernetes accepts (strict schemas: unknown fields fail), and its values steer what they should."""

from __future__ import annotations

import hashlib
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import Chart, HelmRenderError, lint
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

from chart_render import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    NON_DEFAULT_VALUES,
    VALUE_SETS,
    manifests,
    objects,
    of_kind,
    render,
    render_objects,
    the,
)

# Helm output is machine-written: long lines, missing document-start markers and toYaml's
# unindented block sequences are expected; everything else in yamllint's default rules applies.
YAMLLINT = yamllint_config.YamlLintConfig(
    "extends: default\n"
    "rules: {line-length: disable, document-start: disable, comments: {min-spaces-from-content: 1},"
    " indentation: {spaces: 2, indent-sequences: whatever}}"
)


def test_default_render_is_the_operator_and_its_rights(chart: Chart) -> None:
    kinds = sorted(obj["kind"] for obj in render_objects(chart))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "PriorityClass", "ServiceAccount"]


def test_non_default_render_adds_the_optional_objects(chart: Chart) -> None:
    kinds = sorted(obj["kind"] for obj in render_objects(chart, NON_DEFAULT_VALUES))
    assert kinds == [
        "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment",
        "NetworkPolicy", "PodDisruptionBudget", "RoleBinding", "RoleBinding", "ServiceAccount",
    ]  # fmt: skip


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_validates_against_kubernetes_schemas(chart: Chart, value_set: str, kube_version: str) -> None:
    objs = render_objects(chart, VALUE_SETS[value_set])
    assert objs
    for obj in objs:
        # strict: an unknown or misspelt field is an error, as `kubectl apply --validate=strict` makes it.
        kubernetes_validate.validate(obj, kube_version, strict=True)


def test_the_validator_catches_a_broken_object(chart: Chart) -> None:
    """Guards the test above against a validator that accepts anything."""
    deployment = the(render_objects(chart), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    deployment = the(render_objects(chart), "Deployment")
    deployment["spec"]["template"]["spec"]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kube_version", [KUBE_VERSIONS[0], KUBE_VERSIONS[-1]])
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict_passes(value_set: str, kube_version: str) -> None:
    report = lint(CHART_DIR, VALUE_SETS[value_set], strict=True, kube_version=kube_version, namespace=NAMESPACE)
    # Severity 1 is INFO (only "icon is recommended"); warnings (2) and errors (3) fail strict lint.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["errors"] == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_yaml_is_clean(chart: Chart, value_set: str) -> None:
    """yamllint catches what a YAML parser forgives: duplicate keys, bad indentation, truthy words."""
    for path, text in manifests(render(chart, VALUE_SETS[value_set])):
        problems = [f"{path}:{p.line}: {p.desc}" for p in yamllint_linter.run(text, YAMLLINT)]
        assert problems == []


def _operator_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = the(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def test_default_operator_serves_all_namespaces(chart: Chart) -> None:
    container = _operator_container(render_objects(chart))
    assert container["args"] == [
        "operator", "--liveness-port", "8080", "--log-level", "info", "--log-format", "plain", "--all-namespaces",
    ]  # fmt: skip
    assert container["image"] == f"structsim-operator:{chart.metadata['appVersion']}"


def test_values_reach_the_operator_pod(chart: Chart) -> None:
    objs = render_objects(chart, NON_DEFAULT_VALUES)
    deployment = the(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _operator_container(objs)
    assert container["args"] == [
        "operator", "--liveness-port", "9090", "--log-level", "debug", "--log-format", "json",
        "--namespace", "team-a", "--namespace", "team-b",
    ]  # fmt: skip
    assert container["image"] == "registry.example.com/platform/structsim-operator@sha256:" + "ab" * 32
    assert container["imagePullPolicy"] == "Always"
    # Both probes hit kopf's liveness endpoint on the port the operator was told to serve it on.
    assert container["ports"] == [{"name": "health", "containerPort": 9090, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"] == NON_DEFAULT_VALUES["operator"]["resources"]
    assert pod["serviceAccountName"] == "simop-sa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["tolerations"] == NON_DEFAULT_VALUES["operator"]["tolerations"]
    assert pod["affinity"] == NON_DEFAULT_VALUES["operator"]["affinity"]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert "runAsUser" not in pod["securityContext"]  # null: the platform assigns the UID
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["tier"] == "control" and labels["team"] == "search"
    for obj in objs:
        assert obj["metadata"]["labels"]["team"] == "search", obj["kind"]


def test_one_operator_and_never_two_at_once(chart: Chart) -> None:
    spec = the(render_objects(chart), "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


def test_selector_matches_the_pod_labels(chart: Chart) -> None:
    for value_set in VALUE_SETS.values():
        objs = render_objects(chart, value_set)
        deployment = the(objs, "Deployment")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selectors = [deployment["spec"]["selector"]["matchLabels"]]
        selectors += [p["spec"]["selector"]["matchLabels"] for p in of_kind(objs, "PodDisruptionBudget")]
        selectors += [p["spec"]["podSelector"]["matchLabels"] for p in of_kind(objs, "NetworkPolicy")]
        for selector in selectors:
            assert selector.items() <= pod_labels.items()


def _config_checksum(chart: Chart, env: dict[str, str]) -> tuple[str, str]:
    rendered = render(chart, {"operator": {"env": env}})
    configmap_text = rendered["structsim/templates/operator-configmap.yaml"]
    deployment = the(objects(rendered), "Deployment")
    return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"], configmap_text


def test_config_change_rolls_the_operator_pod(chart: Chart) -> None:
    checksum_a, text_a = _config_checksum(chart, {"HTTPS_PROXY": "http://a:3128"})
    checksum_b, _ = _config_checksum(chart, {"HTTPS_PROXY": "http://b:3128"})
    assert checksum_a != checksum_b
    assert checksum_a == _config_checksum(chart, {"HTTPS_PROXY": "http://a:3128"})[0]  # stable otherwise
    assert checksum_a == hashlib.sha256(text_a.encode()).hexdigest()
    configmap = yaml.safe_load(text_a)
    assert configmap["data"]["HTTPS_PROXY"] == "http://a:3128"
    container = _operator_container(render_objects(chart))
    assert container["envFrom"] == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]


def test_operator_settings_reach_its_environment(chart: Chart) -> None:
    """`structsim operator` reads STRUCTSIM_OPERATOR_* as its flags' defaults; the chart sets them."""
    data = the(render_objects(chart), "ConfigMap")["data"]
    assert data == {
        "STRUCTSIM_OPERATOR_RESYNC_INTERVAL": "15",
        "STRUCTSIM_OPERATOR_TUNE_BACKOFF": "60",
        "STRUCTSIM_OPERATOR_TUNE_BACKOFF_MAX": "3600",
        "STRUCTSIM_OPERATOR_TUNE_PRIORITY_CLASS": "structsim-tune",
    }
    data = the(render_objects(chart, NON_DEFAULT_VALUES), "ConfigMap")["data"]
    assert data["STRUCTSIM_OPERATOR_RESYNC_INTERVAL"] == "2.5"
    assert data["STRUCTSIM_OPERATOR_TUNE_BACKOFF"] == "30"
    assert data["STRUCTSIM_OPERATOR_TUNE_BACKOFF_MAX"] == "600"
    assert data["NO_PROXY"] == ".svc,10.0.0.0/8"
    assert data["STRUCTSIM_OPERATOR_TUNE_PRIORITY_CLASS"] == "gpu-batch"  # an existing class
    data = the(render_objects(chart, {"tunePriorityClass": {"create": False}}), "ConfigMap")["data"]
    assert "STRUCTSIM_OPERATOR_TUNE_PRIORITY_CLASS" not in data  # none: tune pods never preempt


def test_tune_priority_class_can_preempt(chart: Chart) -> None:
    objs = render_objects(chart)
    priority_class = the(objs, "PriorityClass")
    assert priority_class["value"] == 1000 and priority_class["globalDefault"] is False
    assert priority_class["preemptionPolicy"] == "PreemptLowerPriority"
    name = the(objs, "ConfigMap")["data"]["STRUCTSIM_OPERATOR_TUNE_PRIORITY_CLASS"]
    assert priority_class["metadata"]["name"] == name


def test_network_policy_allows_only_dns_and_the_api_server(chart: Chart) -> None:
    policy = the(render_objects(chart, NON_DEFAULT_VALUES), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == []
    dns, api = policy["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    assert api["ports"] == [{"port": 6443, "protocol": "TCP"}]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}, {"ipBlock": {"cidr": "fd00::1/128"}}]
    # Without CIDRs the API rule is port-only (any destination).
    policy = the(render_objects(chart, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]
    assert "to" not in policy["egress"][1]


def test_pod_disruption_budget(chart: Chart) -> None:
    pdb = the(render_objects(chart, NON_DEFAULT_VALUES), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "50%"
    pdb = the(render_objects(chart, {"podDisruptionBudget": {"enabled": True}}), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_existing_service_account(chart: Chart) -> None:
    with pytest.raises(HelmRenderError, match="serviceAccount.name is required"):
        render(chart, {"serviceAccount": {"create": False}})
    objs = render_objects(chart, {"serviceAccount": {"create": False, "name": "platform-sa"}})
    assert of_kind(objs, "ServiceAccount") == []
    assert the(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"
    assert the(objs, "ClusterRoleBinding")["subjects"] == [
        {"kind": "ServiceAccount", "name": "platform-sa", "namespace": NAMESPACE}
    ]


def test_rbac_can_be_left_to_the_platform_team(chart: Chart) -> None:
    kinds = {obj["kind"] for obj in render_objects(chart, {"rbac": {"create": False}})}
    assert kinds.isdisjoint({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})


def test_notes_tell_the_user_what_to_do_next(chart: Chart) -> None:
    notes = render(chart)["structsim/templates/NOTES.txt"]
    for step in ("rollout status deployment/structsim-operator", "nvidia.com/gpu.product",
                 "kubectl apply -n <namespace> -f examples/similarity.yaml", "kubectl get simsvc",
                 "/v1/similarity", "kubectl apply --server-side -f charts/structsim/crds/"):  # fmt: skip
        assert step in notes
    notes = render(chart, NON_DEFAULT_VALUES)["structsim/templates/NOTES.txt"]
    assert "team-a, team-b" in notes
