"""The audit report: one self-contained HTML page per epoch, read from the reward warehouse.

Each page shows, for the runs decided in the epoch (or still pending at its end): the loss curve
each peer committed with its audited steps marked, the distance of every audited step against its
tolerance threshold, the usefulness the auditor measured, and the payouts, slashes and claims of
the epoch. Plots are matplotlib PNGs embedded as base64, so the page needs nothing but itself.

    python -m audit report --db veritrain.duckdb --out report/      # report/epoch-<E>.html

The warehouse is opened read-only (rewards.analyst); nothing here writes to it. Amounts in tables
are the exact integers of the warehouse; plots show them divided by 10**decimals.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import polars as pl

from proofs.errors import VeritrainError

log = logging.getLogger(__name__)

REPORT_VERSION = 1


class ReportError(VeritrainError, ValueError):
    """The warehouse has no such epoch, or cannot be read."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EpochData:
    """Everything one epoch's page shows, as read from the warehouse."""

    epoch: int
    summary: dict[str, Any]
    params: dict[str, Any]
    runs: pl.DataFrame  # one row per run in scope, with its outcome and epoch payout/slash
    steps: pl.DataFrame  # run_id, step, loss
    verdicts: pl.DataFrame  # one row per verdict, with its worst distance/threshold ratios
    claims: pl.DataFrame
    posts: pl.DataFrame


_RUNS_SQL = """
SELECT r.run_id, r.peer_id, p.payout_address, r.step_count, r.tokens_per_step, r.device,
       coalesce(o.state, 'pending') AS state, o.decided_epoch, o.audited_steps, o.confidence,
       o.usefulness_micro,
       coalesce((SELECT w.amount FROM rewards w
                 WHERE w.epoch = $e AND w.account = p.payout_address), 0) AS payout,
       coalesce((SELECT s.amount FROM slashes s
                 WHERE s.epoch = $e AND s.peer_id = r.peer_id), 0) AS slashed
FROM runs r JOIN peers p ON p.peer_id = r.peer_id
LEFT JOIN run_outcomes o ON o.run_id = r.run_id
WHERE r.epoch <= $e AND (o.decided_epoch IS NULL OR o.decided_epoch = $e)
ORDER BY r.peer_id, r.run_id
"""

_VERDICTS_SQL = """
SELECT v.run_id, v.step, v.outcome, v.mode, v.auditor_id, v.reason,
       v.max_rel_l2, v.max_cos_dist, v.loss_before, v.loss_after,
       (SELECT max(t.rel_l2 / t.max_rel_l2) FROM verdict_tensors t
         WHERE t.verdict_id = v.verdict_id AND t.max_rel_l2 > 0) AS l2_ratio,
       (SELECT max(t.cos_dist / t.max_cos_dist) FROM verdict_tensors t
         WHERE t.verdict_id = v.verdict_id AND t.max_cos_dist > 0) AS cos_ratio,
       (SELECT min(t.max_rel_l2) FROM verdict_tensors t
         WHERE t.verdict_id = v.verdict_id) AS l2_threshold
FROM verdicts v
WHERE v.epoch <= $e AND v.run_id IN (SELECT unnest($runs::VARCHAR[]))
ORDER BY v.run_id, v.step, v.auditor_id
"""


def _one(frame: pl.DataFrame) -> dict[str, Any]:
    return frame.row(0, named=True) if frame.height else {}


