"""One reconcile of a SimilarityService: observe its children, converge them, report a status.

Level-triggered: every run starts from what exists (children listed by label, owned by uid), not
from what happened, so a restart, a lost event or a rerun converges without duplicates. Per GPU
hardware type the ConfigMap is the durable record of the tuned profile (with the fingerprint it was
tuned for); Jobs are only in flight. A tuning round trip:

1. no matching profile → create tune Job `<name>-tune-<gpu>-<fp>-1`;
2. the Job succeeds → read the profile from its pod's termination message, write it to the
   ConfigMap, roll the DaemonSets (config-hash annotation), delete the Job;
3. the Job fails → Warning Event (once: the Job is annotated as reported), keep serving the safe
   default, and after a backoff that doubles per attempt create attempt 2, 3, ... .
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from similarity_operator import drift, gpus, render
from similarity_operator.k8s import CONFIG_MAP, DAEMON_SET, JOB, POD, SERVICE, Conflict, K8s, Kind
from similarity_operator.render import Owner
from similarity_operator.settings import Settings
from similarity_operator.spec import (
    ProfileError,
    Spec,
    SpecError,
    TunedProfile,
    fingerprint,
    parse_profile,
    parse_spec,
    profile_status,
)
from similarity_operator.status import (
    ProductReport,
    TuneState,
    condition,
    phase,
    ready_condition,
    summary,
    tuned_condition,
)

log = logging.getLogger(__name__)

ANNOTATION_REPORTED = "structsim.io/reported"

# Maps the operator owns outright: keys others add there are removed. A container's resources too, so
# a request or limit dropped from the spec leaves the pods (the API server adds none to a pod template).
_RESOURCES = ("spec", "template", "spec", "containers", drift.EACH, "resources")
_EXACT: dict[str, tuple[drift.Path, ...]] = {
    "ConfigMap": (("data",),),
    "DaemonSet": (
        ("spec", "template", "spec", "nodeSelector"),
        _RESOURCES,
        (*_RESOURCES, "requests"),
        (*_RESOURCES, "limits"),
    ),
    "Service": (("spec", "selector"),),
}


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the resource."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Outcome:
    """What a reconcile decided: the status fields that changed, Events, and whether the spec is invalid."""

    status_patch: dict[str, Any]
    events: list[Event]
    invalid: str | None = None


@dataclass(frozen=True)
class Resource:
    """The parts of a SimilarityService body a reconcile reads."""

    owner: Owner
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    deleting: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Resource:
        meta = body.get("metadata") or {}
        return cls(
            owner=Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
            generation=int(meta.get("generation") or 0),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
        )


@dataclass(frozen=True)
class Tune:
    """Where tuning of one hardware type stands."""

    state: TuneState
    job: str | None = None  # the Job to keep (running, or failed and waiting to retry)
    message: str = ""


@dataclass
class _Observed:
    services: dict[str, dict[str, Any]]
    configmaps: dict[str, dict[str, Any]]
    daemonsets: dict[str, dict[str, Any]]
    jobs: dict[str, dict[str, Any]]


async def reconcile(
    resource: Resource, nodes: Iterable[gpus.GpuNode], k8s: K8s, settings: Settings, now: datetime
) -> Outcome:
    """Converge the resource's children to its spec and the GPU nodes; never raises on a bad spec."""
    if resource.deleting:
        return Outcome({}, [])
    try:
        spec = parse_spec(resource.spec)
    except SpecError as exc:
        return _invalid(resource, str(exc), now)
    return await _Run(resource, spec, k8s, settings, now).converge(list(nodes))


