"""The operator's only Kubernetes API caller (kopf, the framework, makes its own calls).

Dicts in, dicts out: manifests come from render.py as plain dicts and go back as plain dicts, so no
model classes sit between the operator and the API. Errors become ApiError (Conflict, NotFound) here
and nowhere else. Patches are JSON merge patches, declared as such: kubernetes_asyncio would send a
dict as a strategic-merge patch, which custom resources refuse and whose list merging we don't want.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, config

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    """A namespaced built-in kind, named as kubernetes_asyncio names its API methods."""

    api: type
    stem: str  # e.g. "daemon_set" in create_namespaced_daemon_set
    api_version: str
    kind: str


SERVICE = Kind(client.CoreV1Api, "service", "v1", "Service")
CONFIG_MAP = Kind(client.CoreV1Api, "config_map", "v1", "ConfigMap")
POD = Kind(client.CoreV1Api, "pod", "v1", "Pod")
DAEMON_SET = Kind(client.AppsV1Api, "daemon_set", "apps/v1", "DaemonSet")
JOB = Kind(client.BatchV1Api, "job", "batch/v1", "Job")


class ApiError(Exception):
    """The API server refused a request."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @classmethod
    def from_response(cls, status: int, body: bytes) -> ApiError:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        reason = str(doc.get("reason") or "")
        message = str(doc.get("message") or body[:200].decode(errors="replace"))
        error_type = {404: NotFound, 409: Conflict}.get(status, cls)
        return error_type(status, reason, message)


class NotFound(ApiError):
    """404: the object (or its namespace) does not exist."""


class Conflict(ApiError):
    """409: the name is taken, or the object changed since it was read."""


async def load_configuration(server: str | None = None) -> client.Configuration:
    """In a pod: its service account; elsewhere: the kubeconfig. `server` (a URL without
    credentials, e.g. from `kubectl proxy`) bypasses both."""
    configuration = client.Configuration()
    if server:
        configuration.host = server.rstrip("/")
        return configuration
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config(client_configuration=configuration)
    return configuration


class K8s:
    """Namespaced CRUD over plain dicts. One instance per operator; close it on shutdown."""

    def __init__(self, configuration: client.Configuration) -> None:
        self._client = client.ApiClient(configuration)
        self._apis: dict[type, Any] = {}

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, kind: Kind, verb: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        api = self._apis.get(kind.api)
        if api is None:
            api = self._apis[kind.api] = kind.api(self._client)
        method = getattr(api, f"{verb}_namespaced_{kind.stem}")
        # Raw responses: the JSON is what we want, and non-2xx statuses are mapped to ApiError here.
        response = await method(*args, _preload_content=False, **kwargs)
        try:
            body = await response.read()
        finally:
            response.release()
        if not 200 <= response.status < 300:
            raise ApiError.from_response(response.status, body)
        return json.loads(body) if body else {}

    async def list(self, kind: Kind, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        result = await self._call(kind, "list", namespace, label_selector=label_selector)
        return list(result.get("items") or [])

    async def read(self, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
        return await self._call(kind, "read", name, namespace)

    async def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(kind, "create", namespace, body)

    async def patch(self, kind: Kind, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(kind, "patch", name, namespace, body, _content_type=MERGE_PATCH)

    async def delete(self, kind: Kind, namespace: str, name: str) -> None:
        """Delete with its dependents (a Job's pods); an object already gone is not an error."""
        with contextlib.suppress(NotFound):
            await self._call(kind, "delete", name, namespace, propagation_policy="Background")
