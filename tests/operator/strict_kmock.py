"""StrictEmulator: kmock's in-memory Kubernetes API server with the API-server semantics the operator
depends on (K8S-TESTING.md §3), so that the mock cannot hide the bugs a real cluster would show:

- the server assigns uid, resourceVersion, generation and creationTimestamp, and fills apiVersion/kind;
  generateName works (kopf's Events use it);
- names, label keys/values and ownerReferences (uid required) are validated (422);
- a resource with a status subresource splits writes: PATCH …/status changes only status, a main PATCH
  or a create ignores status;
- PATCH needs a declared Content-Type: merge-patch (dict) or json-patch (list); anything else is 415,
  including the strategic-merge patch that kubernetes_asyncio picks by default for dicts;
- 409 on a duplicate create and on a patch carrying a stale metadata.resourceVersion;
- immutable fields stay immutable (a Job's pod template and selector, a DaemonSet's selector);
- label selectors filter lists and watches; lists are typed (kind …List, apiVersion, resourceVersion);
- deletion honours finalizers, then garbage-collects dependents by ownerReferences (same namespace),
  and an object created with only dangling owners is collected at once, as the real GC would;
- custom resources are validated against the CRD's schema (422) and pruned of unknown fields;
- the core group's discovery says groupVersion "v1" (kmock says "/v1"), and /api/v1/namespaces[/name]
  means the Namespace resource (kmock's path parser reads it as a namespaced path and fails);
- namespaced objects can only be created in an existing Namespace.
Not emulated: controllers (no pods from DaemonSets or Jobs), scheduling, RBAC, server-side apply,
strategic merge, watch from a resourceVersion (every watch replays all objects as ADDED, as kmock does).
"""

from __future__ import annotations

import copy
import datetime
import itertools
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import jsonpatch
import jsonpointer
import jsonschema
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing, rendering

from crd_schema import crd_jsonschema, prune

JSON = dict[str, Any]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
# Kinds whose names must be DNS-1035/1123 labels rather than subdomains.
_LABEL_NAMED = {"services", "namespaces"}
# (plural, path) of fields a PATCH may not change.
_IMMUTABLE = {
    "jobs": (("spec", "template"), ("spec", "selector"), ("spec", "completions")),
    "daemonsets": (("spec", "selector"),),
    "services": (("spec", "clusterIP"),),
}
_WRITES = {kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE}


_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock's parser, except that /api/v1/namespaces[/name] is the Namespace resource itself."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path  # kmock 0.8 fails on GET /api/v1/namespaces, which kopf lists


