"""The audit report: one self-contained HTML page per epoch, read from the reward warehouse.

Each page shows, for the runs decided in the epoch (or still pending at its end): the loss curve
each peer committed with its audited steps marked, the distance of every audited step against its
tolerance threshold, the usefulness the auditor measured, and the payouts, slashes and claims of
the epoch. Plots are matplotlib PNGs embedded as base64, so the page needs nothing but itself.

    python -m rewards report --db veritrain.duckdb --out report/      # report/epoch-<E>.html

The warehouse is opened read-only (:class:`rewards.analyst.Analyst`); nothing here writes to it.
Amounts in tables are the exact integers of the warehouse; plots show them divided by
10**decimals.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import polars as pl

from proofs.errors import VeritrainError
from rewards.analyst import Analyst
from rewards.display import tokens_shown
from rewards.report_html import img, section, table
from rewards.report_plots import plot_distances, plot_losses, plot_money, plot_usefulness
from rewards.report_shared import SharedData, load_shared, render_shared
from trainer.cli_errors import BadInput, Command

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
    assignment: dict[str, Any]
    """The epoch's assignments row (assignment_hash, body), empty when it has none."""
    runs: pl.DataFrame  # one row per run in scope, with its outcome and epoch payout/slash
    steps: pl.DataFrame  # run_id, step, loss
    verdicts: pl.DataFrame  # one row per verdict, with its worst distance/threshold ratios
    claims: pl.DataFrame
    posts: pl.DataFrame
    shared: SharedData | None = None  # the epoch's shared runs (rewards/report_shared.py)


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
                assignment=_one(
                    con.sql(
                        "SELECT assignment_hash, body FROM assignments WHERE epoch = $e",
                        params={"e": epoch},
                    ).pl()
                ),
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
                shared=load_shared(con, epoch),
            )
    except ReportError:
        raise
    except Exception as exc:  # duckdb and warehouse errors: one clear message
        raise ReportError(f"cannot read epoch {epoch} from {db}: {exc}") from exc


def epochs_in(db: str | os.PathLike[str]) -> list[int]:
    """The computed epochs of the warehouse, ascending."""
    with Analyst(db) as a:
        return [
            int(r[0]) for r in a.con.sql("SELECT epoch FROM epoch_summaries ORDER BY 1").fetchall()
        ]