def _invalid(resource: Resource, message: str, now: datetime) -> Outcome:
    """An invalid spec changes no child: it only says so, once per generation."""
    previous = resource.status.get("conditions") or []
    gen = resource.generation
    reported = any(
        c.get("type") == "Ready"
        and c.get("reason") == "InvalidSpec"
        and c.get("message") == message
        and c.get("observedGeneration") == gen
        for c in previous
    )
    status = {
        "phase": "Degraded",
        "observedGeneration": gen,
        "conditions": [
            condition("Ready", False, "InvalidSpec", message, gen, previous, now),
            condition(
                "Tuned",
                False,
                "InvalidSpec",
                "the spec is invalid: children were left as they were",
                gen,
                previous,
                now,
            ),
        ],
    }
    events = [] if reported else [Event("Warning", "InvalidSpec", message)]
    return Outcome(_status_patch(resource.status, status), events, invalid=message)


def _status_patch(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level status fields that differ (None removes one), so a steady state writes nothing."""
    return {
        key: value
        for key, value in desired.items()
        if current.get(key) != value and not (value is None and key not in current)
    }


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _time(text: object) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


def job_state(job: Mapping[str, Any]) -> Literal["active", "succeeded", "failed"]:
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded"
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    if int(status.get("succeeded") or 0) > 0:
        return "succeeded"
    if int(status.get("failed") or 0) > 0:  # backoffLimit is 0: one failed pod fails the Job
        return "failed"
    return "active"


def finished_at(job: Mapping[str, Any], default: datetime) -> datetime:
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") in ("Failed", "FailureTarget", "Complete") and cond.get("status") == "True":
            when = _time(cond.get("lastTransitionTime"))
            if when:
                return when
    for text in (status.get("completionTime"), status.get("startTime"), _meta(job).get("creationTimestamp")):
        when = _time(text)
        if when:
            return when
    return default


def attempt_of(job: Mapping[str, Any]) -> int:
    value = (_meta(job).get("labels") or {}).get(render.LABEL_ATTEMPT, "1")
    return int(value) if str(value).isdigit() else 1


class _Run:
    """The state of one reconcile: the resource, its parsed spec, and the Events it produced."""

    def __init__(self, resource: Resource, spec: Spec, k8s: K8s, settings: Settings, now: datetime) -> None:
        self.resource = resource
        self.owner = resource.owner
        self.ns = resource.owner.namespace
        self.spec = spec
        self.fp = fingerprint(spec)
        self.k8s = k8s
        self.settings = settings
        self.now = now
        self.events: list[Event] = []

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        log.info("%s/%s: %s: %s", self.ns, self.owner.name, reason, message)
        self.events.append(Event(type_, reason, message))

    async def converge(self, nodes: list[gpus.GpuNode]) -> Outcome:
        observed = await self.observe()
        products = gpus.select_products(nodes, self.spec.node_selector)
        await self.ensure_service(observed)
        reports: list[ProductReport] = []
        profiles: list[dict[str, Any]] = []
        keep_jobs: set[str] = set()
        for product in products:
            product_reports, tune, profile = await self.converge_product(product, observed)
            reports += product_reports
            if tune.job:
                keep_jobs.add(tune.job)
            if profile:
                profiles.append(profile)
        await self.prune(observed, {r.daemonset for r in reports}, keep_jobs)
        return Outcome(_status_patch(self.resource.status, self.status(reports, profiles)), self.events)

    async def observe(self) -> _Observed:
        selector = render.owned_selector(self.owner)
        kinds = (SERVICE, CONFIG_MAP, DAEMON_SET, JOB)
        lists = await asyncio.gather(*(self.k8s.list(kind, self.ns, selector) for kind in kinds))
        # Only children this very resource owns (by uid): a same-named predecessor's leftovers are not ours.
        owned = [{_meta(o)["name"]: o for o in items if render.is_owned_by(o, self.owner)} for items in lists]
        return _Observed(*owned)

    async def ensure(
        self, kind: Kind, desired: dict[str, Any], live: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, str]:
        """Create the child, or patch the live one where it drifted. Returns it and what was done:
        created, patched, unchanged, or conflict (the name is taken by something not ours)."""
        name = desired["metadata"]["name"]
        if live is None:
            try:
                return await self.k8s.create(kind, self.ns, desired), "created"
            except Conflict:  # it exists but was not listed: someone changed its labels
                live = await self.k8s.read(kind, self.ns, name)
            if not render.is_owned_by(live, self.owner):
                self.event(
                    "Warning",
                    "NameConflict",
                    f"{kind.kind} {name} exists and is not owned by this resource; "
                    "delete it to let the operator create its own",
                )
                return None, "conflict"
        # A Job's pod template is immutable: only its labels and owner can be repaired.
        mutable = (
            {"metadata": {k: desired["metadata"][k] for k in ("labels", "ownerReferences")}} if kind is JOB else desired
        )
        patch = drift.merge_patch(live, mutable, _EXACT.get(kind.kind, ()))
        if not patch:
            return live, "unchanged"
        return await self.k8s.patch(kind, self.ns, name, patch), "patched"

    async def ensure_service(self, observed: _Observed) -> None:
        desired = render.render_service(self.owner, self.spec)
        name = desired["metadata"]["name"]
        _, action = await self.ensure(SERVICE, desired, observed.services.get(name))
        if action == "created":
            self.event(
                "Normal", "ServiceCreated", f"Service {name} created: {render.endpoint(self.owner, self.spec.port)}"
            )
        elif action == "patched":
            self.event("Normal", "Updated", f"Service {name} updated to match the spec")

    def stored_profile(self, configmap: Mapping[str, Any] | None) -> tuple[TunedProfile | None, str | None]:
        """The product's tuned profile, if its ConfigMap holds one for the current fingerprint."""
        data = (configmap or {}).get("data") or {}
        text = data.get(render.PROFILE_KEY)
        if data.get(render.FINGERPRINT_KEY) != self.fp or not text:
            return None, None
        try:
            return self.check_pins(parse_profile(text)), text
        except ProfileError as exc:
            self.event(
                "Warning", "InvalidProfile", f"ConfigMap {_meta(configmap or {}).get('name')}: {exc}; tuning again"
            )
            return None, None

    def check_pins(self, profile: TunedProfile) -> TunedProfile:
        """A profile must keep what the spec pins: it was tuned with those knobs fixed."""
        pins = {
            "precision": (self.spec.pinned_precision, profile.precision),
            "maxBatchSize": (self.spec.batching.max_batch_size, profile.max_batch_size),
            "maxWaitMs": (self.spec.batching.max_wait_ms, profile.max_wait_ms),
        }
        for knob, (pinned, got) in pins.items():
            if pinned not in (None, "auto") and pinned != got:
                raise ProfileError(f"{knob} is {got!r} but the spec pins {pinned!r}")
        return profile

    async def converge_product(
        self, product: gpus.Product, observed: _Observed
    ) -> tuple[list[ProductReport], Tune, dict[str, Any] | None]:
        cm_name = render.configmap_name(self.owner, product.hardware)
        profile, profile_json = self.stored_profile(observed.configmaps.get(cm_name))
        if profile is not None:
            tune = Tune("tuned")
        elif self.spec.tunes:
            tune, profile, profile_json = await self.tune(product, observed.jobs)
        else:
            tune = Tune("pinned" if self.spec.fully_pinned else "disabled")
        await self.ensure(
            CONFIG_MAP,
            render.render_configmap(self.owner, product.hardware, self.fp, profile_json),
            observed.configmaps.get(cm_name),
        )
        config = render.serving(self.spec, product, profile, profile_json)
        reports = [
            await self.ensure_daemonset(product, label, config, cm_name, tune, observed) for label in product.labels
        ]
        entry = profile_status(product.hardware, profile, product.compute_capability, self.fp) if profile else None
        return reports, tune, entry

    async def ensure_daemonset(
        self, product: gpus.Product, label: str, config: render.Serving, cm_name: str, tune: Tune, observed: _Observed
    ) -> ProductReport:
        desired = render.render_daemonset(self.owner, self.spec, label, config, cm_name)
        name = desired["metadata"]["name"]
        live_before = observed.daemonsets.get(name)
        live, action = await self.ensure(DAEMON_SET, desired, live_before)
        if action == "created":
            self.event(
                "Normal",
                "DaemonSetCreated",
                f"{label}: DaemonSet {name} created for {product.nodes[label]} node(s), "
                f"serving {config.precision} ({config.mode})",
            )
        elif action == "patched":
            old_hash = (
                ((live_before or {}).get("spec") or {})
                .get("template", {})
                .get("metadata", {})
                .get("annotations", {})
                .get(render.ANNOTATION_CONFIG_HASH)
            )
            if old_hash != config.config_hash:
                self.event(
                    "Normal",
                    "DaemonSetRolled",
                    f"{label}: DaemonSet {name} rolled to the {config.mode} config ({config.precision})",
                )
            else:
                self.event("Normal", "Updated", f"DaemonSet {name} updated to match the spec")
        live = live or {}
        return ProductReport(
            gpu_product=label,
            hardware=product.hardware,
            nodes=product.nodes[label],
            daemonset=name,
            daemonset_status=live.get("status") or {},
            daemonset_generation=int(_meta(live).get("generation") or 0),
            config=config.mode,
            precision=config.precision,
            tune=tune.state,
            tune_message=tune.message,
        )

    def backoff(self, attempt: int) -> timedelta:
        seconds = min(self.settings.tune_backoff_s * 2 ** (attempt - 1), self.settings.tune_backoff_max_s)
        return timedelta(seconds=seconds)

    async def tune(
        self, product: gpus.Product, jobs: Mapping[str, dict[str, Any]]
    ) -> tuple[Tune, TunedProfile | None, str | None]:
        """Advance tuning of one hardware type by one step; returns a profile once a Job delivered one."""
        hw = product.hardware
        mine = sorted(
            (
                job
                for job in jobs.values()
                if (_meta(job).get("labels") or {}).get(render.LABEL_PRODUCT) == hw
                and (_meta(job).get("labels") or {}).get(render.LABEL_FINGERPRINT) == self.fp
            ),
            key=attempt_of,
        )
        if not mine:
            return await self.start_tune(product, 1), None, None
        latest = mine[-1]
        name, attempt, state = _meta(latest)["name"], attempt_of(latest), job_state(latest)
        if state == "active":
            await self.ensure(JOB, self.job_manifest(product, attempt), latest)
            return Tune("running", name, f"{hw}: tune Job {name} running (attempt {attempt})"), None, None
        if state == "succeeded":
            message, _ = await self.pod_result(name)
            try:
                profile = self.check_pins(parse_profile(message))
            except ProfileError as exc:
                reason = f"its result is unusable: {exc}"
            else:
                self.event(
                    "Normal",
                    "Tuned",
                    f"{hw}: {profile.precision}, batch {profile.max_batch_size}, wait {profile.max_wait_ms:g} ms: "
                    f"{profile.throughput:.0f} pairs/s at p99 {profile.p99_ms:.1f} ms",
                )
                return Tune("tuned"), profile, message
        else:
            reason = await self.failure_reason(latest)
        return await self.after_failure(product, latest, attempt, reason), None, None

    async def after_failure(self, product: gpus.Product, job: dict[str, Any], attempt: int, reason: str) -> Tune:
        """Report a failed attempt once, then wait out the backoff before the next attempt."""
        name = _meta(job)["name"]
        retry_at = finished_at(job, self.now) + self.backoff(attempt)
        default = render.serving(self.spec, product, None, None).precision
        if not (_meta(job).get("annotations") or {}).get(ANNOTATION_REPORTED):
            wait = max(0, round((retry_at - self.now).total_seconds()))
            self.event(
                "Warning",
                "TuneFailed",
                f"{product.hardware}: tune Job {name} (attempt {attempt}) failed: {reason}; "
                f"serving the {default} default, next attempt in {wait}s",
            )
            await self.k8s.patch(JOB, self.ns, name, {"metadata": {"annotations": {ANNOTATION_REPORTED: "failed"}}})
        if self.now >= retry_at:
            return await self.start_tune(product, attempt + 1)
        stamp = retry_at.isoformat(timespec="seconds").replace("+00:00", "Z")
        return Tune("failed", name, f"{product.hardware}: attempt {attempt} failed ({reason}); next attempt at {stamp}")

    def job_manifest(self, product: gpus.Product, attempt: int) -> dict[str, Any]:
        return render.render_job(self.owner, self.spec, product, self.fp, attempt, self.settings.tune_priority_class)

    async def start_tune(self, product: gpus.Product, attempt: int) -> Tune:
        desired = self.job_manifest(product, attempt)
        name = desired["metadata"]["name"]
        _, action = await self.ensure(JOB, desired, None)
        if action == "created":
            self.event(
                "Normal",
                "TuneStarted",
                f"{product.hardware}: tune Job {name} started (attempt {attempt}, fingerprint {self.fp})",
            )
        elif action == "conflict":
            return Tune("failed", None, f"{product.hardware}: the name of tune Job {name} is taken")
        return Tune("running", name, f"{product.hardware}: tune Job {name} running (attempt {attempt})")

    async def pod_result(self, job_name: str) -> tuple[str | None, int | None]:
        """The termination message and exit code of the Job's autotune container (newest pod first)."""
        pods = await self.k8s.list(POD, self.ns, f"{render.LABEL_TUNE_JOB}={job_name}")
        pods.sort(key=lambda pod: str(_meta(pod).get("creationTimestamp") or ""), reverse=True)
        for pod in pods:
            for container in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (container.get("state") or {}).get("terminated")
                if container.get("name") == render.COMPONENT_TUNE and terminated:
                    return terminated.get("message"), terminated.get("exitCode")
        return None, None

    async def failure_reason(self, job: Mapping[str, Any]) -> str:
        message, code = await self.pod_result(_meta(job)["name"])
        if message and message.strip():
            return f"exit code {code}: {message.strip()[:300]}"
        for cond in (job.get("status") or {}).get("conditions") or []:
            if cond.get("type") in ("Failed", "FailureTarget") and cond.get("status") == "True":
                return f"{cond.get('reason') or 'Failed'}: {cond.get('message') or 'no message'}"
        return f"exit code {code}" if code is not None else "the Job failed without a reason"

    async def prune(self, observed: _Observed, keep_daemonsets: set[str], keep_jobs: set[str]) -> None:
        """Delete owned children nothing wants any more. ConfigMaps stay: they are the tuning record."""
        for name, ds in observed.daemonsets.items():
            if name not in keep_daemonsets:
                label = (_meta(ds).get("labels") or {}).get(render.LABEL_PRODUCT, "?")
                await self.k8s.delete(DAEMON_SET, self.ns, name)
                self.event(
                    "Normal", "GpuProductGone", f"{label}: no selected node has it any more; DaemonSet {name} deleted"
                )
        for name, job in observed.jobs.items():
            if name not in keep_jobs:
                await self.k8s.delete(JOB, self.ns, name)
                if job_state(job) == "active":
                    self.event("Normal", "TuneCancelled", f"tune Job {name} deleted: the spec or the nodes changed")
        service = render.service_name(self.owner)
        for name in observed.services:
            if name != service:
                await self.k8s.delete(SERVICE, self.ns, name)

    def status(self, reports: list[ProductReport], profiles: list[dict[str, Any]]) -> dict[str, Any]:
        previous = self.resource.status.get("conditions") or []
        gen = self.resource.generation
        ready, tuned = ready_condition(reports), tuned_condition(reports)
        return {
            "phase": phase(reports),
            "observedGeneration": gen,
            "endpoint": render.endpoint(self.owner, self.spec.port),
            "fingerprint": self.fp,
            **summary(reports, profiles),
            "products": [report.entry() for report in reports],
            "profiles": profiles,
            "conditions": [
                condition("Ready", *ready, gen, previous, self.now),
                condition("Tuned", *tuned, gen, previous, self.now),
            ],
        }
