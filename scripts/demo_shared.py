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
from dataclasses import dataclass
from pathlib import Path

from demo_shell import DemoError, Job, Shell, console

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
