"""The mock API server is strict where a lenient one would hide the operator's bugs (K8S-TESTING.md
§3), and the operator's API client (k8s.py) speaks to it the way a real API server needs."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes_asyncio import client

from kube_harness import GROUP_PATH, MODEL, Cluster
from similarity_operator.k8s import CONFIG_MAP, DAEMON_SET, Conflict, K8s, NotFound, load_configuration
from strict_kmock import StrictEmulator

NS = "/api/v1/namespaces/team-a"
SIMSVC = f"{GROUP_PATH}/namespaces/team-a/similarityservices"
CM_BODY: dict[str, Any] = {"metadata": {"name": "cm", "labels": {"app": "x"}}, "data": {"a": "1"}}


async def status_of(
    cluster: Cluster, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    async with cluster.kube.request(method, path, json=body, headers={"Content-Type": content_type}) as response:
        return response.status, await response.json()


async def test_the_server_assigns_metadata(cluster: Cluster) -> None:
    created = await cluster.create(f"{NS}/configmaps", CM_BODY)
    meta = created["metadata"]
    assert created["apiVersion"] == "v1" and created["kind"] == "ConfigMap"
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"] and meta["generation"] == 1
    patched = await cluster.merge(f"{NS}/configmaps/cm", {"data": {"a": "2"}})
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert patched["metadata"]["generation"] == 2 and patched["metadata"]["uid"] == meta["uid"]
    event = await cluster.create(f"{NS}/events", {"metadata": {"generateName": "ev-"}, "reason": "x"})
    assert event["metadata"]["name"].startswith("ev-") and len(event["metadata"]["name"]) > 3


async def test_status_is_written_only_through_its_subresource(cluster: Cluster) -> None:
    body = {"metadata": {"name": "s"}, "spec": {"model": {"id": MODEL}, "image": "i"}, "status": {"phase": "Ready"}}
    created = await cluster.create(SIMSVC, body)
    assert "status" not in created  # ignored on create
    main = await cluster.merge(f"{SIMSVC}/s", {"spec": {"port": 81}, "status": {"phase": "Ready"}})
    assert main["spec"]["port"] == 81 and "status" not in main
    status = await cluster.merge(f"{SIMSVC}/s/status", {"spec": {"port": 82}, "status": {"phase": "Tuning"}})
    assert status["spec"]["port"] == 81 and status["status"] == {"phase": "Tuning"}
    assert status["metadata"]["generation"] == 2  # only the spec change counted


async def test_custom_resources_are_validated_and_pruned(cluster: Cluster) -> None:
    code, reply = await status_of(cluster, "POST", SIMSVC, {"metadata": {"name": "s"}, "spec": {"image": "i"}})
    assert code == 422 and "'model' is a required property" in reply["message"]
    body = {"metadata": {"name": "s"}, "spec": {"model": {"id": MODEL}, "image": "i", "gpusPerPod": 1, "typo": 1}}
    created = await cluster.create(SIMSVC, body)
    assert "typo" not in created["spec"]  # pruned silently, as a real server does
    pruned = await cluster.merge(f"{SIMSVC}/s/status", {"status": {"phase": "Ready", "kopf": {"progress": {}}}})
    assert pruned["status"] == {"phase": "Ready"}
    code, _ = await status_of(
        cluster, "PATCH", f"{SIMSVC}/s/status", {"status": {"phase": "Happy"}}, "application/merge-patch+json"
    )
    assert code == 422


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/strategic-merge-patch+json", "application/json-patch+json"]
)
async def test_a_dict_patch_must_say_it_is_a_merge_patch(cluster: Cluster, content_type: str) -> None:
    await cluster.create(f"{NS}/configmaps", CM_BODY)
    code, reply = await status_of(cluster, "PATCH", f"{NS}/configmaps/cm", {"data": {"a": "2"}}, content_type)
    assert code == 415 and "merge patch" in reply["message"]


async def test_conflicts_and_immutable_fields(cluster: Cluster) -> None:
    created = await cluster.create(f"{NS}/configmaps", CM_BODY)
    assert (await status_of(cluster, "POST", f"{NS}/configmaps", CM_BODY))[0] == 409
    await cluster.merge(f"{NS}/configmaps/cm", {"data": {"a": "2"}})
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "data": {"a": "3"}}
    assert (await status_of(cluster, "PATCH", f"{NS}/configmaps/cm", stale, "application/merge-patch+json"))[0] == 409
    job = {"metadata": {"name": "j"}, "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    await cluster.create("/apis/batch/v1/namespaces/team-a/jobs", job)
    code, reply = await status_of(
        cluster,
        "PATCH",
        "/apis/batch/v1/namespaces/team-a/jobs/j",
        {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "j"}]}}}},
        "application/merge-patch+json",
    )
    assert code == 422 and "immutable" in reply["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"metadata": {"name": "Bad_Name"}}, 422),
        ({"metadata": {"name": "ok", "labels": {"k": "x" * 64}}}, 422),
        ({"metadata": {"name": "ok", "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "o"}]}}, 422),
    ],
)
async def test_invalid_metadata_is_refused(cluster: Cluster, body: dict[str, Any], status: int) -> None:
    assert (await status_of(cluster, "POST", f"{NS}/configmaps", body))[0] == status


async def test_a_namespace_must_exist(cluster: Cluster) -> None:
    assert (await status_of(cluster, "POST", "/api/v1/namespaces/nowhere/configmaps", CM_BODY))[0] == 404


async def test_selectors_typed_lists_and_core_discovery(cluster: Cluster) -> None:
    await cluster.create(f"{NS}/configmaps", CM_BODY)
    await cluster.create(f"{NS}/configmaps", {"metadata": {"name": "other", "labels": {"app": "y", "tier": "a"}}})
    for selector, names in [
        ("app=x", ["cm"]),
        ("app!=x", ["other"]),
        ("app in (x,y),tier", ["other"]),
        ("!tier", ["cm"]),
        ("app notin (x)", ["other"]),
    ]:
        listed = await cluster.call("GET", f"{NS}/configmaps?labelSelector={selector}")
        assert [item["metadata"]["name"] for item in listed["items"]] == names, selector
    assert listed["kind"] == "ConfigMapList" and listed["apiVersion"] == "v1" and listed["metadata"]["resourceVersion"]
    assert (await cluster.call("GET", "/api/v1"))["groupVersion"] == "v1"


async def test_deletion_honours_finalizers_then_collects_dependents(cluster: Cluster) -> None:
    owner = await cluster.create(
        SIMSVC, {"metadata": {"name": "s", "finalizers": ["x/y"]}, "spec": {"model": {"id": MODEL}, "image": "i"}}
    )
    ref = {
        "apiVersion": "structsim.io/v1alpha1",
        "kind": "SimilarityService",
        "name": "s",
        "uid": owner["metadata"]["uid"],
    }
    await cluster.create(f"{NS}/configmaps", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    await cluster.create(f"{NS}/configmaps", {"metadata": {"name": "free"}})
    await cluster.delete(f"{SIMSVC}/s")
    assert cluster.resource("s")["metadata"]["deletionTimestamp"]  # held by its finalizer
    assert cluster.get("v1/configmaps", "child", "team-a") is not None
    await cluster.merge(f"{SIMSVC}/s", {"metadata": {"finalizers": None}})
    assert cluster.get("v1/configmaps", "child", "team-a") is None
    assert cluster.get("v1/configmaps", "free", "team-a") is not None
    # A child created for an owner that is gone is collected at once, as the garbage collector would.
    await cluster.create(f"{NS}/configmaps", {"metadata": {"name": "late", "ownerReferences": [ref]}})
    assert cluster.get("v1/configmaps", "late", "team-a") is None


async def test_the_operator_client_maps_errors_and_declares_merge_patches(
    kube: StrictEmulator, cluster: Cluster
) -> None:
    k8s = K8s(await load_configuration(str(kube.url)))
    try:
        await k8s.create(CONFIG_MAP, "team-a", CM_BODY)
        with pytest.raises(Conflict):
            await k8s.create(CONFIG_MAP, "team-a", CM_BODY)
        with pytest.raises(NotFound):
            await k8s.read(DAEMON_SET, "team-a", "missing")
        await k8s.delete(DAEMON_SET, "team-a", "missing")  # already gone: fine
        patched = await k8s.patch(CONFIG_MAP, "team-a", "cm", {"data": {"b": "2"}})
        assert patched["data"] == {"a": "1", "b": "2"}
        assert [item["metadata"]["name"] for item in await k8s.list(CONFIG_MAP, "team-a", "app=x")] == ["cm"]
    finally:
        await k8s.close()
    # What the operator would have sent without declaring the content type: refused, not merged.
    async with client.ApiClient(await load_configuration(str(kube.url))) as api:
        with pytest.raises(client.ApiException) as refused:
            await client.CoreV1Api(api).patch_namespaced_config_map("cm", "team-a", {"data": {"c": "3"}})
    assert refused.value.status == 415
