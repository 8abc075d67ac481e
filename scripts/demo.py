"""`make demo`: a small decentralized training epoch, end to end, with the public commands only.

A local Anvil chain with the settlement contract deployed and funded; four peers (each with its
own BLS key and payout address) train the reference GPT on the standard library's sources and
record their commitments on chain: alice and bob are honest, carol fabricates a third of her
gradients, dave re-commits a stale gradient every other step. carol and dave are ordinary users of
the public audit hook (examples/cheating_peer.py, examples/lazy_peer.py). An auditor samples steps
with the block hash after each commitment as beacon, re-executes them and signs verdicts; the
reward engine ingests, computes the epoch in DuckDB, posts the payout root, and the honest peers
claim. Then six peers train one shared GPT in rounds (scripts/demo_shared.py): honest peers, a
fabricator, a stale peer, a copier and a peer that drops out for two rounds; the aggregator prints
each round's table, the round records are committed on chain, the auditor audits the included
contributions with the block after each round's commitment as beacon, and the round pools are paid
in the same epoch. Everything lands under demo-out/ (wiped at the start, so a rerun starts afresh).

    python scripts/demo.py [--steps 48] [--out demo-out]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from eth_account import Account
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_shared import ROUNDS, SHARED_PEERS, SharedSection
from demo_shell import (
    ROOT,
    DemoError,
    Job,
    Shell,
    console,
    run_parallel,
    run_steps,
    wait_with_bar,
)

TOKEN = 10**18  # the test token's base units per token
POOL = 1_000 * TOKEN  # epoch 0's reward pool
ROUND_POOL = 50 * TOKEN  # what each round of the shared run shares among its useful contributions
STAKE = 100 * TOKEN
CHEAT_FRACTION, CONFIDENCE = 0.25, 0.99  # audit target: catch a 25 % cheat with 99 %
ACTIVATION_DELAY = 6  # seconds a posted root waits (the guardian's window to revoke it)
BEACON_DELAY = 2  # the beacon is the hash of the block 2 after the commitment


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str
    how: str  # the training command after `python`

    def train_args(self, out: Path, steps: int) -> list[str]:
        store, key = str(out / "runs" / self.name), str(out / "keys" / f"{self.name}.bls")
        # The assignment fixes the recipe; the run seed is derived from each peer's own key.
        assignment = str(out / "assignment.json")
        common = ["--store", store, "--assignment", assignment, "--steps", str(steps)]
        if self.how == "trainer":
            return ["-m", "trainer", "run", *common, "--key-file", key, "--checkpoint-every", "8"]
        script = "examples/cheating_peer.py" if self.kind == "cheater" else "examples/lazy_peer.py"
        extra = ["--fraction", "0.33"] if self.kind == "cheater" else ["--every", "2"]
        return [script, *common, "--key-file", key, "--checkpoint-every", "8", *extra]


PEERS = (
    Peer(name="alice", kind="honest", how="trainer"),
    Peer(name="bob", kind="honest", how="trainer"),
    Peer(name="carol", kind="cheater", how="script"),
    Peer(name="dave", kind="lazy", how="script"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NAMES = tuple(dict.fromkeys([*(p.name for p in PEERS), *(p.name for p in SHARED_PEERS)]))
"""Every trainer of the demo: the solo peers and the shared run's (alice..dave are in both)."""