def load_epoch(db: str | os.PathLike[str], epoch: int) -> EpochData:
    """Read epoch ``epoch``'s report data from the warehouse at ``db`` (read-only).

    Raises ReportError when the epoch does not exist or the payout policy has not been computed.
    """
    from rewards.analyst import Analyst  # the warehouse's read-only interface

    try:
        with Analyst(db) as a:
            con = a.con
            summary = _one(
                con.sql("SELECT * FROM epoch_summaries WHERE epoch = $e", params={"e": epoch}).pl()
            )
            if not summary:
                known = con.sql("SELECT count(*) FROM epochs WHERE epoch = $e", params={"e": epoch})
                row = known.fetchall()[0]
                what = (
                    "not computed (run `python -m rewards compute`)"
                    if row and row[0]
                    else ("not in the warehouse")
                )
                raise ReportError(f"epoch {epoch} is {what}")
            runs = con.sql(_RUNS_SQL, params={"e": epoch}).pl()
            ids = runs["run_id"].to_list()
            return EpochData(
                epoch=epoch,
                summary=summary,
                params=_one(con.sql("SELECT * FROM policy_params").pl()),
                runs=runs,
                steps=con.sql(
                    "SELECT run_id, step, loss FROM steps WHERE run_id IN "
                    "(SELECT unnest($runs::VARCHAR[])) ORDER BY run_id, step",
                    params={"runs": ids},
                ).pl(),
                verdicts=con.sql(_VERDICTS_SQL, params={"e": epoch, "runs": ids}).pl(),
                claims=con.sql(
                    "SELECT * FROM claims WHERE epoch = $e ORDER BY account", params={"e": epoch}
                ).pl(),
                posts=con.sql(
                    "SELECT * FROM settlement_posts WHERE epoch = $e", params={"e": epoch}
                ).pl(),
            )
    except ReportError:
        raise
    except Exception as exc:  # duckdb and warehouse errors: one clear message
        raise ReportError(f"cannot read epoch {epoch} from {db}: {exc}") from exc


def epochs_in(db: str | os.PathLike[str]) -> list[int]:
    """The computed epochs of the warehouse, ascending."""
    from rewards.analyst import Analyst

    with Analyst(db) as a:
        return [
            int(r[0]) for r in a.con.sql("SELECT epoch FROM epoch_summaries ORDER BY 1").fetchall()
        ]


# ---- plots --------------------------------------------------------------------------------------


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
    peer = runs.filter(pl.col("run_id") == run_id)["peer_id"]
    return f"{peer[0]} / {run_id}" if peer.len() and peer[0] != run_id else run_id


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


