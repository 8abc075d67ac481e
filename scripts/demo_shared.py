"""The shared run of `make demo`: six peers train one tiny GPT in rounds (docs/shared-runs.md).

alice, bob and frank are honest (frank drops out for rounds 2 and 3 and rejoins); carol sends
random noise of plausible norm instead of her real update, dave builds every round on the previous
round's model, and erin re-signs bob's contribution as her own (`trainer join --behaviour`, a
testing aid: trainer/adversaries.py). Each peer is one `trainer join` process; the demo closes each
round with `trainer aggregate --once` as soon as every peer expected in it has published (the
genesis deadline is short, so the round is due at once), and prints the aggregator's round table.
The same run without carol, dave and erin trains next, as the report's comparison curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo_shell import DemoError, Job, Shell, console
from rich.table import Table

ROUNDS = 7
INNER_STEPS = 8
AWAY = (2, 3)  # the rounds frank misses
# A tiny GPT (1 layer, d_model 64: 41,600 parameters) so that both runs fit in the demo's time.
GENESIS_ARGS = (
    "--rounds", str(ROUNDS), "--inner-steps", str(INNER_STEPS), "--n-layer", "1",
    "--n-head", "2", "--d-model", "64", "--context", "32", "--dropout", "0", "--batch-size", "8",
    "--inner-lr", "0.01", "--chunk", "1024", "--topk", "32", "--probe-batch", "16",
    "--deadline", "1",
)  # fmt: skip
HELDOUT = ("proofs",)  # veritrain's own sources: never in the training corpus (the stdlib)


@dataclass(frozen=True)
class SharedPeer:
    name: str
    behaviour: str  # trainer join --behaviour
    role: str

    def active(self, r: int) -> bool:
        return self.name != "frank" or r not in AWAY


SHARED_PEERS = (
    SharedPeer(name="alice", behaviour="honest", role="honest"),
    SharedPeer(name="bob", behaviour="honest", role="honest (copied by erin)"),
    SharedPeer(name="carol", behaviour="fabricate", role="fabricator"),
    SharedPeer(name="dave", behaviour="stale", role="stale"),
    SharedPeer(name="erin", behaviour="copy:bob", role="copier of bob"),
    SharedPeer(name="frank", behaviour="honest", role=f"honest, away rounds {AWAY[0]}-{AWAY[-1]}"),
)
HONEST = tuple(p for p in SHARED_PEERS if p.behaviour == "honest")


class SharedRun:
    """One shared run of the demo: its genesis, its peers' join processes and its rounds."""

    def __init__(
        self, sh: Shell, out: Path, keys: Path, run_id: str, peers: tuple[SharedPeer, ...]
    ) -> None:
        self.sh, self.keys, self.run_id, self.peers = sh, keys, run_id, peers
        self.store = out / run_id
        self.verdicts = out / "shared-verdicts" / run_id
        self.records: list[str] = []  # the aggregator's output per round

    def key(self, name: str) -> str:
        return str(self.keys / f"{name}.bls")

    def genesis(self) -> str:
        roster = [a for p in self.peers for a in ("--peer", f"{p.name}={self.key(p.name)}")]
        held = [a for h in HELDOUT for a in ("--heldout", h)]
        out = self.sh.run(f"genesis {self.run_id}", [
            "-m", "trainer", "genesis", "--shared", str(self.store), "--run-id", self.run_id,
            "--key", self.key("coordinator"), "--aggregator-key", self.key("aggregator"),
            *roster, *held, *GENESIS_ARGS,
        ])  # fmt: skip
        return out.strip().splitlines()[0]

    def _join(self, p: SharedPeer, *extra: str) -> Job:
        args = ["-m", "trainer", "join", "--shared", str(self.store), "--key", self.key(p.name),
                "--name", p.name, "--threads", "1", "--device", "cpu", "--poll", "0.2",
                *extra]  # fmt: skip
        if p.behaviour != "honest":
            args += ["--behaviour", p.behaviour]
        return self.sh.start(f"join {self.run_id} {p.name}", args)

    def _published(self, p: SharedPeer, r: int) -> bool:
        return (self.store / "contributions" / p.name / f"r{r:06d}.json").exists()

    def _wait_for(self, r: int, jobs: list[Job]) -> None:
        expected = [p for p in self.peers if p.active(r)]
        deadline = time.monotonic() + 300
        while not all(self._published(p, r) for p in expected):
            for job in jobs:
                if job.proc.poll() is not None:
                    job.result()  # raises with the log's tail unless it exited 0
            if time.monotonic() > deadline:
                missing = [p.name for p in expected if not self._published(p, r)]
                raise DemoError(f"round {r}: no contribution from {', '.join(missing)} in 300 s")
            time.sleep(0.1)

    def train(self, show: bool) -> list[str]:
        """All rounds: start the peers, close each round once its expected peers published
        (frank leaves after round 1 and rejoins when round 4 opens); returns each round's table."""
        jobs = [self._join(p) if p.name != "frank" else self._join(p, "--rounds", str(AWAY[0]))
                for p in self.peers]  # fmt: skip
        for r in range(ROUNDS):
            self._wait_for(r, jobs)
            table = self.sh.run(f"aggregate {self.run_id} r{r}", [
                "-m", "trainer", "aggregate", "--shared", str(self.store),
                "--key", self.key("aggregator"), "--once",
            ])  # fmt: skip
            self.records.append(table)
            if show:
                console.print(table.rstrip(), markup=False, highlight=False, soft_wrap=True)
            else:
                console.print("  " + table.splitlines()[0][:110], markup=False)
            if r == AWAY[-1] and any(p.name == "frank" for p in self.peers):
                jobs.append(self._join(next(p for p in self.peers if p.name == "frank")))
        for job in jobs:
            job.result()
        return self.records

    def verify(self) -> str:
        return self.sh.run(f"verify-round {self.run_id}", [
            "-m", "trainer", "verify-round", "--shared", str(self.store), "--all",
        ])  # fmt: skip

    def commit_rounds(self, key_file: Path) -> str:
        return self.sh.run(f"commit-rounds {self.run_id}", [
            "-m", "rewards", "commit-rounds", "--shared", str(self.store),
        ], key_file=key_file)  # fmt: skip

    def audit(self, auditor_key: Path, rpc: str, deployment: Path, *extra: str) -> str:
        """`audit shared` of the included contributions into ``self.verdicts``, the sample drawn
        from the block after each round record's commitment. Exit 1 when a contribution fails
        (carol's do): that is the point."""
        held = [a for h in HELDOUT for a in ("--heldout", h)]
        return self.sh.run(f"audit shared {self.run_id}", [
            "-m", "audit", "shared", "--shared", str(self.store), "--key", str(auditor_key),
            "--out", str(self.verdicts), "--rpc", rpc, "--deployment", str(deployment),
            "--mode", "exact", *held, *extra,
        ], ok_codes=(0, 1))  # fmt: skip

    def ingest(self, round_pool: int) -> str:
        """`rewards ingest-shared` of the store and the verdicts (round pool in base units); any
        rejected record (exit 3) stops the demo."""
        out = self.sh.run(f"ingest-shared {self.run_id}", [
            "-m", "rewards", "ingest-shared", "--shared", str(self.store), "--verdicts",
            str(self.verdicts), "--epoch", "0", "--round-pool", str(round_pool),
        ])  # fmt: skip
        return out.strip().splitlines()[0]