def count_files(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


class Demo:
    def __init__(self, out: Path, steps: int) -> None:
        self.out, self.steps = out, steps
        self.keys = out / "keys"
        self.rpc = f"http://127.0.0.1:{free_port()}"
        self.db = out / "veritrain.duckdb"
        self.sh = Shell(
            out,
            env={
                "VERITRAIN_RPC": self.rpc,
                "VERITRAIN_DB": str(self.db),
                "VERITRAIN_DEPLOYMENT": str(out / "deployment.json"),
            },
        )
        self.addresses: dict[str, str] = {}
        self.pubkeys: dict[str, str] = {}
        self.roots: dict[str, str] = {}
        self.chain: Job | None = None
        self.shared = SharedSection(self.sh, out, self.keys)

    def eth_key(self, name: str) -> Path:
        return self.keys / f"{name}.eth-key"

    # ---- 1. keys and chain --------------------------------------------------------------------

    def make_keys(self) -> None:
        console.rule("[bold]1. keys, chain, contract, warehouse")
        self.keys.mkdir(parents=True, exist_ok=True)
        for name in ("operator", *NAMES):
            account = Account.create()
            path = self.eth_key(name)
            path.touch(mode=0o600)
            path.write_text(account.key.hex() + "\n")
            self.addresses[name] = account.address
        jobs = {
            name: self.sh.start(
                f"keygen {name}", ["-m", "trainer", "keygen", str(self.keys / f"{name}.bls")]
            )
            for name in (*NAMES, "coordinator", "aggregator")
        }
        jobs["auditor"] = self.sh.start(
            "keygen auditor", ["-m", "audit", "keygen", str(self.keys / "auditor.bls")]
        )
        for name, job in jobs.items():
            job.result()
            self.pubkeys[name] = re.findall(r"0x[0-9a-f]{96}", job.output().replace("\n", ""))[0]
        console.print(f"  BLS keys and payout addresses for {', '.join(NAMES)}; BLS keys for the "
                      "shared run's coordinator and aggregator")  # fmt: skip

    def start_chain(self) -> None:
        port = self.rpc.rsplit(":", 1)[1]
        fund = [a for n in self.addresses for a in ("--fund", self.addresses[n])]
        state = str(self.out / "chain" / "state.json")
        self.chain = self.sh.start(
            "chain", ["-m", "rewards", "chain", "--port", port, "--state", state, *fund]
        )
        deadline = time.monotonic() + 90
        while "anvil on" not in self.chain.output():
            if self.chain.proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"the chain did not start:\n{self.chain.output()[-2000:]}")
            time.sleep(0.2)
        op = self.eth_key("operator")
        self.sh.run(
            "deploy",
            [
                "-m",
                "rewards",
                "deploy",
                "--mint",
                str(10**6 * TOKEN),
                "--delay",
                str(ACTIVATION_DELAY),
            ],
            key_file=op,
        )
        funds = POOL + ROUNDS * ROUND_POOL  # the epoch pool and every round pool of the shared run
        self.sh.run("fund", ["-m", "rewards", "fund", str(funds)], key_file=op)
        console.print(f"  Anvil at {self.rpc}; settlement deployed and funded with "
                      f"{tokens(funds)} tokens")  # fmt: skip

    def setup_warehouse(self) -> None:
        def rewards(name: str, line: str) -> tuple[str, list[str], None]:
            return name, ["-m", "rewards", *line.split()], None

        steps = [
            rewards("init", "init"),
            rewards("params", f"params --cheat-fraction {CHEAT_FRACTION} --confidence "
                    f"{CONFIDENCE} --slash-bps 5000 --usefulness-ppm 0"),
            rewards("open-epoch", f"open-epoch 0 --pool {POOL}"),
            rewards("assign", f"assign --epoch 0 --steps {self.steps} --checkpoint-min 4 "
                    f"--checkpoint-max 16 --out {self.out / 'assignment.json'}"),
            rewards("register auditor", f"register-peer auditor --role auditor "
                    f"--pubkey {self.pubkeys['auditor']}"),
        ]  # fmt: skip
        for name in NAMES:
            key, address = self.pubkeys[name], self.addresses[name]
            line = f"register-peer {name} --pubkey {key} --address {address}"
            steps.append(rewards(f"register {name}", line))
            steps.append(rewards(f"stake {name}", f"stake {name} --epoch 0 --amount {STAKE}"))
        run_steps(self.sh, "warehouse", steps)
        console.print(
            f"  warehouse {self.db}: epoch 0 pool 1000 tokens for the reference GPT recipe "
            f"({self.out / 'assignment.json'}), 100 tokens staked each"
        )

    # ---- 2. training and commitments ----------------------------------------------------------

    def train(self) -> None:
        console.rule(f"[bold]2. four peers train {self.steps} steps each")

        def job(p: Peer) -> tuple[str, int, object, object]:
            manifests = self.out / "runs" / p.name / "manifests"
            return (
                f"{p.name} ({p.kind})",
                self.steps,
                lambda: self.sh.start(f"train {p.name}", p.train_args(self.out, self.steps)),
                # a signed manifest closes every window of 8 steps
                lambda: min(self.steps, 8 * count_files(manifests, "w*.json")),
            )

        done = run_parallel("train", [job(p) for p in PEERS])  # type: ignore[list-item]
        for p in PEERS:
            if p.kind != "honest":
                line = done[f"{p.name} ({p.kind})"].output().strip().splitlines()[-1]
                console.print(f"  {p.name} (secretly): {line}")
        self.verify_stores()

    def verify_stores(self) -> None:
        """Every store verifies offline, the cheaters' too: their fakes are signed, chained and
        really applied by the optimizer. Only re-executing a faked step can tell."""

        def job(p: Peer) -> tuple[str, int, object, object]:
            log: list[Job] = []

            def start() -> Job:
                log.append(
                    self.sh.start(
                        f"verify-store {p.name}",
                        ["-m", "trainer", "verify-store", str(self.out / "runs" / p.name)],
                        ok_codes=(0, 1),
                    )
                )
                return log[0]

            return p.name, 1, start, lambda: int(bool(log) and "OK run" in log[0].output())

        done = run_parallel("verify-store", [job(p) for p in PEERS])  # type: ignore[list-item]
        ok = [p.name for p in PEERS if done[p.name].proc.returncode == 0]
        # verify-store prints the root each peer records on chain: its final manifest hash.
        self.roots = {
            name: re.findall(r"final manifest hash\) (0x[0-9a-f]{64})", done[name].output())[0]
            for name in ok
        }
        console.print(
            f"  verify-store passes for {', '.join(ok)}: signatures, hash chains, roots "
            "and the gradient-to-state replay all hold, fakes included"
        )

    def commit(self) -> dict[str, int]:
        """Each peer records its run's commitment (the final manifest hash) from its address."""
        console.rule("[bold]3. commitments on chain")
        roots = self.roots
        jobs = {
            p.name: self.sh.start(
                f"commit {p.name}",
                ["-m", "rewards", "commit-run", p.name, roots[p.name]],
                key_file=self.eth_key(p.name),
            )
            for p in PEERS
        }
        blocks: dict[str, int] = {}
        for name, job in jobs.items():
            job.result()
            blocks[name] = int(re.findall(r"in block (\d+)", job.output())[0])
            console.print(
                f"  {name}: final manifest hash {roots[name][:18]}… recorded in block "
                f"{blocks[name]} from {self.addresses[name][:10]}…"
            )
        self.mine()
        return blocks

    def mine(self) -> None:
        """Mine BEACON_DELAY blocks: a dev chain mines only on transactions."""
        from web3 import Web3

        w3 = Web3(Web3.HTTPProvider(self.rpc))
        self.sh.note(f"mine {BEACON_DELAY} blocks (evm_mine): a live chain makes them by itself")
        for _ in range(BEACON_DELAY):
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    # ---- 3. audit -----------------------------------------------------------------------------

    def audit(self, blocks: dict[str, int]) -> None:
        from audit.sampling import sample_size_for

        console.rule("[bold]4. the auditor samples with the on-chain beacon and re-executes")
        verdicts = self.out / "verdicts"
        count = sample_size_for(
            cheat_fraction=CHEAT_FRACTION, confidence=CONFIDENCE, total_steps=self.steps
        )
        console.print(
            f"  {count} of {self.steps} steps per run: a peer faking "
            f"{CHEAT_FRACTION:.0%} of its steps is caught with probability >= "
            f"{CONFIDENCE}; each run's sample is seeded by the hash of block "
            f"commitment + {BEACON_DELAY}, unknown when the peer committed"
        )

        def job(p: Peer) -> tuple[str, int, object, object]:
            store, key = str(self.out / "runs" / p.name), str(self.keys / "auditor.bls")
            # One job per output folder (a job locks its folder): each run has its own beacon,
            # hence its own job; ingest reads every folder below verdicts/.
            out = verdicts / p.name
            args = [
                "-m",
                "audit",
                "run",
                "--store",
                store,
                "--key",
                key,
                "--out",
                str(out),
                "--chain-url",
                self.rpc,
                "--committer",
                self.addresses[p.name],
                "--delay",
                str(BEACON_DELAY),
                "--cheat-fraction",
                str(CHEAT_FRACTION),
                "--confidence",
                str(CONFIDENCE),
            ]
            return (
                f"{p.name} (block {blocks[p.name] + BEACON_DELAY})",
                count,
                lambda: self.sh.start(f"audit {p.name}", args, ok_codes=(0, 1)),
                lambda: count_files(out / p.name, "step-*.json"),
            )

        done = run_parallel("audit", [job(p) for p in PEERS])  # type: ignore[list-item]
        for label, finished in done.items():
            verdict = "all sampled steps pass" if finished.proc.returncode == 0 else "FAILED"
            console.print(f"  {label.split()[0]}: {verdict}")

    # ---- 4. rewards and settlement ------------------------------------------------------------

    def settle(self) -> None:
        console.rule("[bold]8. rewards: ingest, payouts in DuckDB, root on chain, claims")
        r, op = ["-m", "rewards"], self.eth_key("operator")
        runs, verdicts = str(self.out / "runs"), str(self.out / "verdicts")
        ingested = self.shared.ingest(ROUND_POOL)
        out = run_steps(self.sh, "ingest, compute, post", [
            ("ingest", [*r, "ingest", "--store", runs, "--verdicts", verdicts], None),
            ("compute", [*r, "compute"], None),
            ("root", [*r, "root", "0", "--out", str(self.out / "epoch-0")], None),
            ("post", [*r, "post", "0"], op),
        ])  # fmt: skip
        for line in (out["ingest"], *ingested, out["root"]):
            console.print("  " + " ".join(line.split())[:150], markup=False)
        wait_with_bar("root activation delay", ACTIVATION_DELAY + 1)
        paid = [row["peer_id"] for row in self.sql(PAID_SQL)]
        run_steps(self.sh, "claims, verify-root", [
            *((f"claim {n}", [*r, "claim", self.addresses[n]], self.eth_key(n)) for n in paid),
            ("verify-root", [*r, "verify-root", "0"], None),
        ])  # fmt: skip
        console.print(f"  {', '.join(paid)} claimed; verify-root 0: the posted root matches a "
                      "recomputation from the warehouse inputs")  # fmt: skip
        if "carol" not in paid:
            refused = self.sh.run("claim carol", [*r, "claim", self.addresses["carol"]],
                                  key_file=self.eth_key("carol"), ok_codes=(2,))  # fmt: skip
            console.print("  carol tries to claim: " + " ".join(refused.split())[-90:])

    def sql(self, query: str) -> list[dict[str, Any]]:
        """Rows of a read-only warehouse query (`rewards sql`), as JSON objects."""
        out = self.sh.run("sql", ["-m", "rewards", "sql", "--format", "json", query])
        rows: list[dict[str, Any]] = json.loads(out)
        return rows

    def report(self) -> Path:
        out = self.out / "report"
        self.sh.run("report", ["-m", "rewards", "report", "--epoch", "0", "--out", str(out)])
        return out / "epoch-0.html"

    # ---- 5. summary ---------------------------------------------------------------------------

    def summary(self, report: Path, started: float) -> None:
        rows = self.sql(SUMMARY_SQL)
        kinds = {p.name: p.kind for p in PEERS}
        table = Table(title="epoch 0")
        for col in (
            "peer",
            "role",
            "steps",
            "audited",
            "outcome",
            "usefulness",
            "epoch payout",
            "slashed",
            "claim tx",
        ):
            table.add_column(col, justify="right" if col in ("steps", "audited") else "left")
        for row in rows:
            use = row["usefulness_micro"]
            table.add_row(
                row["peer_id"],
                kinds.get(row["peer_id"], "?"),
                str(row["steps"]),
                f"{row['audited']} ({row['passed']} pass)",
                str(row["outcome"]),
                "-" if use is None else f"{int(use) / 1e6:.4f}",
                tokens(row["payout"]),
                tokens(row["slashed"]),
                (row["claim_tx"] or "-")[:18] + ("…" if row["claim_tx"] else ""),
            )
        console.rule("[bold]9. summary")
        console.print(table)
        self.shared.summary(self.sql, tokens)
        console.print(f"report:   {report}")
        console.print(f"commands: {self.sh.script} (every command above, as a user types it)")
        console.print("next, paste an analyst query (read-only):")
        console.print(f'  .venv/bin/python -m rewards sql --db {self.db} "{NEXT_QUERY}"')
        console.print(f"demo finished in {time.monotonic() - started:.0f} s")

    def stop_chain(self) -> None:
        if self.chain is not None and self.chain.proc.poll() is None:
            self.chain.proc.terminate()  # the chain command saves its state file on SIGTERM
            self.chain.proc.wait(timeout=30)


