"""values.yaml documents every value, and values.schema.json refuses what the chart cannot use."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from helm_python import Chart, HelmValuesError

from chart_render import CHART_DIR, NON_DEFAULT_VALUES, render

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w.-]*):")
# Objects whose keys are not ours to list: Helm's `global` and the Kubernetes Affinity sub-objects
# (checked by the API server; the tests validate rendered objects against Kubernetes' schemas).
OPEN_OBJECTS = {
    "/properties/global",
    "/properties/operator/properties/affinity/properties/nodeAffinity",
    "/properties/operator/properties/affinity/properties/podAffinity",
    "/properties/operator/properties/affinity/properties/podAntiAffinity",
}


def _uncommented_keys(text: str, max_depth: int = 2) -> list[str]:
    """Keys down to `max_depth` with no comment in their paragraph (the key and the sibling keys
    right above it, up to a blank line); deeper keys are explained by their parent's comment."""
    lines = text.splitlines()
    missing, path = [], []
    for i, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        depth = indent // 2
        path = path[:depth] + [match["key"]]
        if depth + 1 > max_depth:
            continue
        j = i - 1
        while j >= 0 and lines[j].strip() and not lines[j].strip().startswith("#"):
            above_indent = len(lines[j]) - len(lines[j].lstrip())
            if above_indent < indent:
                break  # reached the parent: no comment in this paragraph
            j -= 1
        above = lines[j] if j >= 0 else ""
        commented = above.strip().startswith("#") and len(above) - len(above.lstrip()) == indent
        if not commented:
            missing.append(".".join(path))
    return missing


def test_every_value_is_commented() -> None:
    assert _uncommented_keys((CHART_DIR / "values.yaml").read_text()) == []


def test_comment_check_finds_an_uncommented_key() -> None:
    assert _uncommented_keys("# -- fine\na: 1\n\nb: 2\nc:\n  # -- ok\n  d: 1\n  e:\n    f: 1\n") == ["b", "c"]


def _object_schemas(node: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or (isinstance(node.get("type"), list) and "object" in node["type"]):
            yield pointer, node
        for key, child in node.items():
            yield from _object_schemas(child, f"{pointer}/{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _object_schemas(child, f"{pointer}/{index}")


def test_schema_refuses_unknown_keys_everywhere() -> None:
    for pointer, node in _object_schemas(SCHEMA):
        if pointer in OPEN_OBJECTS:
            assert node.get("description") or pointer.startswith("/properties/operator/properties/affinity")
            continue
        if "properties" in node:
            assert node.get("additionalProperties") is False, pointer
        else:  # a map (labels, annotations, env): values must still have a type
            assert isinstance(node.get("additionalProperties"), dict), pointer


def test_defaults_and_non_defaults_satisfy_the_schema(chart: Chart) -> None:
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(defaults, SCHEMA, cls=jsonschema.Draft7Validator)
    chart.validate_schema(chart.merge_values(None))
    chart.validate_schema(chart.merge_values(NON_DEFAULT_VALUES))
    # Every default is in the schema (additionalProperties false makes this a real check).
    assert set(defaults) == set(SCHEMA["properties"]) - {"global"}


BROKEN_VALUES = {
    "unknown top-level key": ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
    "unknown nested key": ({"operator": {"replicas": 2}}, "additional properties 'replicas' not allowed"),
    "misspelt key": ({"image": {"pullpolicy": "Always"}}, "additional properties 'pullpolicy' not allowed"),
    "port as string": ({"operator": {"livenessPort": "8080"}}, "/operator/livenessPort"),
    "port out of range": ({"operator": {"livenessPort": 70000}}, "/operator/livenessPort"),
    "unknown log level": ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
    "namespaces as string": ({"operator": {"watchNamespaces": "team-a"}}, "/operator/watchNamespaces"),
    "invalid namespace name": ({"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    "env value not a string": ({"operator": {"env": {"RETRIES": 3}}}, "/operator/env/RETRIES"),
    "env name invalid": ({"operator": {"env": {"1BAD": "x"}}}, "invalid propertyName '1BAD'"),
    "operator setting via env": ({"operator": {"env": {"STRUCTSIM_OPERATOR_TUNE_BACKOFF": "1"}}}, "invalid propertyName"),
    "zero resync interval": ({"operator": {"resyncIntervalSeconds": 0}}, "/operator/resyncIntervalSeconds"),
    "unknown log format": ({"operator": {"logFormat": "xml"}}, "/operator/logFormat"),
    "zero priority": ({"tunePriorityClass": {"value": 0}}, "/tunePriorityClass/value"),
    "bad digest": ({"image": {"digest": "latest"}}, "/image/digest"),
    "bad pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "boolean as string": ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
    "unknown resource": ({"operator": {"resources": {"limits": {"gpu": 1}}}}, "properties 'gpu' not allowed"),
    "bad quantity": ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "/resources/limits/memory"),
    "bad toleration effect": ({"operator": {"tolerations": [{"effect": "Sometimes"}]}}, "/tolerations/0/effect"),
    "bad pdb value": ({"podDisruptionBudget": {"maxUnavailable": "half"}}, "/podDisruptionBudget/maxUnavailable"),
}


@pytest.mark.parametrize("case", BROKEN_VALUES)
def test_a_broken_value_fails_the_install(chart: Chart, case: str) -> None:
    values, message = BROKEN_VALUES[case]
    with pytest.raises(HelmValuesError) as error:
        render(chart, values)  # helm install/upgrade/template validate values the same way
    assert message in str(error.value)