# The policy's confidence (99 % of catching a peer that fakes 25 % of its steps) over H = 8 inner
# steps needs 7 of them re-executed: 1 - C(8-2, n) / C(8, n) reaches 0.99 only at n = 7.
AUDIT_STEPS = 7

SHARED_SUMMARY_SQL = """
WITH excl AS (
    SELECT c.roster_name, x.reason, count(*) AS n
    FROM contributions c JOIN exclusions x ON x.shared_run_id = c.shared_run_id
                                          AND x.contribution_hash = c.contribution_hash
    WHERE c.shared_run_id = '{run}' GROUP BY ALL
), caught AS (
    SELECT contribution_hash, split_part(min(reason), ':', 1) AS why
    FROM contribution_verdicts WHERE outcome <> 'pass' GROUP BY ALL
)
SELECT c.roster_name AS peer,
       count(DISTINCT c.record_round) AS rounds_sent,
       count(*) FILTER (WHERE c.included) AS included,
       coalesce((SELECT string_agg(e.reason || ' x' || e.n, ', ' ORDER BY e.reason) FROM excl e
                 WHERE e.roster_name = c.roster_name), '') AS excluded_for,
       count(*) FILTER (WHERE o.state = 'failed') AS caught,
       coalesce(string_agg(DISTINCT k.why, ', '), '') AS caught_for,
       coalesce((SELECT sum(w.amount) FROM round_rewards w
                 WHERE w.shared_run_id = c.shared_run_id AND w.peer_id = c.peer_id), 0) AS paid,
       coalesce((SELECT sum(s.amount) FROM slashes s WHERE s.peer_id = c.peer_id), 0) AS slashed
FROM contributions c
LEFT JOIN contribution_outcomes o ON o.shared_run_id = c.shared_run_id
                                 AND o.contribution_hash = c.contribution_hash
LEFT JOIN caught k ON k.contribution_hash = c.contribution_hash
WHERE c.shared_run_id = '{run}'
GROUP BY c.shared_run_id, c.roster_name, c.peer_id ORDER BY c.roster_name
"""

