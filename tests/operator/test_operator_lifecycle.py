"""The operator running for real against the strict mock API server: a SimilarityService's life,
from `kubectl apply` through tuning, node changes, spec changes and restarts to deletion."""

from __future__ import annotations

import asyncio
from typing import Any

from kube_harness import A100, H100, MODEL, T4, Cluster, OperatorThread, eventually, fast_settings, profile_json

SPEC: dict[str, Any] = {"model": {"id": MODEL}, "image": "registry.example.com/structsim:0.1.0"}
DS = "apps/v1/daemonsets"
CM = "v1/configmaps"


def args_of(ds: dict[str, Any]) -> list[str]:
    return ds["spec"]["template"]["spec"]["containers"][0]["args"]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def config_hash(ds: dict[str, Any]) -> str:
    return ds["spec"]["template"]["metadata"]["annotations"]["structsim.io/config-hash"]


async def one_job(cluster: Cluster) -> dict[str, Any]:
    def single() -> dict[str, Any]:
        jobs = cluster.jobs()
        assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
        return jobs[0]

    return await eventually(single)


async def tuned(cluster: Cluster, name: str = "sim") -> dict[str, Any]:
    """Create the resource on one H100 node and let its tune Job succeed."""
    await cluster.add_node("gpu-1", H100)
    await cluster.apply(name, SPEC)
    job = await one_job(cluster)
    await cluster.finish_job(job["metadata"]["name"], result=profile_json(H100))
    return await eventually(lambda: cluster.status(name).get("profiles") and cluster.status(name))


