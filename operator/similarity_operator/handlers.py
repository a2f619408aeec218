"""kopf handlers: the thin edge. They translate kopf's callbacks into one reconcile and its outcome
back into a status patch, Events and kopf's error types; the logic lives in reconcile.py.

Two triggers run the same reconcile: a spec change (create, update, and resume after a restart)
and a timer, which is what notices Jobs finishing, nodes coming and going, and drifted children.
A per-resource lock in kopf's per-object memo keeps the two from running at once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from similarity_operator.gpus import PRODUCT_LABEL, GpuNode
from similarity_operator.k8s import ApiError, K8s, load_configuration
from similarity_operator.reconcile import Outcome, Resource, reconcile
from similarity_operator.settings import Settings
from similarity_operator.spec import GROUP, PLURAL, VERSION


async def _run(settings: Settings, body: kopf.Body, memo: Any, gpu_nodes: kopf.Index[str, GpuNode]) -> Outcome:
    lock: asyncio.Lock = memo.setdefault("lock", asyncio.Lock())
    nodes = [node for store in gpu_nodes.values() for node in store]
    async with lock:
        try:
            return await reconcile(Resource.from_body(body), nodes, memo.k8s, settings, datetime.now(UTC))
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:  # the API is unwell: try again soon
            raise kopf.TemporaryError(f"Kubernetes API: {exc!r}", delay=settings.api_retry_delay_s) from exc


def _deliver(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    for key, value in outcome.status_patch.items():
        patch.status[key] = value
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def build_registry(config: Settings) -> kopf.OperatorRegistry:
    """The operator's handlers, bound to its settings (tests build one with short intervals)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        config.apply_to(settings)
        memo.k8s = K8s(await load_configuration(config.api_server))

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(*, memo: Any, **_: Any) -> None:
        await memo.k8s.close()

    @kopf.on.login(id="login", registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        if config.api_server:
            return kopf.ConnectionInfo(server=config.api_server.rstrip("/"))
        return await kopf.login_via_async_client(**kwargs)

    @kopf.index("", "v1", "nodes", id="gpu_nodes", labels={PRODUCT_LABEL: kopf.PRESENT}, registry=registry)
    def gpu_nodes(*, name: str, labels: kopf.Labels, status: kopf.Status, **_: Any) -> dict[str, GpuNode]:
        return {name: GpuNode.from_node(name, labels, status)}

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="converge", registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="converge", registry=registry)
    # kopf's callback protocols do not declare index keywords (gpu_nodes), hence the type-ignores.
    @kopf.on.update(GROUP, VERSION, PLURAL, id="converge", field="spec", registry=registry)  # type: ignore[arg-type]
    async def converge(
        *, body: kopf.Body, patch: kopf.Patch, memo: Any, gpu_nodes: kopf.Index[str, GpuNode], **_: Any
    ) -> None:
        outcome = await _run(config, body, memo, gpu_nodes)
        _deliver(outcome, body, patch)
        if outcome.invalid:
            raise kopf.PermanentError(f"invalid spec: {outcome.invalid}")

    @kopf.timer(  # type: ignore[arg-type]
        GROUP,
        VERSION,
        PLURAL,
        id="resync",
        interval=config.resync_interval_s,
        initial_delay=config.resync_interval_s,
        registry=registry,
    )
    async def resync(
        *,
        body: kopf.Body,
        patch: kopf.Patch,
        memo: Any,
        gpu_nodes: kopf.Index[str, GpuNode],
        stopped: kopf.DaemonStopped,
        **_: Any,
    ) -> None:
        if not stopped:  # the operator is exiting or the resource is being deleted
            _deliver(await _run(config, body, memo, gpu_nodes), body, patch)

    return registry