def tokens(amount: object) -> str:
    return f"{Decimal(str(amount or 0)) / TOKEN:,.2f}"


SUMMARY_SQL = """
SELECT p.peer_id, r.step_count AS steps,
       count(DISTINCT v.verdict_id) AS audited,
       count(DISTINCT v.verdict_id) FILTER (WHERE v.outcome = 'pass') AS passed,
       any_value(o.state) AS outcome, any_value(o.usefulness_micro) AS usefulness_micro,
       coalesce(any_value(w.amount), 0) AS payout, coalesce(any_value(s.amount), 0) AS slashed,
       any_value(c.tx_hash) AS claim_tx
FROM peers AS p
JOIN runs AS r ON r.peer_id = p.peer_id
LEFT JOIN verdicts AS v ON v.run_id = r.run_id
LEFT JOIN run_outcomes AS o ON o.run_id = r.run_id
LEFT JOIN rewards AS w ON w.account = p.payout_address AND w.epoch = 0
LEFT JOIN slashes AS s ON s.peer_id = p.peer_id AND s.epoch = 0
LEFT JOIN claims AS c ON c.account = p.payout_address
GROUP BY p.peer_id, r.step_count ORDER BY p.peer_id
"""

PAID_SQL = """
SELECT p.peer_id FROM rewards w JOIN peers p ON p.payout_address = w.account
WHERE w.epoch = 0 AND w.amount > 0 ORDER BY p.peer_id
"""