async def test_create_makes_service_daemonset_per_product_and_tune_jobs(
    cluster: Cluster, operator: OperatorThread
) -> None:
    await cluster.add_node("gpu-1", H100, cc="9.0")
    await cluster.add_node("gpu-2", H100, cc="9.0")
    await cluster.add_node("gpu-3", T4, cc="7.5")
    await cluster.add_node("old-gpu", "Tesla-K80", cc="3.7")
    sim = await cluster.apply("sim", SPEC)

    def children() -> bool:
        assert len(cluster.daemonsets()) == 3 and len(cluster.jobs()) == 3
        return cluster.get("v1/services", "sim", "team-a") is not None

    await eventually(children)
    service = cluster.get("v1/services", "sim", "team-a")
    assert service["spec"]["selector"] == {"structsim.io/service": "sim", "app.kubernetes.io/component": "server"}
    by_product = {
        ds["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]: ds for ds in cluster.daemonsets()
    }
    assert set(by_product) == {H100, T4, "Tesla-K80"}
    for child in [*by_product.values(), *cluster.jobs(), service, *cluster.objects(CM, "team-a")]:
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref["uid"] == sim["metadata"]["uid"] and ref["controller"] is True
        assert child["metadata"]["labels"]["structsim.io/service"] == "sim"
    # Until tuned: the safe default, fp16 from compute capability 7.0 up, else fp32.
    assert flag(args_of(by_product[T4]), "--precision") == "fp16"
    assert flag(args_of(by_product["Tesla-K80"]), "--precision") == "fp32"
    assert all("--profile" not in args_of(ds) for ds in by_product.values())
    assert {job["metadata"]["labels"]["structsim.io/gpu-product"] for job in cluster.jobs()} == {H100, T4, "Tesla-K80"}

    status = await eventually(lambda: cluster.status("sim").get("phase") == "Tuning" and cluster.status("sim"))
    assert status["endpoint"] == "http://sim.team-a.svc"
    assert status["observedGeneration"] == 1
    assert {p["gpuProduct"]: (p["nodes"], p["config"]) for p in status["products"]} == {
        H100: (2, "default"),
        T4: (1, "default"),
        "Tesla-K80": (1, "default"),
    }
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Tuned"]["reason"] == "Tuning" and conditions["Ready"]["status"] == "False"
    await eventually(lambda: len(cluster.events("TuneStarted")) == 3 and len(cluster.events("DaemonSetCreated")) == 3)
    # kopf wrote its progress as annotations and status through the /status subresource only.
    assert "kopf" not in status


async def test_job_success_fills_profiles_and_rolls_the_daemonset(cluster: Cluster, operator: OperatorThread) -> None:
    await cluster.add_node("gpu-1", H100)
    await cluster.apply("sim", SPEC)
    job = await one_job(cluster)
    ds_name = (await eventually(cluster.daemonsets))[0]["metadata"]["name"]
    before = config_hash(cluster.get(DS, ds_name, "team-a"))
    assert job["spec"]["template"]["spec"]["containers"][0]["terminationMessagePolicy"] == "File"

    result = profile_json(H100, precision="bf16", batch=128, wait_ms=3.0, throughput=30500.0, p99_ms=18.25)
    await cluster.finish_job(job["metadata"]["name"], result=result)

    status = await eventually(lambda: cluster.status("sim").get("profiles") and cluster.status("sim"))
    # Every field the operator writes is in the CRD's schema (the server would prune the rest).
    assert set(status) == {
        "phase",
        "observedGeneration",
        "endpoint",
        "fingerprint",
        "precision",
        "throughput",
        "p99Ms",
        "products",
        "profiles",
        "conditions",
    }
    (profile,) = status["profiles"]
    assert profile == {
        "gpuProduct": H100,
        "computeCapability": "9.0",
        "precision": "bf16",
        "maxBatchSize": 128,
        "maxWaitMs": 3.0,
        "throughput": 30500.0,
        "p99Ms": 18.25,
        "fingerprint": status["fingerprint"],
        "tunedAt": "2026-11-25T10:00:00Z",
    }
    assert (status["precision"], status["throughput"], status["p99Ms"]) == ("bf16", 30500, 18.25)
    ds = cluster.get(DS, ds_name, "team-a")
    assert flag(args_of(ds), "--profile") == "/etc/structsim/profile.json" and "--precision" not in args_of(ds)
    assert config_hash(ds) != before
    configmap = cluster.get(CM, ds["spec"]["template"]["spec"]["volumes"][2]["configMap"]["name"], "team-a")
    assert configmap["data"] == {"fingerprint": status["fingerprint"], "profile.json": result}
    await eventually(lambda: not cluster.jobs())  # the result is recorded: the Job has done its part
    await eventually(lambda: cluster.events("Tuned") and cluster.events("DaemonSetRolled"))

    await cluster.daemonsets_ready()
    status = await eventually(lambda: cluster.status("sim").get("phase") == "Ready" and cluster.status("sim"))
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Ready": ("True", "AllPodsReady"),
        "Tuned": ("True", "Tuned"),
    }


async def test_job_failure_keeps_the_safe_default_and_retries_with_backoff(
    cluster: Cluster, operator: OperatorThread
) -> None:
    await cluster.add_node("gpu-1", H100)
    await cluster.apply("sim", SPEC)
    first = await one_job(cluster)
    await cluster.finish_job(first["metadata"]["name"], result="CUDA error: out of memory", exit_code=1)
    failed_at = asyncio.get_running_loop().time()

    status = await eventually(lambda: cluster.status("sim").get("phase") == "Degraded" and cluster.status("sim"))
    tuned = next(c for c in status["conditions"] if c["type"] == "Tuned")
    assert tuned["status"] == "False" and tuned["reason"] == "TuneFailed" and "out of memory" in tuned["message"]
    assert flag(args_of(cluster.daemonsets()[0]), "--precision") == "fp16"  # the safe default keeps serving
    (event,) = await eventually(lambda: cluster.events("TuneFailed"))
    assert event["type"] == "Warning" and "exit code 1: CUDA error: out of memory" in event["message"]

    # Attempt 2 comes after the backoff (0.5 s here), not in a hot loop; attempt 1 goes away.
    second = await eventually(
        lambda: [j for j in cluster.jobs() if j["metadata"]["labels"]["structsim.io/attempt"] == "2"]
    )
    assert asyncio.get_running_loop().time() - failed_at >= 0.4
    assert second[0]["metadata"]["name"].endswith("-2")
    await eventually(lambda: len(cluster.jobs()) == 1)
    assert len(cluster.events("TuneFailed")) == 1  # reported once, though reconciled many times since

    # A Job that "succeeds" without a usable profile is a failure too; attempt 3 waits twice as long.
    await cluster.finish_job(second[0]["metadata"]["name"], result="not json at all")
    failed_at = asyncio.get_running_loop().time()
    await eventually(lambda: len(cluster.events("TuneFailed")) == 2)
    assert "unusable" in cluster.events("TuneFailed")[-1]["message"]
    await eventually(lambda: [j for j in cluster.jobs() if j["metadata"]["labels"]["structsim.io/attempt"] == "3"])
    assert asyncio.get_running_loop().time() - failed_at >= 0.9
    assert flag(args_of(cluster.daemonsets()[0]), "--precision") == "fp16"