HELDOUT_SQL = """
SELECT shared_run_id AS run, round, round(avg(loss_before), 4) AS heldout_loss
FROM contribution_verdicts GROUP BY ALL ORDER BY run, round
"""


class SharedSection:
    """The demo's shared-run steps, called by scripts/demo.py between the solo audit and the
    settlement: train both runs, commit their rounds, audit them, then ingest and summarise."""

    def __init__(self, sh: Shell, out: Path, keys: Path) -> None:
        self.sh, self.keys = sh, keys
        self.run = SharedRun(sh, out, keys, "demo-shared", SHARED_PEERS)
        self.base = SharedRun(sh, out, keys, "demo-shared-honest", HONEST)

    def train(self) -> None:
        console.rule(f"[bold]5. one shared GPT: {len(SHARED_PEERS)} peers, {ROUNDS} rounds")
        console.print("  " + self.run.genesis())
        for p in SHARED_PEERS:
            console.print(f"  {p.name:6} {p.role}")
        self.run.train(show=True)
        checked = self.run.verify().count("OK round")
        console.print(f"  verify-round --all: {checked} of {ROUNDS} rounds recomputed bit for bit "
                      "from the store (screening, probe, sum, signatures, chain)")  # fmt: skip
        console.rule("[bold]6. the same run without carol, dave and erin (comparison curve)")
        console.print("  " + self.base.genesis())
        self.base.train(show=False)

    def commit_and_audit(self, operator: Path, rpc: str, deployment: Path,
                         mine: Callable[[], None]) -> None:  # fmt: skip
        console.rule("[bold]7. round records on chain; the auditor audits the contributions")
        for run in (self.run, self.base):
            lines = run.commit_rounds(operator).strip().splitlines()
            console.print(f"  {run.run_id}: {len(lines)} round record hashes committed "
                          f"({lines[-1].split(' (')[-1].rstrip(')')} last)")  # fmt: skip
        mine()
        console.print(f"  {self.run.run_id}: {AUDIT_STEPS} of {INNER_STEPS} inner steps "
                      "re-executed per included contribution (the policy's 99 % confidence "
                      "against a 25 % cheat needs 7 of 8), error feedback recomputed bitwise, "
                      "usefulness on the held-out corpus (proofs/)")  # fmt: skip
        auditor = self.keys / "auditor.bls"
        out = self.run.audit(auditor, rpc, deployment, "--steps", str(AUDIT_STEPS))
        console.print(_tail(out), markup=False, highlight=False, soft_wrap=True)
        # The comparison run: one contribution a round is enough for its held-out loss curve.
        self.base.audit(auditor, rpc, deployment, "--steps", "1", "--contributions", "1")
        console.print(
            f"  {self.base.run_id}: one contribution a round audited (its held-out "
            "loss per round is the report's comparison curve; its round pool is 0)"
        )

    def ingest(self, round_pool: int) -> list[str]:
        return [self.run.ingest(round_pool), self.base.ingest(0)]

    def summary(
        self, sql: Callable[[str], list[dict[str, Any]]], tokens: Callable[[Any], str]
    ) -> None:
        roles = {p.name: p.role for p in SHARED_PEERS}
        table = Table(title=f"shared run {self.run.run_id}: {ROUNDS} rounds")
        for col in ("peer", "role", "rounds sent", "included", "excluded (why)", "caught (why)",
                    "paid from rounds", "slashed (epoch)"):  # fmt: skip
            table.add_column(col, justify="right" if col in ("rounds sent", "included") else "left")
        for row in sql(SHARED_SUMMARY_SQL.format(run=self.run.run_id)):
            caught = str(row["caught"]) + (f" ({row['caught_for']})" if row["caught"] else "")
            table.add_row(row["peer"], roles.get(row["peer"], "?"), str(row["rounds_sent"]),
                          str(row["included"]), row["excluded_for"] or "-", caught,
                          tokens(row["paid"]), tokens(row["slashed"]))  # fmt: skip
        console.print(table)
        losses: dict[int, dict[str, float]] = {}
        for row in sql(HELDOUT_SQL):
            losses.setdefault(int(row["round"]), {})[row["run"]] = float(row["heldout_loss"])
        nan = float("nan")
        line = "  ".join(
            f"r{r} {v.get(self.run.run_id, nan):.3f}/{v.get(self.base.run_id, nan):.3f}"
            for r, v in sorted(losses.items())
        )
        console.print(f"held-out loss per round (with adversaries / without): {line}")


def _tail(output: str, lines: int = 30) -> str:
    return "\n".join("  " + line for line in output.rstrip().splitlines()[-lines:])
