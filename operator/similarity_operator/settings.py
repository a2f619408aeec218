"""The operator's settings: each field says its unit, its default and what changing it trades."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # kopf loads only when the operator runs: `structsim --help` must stay light
    import kopf

PREFIX = "structsim.io"


@dataclass(frozen=True)
class Settings:
    """How often and how patiently the operator works. `structsim operator` sets them from flags."""

    resync_interval_s: float = 15.0
    """Seconds between level-triggered reconciles of each resource (besides the immediate one on a
    spec change). Bounds how late the operator notices a finished tune Job, a node with a new GPU
    product, the last node of one leaving, or a child someone edited. Lower: faster reactions, more
    API reads (four label-selected lists per resource per round)."""

    api_retry_delay_s: float = 10.0
    """Seconds before a reconcile that hit an API error (a 5xx, a conflict) runs again."""

    tune_backoff_s: float = 60.0
    """Seconds before the second tune attempt after a failure; each further attempt waits twice as
    long, up to `tune_backoff_max_s`. The product serves its safe default meanwhile."""

    tune_backoff_max_s: float = 3600.0
    """The longest wait between tune attempts, in seconds: failed tuning is retried at least this
    often, forever, until it succeeds or the spec changes."""

    tune_priority_class: str | None = None
    """PriorityClass of tune pods (default None: the cluster's default priority). A tune pod needs a
    whole GPU on a node of its product; where serving pods hold every GPU (one-GPU nodes), it can
    only run by preempting one, which needs a PriorityClass above the serving pods'. That serving
    pod steps aside for the tuning run and comes back after it."""

    api_server: str | None = None
    """An API server URL to use without credentials (e.g. `kubectl proxy`'s http://127.0.0.1:8001).
    Default None: the pod's service account in a cluster, else the kubeconfig."""

    watch_timeout_s: float = 300.0
    """Seconds one watch request may stream before it is renewed (kopf's server_timeout). Lower
    renews more often; the API server closes watches after a few minutes anyway."""

    watch_reconnect_s: float = 1.0
    """Seconds between a watch ending and the next one (kopf's reconnect_backoff)."""

    def apply_to(self, kopf_settings: kopf.OperatorSettings) -> None:
        """Configure kopf: structsim's own finalizer and annotations, and Events only for warnings.

        kopf keeps its progress in annotations rather than status, so the status stays exactly what
        the CRD's schema describes (a real API server would prune anything else). Events come from
        the reconcile explicitly; kopf's own INFO logs ("Timer succeeded") would flood them.
        """
        import kopf

        kopf_settings.persistence.finalizer = f"{PREFIX}/finalizer"
        kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
        kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=PREFIX, key="last-handled-configuration"
        )
        kopf_settings.posting.level = logging.WARNING
        kopf_settings.posting.reporting_component = "structsim-operator"
        kopf_settings.watching.server_timeout = self.watch_timeout_s
        kopf_settings.watching.client_timeout = self.watch_timeout_s + 10
        kopf_settings.watching.reconnect_backoff = self.watch_reconnect_s
        # On shutdown or deletion, let an in-flight resync finish (they take well under a second)
        # rather than orphan it mid-write; an idle timer exits at once either way.
        kopf_settings.background.instant_exit_timeout = 2.0