async def test_a_node_with_a_new_product_gets_a_daemonset_and_a_job(cluster: Cluster, operator: OperatorThread) -> None:
    await tuned(cluster)
    await cluster.add_node("gpu-9", T4, cc="7.5")
    await eventually(lambda: len(cluster.daemonsets()) == 2)
    job = await one_job(cluster)
    assert job["metadata"]["labels"]["structsim.io/gpu-product"] == T4
    assert len(cluster.status("sim")["profiles"]) == 1  # the H100 keeps its profile, T4 is being tuned
    await eventually(lambda: cluster.status("sim")["phase"] == "Tuning")

    # GPU Feature Discovery labelling a node that was already there counts the same.
    await cluster.create("/api/v1/nodes", {"metadata": {"name": "late", "labels": {"pool": "a"}}})
    await cluster.merge("/api/v1/nodes/late", {"metadata": {"labels": {"nvidia.com/gpu.product": A100}}})
    await eventually(lambda: len(cluster.daemonsets()) == 3 and len(cluster.jobs()) == 2)


async def test_the_last_node_of_a_product_removed_deletes_its_daemonset(
    cluster: Cluster, operator: OperatorThread
) -> None:
    status = await tuned(cluster)  # first, alone: `tuned` finishes the one Job there is, the H100's
    await cluster.add_node("gpu-2", T4, cc="7.5")
    await cluster.add_node("gpu-3", T4, cc="7.5")
    await eventually(lambda: len(cluster.daemonsets()) == 2 and len(cluster.jobs()) == 1)
    await cluster.remove_node("gpu-2")
    await asyncio.sleep(0.6)
    assert len(cluster.daemonsets()) == 2  # one T4 node is left
    await cluster.remove_node("gpu-3")
    await eventually(lambda: [ds["metadata"]["name"] for ds in cluster.daemonsets()] == ["sim-nvidia-h100-80gb-hbm3"])
    await eventually(lambda: not cluster.jobs())  # its tune Job goes too
    (gone,) = await eventually(lambda: cluster.events("GpuProductGone"))
    assert T4 in gone["message"]
    assert [p["gpuProduct"] for p in cluster.status("sim")["products"]] == [H100]
    assert cluster.status("sim")["profiles"] == status["profiles"]


