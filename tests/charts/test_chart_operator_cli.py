"""The chart's Deployment drives the real `structsim operator` CLI: its args parse, and the settings
ConfigMap reaches the operator's settings through the STRUCTSIM_OPERATOR_* variables."""

from __future__ import annotations

import argparse

import pytest
from helm_python import Chart

from chart_render import NON_DEFAULT_VALUES, VALUE_SETS, render_objects, the


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_operator_pod_configures_the_operator(
    chart: Chart, value_set: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from similarity_operator import command
    from similarity_service.cli import SUBCOMMANDS

    objs = render_objects(chart, VALUE_SETS[value_set])
    (container,) = the(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    for name, value in the(objs, "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)

    # The image's entrypoint is `structsim`; the first arg picks the subcommand, the rest are its flags.
    subcommand, *flags = container["args"]
    assert SUBCOMMANDS[subcommand][0] == "similarity_operator.command"
    parser = argparse.ArgumentParser()
    command.configure(parser)
    args = parser.parse_args(flags)
    settings = command.settings_from(args)

    values = {**chart.values["operator"], **(VALUE_SETS[value_set] or {}).get("operator", {})}
    assert args.liveness_port == container["ports"][0]["containerPort"] == values["livenessPort"]
    assert args.log_level == values["logLevel"] and args.log_format == values["logFormat"]
    assert args.namespace == values["watchNamespaces"]
    assert args.all_namespaces is (not values["watchNamespaces"])
    assert settings.resync_interval_s == values["resyncIntervalSeconds"]
    assert settings.tune_backoff_s == values["tuneBackoffSeconds"]
    assert settings.tune_backoff_max_s == values["tuneBackoffMaxSeconds"]
    tune_class = (VALUE_SETS[value_set] or {}).get("tunePriorityClass", {}).get("name") or "structsim-tune"
    assert settings.tune_priority_class == tune_class


def test_non_default_values_differ_from_the_operator_defaults() -> None:
    """Otherwise the test above could pass with the variables ignored."""
    from similarity_operator.settings import Settings

    ours = NON_DEFAULT_VALUES["operator"]
    defaults = Settings()
    assert ours["resyncIntervalSeconds"] != defaults.resync_interval_s
    assert ours["tuneBackoffSeconds"] != defaults.tune_backoff_s
    assert ours["tuneBackoffMaxSeconds"] != defaults.tune_backoff_max_s
