"""Paying shared-run rounds (issue #16 B): ingest-shared, the contribution policy, round rewards.

A real tiny shared run is built once per module: a 1-layer GPT, H = 2 inner steps, three roster
peers p0, p1, p2, two rounds, each peer through trainer.peer.run_round and each round closed by
trainer.aggregator.close_round with a fixed clock. In round 1 p2 scales its delta by 1000, so the
aggregator excludes its contribution (reason "norm"). Contribution verdicts are the real signed
record of audit/contribution_verdict.py, written by registered auditors with chosen outcomes,
steps and losses, so each policy rule can be aimed at.

The round split is checked against an independent oracle (exact fractions, the rule of
docs/payout-policy.md "Shared runs" as written), here on the real run and on seeded random rounds.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import shared_fixtures as sf
import torch
from click.testing import CliRunner

from audit.contribution_verdict import (
    CHECK_NAMES,
    CONTRIBUTION_VERDICT_VERSION,
    Check,
    ContributionVerdict,
    SignedContributionVerdict,
    StepCheck,
    load_contribution_verdict,
    sign_contribution_verdict,
)
from audit.tolerance import Mode
from audit.verdict import Outcome
from proofs.codec import canonical_json
from proofs.hashing import Hash32, sha256
from proofs.signatures import KeyPair
from rewards import payouts, policy, warehouse
from rewards.analyst import Analyst
from rewards.cli import main
from trainer.aggregator import close_round
from trainer.peer import Behaviour, run_round

POOL = 1_000  # each round's pool, base units
EPOCH_POOL = 10**6
STAKE = 10_000
AUDITORS = {"aud1": sf.key("auditor-1"), "aud2": sf.key("auditor-2")}
STRANGER = sf.key("auditor-unregistered")
CLOSED_AT = (2_000_000_000, 2_100_000_000, 2_200_000_000)  # the rounds' fixed clocks


def address(peer: str) -> str:
    return "0x" + hashlib.sha256(peer.encode()).hexdigest()[:40]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> sf.Run:
    """Round 0: p0, p1, p2 included. Round 1: p0, p1 included; it closes (past its deadline)
    before p2 publishes, so p2's round-1 record is late. Round 2: p0, p1 included; p2's late
    round-1 record is excluded as stale and its round-2 one (delta x 1000) for its norm."""
    shared = sf.make_run(
        tmp_path_factory.mktemp("shared"), peers=3, screening={"max_contributions": 3}, rounds=3
    )

    def train(name: str, r: int, behaviour: Behaviour | None = None) -> None:
        keypair = shared.peers[name]
        run_round(
            shared.store, shared.genesis, keypair, name, r, corpus=shared.corpus,
            behaviour=behaviour, threads=1,
        )  # fmt: skip

    def close(r: int) -> None:
        assert close_round(shared.store, shared.aggregator, now=CLOSED_AT[r]) is not None

    for name in ("p0", "p1", "p2"):
        train(name, 0)
    close(0)
    train("p0", 1)
    train("p1", 1)
    close(1)
    train("p2", 1)  # late
    train("p0", 2)
    train("p1", 2)
    train("p2", 2, Behaviour(replace_delta=lambda d: d * 1000.0))
    close(2)
    excluded = shared.store.read_round(2).round.excluded
    assert sorted((x.peer, x.reason, x.built_on) for x in excluded) == [
        ("p2", "norm", None),
        ("p2", "stale", 1),
    ]
    return shared


def contribution_hash(run: sf.Run, r: int, peer: str) -> Hash32:
    return run.store.read_contribution(peer, r).contribution.hash()


def new_warehouse(
    path: Path, run: sf.Run, *, trainers: tuple[str, ...] = ("p0", "p1", "p2")
) -> str:
    path.mkdir(parents=True, exist_ok=True)
    db = str(path / "w.duckdb")
    con = warehouse.connect(db, create=True)
    for name in trainers:
        key = "0x" + bytes(run.peers[name].public).hex()
        warehouse.register_peer(
            con, peer_id=f"t-{name}", pubkey=key, role="trainer", payout_address=address(name)
        )
    for name, kp in AUDITORS.items():
        key = "0x" + bytes(kp.public).hex()
        warehouse.register_peer(con, peer_id=name, pubkey=key, role="auditor", payout_address=None)
    for e in range(3):
        policy.open_epoch(con, e, EPOCH_POOL)
    for name in trainers:
        warehouse.record_stake(con, peer_id=f"t-{name}", epoch=0, amount=STAKE)
    con.close()
    return db


def verdict(
    run: sf.Run,
    r: int,
    peer: str,
    auditor: KeyPair,
    *,
    outcome: str = "pass",
    steps: tuple[int, ...] = (0, 1),
    before: float = 2.0,
    after: float = 1.7,
) -> ContributionVerdict:
    passed = outcome == "pass"
    checks = tuple(
        Check(name=n, passed=passed or n != "inner-steps", detail="" if passed else "differs")
        for n in CHECK_NAMES
    )
    return ContributionVerdict(
        version=CONTRIBUTION_VERDICT_VERSION,
        shared_run_id=run.genesis.shared_run_id,
        genesis=run.genesis.hash(),
        round=r,
        peer=peer,
        pubkey=bytes(run.peers[peer].public),
        contribution=contribution_hash(run, r, peer),
        outcome=Outcome(outcome),
        mode=Mode.EXACT,
        reason="" if passed else "inner step 1: gradient differs",
        checks=checks,
        steps=tuple(StepCheck(step=s, outcome=outcome, reason="") for s in steps),
        inner_steps=run.genesis.inner_steps,
        loss_before=before,
        loss_after=after,
        heldout="dataset batch",
        sample_seed=sha256(b"seed"),
        auditor=bytes(auditor.public),
        device="cpu",
        torch_version=torch.__version__,
    )


def write(folder: Path, *signed: SignedContributionVerdict, raw: bytes | None = None) -> str:
    """Verdict files as `audit shared --out` lays them out: DIR/rNNNNNN/<peer>.json."""
    for s in signed:
        path = folder / f"r{s.verdict.round:06d}" / f"{s.verdict.peer}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(canonical_json(s.to_json()))
    if raw is not None:
        (folder / "r000000").mkdir(parents=True, exist_ok=True)
        (folder / "r000000" / "broken.json").write_bytes(raw)
    return str(folder)


def signed(
    run: sf.Run, r: int, peer: str, auditor: str = "aud1", **kw: Any
) -> SignedContributionVerdict:
    kp = AUDITORS[auditor]
    return sign_contribution_verdict(kp, verdict(run, r, peer, kp, **kw))


def ingest(db: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["ingest-shared", "--db", db, *args])
    return result.exit_code, result.output


def rows(db: str, sql: str) -> list[tuple[Any, ...]]:
    con = warehouse.connect_read_only(db)
    try:
        return [tuple(r) for r in con.execute(sql).fetchall()]
    finally:
        con.close()


def compute(db: str) -> None:
    with warehouse.opened(db) as con:  # publishes the analysts' snapshot, as `compute` does
        policy.compute(con)


# ---------------------------------------------------------------- oracle (docs/payout-policy.md)


def oracle_split(pool: int, weights: dict[str, int], run_id: str, r: int) -> dict[str, int]:
    """The round split as documented: floor(P * w / W) each, then the P - sum leftover units one
    each by largest remainder, ties by sha256("<run>:<round>:<contribution>") then contribution."""
    total = sum(weights.values())
    if total == 0:
        return {}
    share = {c: Fraction(pool * w, total) for c, w in weights.items()}
    out = {c: math.floor(s) for c, s in share.items()}

    def rank(c: str) -> tuple[Fraction, bytes, str]:
        tie = hashlib.sha256(f"{run_id}:{r}:{c}".encode()).hexdigest().encode()
        return (-(share[c] - out[c]), tie, c)

    for c in sorted(weights, key=rank)[: pool - sum(out.values())]:
        out[c] += 1
    return out


def micro(gains: list[float]) -> int:
    """max(0, round half away from zero of 1e6 * mean gain)."""
    x = 1e6 * (sum(gains) / len(gains))
    return max(0, math.floor(abs(x) + 0.5) * (1 if x >= 0 else -1))


# ---------------------------------------------------------------- ingest


def test_ingest_is_verified_and_idempotent(run: sf.Run, tmp_path: Path) -> None:
    db = new_warehouse(tmp_path, run)
    code, out = ingest(db, "--shared", str(run.store.url), "--epoch", "0")
    assert code == 2 and "give --round-pool" in out  # a new run needs its round pool
    code, out = ingest(db, "--shared", str(run.store.url), "--epoch", "0", "--round-pool", "1000")
    assert code == 0, out
    assert "3 rounds, 9 contributions" in out
    tables = ("shared_runs", "shared_rounds", "contributions", "exclusions", "rejections")
    counts = {t: rows(db, f"SELECT count(*) FROM {t}")[0][0] for t in tables}
    assert counts == {
        "shared_runs": 1, "shared_rounds": 3, "contributions": 9, "exclusions": 2, "rejections": 0
    }  # fmt: skip
    assert rows(
        db,
        "SELECT round, peer_id, reason, built_on, contribution_hash IS NOT NULL FROM exclusions"
        " ORDER BY reason",
    ) == [(2, "t-p2", "norm", None, True), (2, "t-p2", "stale", 1, True)]
    assert rows(
        db, "SELECT round, peer_id, record_round, included FROM contributions ORDER BY ALL"
    ) == [(0, "t-p0", 0, True), (0, "t-p1", 0, True), (0, "t-p2", 0, True),
          (1, "t-p0", 1, True), (1, "t-p1", 1, True),
          (2, "t-p0", 2, True), (2, "t-p1", 2, True), (2, "t-p2", 1, False),
          (2, "t-p2", 2, False)]  # fmt: skip
    # Snapshot published for analysts, as every writer does.
    assert warehouse.snapshot_path(db).exists()
    before = [rows(db, f"SELECT * FROM {t} ORDER BY ALL") for t in tables]
    code, out = ingest(db, "--shared", str(run.store.url), "--round-pool", "1000")
    assert code == 0 and "0 rounds, 0 contributions" in out and "3 duplicates" in out, out
    assert [rows(db, f"SELECT * FROM {t} ORDER BY ALL") for t in tables] == before
    code, out = ingest(db, "--shared", str(run.store.url), "--round-pool", "999")
    assert code == 2 and "round pool 1000, not 999" in out


def test_unregistered_peer_and_tampered_round_are_rejections(run: sf.Run, tmp_path: Path) -> None:
    copy = tmp_path / "store"
    shutil.copytree(Path(run.store.url), copy)
    record = copy / "rounds" / "r000001.json"
    text = record.read_bytes()
    assert b'"closed_at":2100000000' in text
    record.write_bytes(text.replace(b'"closed_at":2100000000', b'"closed_at":2100000001'))
    db = new_warehouse(tmp_path, run, trainers=("p0", "p1"))  # p2's key is no trainer here
    code, out = ingest(db, "--shared", str(copy), "--round-pool", "1000")
    assert code == 3, out
    reasons = {k: (s, r) for k, s, r in rows(db, "SELECT kind, source, reason FROM rejections")}
    assert reasons.keys() == {"contribution", "round"}
    assert reasons["contribution"][0] == f"{copy}/contributions/p2/r000000.json"
    assert "'p2' is not a registered trainer" in reasons["contribution"][1]
    assert reasons["round"][0] == str(copy)
    assert "round 1" in reasons["round"][1] and "aggregator" in reasons["round"][1]
    # The rest of the batch is in: round 0 and the contributions of p0 and p1 in it.
    assert rows(db, "SELECT round FROM shared_rounds") == [(0,)]
    assert rows(db, "SELECT peer_id FROM contributions ORDER BY 1") == [("t-p0",), ("t-p1",)]
    # Once p2 is registered, the same ingest loads its contribution of the round already held.
    con = warehouse.connect(db)
    key = "0x" + bytes(run.peers["p2"].public).hex()
    warehouse.register_peer(
        con, peer_id="t-p2", pubkey=key, role="trainer", payout_address=address("p2")
    )
    con.close()
    code, out = ingest(db, "--shared", str(copy))
    assert code == 3 and "0 rounds, 1 contributions" in out, out  # round 1 is still tampered
    assert rows(db, "SELECT peer_id FROM contributions ORDER BY 1") == [
        ("t-p0",),
        ("t-p1",),
        ("t-p2",),
    ]


def test_bad_verdicts_are_rejected_with_reasons(run: sf.Run, tmp_path: Path) -> None:
    db = new_warehouse(tmp_path, run)
    assert ingest(db, "--shared", str(run.store.url), "--round-pool", "1000")[0] == 0
    good = signed(run, 0, "p0")
    forged_body = verdict(run, 0, "p1", AUDITORS["aud1"])
    forged = SignedContributionVerdict.sign(AUDITORS["aud2"], forged_body)  # not aud1's signature
    unknown = sign_contribution_verdict(STRANGER, verdict(run, 0, "p2", STRANGER))
    unsigned = canonical_json({"verdict": verdict(run, 0, "p2", AUDITORS["aud2"]).to_json()})
    folders = [
        write(tmp_path / "a", good),
        write(tmp_path / "b", forged),
        write(tmp_path / "c", unknown, raw=unsigned),
    ]
    code, out = ingest(db, *[a for f in folders for a in ("--verdicts", f)])
    assert code == 3, out
    got = {
        (k, Path(s).parent.parent.name, Path(s).name): r
        for k, s, r in rows(db, "SELECT kind, source, reason FROM rejections")
    }
    assert got.keys() == {
        ("contribution-verdict", "b", "p1.json"),
        ("contribution-verdict", "c", "p2.json"),
        ("contribution-verdict", "c", "broken.json"),
    }
    assert "signature does not verify" in got[("contribution-verdict", "b", "p1.json")]
    assert "not a registered auditor" in got[("contribution-verdict", "c", "p2.json")]
    assert "malformed" in got[("contribution-verdict", "c", "broken.json")]
    assert rows(db, "SELECT peer_id, auditor_id FROM contribution_verdicts") == [("t-p0", "aud1")]
    # Again: the good one is a duplicate, the bad ones rejected again (recorded once).
    code, out = ingest(db, *[a for f in folders for a in ("--verdicts", f)])
    assert code == 3 and "0 contribution verdicts loaded; 1 duplicates" in out, out
    assert rows(db, "SELECT count(*) FROM rejections") == [(3,)]
    # A second, different verdict by the same auditor on the same contribution is refused.
    other = signed(run, 0, "p0", before=3.0)
    code, _ = ingest(db, "--verdicts", write(tmp_path / "d", other))
    assert code == 3
    assert rows(db, "SELECT count(*) FROM contribution_verdicts") == [(1,)]


# ---------------------------------------------------------------- policy


@dataclass
class Paid:
    db: str
    hashes: dict[tuple[int, str], str]


def scenario(run: sf.Run, tmp_path: Path, *, p2_full_in_epoch_1: bool) -> Paid:
    """Epoch 1's verdicts. Round 0: p0 and p1 pass both steps (gains 0.3, 0.1); p2 passes step 0
    only (pending), or both steps (gain 0.2). Round 1: p0 passes (gain 0.2), p1 fails."""
    db = new_warehouse(tmp_path, run)
    loaded = ingest(db, "--shared", str(run.store.url), "--epoch", "0", "--round-pool", str(POOL))
    assert loaded[0] == 0, loaded[1]
    first = [
        signed(run, 0, "p0", after=1.7),
        signed(run, 0, "p1", after=1.9),
        signed(run, 0, "p2", after=1.8, steps=(0, 1) if p2_full_in_epoch_1 else (0,)),
        signed(run, 1, "p0", before=1.9, after=1.7),
        signed(run, 1, "p1", before=1.9, outcome="fail", steps=(1,)),
    ]
    code, out = ingest(db, "--verdicts", write(tmp_path / "v1", *first), "--epoch", "1")
    assert code == 0, out
    hashes = {
        (r, p): "0x" + contribution_hash(run, r, p).hex()
        for r, p in [(0, "p0"), (0, "p1"), (0, "p2"), (1, "p0"), (1, "p1"), (2, "p0"), (2, "p1")]
    }
    return Paid(db=db, hashes=hashes)


def second_epoch(run: sf.Run, paid: Paid, tmp_path: Path) -> None:
    """Epoch 2's verdicts: a second auditor passes p2's round-0 step 1 (gain 0.5); round 2's
    p0 and p1 pass (gains 0.05, 0.15). Then the policy runs."""
    late = [
        signed(run, 0, "p2", "aud2", after=1.5, steps=(1,)),
        signed(run, 2, "p0", before=1.8, after=1.75),
        signed(run, 2, "p1", before=1.8, after=1.65),
    ]
    code, out = ingest(paid.db, "--verdicts", write(tmp_path / "v2", *late), "--epoch", "2")
    assert code == 0, out
    compute(paid.db)


def paid_world(run: sf.Run, tmp_path: Path) -> Paid:
    """The warehouse of docs/queries.md's shared-run queries: both epochs, computed."""
    paid = scenario(run, tmp_path, p2_full_in_epoch_1=False)
    second_epoch(run, paid, tmp_path)
    return paid


