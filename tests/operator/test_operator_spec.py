"""spec.py: defaults equal to the CRD's, the checks a structural schema cannot make, the fingerprint,
and the profile contract with `structsim autotune`."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from crd_schema import apply_defaults, load_crd, openapi_schema
from kube_harness import H100, MODEL, profile_json
from similarity_operator import quantity
from similarity_operator.spec import ProfileError, SpecError, fingerprint, parse_profile, parse_spec

MINIMAL: dict[str, Any] = {"model": {"id": MODEL}, "image": "structsim:0.1.0"}


def _defaults(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, schema["default"])] if "default" in schema and schema["default"] != {} else []
    for name, sub in (schema.get("properties") or {}).items():
        found += _defaults(sub, (*path, name))
    return found


def test_code_defaults_are_the_crd_defaults() -> None:
    """The operator must not depend on server-side defaulting, nor disagree with it."""
    spec_schema = openapi_schema(load_crd())["properties"]["spec"]
    in_code = msgspec.to_builtins(parse_spec(MINIMAL))
    declared = _defaults(spec_schema)
    assert len(declared) >= 12
    for path, default in declared:
        value = in_code
        for key in path:
            value = value[key]
        assert value == default, f"spec.{'.'.join(path)}: the CRD says {default!r}, the operator {value!r}"
    assert parse_spec(apply_defaults(MINIMAL, spec_schema)) == parse_spec(MINIMAL)


@pytest.mark.parametrize(
    ("batching", "expected"),
    [
        ({}, ("auto", "auto")),
        ({"maxBatchSize": 64, "maxWaitMs": 0}, (64, 0)),
        ({"maxBatchSize": "128", "maxWaitMs": "5"}, (128, 5)),  # int-or-string: numbers as strings are numbers
    ],
)
def test_batching_is_int_or_auto(batching: dict[str, Any], expected: tuple[Any, Any]) -> None:
    spec = parse_spec({**MINIMAL, "batching": batching})
    assert (spec.batching.max_batch_size, spec.batching.max_wait_ms) == expected


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"batching": {"maxBatchSize": "lots"}},
            "spec.batching.maxBatchSize must be an integer 1-1024 or \"auto\", got 'lots'",
        ),
        ({"batching": {"maxBatchSize": 0}}, "spec.batching.maxBatchSize must be an integer 1-1024"),
        ({"batching": {"maxWaitMs": 5000}}, "spec.batching.maxWaitMs must be an integer 0-1000"),
        ({"batching": {"maxWaitMs": True}}, "spec.batching.maxWaitMs must be an integer"),
        ({"gpusPerPod": 0}, "spec.gpusPerPod: Expected `int` >= 1"),
        ({"precision": "int8"}, "spec.precision: Invalid enum value 'int8'"),
        ({"autotune": {"p99Ms": 0}}, "spec.autotune.p99Ms: Expected `float` > 0.0"),
        ({"autotune": {"trails": 5}}, "spec.autotune: Object contains unknown field `trails`"),
        ({"nodeSelector": {"pool": "gpu pool"}}, "spec.nodeSelector['pool']: 'gpu pool' is not a valid label value"),
        ({"nodeSelector": {"bad key!": "x"}}, "spec.nodeSelector: 'bad key!' is not a valid label key"),
        ({"model": {"id": MODEL, "cache": {"pvc": "Models_PVC"}}}, "spec.model.cache.pvc: 'Models_PVC' is not a valid"),
        ({"image": ""}, "spec.image: Expected `str` of length >= 1"),
        ({"model": {"id": MODEL, "offline": True}}, "spec.model.offline needs spec.model.cache.pvc"),
        ({"model": {"id": MODEL, "offline": "yes"}}, "spec.model.offline: Expected `bool`"),
        ({"exactThresholds": [0.5, 1.0]}, "spec.exactThresholds[1]: Expected `float` <= 0.999999"),
        (
            {"resources": {"limits": {"nvidia.com/gpu": "2"}}},
            "spec.resources.limits: nvidia.com/gpu is set by the operator: use spec.gpusPerPod",
        ),
        ({"resources": {"requests": {"gpu": "1"}}}, "spec.resources.requests: 'gpu' is not one of cpu, memory"),
        ({"resources": {"requests": {"cpu": "two"}}}, "spec.resources.requests.cpu: 'two' is not a quantity: a string"),
        ({"resources": {"requests": {"memory": "6GB"}}}, "spec.resources.requests.memory: '6GB' is not a quantity"),
        ({"resources": {"limits": {"cpu": 0.5}}}, "spec.resources.limits.cpu: 0.5 is not a quantity"),  # quote it
        ({"resources": {"limits": {"cpu": -1}}}, "spec.resources.limits.cpu: -1 is not a quantity"),
        (
            {"resources": {"limits": {"cpu": "1500m"}}},  # the default request, 2, is above it
            "spec.resources.requests.cpu: 2 is above spec.resources.limits.cpu, 1500m",
        ),
        (
            {"resources": {"requests": {"memory": "8Gi"}, "limits": {"memory": "8000Mi"}}},
            "spec.resources.requests.memory: 8Gi is above spec.resources.limits.memory, 8000Mi",
        ),
        ({"resources": {"requests": "2"}}, "spec.resources.requests: Expected `object`, got `str`"),
        ({"resources": {"request": {}}}, "spec.resources: Object contains unknown field `request`"),
    ],
)
def test_invalid_specs_name_the_field(patch: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec({**MINIMAL, **patch})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        # What apimachinery's Quantity.String gives back: the text as given where the parser keeps it.
        ("2", "2"),
        (2, "2"),
        ("500m", "500m"),
        ("0.5", "500m"),
        (".5", "500m"),
        ("1.5", "1500m"),
        ("1000m", "1"),
        ("1000", "1k"),
        ("0.1m", "100u"),
        ("0.0000000001", "1n"),  # rounded up to a nano
        ("6Gi", "6Gi"),
        ("8Gi", "8Gi"),
        ("1024Mi", "1Gi"),
        ("1.5Gi", "1536Mi"),
        ("0.5Ki", "512"),
        ("6G", "6G"),
        ("129e6", "129e6"),
        ("12e2", "1200"),
        ("0", "0"),
        ("0Gi", "0"),
    ],
)
def test_quantities_are_kept_in_the_form_the_api_server_stores(given: str | int, stored: str) -> None:
    assert quantity.parse(given).text == stored
    assert quantity.parse(stored).value == quantity.parse(given).value


def test_requests_and_limits_compare_by_value() -> None:
    resources = {"requests": {"cpu": "0.5", "memory": "8Gi"}, "limits": {"cpu": "500m", "memory": "8192Mi"}}
    spec = parse_spec({**MINIMAL, "resources": resources})  # equal, however written
    assert spec.resources.requests == spec.resources.limits == {"cpu": "500m", "memory": "8Gi"}


def test_the_crd_checks_quantities_as_the_operator_does() -> None:
    spec_schema = openapi_schema(load_crd())["properties"]["spec"]
    for kind in ("requests", "limits"):
        value = spec_schema["properties"]["resources"]["properties"][kind]["additionalProperties"]
        assert value == {"x-kubernetes-int-or-string": True, "pattern": quantity.PATTERN}


def test_a_missing_spec_is_invalid() -> None:
    with pytest.raises(SpecError, match="spec is missing"):
        parse_spec(None)
    with pytest.raises(SpecError, match="required field `model`"):
        parse_spec({"image": "x"})


def test_pinning_and_tuning() -> None:
    assert parse_spec(MINIMAL).tunes
    assert not parse_spec({**MINIMAL, "autotune": {"enabled": False}}).tunes
    pinned = parse_spec({**MINIMAL, "precision": "fp16", "batching": {"maxBatchSize": 8, "maxWaitMs": 1}})
    assert pinned.fully_pinned and not pinned.tunes and pinned.pinned_precision == "fp16"
    assert parse_spec({**MINIMAL, "precision": "fp16"}).tunes  # batching is still left to tune


@pytest.mark.parametrize(
    "patch",
    [
        {"model": {"id": "iic/another-model"}},
        {"model": {"id": MODEL, "revision": "v1.0.1"}},
        {"precision": "fp32"},
        {"batching": {"maxBatchSize": 32}},
        {"batching": {"maxWaitMs": 3}},
        {"autotune": {"p99Ms": 20}},
        {"autotune": {"maxAbsError": 0.01}},
        {"autotune": {"threshold": 0.5}},
        {"exactThresholds": [0.5, 0.8]},  # the tune Job rescores near them, as the pods do
        {"resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}},  # it caps what the trials measure
    ],
)
def test_the_fingerprint_changes_with_what_a_profile_depends_on(patch: dict[str, Any]) -> None:
    assert fingerprint(parse_spec({**MINIMAL, **patch})) != fingerprint(parse_spec(MINIMAL))


@pytest.mark.parametrize(
    "patch",
    [
        {"image": "structsim:0.2.0"},
        {"autotune": {"trials": 100}},
        {"gpusPerPod": 2},
        {"port": 8080},
        {"nodeSelector": {"pool": "a"}},
        {"batching": {"maxBatchSize": "auto"}},  # the default, spelled out
        {"model": {"id": MODEL, "cache": {"pvc": "models"}, "offline": True}},  # where from, not which weights
        {"exactThresholds": []},  # the default, spelled out
        {"resources": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"memory": "64Gi"}}},  # cap no CPU
    ],
)
def test_the_fingerprint_ignores_what_does_not_change_the_question(patch: dict[str, Any]) -> None:
    assert fingerprint(parse_spec({**MINIMAL, **patch})) == fingerprint(parse_spec(MINIMAL))
    assert len(fingerprint(parse_spec(MINIMAL))) == 16


def test_fingerprints_of_specs_without_exact_thresholds_are_what_they_were() -> None:
    # Computed before exactThresholds joined the fingerprint: existing resources keep their tuned profiles.
    assert fingerprint(parse_spec(MINIMAL)) == "716a03e5cc04ceb0"
    assert fingerprint(parse_spec({**MINIMAL, "precision": "fp16", "autotune": {"threshold": 0.5}})) == "41a8ad8f93a6cc3a"
    # The same thresholds in another order (or repeated) ask the same question.
    exact = fingerprint(parse_spec({**MINIMAL, "exactThresholds": [0.5, 0.8]}))
    assert fingerprint(parse_spec({**MINIMAL, "exactThresholds": [0.8, 0.5, 0.5]})) == exact


def test_fingerprints_of_specs_without_a_cpu_limit_are_what_they_were() -> None:
    # Computed before resources existed: a resource's requests (defaulted or set) keep its tuned profiles.
    no_cpu_limit = {"requests": {"cpu": "4", "ephemeral-storage": "10Gi"}, "limits": {"memory": "32Gi"}}
    assert fingerprint(parse_spec({**MINIMAL, "resources": no_cpu_limit})) == "716a03e5cc04ceb0"
    # The same CPU limit, spelled two ways, asks the same question.
    limited = fingerprint(parse_spec({**MINIMAL, "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "4"}}}))
    assert limited != "716a03e5cc04ceb0"
    assert fingerprint(parse_spec({**MINIMAL, "resources": {"limits": {"cpu": "4000m"}}})) == limited


def test_the_profile_autotune_writes_is_accepted() -> None:
    """The contract with similarity_service/profile.py, through the service's own encoder."""
    profile = parse_profile(
        profile_json(H100, precision="bf16", batch=256, wait_ms=1.5, throughput=9000.0, p99_ms=20.0)
    )
    assert (profile.precision, profile.max_batch_size, profile.max_wait_ms) == ("bf16", 256, 1.5)
    assert (profile.throughput, profile.p99_ms, profile.compute_capability) == (9000.0, 20.0, "9.0")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "no termination message"),
        ("  ", "no termination message"),
        ("Traceback (most recent call last): ...", "not JSON"),
        ('{"precision": "fp16"}', "not a valid profile: Object missing required field"),
        (profile_json(H100).replace('"fp16"', '"int4"'), "not a valid profile: Invalid enum value 'int4'"),
    ],
)
def test_unusable_results_are_refused(text: str | None, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        parse_profile(text)
