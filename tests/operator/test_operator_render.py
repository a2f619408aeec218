"""render.py and gpus.py, purely: names, the serving and tuning contracts, and manifests that a
Kubernetes schema accepts."""

from __future__ import annotations

import argparse
import re
from pathlib import PurePosixPath
from typing import Any

import kubernetes_validate
import pytest

from kube_harness import MODEL
from similarity_operator import gpus, render
from similarity_operator.spec import fingerprint, parse_profile, parse_spec

OWNER = render.Owner(name="sim", namespace="team-a", uid="0f6c5f4e-1111-2222-3333-444455556666")
SPEC: dict[str, Any] = {"model": {"id": MODEL}, "image": "registry.example.com/structsim:0.1.0"}
H100 = gpus.Product(
    hardware="NVIDIA-H100-80GB-HBM3",
    labels=("NVIDIA-H100-80GB-HBM3",),
    nodes={"NVIDIA-H100-80GB-HBM3": 2},
    compute_capability="9.0",
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["template"]["spec"]["containers"][0]


def test_names_are_deterministic_dns_labels() -> None:
    assert render.daemonset_name(OWNER, "NVIDIA-H100-80GB-HBM3") == "sim-nvidia-h100-80gb-hbm3"
    assert render.configmap_name(OWNER, "Tesla-T4") == "sim-profile-tesla-t4"
    assert render.job_name(OWNER, "Tesla-T4", "0123456789abcdef", 2) == "sim-tune-tesla-t4-01234567-2"
    assert render.service_name(OWNER) == "sim"


@pytest.mark.parametrize(
    "parts",
    [
        ("a" * 60, "NVIDIA-H100-80GB-HBM3"),  # too long
        ("sim", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"),  # a dot is not allowed: rewritten, so hashed
        ("my.service", "Tesla-T4"),
        ("x" * 253,),
    ],
)
def test_long_or_rewritten_names_get_a_hash(parts: tuple[str, ...]) -> None:
    name = render.child_name(*parts)
    assert DNS_LABEL.match(name) and len(name) <= 63
    assert re.search(r"-[0-9a-f]{8}$", name)
    assert name == render.child_name(*parts)  # deterministic
    # Rewriting must not merge different products: "1g.5gb" and "1g-5gb" stay apart.
    assert render.child_name("sim", "MIG-1g.5gb") != render.child_name("sim", "MIG-1g-5gb")


def test_a_service_name_starts_with_a_letter() -> None:
    name = render.service_name(render.Owner("1st-sim", "ns", "u"))
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name) and len(name) <= 63
    assert render.endpoint(render.Owner("1st-sim", "ns", "u"), 8080) == f"http://{name}.ns.svc:8080"


@pytest.mark.parametrize(
    ("requests", "workers"),
    [
        ({}, "1"),
        ({"cpu": "8", "memory": "16Gi"}, "2"),
        ({"cpu": "16", "memory": "32Gi"}, "3"),
        ({"cpu": "64", "memory": "256Gi"}, "3"),  # at most 3
        ({"cpu": "16", "memory": "12Gi"}, "1"),  # the smaller of the two decides
        ({"cpu": "7900m", "memory": "64Gi"}, "1"),
        ({"cpu": "8"}, "1"),  # no memory request: nothing reserved for more
    ],
)
def test_serving_processes_follow_the_requested_cpu_and_memory(requests: dict[str, str], workers: str) -> None:
    spec = parse_spec({**SPEC, "resources": {"requests": requests}})
    config = render.serving(spec, H100, None, None)
    args = container(render.render_daemonset(OWNER, spec, "NVIDIA-H100-80GB-HBM3", config, "cm"))["args"]
    assert args[args.index("--workers") + 1] == workers


def test_the_serving_container_follows_the_contract() -> None:
    spec = parse_spec(
        {
            **SPEC,
            "gpusPerPod": 2,
            "model": {"id": MODEL, "revision": "v1.0.1", "cache": {"pvc": "models"}},
            "nodeSelector": {"pool": "inference"},
            "imagePullPolicy": "Always",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    )
    config = render.serving(spec, H100, None, None)
    ds = render.render_daemonset(OWNER, spec, "NVIDIA-H100-80GB-HBM3", config, "sim-profile-nvidia-h100-80gb-hbm3")
    c = container(ds)
    assert c["command"] == ["structsim"]
    assert c["args"] == [
        "serve",
        "--model",
        MODEL,
        "--revision",
        "v1.0.1",
        "--precision",
        "fp16",
        "--devices",
        "auto",  # gpusPerPod 2: the service serves on both GPUs of its limit
        "--workers",
        "1",  # the default requests (2 CPUs, 6Gi) hold one serving process
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    assert {"name": "STRUCTSIM_CACHE_DIR", "value": "/models"} in c["env"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # SIGTERM waits until endpoints have dropped the pod; the drain then has its full time before SIGKILL.
    assert c["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    # Requests by default (Burstable, not BestEffort), no CPU or memory limit; the GPUs in limits only.
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"nvidia.com/gpu": "2"}}
    assert c["imagePullPolicy"] == "Always"
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = ds["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert (
        pod["securityContext"]["runAsNonRoot"] is True
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert pod["nodeSelector"] == {"pool": "inference", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {}}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "models"}
    assert volumes["profile"]["configMap"] == {"name": "sim-profile-nvidia-h100-80gb-hbm3"}
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(("cc", "precision"), [("9.0", "fp16"), ("7.0", "fp16"), ("6.1", "fp32"), (None, "fp32")])
def test_the_safe_default_follows_compute_capability(cc: str | None, precision: str) -> None:
    product = gpus.Product(hardware="GPU", labels=("GPU",), nodes={"GPU": 1}, compute_capability=cc)
    config = render.serving(parse_spec(SPEC), product, None, None)
    assert (config.mode, config.precision, config.args) == ("default", precision, ("--precision", precision))


def test_pinned_knobs_and_tuned_profiles_change_what_pods_run() -> None:
    pinned = parse_spec({**SPEC, "precision": "fp32", "batching": {"maxBatchSize": 16, "maxWaitMs": 0}})
    config = render.serving(pinned, H100, None, None)
    assert config.mode == "pinned"
    assert config.args == ("--precision", "fp32", "--max-batch-size", "16", "--max-wait-ms", "0")

    text = '{"precision": "bf16", "maxBatchSize": 64, "maxWaitMs": 2, "throughput": 1, "p99Ms": 1, "tunedAt": "t"}'
    tuned = render.serving(parse_spec(SPEC), H100, parse_profile(text), text)
    assert (tuned.mode, tuned.precision, tuned.args) == ("tuned", "bf16", ("--profile", "/etc/structsim/profile.json"))
    default = render.serving(parse_spec(SPEC), H100, None, None)
    retuned = render.serving(parse_spec(SPEC), H100, parse_profile(text), text.replace('"t"', '"u"'))
    hashes = {default.config_hash, tuned.config_hash, retuned.config_hash}
    assert len(hashes) == 3  # any change of args or profile content rolls the pods
    assert tuned.config_hash == render.serving(parse_spec(SPEC), H100, parse_profile(text), text).config_hash


def test_the_tune_job_follows_the_contract() -> None:
    spec = parse_spec(
        {
            **SPEC,
            "precision": "fp16",
            "batching": {"maxWaitMs": 2},
            "autotune": {"trials": 12, "p99Ms": 25, "maxAbsError": 0.002, "threshold": 0.6, "timeoutSeconds": 900},
        }
    )
    fp = fingerprint(spec)
    shared = gpus.Product(
        hardware="Tesla-T4", labels=("Tesla-T4", "Tesla-T4-SHARED"), nodes={"Tesla-T4": 1, "Tesla-T4-SHARED": 3}
    )
    job = render.render_job(OWNER, spec, shared, fp, 3, priority_class="structsim-autotune")
    c = container(job)
    assert c["args"] == [
        "autotune",
        "--model",
        MODEL,
        "--revision",
        "master",
        "--gpu-product",
        "Tesla-T4",
        "--precision",
        "fp16",
        "--max-wait-ms",
        "2",
        "--trials",
        "12",
        "--p99-ms",
        "25.0",
        "--max-abs-error",
        "0.002",
        "--threshold",
        "0.6",
        "--out",
        "/tmp/profile.json",
        "--termination-log",
        "/dev/termination-log",
    ]
    assert (c["terminationMessagePath"], c["terminationMessagePolicy"]) == ("/dev/termination-log", "File")
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "6Gi"}, "limits": {"nvidia.com/gpu": "1"}}
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 900
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["priorityClassName"] == "structsim-autotune"
    assert "priorityClassName" not in render.render_job(OWNER, spec, shared, fp, 3)["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["Tesla-T4"]}]
    labels = job["metadata"]["labels"]
    assert (labels["structsim.io/fingerprint"], labels["structsim.io/attempt"], labels["structsim.io/gpu-product"]) == (
        fp,
        "3",
        "Tesla-T4",
    )
    assert job["spec"]["template"]["metadata"]["labels"]["structsim.io/tune-job"] == job["metadata"]["name"]
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] != "server"  # the Service never selects it


def test_a_time_sliced_only_product_tunes_on_its_shared_nodes() -> None:
    only_shared = gpus.Product(hardware="Tesla-T4", labels=("Tesla-T4-SHARED",), nodes={"Tesla-T4-SHARED": 2})
    assert only_shared.tune_labels == ("Tesla-T4-SHARED",)


OFFLINE = {"id": MODEL, "revision": "v1.0.1", "cache": {"pvc": "structsim-models"}, "offline": True}


def test_offline_reaches_both_pods_and_nothing_else() -> None:
    online = parse_spec({**SPEC, "model": {**OFFLINE, "offline": False}})
    offline = parse_spec({**SPEC, "model": OFFLINE})
    assert fingerprint(offline) == fingerprint(online)  # same weights, same scores, same profile

    def rendered(spec: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        ds = render.render_daemonset(OWNER, spec, H100.labels[0], render.serving(spec, H100, None, None), "cm")
        return container(ds), container(render.render_job(OWNER, spec, H100, fingerprint(spec), 1))

    for on, off in zip(rendered(online), rendered(offline), strict=True):
        assert "--offline" not in on["args"]  # unchanged args for specs without it: no rollout on upgrade
        at = off["args"].index("--offline")
        assert off["args"][at - 2 : at] == ["--revision", "v1.0.1"]
        assert off["args"][:at] + off["args"][at + 1 :] == on["args"]
        assert {k: v for k, v in off.items() if k != "args"} == {k: v for k, v in on.items() if k != "args"}


def test_exact_thresholds_reach_the_serving_pods_and_the_tune_job_only_when_named() -> None:
    def serve_args(spec: Any) -> list[str]:
        config = render.serving(spec, H100, None, None)
        return container(render.render_daemonset(OWNER, spec, H100.labels[0], config, "cm"))["args"]

    def job_args(spec: Any) -> list[str]:
        return container(render.render_job(OWNER, spec, H100, fingerprint(spec), 1))["args"]

    plain, named = parse_spec(SPEC), parse_spec({**SPEC, "exactThresholds": [0.5, 0.8]})
    for args in (serve_args, job_args):
        # Other specs' pods and Jobs keep their args: no rollout on upgrade.
        assert "--exact-thresholds" not in args(plain)
        at = args(named).index("--exact-thresholds")
        assert args(named)[at : at + 2] == ["--exact-thresholds", "0.5,0.8"]
        assert args(named)[:at] + args(named)[at + 2 :] == args(plain)


def test_one_gpu_per_pod_renders_no_devices_flag() -> None:
    """One GPU: the service's default device is that GPU; no flag keeps existing pods' args (no rollout)."""
    spec = parse_spec({**SPEC, "gpusPerPod": 1})
    c = container(render.render_daemonset(OWNER, spec, H100.labels[0], render.serving(spec, H100, None, None), "cm"))
    assert "--devices" not in c["args"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1"}


def qos_class(container: dict[str, Any]) -> str:
    """The QoS class of a one-container pod: its requests default to its limits; only CPU and memory count."""
    limits = container["resources"].get("limits", {})
    requests = {**limits, **container["resources"].get("requests", {})}
    if not {"cpu", "memory"} & requests.keys():
        return "BestEffort"
    guaranteed = all(name in limits and requests[name] == limits[name] for name in ("cpu", "memory"))
    return "Guaranteed" if guaranteed else "Burstable"


@pytest.mark.parametrize(
    ("resources", "qos"),
    [
        ({}, "Burstable"),  # the defaults
        ({"requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "20Gi"}}, "Burstable"),
        ({"requests": {"cpu": 4, "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}, "Guaranteed"),
        ({"requests": {}}, "BestEffort"),  # asked for
    ],
)
def test_serving_and_tune_pods_get_the_spec_resources_and_their_gpus(resources: dict[str, Any], qos: str) -> None:
    spec = parse_spec({**SPEC, "gpusPerPod": 2, **({"resources": resources} if resources else {})})
    config = render.serving(spec, H100, None, None)
    serving = container(render.render_daemonset(OWNER, spec, H100.labels[0], config, "cm"))
    tuning = container(render.render_job(OWNER, spec, H100, fingerprint(spec), 1))
    requests = {k: str(v) for k, v in resources.get("requests", {"cpu": "2", "memory": "6Gi"}).items()}
    for c, gpu_limit in ((serving, "2"), (tuning, "1")):  # the tune Job measures one GPU, with the pods' CPU
        assert c["resources"].get("requests", {}) == requests
        assert c["resources"]["limits"] == {**resources.get("limits", {}), "nvidia.com/gpu": gpu_limit}
        assert qos_class(c) == qos


def test_quantities_are_rendered_as_the_api_server_stores_them() -> None:
    """Else drift would patch "0.5" over the live "500m" on every resync."""
    spec = parse_spec(
        {**SPEC, "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"cpu": "1.5"}}}
    )
    c = container(render.render_daemonset(OWNER, spec, H100.labels[0], render.serving(spec, H100, None, None), "cm"))
    assert c["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "1500m", "nvidia.com/gpu": "1"},
    }


@pytest.mark.parametrize("model", [{"id": MODEL, "cache": {"pvc": "structsim-models"}}, {"id": MODEL}])
def test_compile_caches_live_on_the_model_volume(model: dict[str, Any]) -> None:
    """torch.compile's caches outlive the pod (on the claim, or at least a container restart), not /tmp."""
    spec = parse_spec({**SPEC, "model": model})
    ds = render.render_daemonset(OWNER, spec, H100.labels[0], render.serving(spec, H100, None, None), "cm")
    job = render.render_job(OWNER, spec, H100, fingerprint(spec), 1)
    for manifest in (ds, job):
        pod = manifest["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        names = [e["name"] for e in c["env"]]
        assert len(names) == len(set(names))  # one value each: no later entry silently overrides it
        env = {e["name"]: e["value"] for e in c["env"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
            path = PurePosixPath(env[variable])
            assert path.is_absolute()
            # The deepest mount holding the path is the models volume, writable, and not HOME's /tmp.
            mount = max((m for m in mounts if path.is_relative_to(m)), key=lambda m: len(PurePosixPath(m).parts))
            assert mount == env["STRUCTSIM_CACHE_DIR"] and path != PurePosixPath(mount)
            assert not mounts[mount].get("readOnly", False)
            assert not path.is_relative_to(env["HOME"])
            volume = volumes[mounts[mount]["name"]]
            if "cache" in model:
                assert volume["persistentVolumeClaim"] == {"claimName": "structsim-models"}
            else:
                assert volume["emptyDir"] == {}
        assert env["TORCHINDUCTOR_CACHE_DIR"] != env["TRITON_CACHE_DIR"]

def test_rendered_args_parse_with_the_real_serve_and_autotune() -> None:
    """The flag names are a contract with the service's and autotune's CLIs: parse them there."""
    # Imported here, not at the top: autotune pulls in torch, which no other test in this module needs.
    from similarity_autotune import command as autotune_command
    from similarity_autotune.session import TuneOptions, service_settings
    from similarity_service.commands import serve
    from similarity_service.commands.serve import SHUTDOWN_GRACE_S
    from similarity_service.settings import load_settings

    spec = parse_spec(
        {**SPEC, "model": OFFLINE, "batching": {"maxBatchSize": 16}, "gpusPerPod": 4, "exactThresholds": [0.5, 0.000125]}
    )
    config = render.serving(spec, H100, None, None)
    daemonset = render.render_daemonset(OWNER, spec, H100.labels[0], config, "cm")
    serving = container(daemonset)
    tuning = container(render.render_job(OWNER, spec, H100, fingerprint(spec), 1))

    def parse(configure: Any, c: dict[str, Any], subcommand: str) -> tuple[argparse.Namespace, dict[str, str]]:
        assert c["args"][0] == subcommand
        parser = argparse.ArgumentParser()
        configure(parser)
        return parser.parse_args(c["args"][1:]), {e["name"]: e["value"] for e in c["env"]}

    args, env = parse(serve.configure, serving, "serve")
    settings = load_settings(vars(args), env)
    assert (settings.model, settings.revision, settings.offline) == (MODEL, "v1.0.1", True)
    assert (settings.cache_dir, settings.precision, settings.max_batch_size) == ("/models", "fp16", 16)
    assert settings.devices == "auto"  # every GPU of the pod's limit
    assert settings.exact_threshold_values == (0.5, 0.000125)
    # The kubelet's SIGKILL never cuts serve's drain short: preStop sleep + drain + response grace fit.
    grace = daemonset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > render.PRESTOP_SLEEP_S + settings.drain_timeout_s + SHUTDOWN_GRACE_S

    args, env = parse(autotune_command.configure, tuning, "autotune")
    options = TuneOptions.from_args(args)
    settings = service_settings(options, env)
    assert (settings.model, settings.revision, settings.offline, settings.cache_dir) == (
        MODEL,
        "v1.0.1",
        True,
        "/models",
    )
    assert (options.gpu_product, options.max_batch_size) == (H100.hardware, 16)
    assert settings.exact_threshold_values == (0.5, 0.000125)  # tuned as served


@pytest.mark.parametrize("kube_version", ["1.29.0", "1.37.0"])
def test_every_child_is_a_valid_kubernetes_object(kube_version: str) -> None:
    spec = parse_spec(
        {
            **SPEC,
            "tolerations": [
                {"key": "gpu", "operator": "Equal", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 60}
            ],
            "resources": {"requests": {"cpu": "500m", "ephemeral-storage": "10Gi"}, "limits": {"memory": "32Gi"}},
        }
    )
    config = render.serving(spec, H100, None, None)
    children = [
        render.render_service(OWNER, spec),
        render.render_configmap(OWNER, H100.hardware, fingerprint(spec), '{"precision": "fp16"}'),
        render.render_daemonset(OWNER, spec, H100.labels[0], config, "cm"),
        render.render_job(OWNER, spec, H100, fingerprint(spec), 1),
    ]
    for child in children:
        kubernetes_validate.validate(child, kube_version, strict=True)
        assert child["metadata"]["ownerReferences"] == [OWNER.reference()]
        assert DNS_LABEL.match(child["metadata"]["name"]) and len(child["metadata"]["name"]) <= 63


def test_gpu_products_are_grouped_by_hardware() -> None:
    def node(name: str, product: str, **labels: str) -> gpus.GpuNode:
        return gpus.GpuNode(name, {"nvidia.com/gpu.product": product, **labels})

    nodes = [
        node(
            "a", "Tesla-T4", **{"nvidia.com/gpu.compute.major": "7", "nvidia.com/gpu.compute.minor": "5", "pool": "x"}
        ),
        node("b", "Tesla-T4-SHARED", pool="x"),  # time-sliced: same hardware, its own DaemonSet
        node("c", "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", pool="x"),  # a MIG slice: its own product
        node("d", "NVIDIA-A100-SXM4-40GB", pool="x", **{"nvidia.com/mig.strategy": "mixed"}),  # slices only
        node("e", "NVIDIA-H100-80GB-HBM3", pool="y"),  # not selected
        gpus.GpuNode("f", {"nvidia.com/gpu.product": "NVIDIA-L4", "pool": "x"}, gpus=0),  # no allocatable GPU
        gpus.GpuNode("g", {"pool": "x"}),  # no GPU at all
    ]
    products = gpus.select_products(nodes, {"pool": "x"})
    assert [(p.hardware, p.labels, dict(p.nodes)) for p in products] == [
        (
            "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
            ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",),
            {"NVIDIA-A100-SXM4-40GB-MIG-1g.5gb": 1},
        ),
        ("Tesla-T4", ("Tesla-T4", "Tesla-T4-SHARED"), {"Tesla-T4": 1, "Tesla-T4-SHARED": 1}),
    ]
    assert products[1].compute_capability == "7.5" and products[1].safe_precision == "fp16"
    assert products[0].compute_capability is None and products[0].safe_precision == "fp32"


def test_node_capacity_is_read_from_status() -> None:
    node = gpus.GpuNode.from_node("n", {"nvidia.com/gpu.product": "X"}, {"capacity": {"nvidia.com/gpu": "8"}})
    assert node.gpus == 8 and node.serves_gpus()
    assert gpus.GpuNode.from_node("n", {"nvidia.com/gpu.product": "X"}, None).gpus is None