def _fail(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


def _dig(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)  # type: ignore[assignment]
    return obj


Requirement = tuple[str, str, frozenset[str]]  # key, "in" | "notin" | "exists" | "!exists", values


def parse_selector(text: str) -> list[Requirement]:
    """A label selector, equality- and set-based ("a=b,c!=d,e in (f,g),h,!i")."""
    requirements: list[Requirement] = []
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", text or ""):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"([^\s!=]+)\s*(==|=|!=)\s*(\S*)", term):
            requirements.append((m[1], "notin" if m[2] == "!=" else "in", frozenset([m[3]])))
        elif m := re.fullmatch(r"(\S+)\s+(in|notin)\s*\(([^)]*)\)", term):
            requirements.append((m[1], m[2], frozenset(v.strip() for v in m[3].split(","))))
        elif m := re.fullmatch(r"(!?)(\S+)", term):
            requirements.append((m[2], "!exists" if m[1] else "exists", frozenset()))
        else:
            raise _fail(400, "BadRequest", f"unparsable label selector term {term!r}")
    return requirements


def selects(requirements: list[Requirement], labels: Mapping[str, str]) -> bool:
    """Whether labels satisfy every requirement (!= and notin also match a missing key)."""
    for key, op, values in requirements:
        present = key in labels
        if (op == "in" and labels.get(key) not in values) or (op == "notin" and present and labels[key] in values):
            return False
        if (op == "exists" and not present) or (op == "!exists" and present):
            return False
    return True


@attrs.define(kw_only=True)
class StrictEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the API-server semantics listed in this module's docstring."""

    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _schemas: dict[kmock.resource, JSON] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()

    def add_crd(self, crd: JSON) -> kmock.resource:
        """Serve a CRD's resource (discovery with verbs and subresources, schema) and store the CRD."""
        names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
        resource = kmock.resource(crd["spec"]["group"], version["name"], names["plural"])
        self.resources[resource] = kmock.ResourceInfo(
            kind=names["kind"],
            singular=names.get("singular"),
            namespaced=crd["spec"]["scope"] == "Namespaced",
            shortnames=set(names.get("shortNames", [])),
            subresources=set(version.get("subresources", {})),
            verbs={"create", "delete", "get", "list", "patch", "update", "watch", "deletecollection"},
        )
        self._schemas[resource] = version["schema"]["openAPIV3Schema"]
        crds = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        self._objects[crds, None, crd["metadata"]["name"]] = self._stamp(crds, copy.deepcopy(crd), None)
        return resource

    # -- reads ------------------------------------------------------------------------------------

    def _live(self, resource: kmock.resource, namespace: str | None, selector: str, fields: str) -> list[JSON]:
        requirements = parse_selector(selector)
        field_tests = dict(term.split("=", 1) for term in fields.split(",") if term)
        if set(field_tests) - {"metadata.name", "metadata.namespace"}:
            raise _fail(400, "BadRequest", f"unsupported field selector {fields!r}")
        result = []
        for (res, ns, name), obj in self._objects.items():
            if res != resource or obj.deleted or (namespace is not None and ns != namespace):
                continue
            raw = obj.raw
            if not selects(requirements, raw.get("metadata", {}).get("labels") or {}):
                continue
            if field_tests.get("metadata.name", name) != name or field_tests.get("metadata.namespace", ns) != ns:
                continue
            result.append(raw)
        return result

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        info = self._info(request.resource)
        async with self._lock:
            items = self._live(
                request.resource,
                request.namespace,
                request.params.get("labelSelector", ""),
                request.params.get("fieldSelector", ""),
            )
            version = str(next(self._versions))
        return {
            "apiVersion": self._api_version(request.resource),
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": version},
            "items": items,
        }

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""
        requirements = parse_selector(request.params.get("labelSelector", ""))
        bus = self._buses[request.resource]
        async with self._lock:  # snapshot and bus mark together: no event falls in between
            mark = await bus.mark()
            snapshot = self._live(
                request.resource,
                request.namespace,
                request.params.get("labelSelector", ""),
                request.params.get("fieldSelector", ""),
            )
        try:
            for raw in snapshot:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=mark):
                meta = event["object"].get("metadata", {})
                if request.namespace not in (None, meta.get("namespace")) or not selects(
                    requirements, meta.get("labels") or {}
                ):
                    continue
                if request.name not in (None, meta.get("name")):
                    continue
                yield event
        finally:
            await bus.unmark(mark)

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        result = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            result["groupVersion"] = "v1"  # kmock says "/v1", which breaks client-go's RESTMapper
        return result

    # -- writes -----------------------------------------------------------------------------------

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        # The stored object as created, even if the garbage collector has already taken it.
        namespace = request.namespace if self._info(request.resource).namespaced else None
        return self._objects[request.resource, namespace, request.data["metadata"]["name"]].last.raw

    async def _handle(self, request: rendering.Request) -> Any:
        if request.resource is not None and request.action in _WRITES:
            async with self._lock:
                events = self._write(request)
                for resource, event in events:
                    await self._buses[resource].put(event)
        # Skip KubernetesEmulator._handle's own (lenient) writes: serve replies and reactions only.
        return await kmock.RawHandler._handle(self, request)

    def _info(self, resource: kmock.resource | None) -> kmock.ResourceInfo:
        for known in self.resources:
            if known == resource:
                return self.resources[known]
        raise _fail(404, "NotFound", f"the server could not find the requested resource {resource}")

    @staticmethod
    def _api_version(resource: kmock.resource) -> str:
        return resource.version if resource.group == "" else f"{resource.group}/{resource.version}"

    def _now(self) -> str:
        return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")

    def _stamp(self, resource: kmock.resource, obj: JSON, namespace: str | None) -> JSON:
        info = self._info(resource)
        meta = obj.setdefault("metadata", {})
        obj["apiVersion"], obj["kind"] = self._api_version(resource), info.kind
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            generation=1,
            creationTimestamp=self._now(),
        )
        if namespace is not None:
            meta["namespace"] = namespace
        return obj

    def _get(self, resource: kmock.resource, namespace: str | None, name: str | None) -> Any:
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key]

    def _write(self, request: rendering.Request) -> list[tuple[kmock.resource, JSON]]:
        resource, info = request.resource, self._info(request.resource)
        namespace = request.namespace if info.namespaced else None
        if info.namespaced and not namespace:
            raise _fail(400, "BadRequest", f"{resource.plural} are namespaced: the URL needs a namespace")
        if request.action == kmock.action.CREATE:
            return self._create(resource, info, namespace, request)
        obj = self._get(resource, namespace, request.name)
        if obj is None:
            raise _fail(404, "NotFound", f'{resource.plural} "{request.name}" not found')
        if request.action == kmock.action.UPDATE:
            return self._patch(resource, info, obj, request)
        return self._delete(resource, namespace, request.name, self._propagation(request))

    def _validate(self, resource: kmock.resource, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        name = meta.get("name") or ""
        pattern = _DNS_LABEL if resource.plural in _LABEL_NAMED else _DNS_SUBDOMAIN
        limit = 63 if resource.plural in _LABEL_NAMED else 253
        if not pattern.match(name) or len(name) > limit:
            raise _fail(422, "Invalid", f"metadata.name: Invalid value: {name!r}: not a DNS-1123 name of <= {limit}")
        for key, value in (meta.get("labels") or {}).items():
            prefix, _, label = key.rpartition("/")
            if not _LABEL_NAME.match(label) or len(label) > 63 or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
                raise _fail(422, "Invalid", f"metadata.labels: Invalid key {key!r}")
            if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
                raise _fail(422, "Invalid", f"metadata.labels: Invalid value {value!r} for {key!r}")
        for ref in meta.get("ownerReferences") or []:
            if not all(ref.get(field) for field in ("apiVersion", "kind", "name", "uid")):
                raise _fail(
                    422, "Invalid", f"metadata.ownerReferences: apiVersion, kind, name and uid are required: {ref}"
                )
        if resource in self._schemas:
            schema = crd_jsonschema(self._schemas[resource])
            body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
            errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(body), key=lambda e: list(e.path))
            if errors:
                where = ".".join(str(p) for p in errors[0].path)
                raise _fail(422, "Invalid", f"{obj.get('kind')} {name!r} is invalid: {where}: {errors[0].message}")
            pruned = prune(obj, self._schemas[resource])
            obj.clear()
            obj.update(pruned)

    def _create(
        self, resource: kmock.resource, info: kmock.ResourceInfo, namespace: str | None, request: rendering.Request
    ) -> list[tuple[kmock.resource, JSON]]:
        if not isinstance(request.data, dict):
            raise _fail(400, "BadRequest", "the body of a create must be a JSON object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if meta.get("namespace") not in (None, namespace):
            raise _fail(400, "BadRequest", "the namespace of the object does not match the namespace of the URL")
        if namespace is not None and self._get(kmock.resource("", "v1", "namespaces"), None, namespace) is None:
            raise _fail(404, "NotFound", f'namespaces "{namespace}" not found')
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if "status" in info.subresources:
            obj.pop("status", None)  # set only through …/status, as a real server does
        self._validate(resource, obj)
        if self._get(resource, namespace, meta["name"]) is not None:
            raise _fail(409, "AlreadyExists", f'{resource.plural} "{meta["name"]}" already exists')
        self._stamp(resource, obj, namespace)
        key = (resource, namespace, meta["name"])
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        request.data.setdefault("metadata", {})["name"] = meta["name"]  # so the reply finds it
        events = [(resource, {"type": "ADDED", "object": copy.deepcopy(obj)})]
        return events + self._collect_orphans()

    def _patch(
        self, resource: kmock.resource, info: kmock.ResourceInfo, obj: Any, request: rendering.Request
    ) -> list[tuple[kmock.resource, JSON]]:
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        current = copy.deepcopy(obj.raw)
        if content_type == "application/merge-patch+json" and isinstance(request.data, dict):
            new = kmock_dicts.merge_patch_dict(current, request.data)
        elif content_type == "application/json-patch+json" and isinstance(request.data, list):
            try:
                new = jsonpatch.apply_patch(current, request.data)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise _fail(422, "Invalid", f"the JSON patch does not apply: {exc}") from None
        else:
            raise _fail(
                415,
                "UnsupportedMediaType",
                f"PATCH with Content-Type {content_type!r} and a {type(request.data).__name__} body is not "
                "supported here: send a JSON merge patch or a JSON patch and say so",
            )
        new = copy.deepcopy(dict(new))
        sent_version = (
            ((request.data or {}).get("metadata") or {}).get("resourceVersion")
            if isinstance(request.data, dict)
            else None
        )
        if sent_version is not None and sent_version != current["metadata"]["resourceVersion"]:
            raise _fail(
                409, "Conflict", "the object has been modified; please apply your changes to the latest version"
            )
        subresource = request.subresource
        if subresource not in (None, "status") or (subresource == "status" and "status" not in info.subresources):
            raise _fail(404, "NotFound", f"no subresource {subresource!r} for {resource.plural}")
        if subresource == "status":
            new = {**current, "status": new.get("status")}
        elif "status" in info.subresources:
            new["status"] = current.get("status")
        if new.get("status") is None:
            new.pop("status", None)
        for path in _IMMUTABLE.get(resource.plural, ()):
            if _dig(new, path) != _dig(current, path):
                raise _fail(422, "Invalid", f"{'.'.join(path)}: field is immutable")
        keep = ("uid", "name", "namespace", "creationTimestamp", "generation", "deletionTimestamp")
        new["metadata"].update({k: current["metadata"][k] for k in keep if k in current["metadata"]})
        new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
        self._validate(resource, new)
        spec_of = lambda o: {k: v for k, v in o.items() if k not in ("metadata", "status")}  # noqa: E731
        if spec_of(new) != spec_of(current):
            new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        new["metadata"]["resourceVersion"] = str(next(self._versions))
        obj.create(new)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(resource, meta.get("namespace"), meta["name"], cascade=True)
        return [(resource, {"type": "MODIFIED", "object": copy.deepcopy(new)})]

    @staticmethod
    def _propagation(request: rendering.Request) -> str:
        body = request.data if isinstance(request.data, dict) else {}
        return str(request.params.get("propagationPolicy") or body.get("propagationPolicy") or "Background")

    def _delete(
        self, resource: kmock.resource, namespace: str | None, name: str | None, propagation: str
    ) -> list[tuple[kmock.resource, JSON]]:
        obj = self._get(resource, namespace, name)
        meta = obj.raw["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return []
            new = copy.deepcopy(obj.raw)
            new["metadata"].update(deletionTimestamp=self._now(), resourceVersion=str(next(self._versions)))
            obj.create(new)
            return [(resource, {"type": "MODIFIED", "object": copy.deepcopy(new)})]
        return self._remove(resource, namespace, name, cascade=propagation != "Orphan")

    def _remove(
        self, resource: kmock.resource, namespace: str | None, name: str | None, cascade: bool
    ) -> list[tuple[kmock.resource, JSON]]:
        obj = self._get(resource, namespace, name)
        raw = copy.deepcopy(obj.raw)
        obj.delete()
        events = [(resource, {"type": "DELETED", "object": raw})]
        return events + (self._collect_orphans() if cascade else [])

    def _collect_orphans(self) -> list[tuple[kmock.resource, JSON]]:
        """The garbage collector: delete objects whose owners (same namespace or cluster-scoped) are all gone."""
        events: list[tuple[kmock.resource, JSON]] = []
        live = {(ns, obj.raw["metadata"].get("uid")) for (_, ns, _), obj in self._objects.items() if not obj.deleted}
        for (resource, ns, name), obj in list(self._objects.items()):
            if obj.deleted:
                continue
            refs = obj.raw["metadata"].get("ownerReferences") or []
            if refs and not any((ns, ref["uid"]) in live or (None, ref["uid"]) in live for ref in refs):
                events += self._delete(resource, ns, name, "Background")
        return events
