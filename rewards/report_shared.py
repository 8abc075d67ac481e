"""The audit report's shared-run section (issue #16): read from the warehouse, rendered as HTML.

For each shared run in an epoch's scope (ingested under it, or with contributions decided or
round rewards paid in it) the section shows:

- the global held-out loss per round: theta_r's loss on the auditors' held-out batch (the mean
  ``loss_before`` of the round's contribution verdicts), every shared run on one plot, so the run
  without its adversaries (when it is in the warehouse) is drawn beside the run with them; a round
  no verdict measured falls back to the aggregator's probe loss, drawn dashed;
- contributions per round by peer and outcome (included and verified / failed / pending, or the
  aggregator's exclusion reason);
- usefulness per contribution (micro units, as the policy weights it) and what it was paid;
- payouts per peer in tokens with decimals (``amount / 10**decimals``), the exact base units
  alongside.

:func:`load_shared` reads (called by ``rewards.report.load_epoch`` on its read-only connection);
:func:`render_shared` returns the section's HTML, "" when the epoch has no shared run.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from rewards.display import tokens_shown as tokens
from rewards.report_html import img, table
from rewards.report_plots import _png, _pyplot

_RUNS_SQL = """
SELECT s.shared_run_id, s.epoch, s.round_pool, s.inner_steps, s.rounds
FROM shared_runs s
WHERE s.epoch = $e
   OR EXISTS (SELECT 1 FROM round_rewards w
              WHERE w.shared_run_id = s.shared_run_id AND w.epoch = $e)
   OR EXISTS (SELECT 1 FROM contribution_outcomes o
              WHERE o.shared_run_id = s.shared_run_id AND o.decided_epoch = $e)
ORDER BY s.shared_run_id
"""

_ROUNDS_SQL = """
SELECT r.shared_run_id, r.round, r.n_included, r.n_excluded, r.carried_over, r.base_probe_loss,
       (SELECT avg(v.loss_before) FROM contribution_verdicts v
         WHERE v.shared_run_id = r.shared_run_id AND v.round = r.round
           AND isfinite(v.loss_before)) AS heldout_loss
FROM shared_rounds r
WHERE r.shared_run_id IN (SELECT unnest($runs::VARCHAR[]))
ORDER BY r.shared_run_id, r.round
"""

# Every screened file with a named peer: contributions (included or excluded) and the exclusions
# of files the warehouse holds no contribution for (unreadable, unregistered, ...).
_CONTRIBUTIONS_SQL = """
WITH v AS (
    SELECT shared_run_id, contribution_hash,
           string_agg(DISTINCT outcome, '/' ORDER BY outcome) AS audit,
           min(reason) FILTER (WHERE outcome <> 'pass') AS audit_reason,
           avg(loss_before - loss_after) AS gain
    FROM contribution_verdicts GROUP BY ALL
), paid AS (
    SELECT shared_run_id, contribution_hash, sum(amount) AS amount
    FROM round_rewards WHERE epoch = $e GROUP BY ALL
)
SELECT c.shared_run_id, c.round, c.roster_name AS peer, c.peer_id, c.contribution_hash,
       c.included, coalesce(x.reason, CASE WHEN c.included THEN 'included' END) AS screening,
       coalesce(x.detail, '') AS detail, c.norm, o.state, o.usefulness_micro,
       v.audit, v.audit_reason, v.gain, coalesce(paid.amount, 0) AS paid
FROM contributions c
LEFT JOIN exclusions x ON x.shared_run_id = c.shared_run_id AND x.round = c.round
                      AND x.contribution_hash = c.contribution_hash
LEFT JOIN contribution_outcomes o ON o.shared_run_id = c.shared_run_id
                                 AND o.contribution_hash = c.contribution_hash
LEFT JOIN v ON v.shared_run_id = c.shared_run_id AND v.contribution_hash = c.contribution_hash
LEFT JOIN paid ON paid.shared_run_id = c.shared_run_id
              AND paid.contribution_hash = c.contribution_hash
WHERE c.shared_run_id IN (SELECT unnest($runs::VARCHAR[]))
UNION ALL
SELECT x.shared_run_id, x.round, coalesce(x.roster_name, x.file), x.peer_id, x.contribution_hash,
       false, x.reason, x.detail, x.norm, NULL, NULL, NULL, NULL, NULL, 0
