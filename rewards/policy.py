"""Runs the payout policy (rewards/policy.sql, with rewards/policy_shared.sql for shared runs)
and checks its invariants.

The money is computed by the SQL, statement by statement, with its named parameters taken from the
``policy_params`` table (or given explicitly, for a what-if run that is rolled back). Python only
runs it, in one transaction, and refuses the result when an invariant fails: an epoch's rewards
must sum exactly to its payable pool plus the round rewards it pays, a paid round exactly to its
round pool, no amount may be negative, cumulative amounts must never
decrease, and an epoch already posted on chain must recompute to the total it was posted with.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import duckdb

from proofs.errors import VeritrainError
from rewards.warehouse import (
    Connection,
    WarehouseValueError,
    check_amount,
    check_unsettled,
    query,
    transaction,
)

log = logging.getLogger(__name__)

POLICY_VERSION = 2  # 2: shared-run contributions and round rewards (policy_shared.sql)


class PolicyError(VeritrainError, RuntimeError):
    """The policy could not run, or its result broke an invariant; nothing was written."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyParams:
    """The policy's parameters (see docs/payout-policy.md).

    cheat_fraction: fraction of steps a cheater is assumed to fake (0 < f <= 1).
    confidence: detection probability a run's audit must reach before its work is paid (0 <= c < 1).
    slash_bps: stake share lost in an epoch with a failed run, in basis points (0..10000).
    usefulness_ppm: weight of usefulness in the score, in millionths (0 = verified tokens only).
    """

    cheat_fraction: float = 0.1
    confidence: float = 0.9
    slash_bps: int = 1000
    usefulness_ppm: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cheat_fraction) and 0 < self.cheat_fraction <= 1):
            raise WarehouseValueError(
                f"cheat_fraction must be in (0, 1], got {self.cheat_fraction}"
            )
        if not (math.isfinite(self.confidence) and 0 <= self.confidence < 1):
            raise WarehouseValueError(f"confidence must be in [0, 1), got {self.confidence}")
        if isinstance(self.slash_bps, bool) or not 0 <= self.slash_bps <= 10_000:
            raise WarehouseValueError(
                f"slash_bps must be an integer 0..10000, got {self.slash_bps}"
            )
        if isinstance(self.usefulness_ppm, bool) or not 0 <= self.usefulness_ppm <= 1_000_000:
            raise WarehouseValueError(
                f"usefulness_ppm must be an integer 0..1000000, got {self.usefulness_ppm}"
            )

    def to_sql_params(self) -> dict[str, object]:
        """The named parameters of policy.sql."""
        return asdict(self)


def policy_sql() -> str:
    """The text of rewards/policy.sql."""
    return (resources.files("rewards") / "policy.sql").read_text(encoding="utf-8")


def shared_policy_sql() -> str:
    """The text of rewards/policy_shared.sql (contributions and round rewards of shared runs)."""
    return (resources.files("rewards") / "policy_shared.sql").read_text(encoding="utf-8")


def policy_sql_hash() -> str:
    """sha256 of policy.sql followed by policy_shared.sql, part of every epoch's inputs hash."""
    return hashlib.sha256((policy_sql() + shared_policy_sql()).encode()).hexdigest()


# Where the two files interleave (see the top of policy_shared.sql): contribution outcomes come
# first (policy.sql's slashing reads them), round rewards after the epoch summaries and before the
# cumulative payouts (which must include them).
_ROUND_REWARDS_MARK = "\n-- @round rewards"
_SHARED_PART2_MARK = "\n-- @part 2"


def policy_parts() -> tuple[str, ...]:
    """The SQL scripts run_statements runs, in order."""
    main, main_mark, payouts = policy_sql().partition(_ROUND_REWARDS_MARK)
    outcomes, shared_mark, rounds = shared_policy_sql().partition(_SHARED_PART2_MARK)
    if not (main_mark and shared_mark):
        raise PolicyError("policy.sql or policy_shared.sql lost the marker that interleaves them")
    # Each marker line stays a comment at the top of the part it opens.
    return outcomes, main, shared_mark + rounds, main_mark + payouts


def stored_params(con: Connection) -> PolicyParams:
    """The parameters recorded in the warehouse (the defaults when none were set)."""
    rows = query(
        con,
        "SELECT cheat_fraction, confidence, slash_bps, usefulness_ppm FROM policy_params",
    )
    if not rows:
        return PolicyParams()
    f, c, s, u = rows[0]
    return PolicyParams(cheat_fraction=f, confidence=c, slash_bps=s, usefulness_ppm=u)


def set_params(con: Connection, params: PolicyParams) -> None:
    """Record ``params`` as the warehouse's policy parameters (replacing the previous ones)."""
    with transaction(con):
        _store_params(con, params)


def _store_params(con: Connection, params: PolicyParams) -> None:
    query(con, "DELETE FROM policy_params")
    query(
        con,
        "INSERT INTO policy_params VALUES (1, $cheat_fraction, $confidence, $slash_bps,"
        " $usefulness_ppm, $at)",
        {**params.to_sql_params(), "at": _now()},
    )


