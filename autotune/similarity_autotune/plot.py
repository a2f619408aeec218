"""The trials on one picture: sustained throughput against p99 latency, the SLO and the chosen config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from optuna.trial import FrozenTrial

from similarity_autotune.objective import ATTR_P99, is_feasible

_COLORS = {"fp32": "tab:blue", "tf32": "tab:green", "fp16": "tab:orange", "bf16": "tab:purple"}


def plot_trials(
    trials: Sequence[FrozenTrial],
    *,
    chosen: FrozenTrial | None,
    slo_p99_ms: float,
    title: str,
    path: str | Path,
) -> Path:
    """Write a PNG: one dot per measured trial (colour = precision), the SLO line, the chosen one starred.

    Trials that met no rate, were pruned or were skipped by the accuracy guard have no p99 to plot;
    the legend counts them.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    measured = [t for t in trials if is_feasible(t) and (t.value or 0) > 0 and isinstance(t.user_attrs.get(ATTR_P99), float)]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        for precision in sorted({str(t.params["precision"]) for t in measured}):
            group = [t for t in measured if t.params["precision"] == precision]
            axes.scatter(
                [t.user_attrs[ATTR_P99] for t in group],
                [t.value for t in group],
                label=f"{precision} ({len(group)})",
                color=_COLORS.get(precision, "tab:gray"),
                alpha=0.75,
            )
        if chosen is not None and isinstance(chosen.user_attrs.get(ATTR_P99), float):
            axes.scatter(
                [chosen.user_attrs[ATTR_P99]],
                [chosen.value],
                marker="*",
                s=320,
                facecolors="none",
                edgecolors="black",
                linewidths=1.5,
                label=f"chosen: trial {chosen.number}",
            )
        axes.axvline(slo_p99_ms, color="tab:red", linestyle="--", label=f"SLO p99 {slo_p99_ms:g} ms")
        unplotted = len(trials) - len(measured)
        if unplotted:
            axes.plot([], [], " ", label=f"{unplotted} trials without a passing rate")
        axes.set_xlabel("p99 latency at the sustained rate (ms)")
        axes.set_ylabel("sustained throughput (pairs/s)")
        axes.set_title(title, fontsize=10)
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="best")
        figure.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out)
    finally:
        plt.close(figure)
    return out