FROM exclusions x
WHERE x.shared_run_id IN (SELECT unnest($runs::VARCHAR[]))
  AND NOT EXISTS (SELECT 1 FROM contributions c WHERE c.shared_run_id = x.shared_run_id
                  AND c.contribution_hash IS NOT DISTINCT FROM x.contribution_hash)
ORDER BY 1, 2, 3
"""

_PAYOUTS_SQL = """
SELECT w.shared_run_id, w.peer_id, w.account, count(*) AS rounds_paid,
       sum(w.usefulness_micro) AS usefulness_micro, sum(w.amount) AS amount
FROM round_rewards w WHERE w.epoch = $e
GROUP BY ALL ORDER BY w.shared_run_id, w.peer_id
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedData:
    """The shared runs of one epoch's page, as read from the warehouse."""

    runs: pl.DataFrame
    rounds: pl.DataFrame
    contributions: pl.DataFrame
    payouts: pl.DataFrame


def load_shared(con: duckdb.DuckDBPyConnection, epoch: int) -> SharedData | None:
    """The epoch's shared runs; None when it has none (or the warehouse predates shared runs)."""
    tables = {r[0] for r in con.sql("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "shared_runs" not in tables:
        return None
    runs = con.sql(_RUNS_SQL, params={"e": epoch}).pl()
    if not runs.height:
        return None
    params = {"e": epoch, "runs": runs["shared_run_id"].to_list()}
    return SharedData(
        runs=runs,
        rounds=con.sql(_ROUNDS_SQL, params={"runs": params["runs"]}).pl(),
        contributions=con.sql(_CONTRIBUTIONS_SQL, params=params).pl(),
        payouts=con.sql(_PAYOUTS_SQL, params={"e": epoch}).pl(),
    )


# ---- HTML ---------------------------------------------------------------------------------------


def _outcome(row: dict[str, Any]) -> str:
    """One cell of the round grid: the audit state of an included contribution, else the
    aggregator's reason."""
    if row["included"]:
        return str(row["state"] or "pending")
    return str(row["screening"])


def _grid(data: SharedData, run_id: str) -> str:
    """Rows: peers; columns: rounds; cells: outcome (``-``: no contribution that round)."""
    rounds = data.rounds.filter(pl.col("shared_run_id") == run_id)["round"].to_list()
    mine = data.contributions.filter(pl.col("shared_run_id") == run_id)
    cells: dict[tuple[str, int], list[str]] = {}
    for row in mine.iter_rows(named=True):
        cells.setdefault((row["peer"], row["round"]), []).append(_outcome(row))
    peers = sorted({p for p, _ in cells})
    rows = [[p, *(" ".join(cells.get((p, r), ["-"])) for r in rounds)] for p in peers]
    return table(rows, ["peer", *(f"r{r}" for r in rounds)])


def _contribution_rows(data: SharedData, decimals: int) -> list[list[Any]]:
    rows = []
    for c in data.contributions.iter_rows(named=True):
        use = c["usefulness_micro"]
        audit = c["audit"] or "-"
        if c["audit_reason"]:
            audit += f": {c['audit_reason']}"
        screening = c["screening"] + (f" ({c['detail']})" if c["detail"] else "")
        rows.append([c["shared_run_id"], c["round"], c["peer"], screening, c["norm"],
                     c["state"] if c["included"] else "-", audit, c["gain"],
                     None if use is None else int(use), tokens(c["paid"], decimals)])  # fmt: skip
    return rows


CONTRIBUTION_COLUMNS = ("shared run", "round", "peer", "screening", "norm", "state", "audit",
                        "held-out gain", "usefulness (micro)", "paid (tokens)")  # fmt: skip


def _payout_rows(data: SharedData, decimals: int) -> list[list[Any]]:
    return [[p["shared_run_id"], p["peer_id"], p["account"], p["rounds_paid"],
             int(p["usefulness_micro"]), tokens(p["amount"], decimals), int(p["amount"])]
            for p in data.payouts.iter_rows(named=True)]  # fmt: skip


PAYOUT_COLUMNS = ("shared run", "peer", "account", "rounds paid", "usefulness (micro)",
                  "paid (tokens)", "paid (base units)")  # fmt: skip


def _label(text: str) -> str:
    # Ids come from peers: no mathtext, no hidden legend entry (see report_plots._label).
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def plot_heldout(data: SharedData) -> str:
    """Held-out loss of theta_r per round, one line per shared run (probe loss, dashed, where
    no verdict measured a round)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, run_id in enumerate(data.runs["shared_run_id"].to_list()):
        rounds = data.rounds.filter(pl.col("shared_run_id") == run_id)
        held = rounds.filter(pl.col("heldout_loss").is_not_null())
        probe = rounds.filter(pl.col("base_probe_loss").is_not_null())
        if held.height:
            ax.plot(held["round"], held["heldout_loss"], "o-", color=f"C{i}",
                    label=_label(f"{run_id}: held-out loss"))  # fmt: skip
        elif probe.height:
            ax.plot(probe["round"], probe["base_probe_loss"], "s--", color=f"C{i}",
                    label=_label(f"{run_id}: probe loss (no verdicts)"))  # fmt: skip
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round r (loss of theta_r)")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_contribution_usefulness(data: SharedData) -> str:
    """Held-out gain of each audited contribution (theta_r vs theta_r - alpha d) per round: one
    colour per peer, one marker per shared run, a black x on a failed or invalid audit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    audited = data.contributions.filter(pl.col("gain").is_not_null())
    peers = sorted(set(audited["peer"].to_list()))
    runs = data.runs["shared_run_id"].to_list()
    for j, run_id in enumerate(runs):
        mine = audited.filter(pl.col("shared_run_id") == run_id)
        for i, peer in enumerate(peers):
            rows = mine.filter(pl.col("peer") == peer)
            label = f"{peer} ({run_id})" if len(runs) > 1 else peer
            if rows.height:
                ax.scatter(rows["round"], rows["gain"], color=f"C{i % 10}", s=30,
                           marker=_MARKERS[j % len(_MARKERS)], label=_label(label))  # fmt: skip
        failed = mine.filter(pl.col("audit").str.contains("fail|invalid"))
        if failed.height:
            ax.scatter(failed["round"], failed["gain"], marker="x", color="black", s=80)
    ax.axhline(0, color="#888", lw=0.8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("loss_before - loss_after")
    ax.grid(alpha=0.3)
    if audited.height:
        ax.legend(fontsize=7, ncol=2)
    return _png(fig)


_MARKERS = ("o", "^", "s", "D")


def render_shared(data: SharedData | None, *, decimals: int = 18) -> str:
    """The shared-run section's HTML ("" when ``data`` is None)."""
    if data is None:
        return ""
    runs = [
        [r["shared_run_id"], r["epoch"], r["inner_steps"], r["rounds"] or "until stopped",
         tokens(r["round_pool"], decimals)]
        for r in data.runs.iter_rows(named=True)
    ]  # fmt: skip
    grids = "".join(
        f"<h3>{html.escape(run_id)}: contributions per round</h3>{_grid(data, run_id)}"
        for run_id in data.runs["shared_run_id"].to_list()
    )
    note = (
        "<p>Held-out loss: theta_r on the auditors' held-out batch (mean "
        "<code>loss_before</code> of round r's contribution verdicts). Each run draws its batch "
        "from its own genesis hash, so two runs' curves compare in trend, not point by point. "
        "Usefulness: <code>loss_before - loss_after</code> of theta_r - alpha d alone; the "
        "policy pays max(0, round(1e6 x mean)) over passing verdicts. A black x marks a failed "
        "or invalid audit.</p>"
    )
    body = "".join([
        table(runs, ["shared run", "ingested in epoch", "inner steps", "rounds",
                      "round pool (tokens)"]),
        img(plot_heldout(data), "held-out loss per round"), note,
        img(plot_contribution_usefulness(data), "usefulness per contribution"), grids,
        "<h3>Contributions</h3>",
        table(_contribution_rows(data, decimals), CONTRIBUTION_COLUMNS),
        "<h3>Round rewards paid this epoch</h3>",
        table(_payout_rows(data, decimals), PAYOUT_COLUMNS),
    ])  # fmt: skip
    return f'<section id="shared"><h2>Shared runs</h2>{body}</section>'