async def test_operator_restart_midway_creates_no_duplicates(kube: Any, cluster: Cluster) -> None:
    settings = fast_settings(str(kube.url))
    first = await OperatorThread(settings).start()
    await cluster.add_node("gpu-1", H100)
    await cluster.add_node("gpu-2", T4, cc="7.5")
    await cluster.apply("sim", SPEC)
    await eventually(lambda: len(cluster.jobs()) == 2 and len(cluster.daemonsets()) == 2)
    await eventually(lambda: len(cluster.events("TuneStarted")) == 2)
    await first.stop()

    # While it is down, one Job finishes; the new operator resumes from what exists.
    h100_job = next(j for j in cluster.jobs() if j["metadata"]["labels"]["structsim.io/gpu-product"] == H100)
    await cluster.finish_job(h100_job["metadata"]["name"], result=profile_json(H100))
    second = await OperatorThread(settings).start()
    try:
        await eventually(lambda: len(cluster.status("sim").get("profiles") or []) == 1)
        await asyncio.sleep(1.0)  # several resyncs, and kmock replays every object as ADDED on each watch
    finally:
        await second.stop()
    assert len(cluster.daemonsets()) == 2 and len(cluster.jobs()) == 1
    assert len(cluster.objects("v1/services", "team-a")) == 1 and len(cluster.objects(CM, "team-a")) == 2
    for ds in cluster.daemonsets():  # created once each, never deleted and recreated
        assert cluster.history(DS, ds["metadata"]["name"], "team-a").count(None) == 0
    assert len(cluster.events("TuneStarted")) == 2 and len(cluster.events("ServiceCreated")) == 1


async def test_a_spec_change_changes_the_fingerprint_and_tunes_again(
    cluster: Cluster, operator: OperatorThread
) -> None:
    status = await tuned(cluster)
    old_fp = status["fingerprint"]
    await cluster.merge(cluster.resource_path("sim"), {"spec": {"autotune": {"p99Ms": 20}}})

    job = await one_job(cluster)
    assert job["metadata"]["labels"]["structsim.io/fingerprint"] not in (old_fp, None)
    assert flag(job["spec"]["template"]["spec"]["containers"][0]["args"], "--p99-ms") == "20.0"
    status = await eventually(lambda: cluster.status("sim")["observedGeneration"] == 2 and cluster.status("sim"))
    assert status["fingerprint"] == job["metadata"]["labels"]["structsim.io/fingerprint"]
    assert status["profiles"] == [] and status["phase"] == "Tuning"
    # The old profile was tuned for another objective: back to the safe default until re-tuned.
    assert flag(args_of(cluster.daemonsets()[0]), "--precision") == "fp16"

    await cluster.finish_job(job["metadata"]["name"], result=profile_json(H100, p99_ms=15.0))
    status = await eventually(lambda: cluster.status("sim")["profiles"] and cluster.status("sim"))
    assert status["profiles"][0]["fingerprint"] == status["fingerprint"] != old_fp


async def test_going_offline_keeps_the_tuned_profile_and_rolls_the_pods(
    cluster: Cluster, operator: OperatorThread
) -> None:
    status = await tuned(cluster)
    before = cluster.daemonsets()[0]
    await cluster.merge(
        cluster.resource_path("sim"), {"spec": {"model": {"cache": {"pvc": "structsim-models"}, "offline": True}}}
    )

    ds = await eventually(lambda: "--offline" in args_of(cluster.daemonsets()[0]) and cluster.daemonsets()[0])
    assert flag(args_of(ds), "--profile") == flag(args_of(before), "--profile") is not None  # still tuned
    after = await eventually(lambda: cluster.status("sim")["observedGeneration"] == 2 and cluster.status("sim"))
    assert (after["fingerprint"], after["profiles"]) == (status["fingerprint"], status["profiles"])
    assert not cluster.jobs() and len(cluster.events("TuneStarted")) == 1  # no re-tuning


async def test_deleting_the_resource_removes_every_child(cluster: Cluster, operator: OperatorThread) -> None:
    await tuned(cluster)
    await cluster.add_node("gpu-2", T4, cc="7.5")
    await eventually(lambda: cluster.jobs() and len(cluster.daemonsets()) == 2)
    await cluster.delete(cluster.resource_path("sim"))

    def all_gone() -> bool:
        assert not cluster.objects("structsim.io/v1alpha1/similarityservices", "team-a")
        for resource in (DS, "batch/v1/jobs", "v1/services", CM, "v1/pods"):
            assert not cluster.objects(resource, "team-a"), resource
        return True

    await eventually(all_gone)