def open_epoch(con: Connection, epoch: int, pool: int) -> None:
    """Create epoch ``epoch`` with a reward pool of ``pool`` base units (must be > 0).

    Re-opening an epoch with the same pool does nothing; with another pool it is an error.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise WarehouseValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    check_amount("pool", pool)
    if pool == 0:
        raise WarehouseValueError(
            "pool must be positive: an epoch with nothing to pay is not opened"
        )
    existing = query(con, "SELECT pool FROM epochs WHERE epoch = $e", {"e": epoch})
    if existing:
        if int(existing[0][0]) != pool:
            raise WarehouseValueError(
                f"epoch {epoch} is already open with pool {int(existing[0][0])}, not {pool}"
            )
        return
    check_unsettled(con, epoch)  # an earlier new epoch would change a posted epoch's rollover
    query(con, "INSERT INTO epochs VALUES ($e, $p, $at)", {"e": epoch, "p": pool, "at": _now()})


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def run_statements(con: Connection, params: PolicyParams) -> None:
    """Run policy.sql on ``con`` (inside the caller's transaction); PolicyError if it fails."""
    values = params.to_sql_params()
    for part in policy_parts():
        for statement in con.extract_statements(part):
            named = {name: values[name] for name in statement.named_parameters}
            try:
                con.execute(statement, named).fetchall()
            except duckdb.Error as exc:
                raise PolicyError(f"policy.sql failed: {exc}") from exc


def check_invariants(con: Connection) -> None:
    """Raise PolicyError when the computed tables break an invariant of the policy."""
    checks = {
        "an epoch's rewards do not sum to its payable pool plus its round rewards": """
            SELECT s.epoch FROM epoch_summaries AS s
            WHERE s.paid + s.carry_out <> s.pool + s.carry_in
               OR s.paid + coalesce((SELECT sum(amount) FROM round_rewards AS x
                                     WHERE x.epoch = s.epoch), 0)
                  <> coalesce((SELECT sum(amount) FROM rewards AS w WHERE w.epoch = s.epoch), 0)""",
        "a round's rewards do not sum exactly to its round pool": """
            SELECT min(x.epoch) FROM round_rewards AS x JOIN shared_runs AS r USING (shared_run_id)
            GROUP BY x.shared_run_id, x.round, r.round_pool
            HAVING sum(x.amount) <> r.round_pool OR count(DISTINCT x.epoch) <> 1""",
        "an amount is negative": "SELECT epoch FROM rewards WHERE amount < 0 OR score < 0",
        # One window pass over payouts: a repeated (epoch, account) sorts next to itself.
        "a cumulative amount decreased, or payouts repeat an account in an epoch": """
            SELECT epoch FROM (SELECT epoch, lag(epoch) OVER w AS previous,
                                      cumulative - lag(cumulative, 1, 0) OVER w AS delta, amount
                               FROM payouts WINDOW w AS (PARTITION BY account ORDER BY epoch))
            WHERE delta <> amount OR epoch = previous""",
        "the grand total paid differs from the pools minus what is carried": """
            SELECT 1 FROM (SELECT sum(pool) AS pools FROM epochs) AS a,
                          (SELECT sum(amount) AS paid FROM rewards) AS b,
                          (SELECT carry_out FROM epoch_summaries ORDER BY epoch DESC LIMIT 1) AS c,
                          (SELECT sum(amount) AS rounds FROM round_rewards) AS d
            WHERE a.pools + coalesce(d.rounds, 0) <> coalesce(b.paid, 0) + c.carry_out""",
        # The computed tables have no key index (migration 002): their keys are unique by
        # construction of policy.sql, and checked here (payouts above).
        "a computed table repeats a key": """
            SELECT 0 FROM (SELECT run_id FROM run_outcomes GROUP BY run_id HAVING count(*) > 1
                           UNION ALL
                           SELECT epoch FROM rewards GROUP BY epoch, account HAVING count(*) > 1
                           UNION ALL
                           SELECT 0 FROM contribution_outcomes
                           GROUP BY shared_run_id, contribution_hash HAVING count(*) > 1
                           UNION ALL
                           SELECT 0 FROM round_rewards
                           GROUP BY shared_run_id, contribution_hash HAVING count(*) > 1)
            LIMIT 1""",
        "an epoch posted on chain now gives another cumulative total": """
            SELECT p.epoch FROM settlement_posts AS p
            WHERE p.cumulative_total <> coalesce((SELECT sum(cumulative) FROM payouts AS o
                                                  WHERE o.epoch = p.epoch), 0)""",
    }
    for message, sql in checks.items():
        bad = query(con, sql)
        if bad:
            raise PolicyError(f"invariant broken: {message} (epoch {bad[0][0]})")


def compute(con: Connection, params: PolicyParams | None = None) -> PolicyParams:
    """Recompute every computed table from the inputs, in one transaction; returns the params used.

    ``params`` defaults to the stored parameters; given ones are stored in the same transaction,
    so the warehouse always records the parameters its results were computed with. A broken
    invariant raises PolicyError and leaves the previous results (and parameters) in place.
    """
    used = params if params is not None else stored_params(con)
    with transaction(con):
        if params is not None:
            _store_params(con, params)
        run_statements(con, used)
        check_invariants(con)
        # A recomputation invalidates the cached roots; rewards.payouts rebuilds them on demand.
        query(con, "DELETE FROM payout_roots")
    log.info("payout policy v%s computed with %s", POLICY_VERSION, used)
    return used


def preview(con: Connection, params: PolicyParams, sql: str) -> list[Any]:
    """What-if: run the policy with ``params``, return the rows of ``sql`` over the results, and
    roll everything back (the warehouse is unchanged)."""
    con.execute("BEGIN TRANSACTION")
    try:
        run_statements(con, params)
        return query(con, sql)
    finally:
        con.execute("ROLLBACK")
