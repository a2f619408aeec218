"""Every API call the operator makes is allowed by the chart's RBAC, in both of the chart's layouts.
(The `operator` fixture runs the same check after every lifecycle test, cluster-wide.)"""

from __future__ import annotations

from typing import Any

from kube_harness import (
    H100,
    MODEL,
    Cluster,
    OperatorThread,
    eventually,
    fast_settings,
    operator_calls,
    profile_json,
    rbac_gaps,
    render_chart,
)

SPEC: dict[str, Any] = {"model": {"id": MODEL}, "image": "registry.example.com/structsim:0.1.0"}


def test_a_missing_rule_is_caught() -> None:
    docs = render_chart({})
    calls = {("", "pods", "list", "team-a"), ("batch", "jobs", "delete", "team-a"), ("", "nodes", "watch", None)}
    assert rbac_gaps(calls, docs) == []
    for doc in docs:
        if doc["kind"] == "ClusterRole":
            doc["rules"] = [rule for rule in doc["rules"] if "pods" not in rule["resources"]]
    assert rbac_gaps(calls, docs) == ["list core/pods in team-a"]


async def test_a_namespaced_operator_stays_within_the_namespaced_rbac(kube: Any, cluster: Cluster) -> None:
    """With operator.watchNamespaces the chart grants namespaced rights only there (RoleBindings) and
    cluster-scoped ones (nodes, CRD discovery) through its own ClusterRoleBinding."""
    operator = await OperatorThread(fast_settings(str(kube.url)), namespaces=["team-a"]).start()
    try:
        await cluster.add_node("gpu-1", H100)
        await cluster.apply("sim", SPEC)
        job = await eventually(cluster.jobs)
        await cluster.finish_job(job[0]["metadata"]["name"], result="oops", exit_code=1)
        job = await eventually(
            lambda: [j for j in cluster.jobs() if j["metadata"]["labels"]["structsim.io/attempt"] == "2"]
        )
        await cluster.finish_job(job[0]["metadata"]["name"], result=profile_json(H100))
        await eventually(lambda: cluster.status("sim").get("profiles"))
        await cluster.remove_node("gpu-1")
        await eventually(lambda: not cluster.daemonsets())
        await cluster.delete(cluster.resource_path("sim"))
        await eventually(lambda: not cluster.objects("structsim.io/v1alpha1/similarityservices"))
    finally:
        await operator.stop()

    calls = operator_calls(kube)
    verbs = {(resource, verb) for _, resource, verb, _ in calls}
    # The check has teeth: these are the calls that matter, all made.
    assert {
        ("pods", "list"),
        ("jobs", "create"),
        ("jobs", "patch"),
        ("jobs", "delete"),
        ("daemonsets", "delete"),
        ("configmaps", "patch"),
        ("similarityservices/status", "patch"),
        ("events", "create"),
        ("nodes", "watch"),
    } <= verbs
    assert all(namespace in (None, "team-a") for *_, namespace in calls)
    docs = render_chart({"operator": {"watchNamespaces": ["team-a"]}})
    assert rbac_gaps(calls, docs) == []
    assert rbac_gaps(calls, render_chart({"operator": {"watchNamespaces": ["team-b"]}}))  # elsewhere: refused