async def test_an_invalid_spec_gets_a_condition_and_an_event_without_a_loop(
    cluster: Cluster, operator: OperatorThread
) -> None:
    await cluster.add_node("gpu-1", H100)
    # Valid for the CRD (int-or-string), not for the operator.
    await cluster.apply("sim", {**SPEC, "batching": {"maxBatchSize": "lots"}})
    status = await eventually(lambda: cluster.status("sim").get("phase") == "Degraded" and cluster.status("sim"))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "spec.batching.maxBatchSize" in ready["message"]
    await eventually(lambda: cluster.events("InvalidSpec"))
    annotations = lambda: cluster.resource("sim")["metadata"].get("annotations") or {}  # noqa: E731
    await eventually(lambda: "structsim.io/last-handled-configuration" in annotations())  # kopf is done with it
    versions = len(cluster.history("structsim.io/v1alpha1/similarityservices", "sim", "team-a"))
    await asyncio.sleep(1.0)  # four resync periods
    assert len(cluster.events("InvalidSpec")) == 1
    assert len(cluster.history("structsim.io/v1alpha1/similarityservices", "sim", "team-a")) == versions  # no writes
    assert not cluster.daemonsets() and not cluster.jobs()

    await cluster.merge(cluster.resource_path("sim"), {"spec": {"batching": {"maxBatchSize": 64}}})
    await eventually(lambda: cluster.daemonsets() and cluster.jobs())
    job_args = cluster.jobs()[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(job_args, "--max-batch-size") == "64" and "--max-wait-ms" not in job_args


async def test_autotune_disabled_never_tunes(cluster: Cluster, operator: OperatorThread) -> None:
    await cluster.add_node("gpu-1", H100)
    await cluster.apply("sim", {**SPEC, "autotune": {"enabled": False}})
    await eventually(lambda: cluster.daemonsets())
    await cluster.daemonsets_ready()
    status = await eventually(lambda: cluster.status("sim").get("phase") == "Ready" and cluster.status("sim"))
    assert next(c for c in status["conditions"] if c["type"] == "Tuned")["reason"] == "AutotuneDisabled"
    await asyncio.sleep(0.6)
    assert not cluster.jobs() and not cluster.events("TuneStarted")


async def test_pinned_precision_and_batching_skip_tuning(cluster: Cluster, operator: OperatorThread) -> None:
    await cluster.add_node("gpu-1", H100)
    await cluster.apply("sim", {**SPEC, "precision": "bf16", "batching": {"maxBatchSize": 32, "maxWaitMs": 4}})
    ds = (await eventually(lambda: cluster.daemonsets()))[0]
    args = args_of(ds)
    assert (flag(args, "--precision"), flag(args, "--max-batch-size"), flag(args, "--max-wait-ms")) == (
        "bf16",
        "32",
        "4",
    )
    status = await eventually(lambda: cluster.status("sim").get("conditions") and cluster.status("sim"))
    assert next(c for c in status["conditions"] if c["type"] == "Tuned")["reason"] == "Pinned"
    assert status["products"][0]["config"] == "pinned"
    await asyncio.sleep(0.6)
    assert not cluster.jobs()

    # Pinning only the precision tunes the rest, with the precision fixed.
    await cluster.merge(
        cluster.resource_path("sim"), {"spec": {"batching": {"maxBatchSize": "auto", "maxWaitMs": "auto"}}}
    )
    job_args = (await one_job(cluster))["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(job_args, "--precision") == "bf16" and "--max-batch-size" not in job_args


async def test_drifted_children_are_repaired(cluster: Cluster, operator: OperatorThread) -> None:
    await tuned(cluster)
    ds = cluster.daemonsets()[0]
    name = ds["metadata"]["name"]
    path = f"/apis/apps/v1/namespaces/team-a/daemonsets/{name}"
    good_template = ds["spec"]["template"]
    await cluster.merge(
        path,
        {
            "spec": {
                "template": {
                    "spec": {
                        "nodeSelector": {"extra": "x"},
                        "containers": [{**good_template["spec"]["containers"][0], "image": "evil:latest"}],
                    }
                }
            }
        },
    )
    await cluster.delete("/api/v1/namespaces/team-a/services/sim")

    def repaired() -> bool:
        fixed = cluster.get(DS, name, "team-a")
        assert fixed["spec"]["template"]["spec"]["containers"][0]["image"] == SPEC["image"]
        assert "extra" not in fixed["spec"]["template"]["spec"]["nodeSelector"]
        return cluster.get("v1/services", "sim", "team-a") is not None

    await eventually(repaired)
    assert cluster.get(DS, name, "team-a")["spec"]["template"] == good_template
    await eventually(lambda: cluster.events("Updated"))


async def test_changed_resources_update_the_daemonset_and_keep_the_profile(
    cluster: Cluster, operator: OperatorThread
) -> None:
    status = await tuned(cluster)
    name = cluster.daemonsets()[0]["metadata"]["name"]

    def resources() -> dict[str, Any]:
        return cluster.get(DS, name, "team-a")["spec"]["template"]["spec"]["containers"][0]["resources"]

    assert resources() == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"nvidia.com/gpu": "1"}}
    # Requests replace the default map whole (memory goes), in the API server's form; a memory limit joins.
    spec = {"resources": {"requests": {"cpu": "0.5"}, "limits": {"memory": "32Gi"}}}
    await cluster.merge(cluster.resource_path("sim"), {"spec": spec})
    await eventually(
        lambda: resources() == {"requests": {"cpu": "500m"}, "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}}
    )
    # A limit dropped from the spec leaves the pods too (the live container still had it).
    await cluster.merge(cluster.resource_path("sim"), {"spec": {"resources": {"limits": None}}})
    await eventually(lambda: resources() == {"requests": {"cpu": "500m"}, "limits": {"nvidia.com/gpu": "1"}})

    after = await eventually(lambda: cluster.status("sim")["observedGeneration"] == 3 and cluster.status("sim"))
    assert (after["fingerprint"], after["profiles"]) == (status["fingerprint"], status["profiles"])  # no CPU limit
    assert not cluster.jobs() and len(cluster.events("TuneStarted")) == 1
    assert "--profile" in args_of(cluster.get(DS, name, "team-a"))
    versions = len(cluster.history(DS, name, "team-a"))
    await asyncio.sleep(0.6)  # a few resyncs: converged, nothing patched again
    assert len(cluster.history(DS, name, "team-a")) == versions


async def test_time_sliced_nodes_share_the_tuning_of_their_gpu(cluster: Cluster, operator: OperatorThread) -> None:
    await cluster.add_node("gpu-1", T4, cc="7.5")
    await cluster.add_node("gpu-2", f"{T4}-SHARED", cc="7.5")
    await cluster.apply("sim", SPEC)
    await eventually(lambda: len(cluster.daemonsets()) == 2)
    job = await one_job(cluster)  # one GPU type, one tuning, on the node with a whole GPU
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == [T4]
    await cluster.finish_job(job["metadata"]["name"], result=profile_json(T4, cc="7.5"))

    def both_tuned() -> bool:
        assert all(flag(args_of(ds), "--profile") for ds in cluster.daemonsets())
        return True

    await eventually(both_tuned)
    status = await eventually(lambda: cluster.status("sim").get("profiles") and cluster.status("sim"))
    assert [p["gpuProduct"] for p in status["profiles"]] == [T4]
    await eventually(
        lambda: (
            {p["gpuProduct"]: p["config"] for p in cluster.status("sim")["products"]}
            == {T4: "tuned", f"{T4}-SHARED": "tuned"}
        )
    )
