"""The CRD's structural OpenAPI schema as the API server applies it, offline: validation (through
JSON Schema draft 4, whose boolean exclusiveMinimum matches OpenAPI 3.0), defaulting and pruning."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "operator" / "crd" / "similarityservices.structsim.io.yaml"

JSON = dict[str, Any]


def load_crd() -> JSON:
    return yaml.safe_load(CRD_PATH.read_text())


def openapi_schema(crd: JSON) -> JSON:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def crd_jsonschema(schema: JSON, *, strict: bool = False) -> JSON:
    """JSON Schema for a structural schema. strict: unknown fields are errors (kubectl's
    --validate=strict) instead of being pruned silently."""
    out: JSON = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: crd_jsonschema(sub, strict=strict) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = crd_jsonschema(value, strict=strict)
        elif key in ("nullable", "description", "default") or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if strict and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def prune(obj: Any, schema: JSON) -> Any:
    """Drop fields the schema does not declare, as the API server does (metadata, declared as a
    bare object, is kept whole)."""
    if isinstance(obj, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props = schema["properties"]
        return {k: prune(v, props[k]) for k, v in obj.items() if k in props}
    if isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: prune(v, schema["additionalProperties"]) for k, v in obj.items()}
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in obj]
    return obj


def apply_defaults(obj: Any, schema: JSON) -> Any:
    """Fill `default`s as the API server does: a missing field with a default gets it, recursively."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                obj[name] = apply_defaults(obj[name], sub)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        obj = [apply_defaults(item, schema["items"]) for item in obj]
    return obj