NEXT_QUERY = (
    "SELECT r.peer_id, v.step, v.outcome, v.max_rel_l2, "
    "v.loss_before - v.loss_after AS gain FROM verdicts v JOIN runs r USING (run_id) "
    "ORDER BY r.peer_id, v.step"
)


def main() -> int:
    parser = argparse.ArgumentParser(description="veritrain end-to-end demo")
    parser.add_argument("--steps", type=int, default=48, help="training steps per peer")
    parser.add_argument("--out", type=Path, default=ROOT / "demo-out")
    args = parser.parse_args()
    started = time.monotonic()
    if args.out.exists():
        shutil.rmtree(args.out)  # the demo's own folder: every run starts from nothing
    args.out.mkdir(parents=True)
    demo = Demo(args.out.resolve(), args.steps)
    try:
        demo.make_keys()
        demo.start_chain()
        demo.setup_warehouse()
        demo.train()
        demo.audit(demo.commit())
        demo.shared.train()
        demo.shared.commit_and_audit(demo.eth_key("operator"), demo.rpc,
                                     demo.out / "deployment.json", demo.mine)  # fmt: skip
        demo.settle()
        report = demo.report()
        demo.summary(report, started)
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        demo.stop_chain()
    return 0


if __name__ == "__main__":
    sys.exit(main())
