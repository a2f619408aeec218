"""`structsim operator`: run the Kubernetes operator (kopf) until SIGTERM.

One replica, standalone (no peering): the chart's Deployment has replicas 1 and the Recreate
strategy, so two operators never reconcile the same resource. kopf is imported in `run` only, so
`structsim --help` stays fast and this module loads anywhere.
"""

from __future__ import annotations

import argparse
import logging
import os

from similarity_operator.settings import Settings

_ENV = "STRUCTSIM_OPERATOR_"
LEVELS = ("debug", "info", "warning", "error")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(_ENV + name)
    return float(value) if value else default


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of `structsim operator`; the tuning knobs fall back to STRUCTSIM_OPERATOR_* variables."""
    defaults = Settings()
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NS",
        help="serve SimilarityServices in this namespace (repeatable; globs like team-* work)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="serve every namespace (the default when no --namespace is given)",
    )
    parser.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        metavar="PORT",
        help="port of the liveness endpoint GET /healthz; 0 turns it off (default 8080)",
    )
    parser.add_argument("--log-level", choices=LEVELS, default="info", help="default info; debug logs every API call")
    parser.add_argument("--log-format", choices=("plain", "json"), default="plain", help="default plain")
    parser.add_argument(
        "--resync-interval",
        type=float,
        metavar="S",
        default=_env_float("RESYNC_INTERVAL", defaults.resync_interval_s),
        help=f"seconds between reconciles of each resource (default {defaults.resync_interval_s:g}); "
        "bounds how late Job results, node changes and drift are noticed",
    )
    parser.add_argument(
        "--tune-backoff",
        type=float,
        metavar="S",
        default=_env_float("TUNE_BACKOFF", defaults.tune_backoff_s),
        help=f"seconds before retrying a failed tune Job, doubled per attempt (default {defaults.tune_backoff_s:g})",
    )
    parser.add_argument(
        "--tune-backoff-max",
        type=float,
        metavar="S",
        default=_env_float("TUNE_BACKOFF_MAX", defaults.tune_backoff_max_s),
        help=f"longest wait between tune attempts (default {defaults.tune_backoff_max_s:g})",
    )
    parser.add_argument(
        "--tune-priority-class",
        default=os.environ.get(_ENV + "TUNE_PRIORITY_CLASS") or None,
        metavar="NAME",
        help="PriorityClass of tune pods, so that they may preempt a serving pod "
        "where serving holds every GPU (default: none)",
    )
    parser.add_argument(
        "--api-server",
        default=os.environ.get(_ENV + "API_SERVER") or None,
        metavar="URL",
        help="talk to this API server without credentials (e.g. `kubectl proxy`); "
        "default: in-cluster service account, else kubeconfig",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        resync_interval_s=args.resync_interval,
        tune_backoff_s=args.tune_backoff,
        tune_backoff_max_s=args.tune_backoff_max,
        tune_priority_class=args.tune_priority_class,
        api_server=args.api_server,
    )


def run(args: argparse.Namespace) -> int:
    """Run the operator in this process until it is stopped; returns the exit status."""
    import kopf

    from similarity_operator.handlers import build_registry

    kopf.configure(
        debug=args.log_level == "debug",
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger().setLevel(args.log_level.upper())
    namespaces = list(args.namespace)
    kopf.run(
        registry=build_registry(settings_from(args)),
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None,
    )
    return 0
