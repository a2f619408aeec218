"""The pure decisions behind a reconcile: drift patches, Job states, phase and conditions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from similarity_operator.drift import EACH, covers, merge_patch
from similarity_operator.reconcile import finished_at, job_state
from similarity_operator.status import ProductReport, condition, phase, ready_condition, summary, tuned_condition

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_server_defaults_are_not_drift() -> None:
    desired = {"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 8080}]}], "tolerations": []}}
    live = {
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "terminationMessagePath": "/dev/termination-log",
                }
            ],
            "dnsPolicy": "ClusterFirst",
        }
    }
    assert covers(live, desired)
    assert merge_patch(live, desired) == {}


def test_drift_is_patched_minimally_and_lists_whole() -> None:
    desired = {"metadata": {"labels": {"a": "1"}}, "spec": {"args": ["serve", "--precision", "fp16"], "image": "good"}}
    live = {"metadata": {"labels": {"a": "0", "mine": "x"}}, "spec": {"args": ["serve"], "image": "good", "extra": 1}}
    assert merge_patch(live, desired) == {
        "metadata": {"labels": {"a": "1"}},
        "spec": {"args": ["serve", "--precision", "fp16"]},
    }


def test_owned_maps_are_exact() -> None:
    desired = {"data": {"fingerprint": "f"}, "spec": {"nodeSelector": {"gpu": "t4"}}}
    live = {
        "data": {"fingerprint": "f", "profile.json": "stale"},
        "spec": {"nodeSelector": {"gpu": "t4", "added": "x"}},
    }
    patch = merge_patch(live, desired, exact=[("data",), ("spec", "nodeSelector")])
    assert patch == {"data": {"profile.json": None}, "spec": {"nodeSelector": {"added": None}}}


def test_exact_maps_inside_list_items_replace_the_list() -> None:
    """A limit or request dropped from the spec is still on the live container: the containers are
    replaced whole (a merge patch cannot reach into a list), server defaults there still no drift."""
    resources = ("spec", "containers", EACH, "resources")
    exact = [resources, (*resources, "requests"), (*resources, "limits")]

    def pod(**resources: dict[str, str]) -> dict[str, Any]:
        return {"spec": {"containers": [{"name": "c", "resources": resources}]}}

    desired = pod(requests={"cpu": "2"}, limits={"gpu": "1"})
    live = pod(requests={"cpu": "2"}, limits={"gpu": "1"})
    live["spec"]["containers"][0]["terminationMessagePath"] = "/dev/termination-log"
    assert merge_patch(live, desired, exact) == {}
    for stale in (
        pod(requests={"cpu": "2"}, limits={"gpu": "1", "cpu": "4"}),  # a limit dropped
        pod(requests={"cpu": "2", "memory": "6Gi"}, limits={"gpu": "1"}),  # a request dropped
        pod(limits={"gpu": "1"}),  # a request added
    ):
        assert merge_patch(stale, desired, exact) == desired
    assert merge_patch(pod(requests={"cpu": "2"}, limits={"gpu": "1"}), pod(limits={"gpu": "1"}), exact) == pod(
        limits={"gpu": "1"}
    )  # every request dropped
    assert covers(pod(limits={"gpu": "1", "cpu": "4"}), pod(limits={"gpu": "1"}))  # not exact: extra keys are fine


def job(*conditions: tuple[str, str], **status: Any) -> dict[str, Any]:
    conds = [{"type": t, "status": "True", "lastTransitionTime": when} for t, when in conditions]
    return {"metadata": {"creationTimestamp": "2026-11-25T11:00:00Z"}, "status": {"conditions": conds, **status}}


@pytest.mark.parametrize(
    ("obj", "state"),
    [
        (job(), "active"),
        (job(active=1), "active"),
        (job(("Complete", "2026-11-25T11:30:00Z")), "succeeded"),
        (job(("SuccessCriteriaMet", "2026-11-25T11:30:00Z")), "succeeded"),
        (job(("FailureTarget", "2026-11-25T11:30:00Z")), "failed"),
        (job(("Failed", "2026-11-25T11:30:00Z")), "failed"),
        (job(failed=1), "failed"),
    ],
)
def test_job_states(obj: dict[str, Any], state: str) -> None:
    assert job_state(obj) == state


def test_a_failure_is_timed_by_its_condition() -> None:
    assert finished_at(job(("Failed", "2026-11-25T11:30:00Z")), NOW) == datetime(2026, 11, 25, 11, 30, tzinfo=UTC)
    assert finished_at(job(), NOW) == datetime(2026, 11, 25, 11, 0, tzinfo=UTC)  # else its creation
    assert finished_at({}, NOW) == NOW


def report(tune: str = "tuned", desired: int = 2, available: int = 2, **status: Any) -> ProductReport:
    return ProductReport(
        gpu_product="GPU",
        hardware="GPU",
        nodes=desired,
        daemonset="sim-gpu",
        daemonset_status={
            "desiredNumberScheduled": desired,
            "numberAvailable": available,
            "updatedNumberScheduled": desired,
            "observedGeneration": 2,
            **status,
        },
        daemonset_generation=2,
        config="tuned",
        precision="fp16",
        tune=tune,  # type: ignore[arg-type]
        tune_message=f"GPU: {tune}",
    )


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([], "Pending"),
        ([report(available=0, desired=0)], "Pending"),
        ([report("failed")], "Degraded"),
        ([report("running", available=0)], "Tuning"),
        ([report("tuned")], "Ready"),
        ([report("pinned"), report("disabled")], "Ready"),
        ([report(available=1, updatedNumberScheduled=1)], "Tuning"),  # a new config rolling out
        ([report(available=1, observedGeneration=1)], "Tuning"),
        ([report(available=0)], "Pending"),
        ([report(available=1)], "Degraded"),  # up to date, yet a pod is not available
    ],
)
def test_phase(reports: list[ProductReport], expected: str) -> None:
    assert phase(reports) == expected


def test_conditions_say_why() -> None:
    assert ready_condition([]) == (False, "NoGpuNodes", ready_condition([])[2])
    assert ready_condition([report(available=1)])[:2] == (False, "PodsNotReady")
    assert ready_condition([report()]) == (True, "AllPodsReady", "2/2 serving pods available on 1 GPU product(s)")
    assert tuned_condition([report("failed"), report("running")]) == (False, "TuneFailed", "GPU: failed; GPU: running")
    assert tuned_condition([report("running")])[:2] == (False, "Tuning")
    assert tuned_condition([report("disabled")])[:2] == (False, "AutotuneDisabled")
    assert tuned_condition([report("pinned")])[:2] == (True, "Pinned")
    assert tuned_condition([report("tuned"), report("pinned")]) == (True, "Tuned", "tuned: GPU")


def test_a_condition_keeps_its_transition_time_while_unchanged() -> None:
    earlier = [{"type": "Ready", "status": "False", "lastTransitionTime": "2026-11-25T10:00:00Z"}]
    same = condition("Ready", False, "PodsNotReady", "0/1", 3, earlier, NOW)
    flipped = condition("Ready", True, "AllPodsReady", "1/1", 3, earlier, NOW)
    assert same["lastTransitionTime"] == "2026-11-25T10:00:00Z"
    assert flipped["lastTransitionTime"] == "2026-11-25T12:00:00Z" and flipped["observedGeneration"] == 3


def test_the_summary_shows_the_slowest_tuned_type() -> None:
    profiles = [{"throughput": 24101.7, "p99Ms": 12.0}, {"throughput": 3100.2, "p99Ms": 31.5}]
    assert summary([report()], profiles) == {"precision": "fp16", "throughput": 3100, "p99Ms": 31.5}
    assert summary([], []) == {"precision": None, "throughput": None, "p99Ms": None}