def test_rounds_pay_verified_contributions_by_usefulness(run: sf.Run, tmp_path: Path) -> None:
    paid = scenario(run, tmp_path, p2_full_in_epoch_1=False)
    compute(paid.db)
    states = rows(
        paid.db,
        "SELECT round, peer_id, state, decided_epoch, passed_steps, usefulness_micro"
        " FROM contribution_outcomes ORDER BY ALL",
    )
    assert states == [
        (0, "t-p0", "verified", 1, 2, 300000),
        (0, "t-p1", "verified", 1, 2, micro([2.0 - 1.9])),
        (0, "t-p2", "pending", None, 1, 0),  # one passed step of H=2: confidence 0.5 < 0.9
        (1, "t-p0", "verified", 1, 2, micro([1.9 - 1.7])),
        (1, "t-p1", "failed", 1, 0, 0),
        (2, "t-p0", "pending", None, 0, 0),  # not audited yet
        (2, "t-p1", "pending", None, 0, 0),
        (2, "t-p2", "excluded", None, 0, 0),  # stale (its late round-1 record)
        (2, "t-p2", "excluded", None, 0, 0),  # norm
    ]
    # Round 1 is decided: p1 failed, so p0 takes the whole pool. Round 0 waits for p2.
    assert rows(paid.db, "SELECT epoch, round, peer_id, amount FROM round_rewards") == [
        (1, 1, "t-p0", POOL)
    ]
    assert rows(paid.db, "SELECT epoch, peer_id, amount, failed_runs FROM slashes") == [
        (1, "t-p1", STAKE // 10, 1)
    ]
    # The round reward is in epoch 1's rewards and cumulative payouts (epoch pools roll over:
    # no runs in this warehouse).
    assert rows(paid.db, "SELECT epoch, account, score, amount FROM rewards") == [
        (1, address("p0"), 0, POOL)
    ]
    assert payouts.epoch_payout(paid.db, 1).entries == ((address("p0"), POOL),)

    # Epoch 2: round 0 is decided (p2 verified) and split by usefulness among p0, p1, p2 (p2's
    # usefulness is the mean over both passing verdicts); round 2 between p0 and p1.
    second_epoch(run, paid, tmp_path)
    expected: dict[str, int] = {}
    for r, weights in {
        0: {
            paid.hashes[(0, "p0")]: micro([2.0 - 1.7]),
            paid.hashes[(0, "p1")]: micro([2.0 - 1.9]),
            paid.hashes[(0, "p2")]: micro([2.0 - 1.8, 2.0 - 1.5]),
        },
        2: {
            paid.hashes[(2, "p0")]: micro([1.8 - 1.75]),
            paid.hashes[(2, "p1")]: micro([1.8 - 1.65]),
        },
    }.items():
        split = oracle_split(POOL, weights, run.genesis.shared_run_id, r)
        assert sum(split.values()) == POOL
        expected |= split
        got = rows(
            paid.db,
            f"SELECT contribution_hash, amount, epoch, usefulness_micro FROM round_rewards"
            f" WHERE round = {r}",
        )
        assert {h: int(a) for h, a, _, _ in got} == split
        assert {e for _, _, e, _ in got} == {2}
        assert {h: u for h, _, _, u in got} == weights
    assert [expected[paid.hashes[k]] for k in [(0, "p0"), (0, "p1"), (0, "p2")]] == [400, 133, 467]
    cumulative = dict(payouts.epoch_payout(paid.db, 2).entries)
    assert cumulative == {
        address("p0"): POOL + expected[paid.hashes[(0, "p0")]] + expected[paid.hashes[(2, "p0")]],
        address("p1"): expected[paid.hashes[(0, "p1")]] + expected[paid.hashes[(2, "p1")]],
        address("p2"): expected[paid.hashes[(0, "p2")]],
    }
    # The epoch's total grows by the round pools paid; its own pool still accounts exactly.
    summary = rows(paid.db, "SELECT epoch, paid, carry_out FROM epoch_summaries ORDER BY epoch")
    assert summary == [(0, 0, EPOCH_POOL), (1, 0, 2 * EPOCH_POOL), (2, 0, 3 * EPOCH_POOL)]


def test_failed_contribution_forfeits_round_rewards_decided_in_its_epoch(
    run: sf.Run, tmp_path: Path
) -> None:
    paid = scenario(run, tmp_path, p2_full_in_epoch_1=True)
    compute(paid.db)
    # Round 0 is decided in epoch 1, where p1 is slashed for its failed round-1 contribution:
    # p1's verified round-0 contribution is forfeited and the pool goes to p0 and p2.
    got = dict(rows(paid.db, "SELECT peer_id, amount FROM round_rewards WHERE round = 0"))
    weights = {
        paid.hashes[(0, "p0")]: micro([2.0 - 1.7]),
        paid.hashes[(0, "p2")]: micro([2.0 - 1.8]),
    }
    expected = oracle_split(POOL, weights, run.genesis.shared_run_id, 0)
    assert got == {
        "t-p0": expected[paid.hashes[(0, "p0")]],
        "t-p2": expected[paid.hashes[(0, "p2")]],
    }
    assert got == {"t-p0": 600, "t-p2": 400}  # the worked example of docs/payout-policy.md


def test_round_split_matches_the_oracle_on_random_rounds(tmp_path: Path) -> None:
    """Synthetic rows straight into the input tables: many contributions, ties, zero gains."""
    for seed in range(6):
        rng = random.Random(seed)
        db = str(tmp_path / f"r{seed}.duckdb")
        con = warehouse.connect(db, create=True)
        policy.open_epoch(con, 0, 10)
        key = 0
        con.execute(
            "INSERT INTO peers VALUES ('aud', 'auditor', ?, NULL, now())", ["0x" + "f" * 96]
        )
        pool = rng.choice([1, 7, 1000, 10**24 + 3])
        con.execute(
            "INSERT INTO shared_runs VALUES ('run', ?, 0, ?, 'c', 'a', 4, 3, 'm', 'b', now())",
            ["0x" + "a" * 64, pool],
        )
        expected: dict[str, int] = {}
        for r in range(3):
            weights: dict[str, int] = {}
            for i in range(rng.randint(1, 8)):
                key += 1
                peer = f"peer{key}"
                con.execute(
                    "INSERT INTO peers VALUES (?, 'trainer', ?, ?, now())",
                    [peer, "0x" + f"{key:096x}", address(peer)],
                )
                h = "0x" + hashlib.sha256(f"{seed}/{r}/{i}".encode()).hexdigest()
                con.execute(
                    "INSERT INTO contributions VALUES ('run', ?, ?, ?, ?, ?, 'b', 'd', 1, 1, 1.0,"
                    " NULL, true, NULL, [], 0, 'b')",
                    [r, peer, peer, h, r],
                )
                gain = rng.choice([0.0, 0.25, 0.25, 0.5, 1.0, -0.5])  # ties and clipped ones
                con.execute(
                    "INSERT INTO contribution_verdicts VALUES (?, 'run', ?, ?, ?, 'aud', 0, 'pass',"
                    " 'exact', '', [0, 1, 2, 3], 4, 4, 2.0, ?, 'h', 's', 'cpu', 'b')",
                    [h + "v", r, peer, h, 2.0 - gain],
                )
                weights[h] = micro([gain])
            expected |= oracle_split(pool, weights, "run", r)
        con.close()
        compute(db)
        got = dict(rows(db, "SELECT contribution_hash, amount FROM round_rewards"))
        assert {h: int(a) for h, a in got.items()} == {h: a for h, a in expected.items()}, seed


# ---------------------------------------------------------------- settlement on top


def test_root_and_post_work_on_round_rewards(run: sf.Run, tmp_path: Path) -> None:
    from conftest_chain import ACTIVATION_DELAY, account

    from proofs.payout import PayoutTree
    from rewards.chain import advance_time, connect, fund_from_dev_account
    from rewards.settlement import ClaimRequest, Settlement, deploy_token

    paid = scenario(run, tmp_path, p2_full_in_epoch_1=True)
    compute(paid.db)
    result = CliRunner().invoke(main, ["root", "--db", paid.db, "1"])
    assert result.exit_code == 0, result.output
    payout = payouts.epoch_payout(paid.db, 1)
    assert "0x" + payout.root.hex() in result.output
    assert payout.cumulative_total == 2 * POOL  # both rounds' pools, nothing else this epoch

    w3 = connect(None)
    admin, poster = account("admin"), account("poster")
    for who in (admin, poster):
        fund_from_dev_account(w3, who.address, 10**20)
    token = deploy_token(w3, admin, supply=10**24, holder=admin.address)
    s, _ = Settlement.deploy(
        w3, admin, token=token, activation_delay=ACTIVATION_DELAY, poster=poster.address,
        guardian=admin.address,
    )  # fmt: skip
    s.fund(admin, payout.cumulative_total)
    s.post_root(
        poster,
        epoch=1,
        root=payout.root,
        cumulative_total=payout.cumulative_total,
        inputs_hash=payout.inputs_hash,
    )
    advance_time(w3, ACTIVATION_DELAY)
    tree = PayoutTree.build(payout.entries)
    for acct, amount in payout.entries:
        s.claim(
            admin, ClaimRequest(account=acct, cumulative_amount=amount, proof=tree.proof_for(acct))
        )
        assert s.token_balance(acct) == amount


# ---------------------------------------------------------------- docs/queries.md


DOC = Path(__file__).resolve().parents[1] / "docs" / "queries.md"
SECTION = re.compile(r"^## (\d+)\. (.+?)\n(.*?)(?=^## |^# |\Z)", re.S | re.M)
SQL = re.compile(r"```sql\n(.*?)```", re.S)
FIRST_SHARED_QUERY = 13
AFTER_EPOCH_1 = {19}  # shown as the warehouse stood after epoch 1's verdicts


def _markdown(frame: pl.DataFrame) -> str:
    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    for row in frame.iter_rows():
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


def test_shared_run_queries_of_the_doc(run: sf.Run, tmp_path: Path) -> None:
    sections = {
        int(n): (title, body)
        for n, title, body in SECTION.findall(DOC.read_text(encoding="utf-8"))
        if int(n) >= FIRST_SHARED_QUERY
    }
    assert len(sections) >= 6
    first = scenario(run, tmp_path / "first", p2_full_in_epoch_1=False)
    compute(first.db)
    paid = paid_world(run, tmp_path / "paid")
    results = {}
    for n, (_, body) in sorted(sections.items()):
        sql = SQL.search(body)
        assert sql is not None, f"query {n} has no sql block"
        with Analyst(first.db if n in AFTER_EPOCH_1 else paid.db) as analyst:
            results[n] = analyst.sql(sql.group(1))
    for n, frame in results.items():
        assert _markdown(frame) in sections[n][1], (
            f"query {n}: doc table is stale:\n{_markdown(frame)}"
        )


# ---------------------------------------------------------------- with the real auditor


def test_verdicts_of_audit_shared_are_ingested_and_paid(run: sf.Run, tmp_path: Path) -> None:
    """`python -m audit shared` judges every included contribution of the run (real re-execution
    of sampled inner steps, real usefulness); ingest-shared loads its folder as written."""
    from audit.cli import main as audit_main
    from proofs.signatures import save_keypair

    key = tmp_path / "aud1.key"
    save_keypair(key, AUDITORS["aud1"])
    out = tmp_path / "verdicts"
    args = ["shared", "--shared", str(run.store.url), "--key", str(key), "--out", str(out),
            "--beacon", "0x" + "11" * 16, "--steps", "2", "--corpus", str(run.path / "corpus.py"),
            "--device", "cpu"]  # fmt: skip
    audited = CliRunner().invoke(audit_main, args)
    assert audited.exit_code == 0, audited.output
    files = sorted(f for f in out.rglob("*.json") if f.name != "_plan.json")
    assert len(files) == 7  # the included contributions: 3 + 2 + 2
    db = new_warehouse(tmp_path, run)
    code, output = ingest(
        db, "--shared", str(run.store.url), "--round-pool", str(POOL), "--verdicts", str(out)
    )
    assert code == 0 and "7 contribution verdicts loaded" in output, output
    compute(db)
    gains: dict[str, list[float]] = {}
    for path in files:
        v = load_contribution_verdict(path.read_bytes()).verdict
        gains["0x" + v.contribution.hex()] = [v.loss_before - v.loss_after]
    outcomes = rows(
        db,
        "SELECT contribution_hash, state, passed_steps, usefulness_micro"
        " FROM contribution_outcomes WHERE included",
    )
    assert {h: (s, n, u) for h, s, n, u in outcomes} == {
        h: ("verified", 2, micro(g)) for h, g in gains.items()
    }
    for r in range(3):
        paid = rows(db, f"SELECT sum(amount) FROM round_rewards WHERE round = {r}")[0][0]
        useful = any(
            micro(gains["0x" + contribution_hash(run, r, p).hex()]) > 0
            for p in ("p0", "p1", "p2")
            if (r, p) not in {(1, "p2"), (2, "p2")}
        )
        assert (paid == POOL) if useful else (paid is None), (r, paid)


def test_a_version_3_warehouse_migrates_and_keeps_its_rejections(tmp_path: Path) -> None:
    import duckdb

    from rewards import schema

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " checksum VARCHAR NOT NULL, applied_at TIMESTAMP NOT NULL)"
    )
    for m in schema.migrations()[:3]:  # the schema of the code before shared runs
        con.execute(m.sql)
        con.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, ?, now())", [m.version, m.name, m.checksum]
        )
    con.execute("INSERT INTO rejections VALUES ('runs/x', 'run', 'bad signature', 'b-1', now())")
    con.close()
    migrated = warehouse.connect(path)
    try:
        assert schema.current_version(migrated) == 4
        assert migrated.execute("SELECT source, kind, reason FROM rejections").fetchall() == [
            ("runs/x", "run", "bad signature")
        ]
        migrated.execute(
            "INSERT INTO rejections VALUES ('s/r', 'contribution-verdict', 'why', 'b-2', now())"
        )
        with pytest.raises(duckdb.ConstraintException):
            migrated.execute("INSERT INTO rejections VALUES ('s/r', 'nonsense', 'w', 'b', now())")
    finally:
        migrated.close()