# ---- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f2f2f2}
.pass,.verified{color:#1a7f37;font-weight:600}.fail,.failed,.invalid{color:#c62828;font-weight:600}
.pending{color:#b26a00}img{max-width:100%;display:block;margin:8px 0}code{font-size:.9em}
"""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else f"{value:.4g}"
    text = html.escape(str(value))
    if text in ("pass", "fail", "invalid", "verified", "failed", "pending"):
        return f'<span class="{text}">{text}</span>'
    return text


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(ident: str, title: str, *parts: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _peer_rows(data: EpochData) -> list[list[Any]]:
    rows = []
    for r in data.runs.iter_rows(named=True):
        v = data.verdicts.filter(pl.col("run_id") == r["run_id"])
        passed = v.filter(pl.col("outcome") == "pass").height
        use = r["usefulness_micro"]
        rows.append(
            [
                r["peer_id"],
                r["run_id"],
                r["step_count"],
                f"{v.height} ({passed} pass)",
                r["state"],
                None if r["confidence"] is None else float(r["confidence"]),
                None if use is None else int(use) / 1e6,
                int(r["payout"]),
                int(r["slashed"]),
                r["payout_address"],
            ]
        )
    return rows


def render_html(data: EpochData, *, decimals: int = 18) -> str:
    """The epoch's page: HTML with every plot embedded (no external resource)."""
    s, p = data.summary, data.params
    facts = [
        ["pool", int(s["pool"])],
        ["carried in", int(s["carry_in"])],
        ["paid", int(s["paid"])],
        ["carried out", int(s["carry_out"])],
        ["verified runs", s["verified_runs"]],
        ["failed runs", s["failed_runs"]],
        ["pending runs", s["pending_runs"]],
        [
            "policy",
            f"cheat fraction {p.get('cheat_fraction')}, confidence {p.get('confidence')}, "
            f"slash {p.get('slash_bps')} bps, usefulness weight {p.get('usefulness_ppm')} ppm",
        ],
    ]
    posts = [
        [r["root"], int(r["cumulative_total"]), r["tx_hash"], r["block_number"]]
        for r in data.posts.iter_rows(named=True)
    ]
    claims = [
        [r["account"], int(r["paid"]), int(r["cumulative_amount"]), r["tx_hash"]]
        for r in data.claims.iter_rows(named=True)
    ]
    verdict_rows = [
        [
            r["run_id"],
            r["step"],
            r["outcome"],
            r["mode"],
            r["max_rel_l2"],
            r["l2_threshold"],
            r["max_cos_dist"],
            r["loss_before"],
            r["loss_after"],
            r["auditor_id"],
            r["reason"],
        ]
        for r in data.verdicts.iter_rows(named=True)
    ]
    has_runs = data.runs.height > 0
    parts = [
        f"<h1>veritrain audit report: epoch {data.epoch}</h1>",
        _section("summary", "Epoch summary", _table(facts, ["", "value (base units)"])),
        _section(
            "peers",
            "Peers and runs",
            _table(
                _peer_rows(data),
                [
                    "peer",
                    "run",
                    "steps",
                    "audited",
                    "outcome",
                    "confidence",
                    "usefulness",
                    "payout",
                    "slashed",
                    "payout address",
                ],
            ),
        ),
    ]
    if has_runs:
        parts += [
            _section("loss", "Loss curves", _img(plot_losses(data), "loss curves")),
            _section(
                "distances",
                "Audited distances vs thresholds",
                _img(plot_distances(data), "distances"),
                "<p>Each point is an audited step: the largest distance over its tensors "
                "divided by that tensor's calibrated threshold (docs/auditing.md). Above 1 "
                "fails; a NaN or infinite distance is drawn at the top.</p>",
            ),
            _section("usefulness", "Usefulness", _img(plot_usefulness(data), "usefulness")),
            _section("payouts", "Payouts and slashes", _img(plot_money(data, decimals), "money")),
        ]
    parts += [
        _section(
            "settlement",
            "Settlement",
            _table(posts, ["root", "cumulative total", "tx", "block"]),
            _table(claims, ["account", "paid", "cumulative", "tx"]),
        ),
        _section(
            "verdicts",
            "Verdicts",
            _table(
                verdict_rows,
                [
                    "run",
                    "step",
                    "outcome",
                    "mode",
                    "max rel L2",
                    "threshold",
                    "max cos dist",
                    "loss before",
                    "loss after",
                    "auditor",
                    "reason",
                ],
            ),
        ),
    ]
    title = f"veritrain epoch {data.epoch}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="generator" content="veritrain audit report v{REPORT_VERSION}">'
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )


def write_reports(
    db: str | os.PathLike[str], out: Path, *, epochs: Sequence[int] = (), decimals: int = 18
) -> list[Path]:
    """Write ``out/epoch-<E>.html`` for each epoch (all computed epochs when empty), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for epoch in epochs or epochs_in(db):
        page = render_html(load_epoch(db, epoch), decimals=decimals)
        path = out / f"epoch-{epoch}.html"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
        log.info("wrote %s (%d bytes)", path, len(page))
        written.append(path)
    return written


@click.command("report")
@click.option(
    "--db",
    envvar="VERITRAIN_DB",
    default="veritrain.duckdb",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Warehouse file (also $VERITRAIN_DB).",
)
@click.option("--epoch", "epochs", type=int, multiple=True, help="Epoch (repeatable; default all).")
@click.option(
    "--out",
    default="report",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder.",
)
@click.option("--decimals", default=18, show_default=True, help="Token decimals for the plots.")
def report_command(db: str, epochs: tuple[int, ...], out: Path, decimals: int) -> None:
    """Write a self-contained HTML audit report per epoch (loss, distances, usefulness, money)."""
    if not Path(db).is_file():
        raise click.ClickException(f"no warehouse at {db}")
    try:
        paths = write_reports(db, out, epochs=epochs, decimals=decimals)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from exc
    if not paths:
        raise click.ClickException("no computed epoch in the warehouse (run `rewards compute`)")
    for path in paths:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    report_command()
