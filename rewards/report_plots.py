"""The audit report's plots: matplotlib figures rendered to base64 PNG (no display needed).

Each function takes one epoch's :class:`rewards.report.EpochData` and returns the PNG as base64 text
for an ``<img src="data:image/png;base64,...">``; every run keeps one colour across the plots.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:
    from rewards.report import EpochData


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    import matplotlib.pyplot as plt

    return plt


def _color(runs: pl.DataFrame, run_id: str) -> str:
    """One colour per run, the same in every plot."""
    return f"C{runs['run_id'].to_list().index(run_id) % 10}"


def _label(runs: pl.DataFrame, run_id: str) -> str:
    """The run's legend and axis label, as plain text: ids come from peers, and matplotlib reads
    text between two ``$`` as mathtext (a bad formula fails the whole report) and drops legend
    entries whose label starts with ``_``."""
    peer = runs.filter(pl.col("run_id") == run_id)["peer_id"]
    text = f"{peer[0]} / {run_id}" if peer.len() and peer[0] != run_id else run_id
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def plot_losses(data: EpochData) -> str:
    """Loss per step of every run, audited steps marked (green pass, red fail or invalid)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for run_id in data.runs["run_id"].to_list():
        steps = data.steps.filter(pl.col("run_id") == run_id)
        ax.plot(
            steps["step"],
            steps["loss"],
            label=_label(data.runs, run_id),
            color=_color(data.runs, run_id),
            lw=1.4,
        )
        v = data.verdicts.filter(pl.col("run_id") == run_id).join(
            steps, on=["run_id", "step"], how="left"
        )
        ok = v.filter(pl.col("outcome") == "pass")
        bad = v.filter(pl.col("outcome") != "pass")
        ax.scatter(ok["step"], ok["loss"], marker="o", s=22, color="#1a9850", zorder=3)
        ax.scatter(bad["step"], bad["loss"], marker="x", s=46, color="#d73027", zorder=4)
    ax.scatter([], [], marker="o", color="#1a9850", label="audited: pass")
    ax.scatter([], [], marker="x", color="#d73027", label="audited: fail / invalid")
    ax.set(xlabel="step", ylabel="training loss (as committed)", title="Loss curves per peer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _png(fig)


def _finite_ratio(value: Any) -> float:
    """A distance ratio for a log axis: NaN/Inf (never passes) is drawn at the top."""
    if value is None:
        return math.nan
    x = float(value)
    return 1e12 if not math.isfinite(x) else max(x, 1e-6)


def plot_distances(data: EpochData) -> str:
    """Worst per-tensor distance / threshold of every audited step (1 = the threshold)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, column, name in (
        (axes[0], "l2_ratio", "relative L2"),
        (axes[1], "cos_ratio", "cosine distance"),
    ):
        for run_id in data.runs["run_id"].to_list():
            v = data.verdicts.filter(pl.col("run_id") == run_id)
            ys = [_finite_ratio(x) for x in v[column].to_list()]
            ax.scatter(
                v["step"],
                ys,
                label=_label(data.runs, run_id),
                color=_color(data.runs, run_id),
                s=24,
            )
        ax.axhline(1.0, color="#d73027", ls="--", lw=1.2, label="threshold")
        ax.set_yscale("log")
        ax.set(xlabel="audited step", ylabel=f"worst tensor: {name} / threshold", title=name)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Distance of each audited step against its calibrated threshold")
    return _png(fig)


def plot_usefulness(data: EpochData) -> str:
    """Held-out loss drop of each audited step's committed update."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for run_id in data.runs["run_id"].to_list():
        v = data.verdicts.filter(pl.col("run_id") == run_id).drop_nulls("loss_before")
        gain = (v["loss_before"] - v["loss_after"]).to_list()
        ax.scatter(
            v["step"], gain, label=_label(data.runs, run_id), color=_color(data.runs, run_id), s=24
        )
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set(
        xlabel="audited step",
        ylabel="held-out loss before - after",
        title="Usefulness of audited steps",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_money(data: EpochData, decimals: int) -> str:
    """Payout and slash of each peer in the epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.55 * max(1, data.runs.height)))
    scale = 10**decimals
    labels = [_label(data.runs, r) for r in data.runs["run_id"].to_list()]
    paid = [int(x) / scale for x in data.runs["payout"].to_list()]
    slashed = [-int(x) / scale for x in data.runs["slashed"].to_list()]
    y = list(range(len(labels)))
    ax.barh(y, paid, color="#1a9850", label="payout")
    ax.barh(y, slashed, color="#d73027", label="stake slashed")
    ax.set_yticks(y, labels)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel=f"tokens (base units / 10^{decimals})", title="Payouts and slashes")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)