# ---- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f2f2f2}
.pass,.verified{color:#1a7f37;font-weight:600}.fail,.failed,.invalid{color:#c62828;font-weight:600}
.pending{color:#b26a00}.hex{overflow-wrap:anywhere;font-family:monospace}
img{max-width:100%;display:block;margin:8px 0}code{font-size:.9em}
"""


def _peer_rows(data: EpochData, decimals: int) -> list[list[Any]]:
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
                tokens_shown(r["payout"], decimals),
                tokens_shown(r["slashed"], decimals),
                r["payout_address"],
            ]
        )
    return rows


PEER_COLUMNS = (
    "peer",
    "run",
    "steps",
    "audited",
    "outcome",
    "confidence",
    "usefulness",
    "payout (tokens)",
    "slashed (tokens)",
    "payout address",
)
VERDICT_COLUMNS = {
    "run_id": "run",
    "step": "step",
    "outcome": "outcome",
    "mode": "mode",
    "max_rel_l2": "max rel L2",
    "l2_threshold": "threshold",
    "max_cos_dist": "max cos dist",
    "loss_before": "loss before",
    "loss_after": "loss after",
    "auditor_id": "auditor",
    "reason": "reason",
}
POST_COLUMNS = {
    "root": "root",
    "cumulative_total": "cumulative total (tokens)",
    "tx_hash": "tx",
    "block_number": "block",
}
CLAIM_COLUMNS = {
    "account": "account",
    "paid": "paid (tokens)",
    "cumulative_amount": "cumulative (tokens)",
    "tx_hash": "tx",
}


def _frame_table(frame: pl.DataFrame, columns: dict[str, str], decimals: int) -> str:
    """A table of ``columns`` (warehouse name -> heading); money columns (DECIMAL(38,0) base
    units) are shown in tokens."""
    rows = [
        [tokens_shown(v, decimals) if isinstance(v, Decimal) else v for v in row]
        for row in frame.select(list(columns)).iter_rows()
    ]
    return table(rows, list(columns.values()))


def _facts(data: EpochData, decimals: int) -> list[list[Any]]:
    s, p = data.summary, data.params
    money = [
        (f"{k} (tokens)", tokens_shown(s[c], decimals))
        for k, c in (
            ("pool", "pool"),
            ("carried in", "carry_in"),
            ("paid", "paid"),
            ("carried out", "carry_out"),
        )
    ]
    counts = [
        (k, s[c])
        for k, c in (
            ("verified runs", "verified_runs"),
            ("failed runs", "failed_runs"),
            ("pending runs", "pending_runs"),
        )
    ]
    policy = (
        f"cheat fraction {p.get('cheat_fraction')}, confidence {p.get('confidence')}, "
        f"slash {p.get('slash_bps')} bps, usefulness weight {p.get('usefulness_ppm')} ppm"
    )
    return [list(x) for x in (*money, *counts, ("policy", policy))]


def _assignment_rows(data: EpochData) -> list[list[Any]]:
    """The work the epoch pays for, one recipe field a row (docs/protocol.md §2.1)."""
    if not data.assignment:
        return [["assignment", "none: this epoch pays for no run (rewards assign)"]]
    body = json.loads(str(data.assignment["body"]))
    schedule = body["schedule"]
    rows: list[list[Any]] = [
        ["assignment hash", data.assignment["assignment_hash"]],
        ["model", body["model"]],
        *([f"  {k}", v] for k, v in sorted(body["model_config"].items())),
        ["dataset", f"{body['dataset']['root']} ({body['dataset']['nbytes']} bytes)"],
        ["batch size x context", f"{body['batch_size']} x {body['context']}"],
        ["dtype", body["dtype"]],
        ["optimizer", body["optimizer"]["name"]],
        *([f"  {k}", v] for k, v in sorted(body["optimizer"]["hyperparameters"].items())),
        ["learning rate", _schedule_text(schedule)],
        ["gradient clip", body["grad_clip"]],
        [
            "checkpoint every",
            f"{body['checkpoint_every']['min']} to {body['checkpoint_every']['max']} steps",
        ],
    ]
    return rows


def _schedule_text(schedule: dict[str, Any]) -> str:
    """A schedule in words (trainer.schedule): its kind and the parameters that kind uses."""
    kind, lr = schedule["kind"], schedule["lr"]
    if kind == "warmup_cosine":
        text = (
            f"warmup over {schedule['warmup_steps']} steps to {lr}, cosine to "
            f"{schedule['final_fraction']} of it at step {schedule['total_steps']}"
        )
    elif kind == "step":
        text = f"{lr}, times {schedule['gamma']} every {schedule['step_size']} steps"
    else:
        text = f"constant {lr}"
    scales = schedule.get("group_scales") or []
    return text + (f"; per-group scales {scales}" if scales else "")


def _plots(data: EpochData, decimals: int) -> list[str]:
    note = (
        "<p>Each point is an audited step: the largest distance over its tensors divided by "
        "that tensor's calibrated threshold (docs/auditing.md). Above 1 fails; a NaN or "
        "infinite distance is drawn at the top.</p>"
    )
    return [
        section("loss", "Loss curves", img(plot_losses(data), "loss curves")),
        section(
            "distances",
            "Audited distances vs thresholds",
            img(plot_distances(data), "distances"),
            note,
        ),
        section("usefulness", "Usefulness", img(plot_usefulness(data), "usefulness")),
        section("payouts", "Payouts and slashes", img(plot_money(data, decimals), "money")),
    ]


def render_html(data: EpochData, *, decimals: int = 18) -> str:
    """The epoch's page: HTML with every plot embedded (no external resource)."""
    parts = [
        f"<h1>veritrain audit report: epoch {data.epoch}</h1>",
        section("summary", "Epoch summary", table(_facts(data, decimals), ["", "value"])),
        section(
            "assignment",
            "Assigned work (runs outside it are refused at ingest)",
            table(_assignment_rows(data), ["", "value"]),
        ),
        section("peers", "Peers and runs", table(_peer_rows(data, decimals), PEER_COLUMNS)),
        *(_plots(data, decimals) if data.runs.height else []),
        render_shared(data.shared, decimals=decimals),
        section(
            "settlement",
            "Settlement",
            _frame_table(data.posts, POST_COLUMNS, decimals),
            _frame_table(data.claims, CLAIM_COLUMNS, decimals),
        ),
        section("verdicts", "Verdicts", _frame_table(data.verdicts, VERDICT_COLUMNS, decimals)),
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


@click.command("report", cls=Command)
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
    """Write a self-contained HTML audit report per epoch (loss, distances, usefulness, money).

    Exit code 2, with one ``error: ...`` line, when the warehouse or an epoch cannot be read."""
    if not Path(db).is_file():
        raise BadInput(f"no warehouse at {db}")
    try:
        paths = write_reports(db, out, epochs=epochs, decimals=decimals)
    except (ReportError, OSError) as exc:
        raise BadInput(str(exc)) from exc
    if not paths:
        raise BadInput("no computed epoch in the warehouse (run `rewards compute`)")
    for path in paths:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    report_command()
