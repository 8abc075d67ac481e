"""The payout policy (rewards/policy.sql) on warehouses filled row by row.

The input rows here are what ingest writes (tests/test_rewards_ingest.py covers that path from real
runs); filling them directly lets each rule be tested in isolation. Expected amounts come from an
independent largest-remainder oracle written with fractions.Fraction and hashlib.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import policy, warehouse
from rewards.policy import PolicyError, PolicyParams

T0 = dt.datetime(2026, 1, 1)
LENIENT = PolicyParams(cheat_fraction=0.1, confidence=0.5, slash_bps=1000, usefulness_ppm=0)


class World:
    """A warehouse in memory plus helpers that add the policy's input rows."""

    def __init__(self, path: str = ":memory:") -> None:
        self.con = warehouse.connect(path, create=True)
        self._n = 0

    def exec(self, sql: str, params: list[object] | None = None) -> list[tuple[object, ...]]:
        return self.con.execute(sql, params).fetchall()

    def peer(self, name: str, *, role: str = "trainer", address: str | None = None) -> str:
        self._n += 1
        if role == "trainer" and address is None:
            address = "0x" + hashlib.sha256(name.encode()).hexdigest()[:40]
        self.exec(
            "INSERT INTO peers VALUES (?, ?, ?, ?, ?)",
            [name, role, "0x" + f"{self._n:096x}", address, T0],
        )
        return address or ""

    def epoch(self, epoch: int, pool: int) -> None:
        policy.open_epoch(self.con, epoch, pool)

    def run(
        self, run_id: str, peer: str, epoch: int, *, steps: int = 10, tokens: int = 100
    ) -> None:
        self.exec(
            "INSERT INTO runs VALUES (?, ?, ?, 'h', 'tiny', 'adamw', 'd', 2, 50, ?, ?, 'f', 'cpu',"
            " 'mem', 'b')",
            [run_id, peer, epoch, tokens, steps],
        )

    def verdict(
        self,
        run_id: str,
        step: int,
        auditor: str,
        epoch: int,
        outcome: str = "pass",
        *,
        gain: float = 0.1,
    ) -> None:
        self._n += 1
        self.exec(
            "INSERT INTO verdicts (verdict_id, run_id, step, auditor_id, epoch, outcome, mode,"
            " loss_before, loss_after, replay_seed, recipe_hash, manifest_hash, device, reason,"
            " batch_id) VALUES (?, ?, ?, ?, ?, ?, 'tolerant', 2.0, ?, 's', 'r', 'm', 'cpu', '',"
            " 'b')",
            [f"v{self._n:06d}", run_id, step, auditor, epoch, outcome, 2.0 - gain],
        )

    def audit(self, run_id: str, steps: range, auditor: str, epoch: int, **kw: object) -> None:
        for step in steps:
            self.verdict(run_id, step, auditor, epoch, **kw)  # type: ignore[arg-type]

    def stake(self, peer: str, epoch: int, amount: int) -> None:
        self.exec("INSERT INTO stakes VALUES (?, ?, ?)", [peer, epoch, amount])

    def compute(self, params: PolicyParams = LENIENT) -> None:
        policy.compute(self.con, params)

    def rewards(self, epoch: int) -> dict[str, int]:
        rows = self.exec("SELECT account, amount FROM rewards WHERE epoch = ?", [epoch])
        return {str(a): int(m) for a, m in rows}

    def summary(self, epoch: int) -> dict[str, int]:
        cols = [
            "pool",
            "carry_in",
            "paid",
            "carry_out",
            "verified_runs",
            "forfeited_runs",
            "failed_runs",
            "pending_runs",
        ]
        row = self.exec(f"SELECT {', '.join(cols)} FROM epoch_summaries WHERE epoch = ?", [epoch])
        return dict(zip(cols, (int(v) for v in row[0]), strict=True))  # type: ignore[arg-type]

    def state(self, run_id: str) -> tuple[str, int | None]:
        row = self.exec("SELECT state, decided_epoch FROM run_outcomes WHERE run_id = ?", [run_id])
        return str(row[0][0]), row[0][1]  # type: ignore[return-value]


def largest_remainder(epoch: int, pool: int, scores: dict[str, int]) -> dict[str, int]:
    """Independent oracle: exact quotas with Fraction, leftover to the largest remainders, ties by
    sha256(f"{epoch}:{account}") then account."""
    total = sum(scores.values())
    quotas = {a: Fraction(pool * s, total) for a, s in scores.items()}
    out = {a: q.numerator // q.denominator for a, q in quotas.items()}
    leftover = pool - sum(out.values())
    order = sorted(
        scores,
        key=lambda a: (
            -(quotas[a] - out[a]),
            hashlib.sha256(f"{epoch}:{a}".encode()).hexdigest(),
            a,
        ),
    )
    for account in order[:leftover]:
        out[account] += 1
    return out


@pytest.fixture
def world() -> World:
    return World()


def test_verified_failed_pending_and_slash(world: World) -> None:
    alice, bob = world.peer("alice"), world.peer("bob")
    world.peer("carol")
    world.peer("aud", role="auditor")
    world.epoch(0, 1_000)
    world.epoch(1, 1_000)
    world.stake("bob", 0, 50_000)
    world.run("ra", "alice", 0, tokens=100)
    world.run("rb", "bob", 0, tokens=300)
    world.run("rb2", "bob", 0, tokens=300)
    world.run("rc", "carol", 0)
    world.audit("ra", range(5), "aud", 0)
    world.audit("rb", range(5), "aud", 0)
    world.verdict("rb2", 3, "aud", 0, "invalid")
    world.audit("rc", range(2), "aud", 0)  # 2 of 10 steps: below the 0.5 confidence
    world.compute()
    assert world.state("ra") == ("verified", 0)
    assert world.state("rb2") == ("failed", 0)
    # bob has a verified run too, but his failed run zeroes his whole epoch.
    assert world.state("rb") == ("verified", 0)
    assert world.rewards(0) == {alice: 1_000}
    assert bob not in world.rewards(0)
    assert world.state("rc") == ("pending", None)
    s0 = world.summary(0)
    assert (s0["verified_runs"], s0["forfeited_runs"], s0["failed_runs"]) == (1, 1, 1)
    assert s0["pending_runs"] == 1
    slash = world.exec("SELECT epoch, peer_id, stake_before, amount FROM slashes")
    assert slash == [(0, "bob", 50_000, 5_000)]
    assert world.exec("SELECT balance FROM stake_balances WHERE peer_id = 'bob'") == [(45_000,)]


def test_pending_work_is_carried_to_the_epoch_its_audit_completes(world: World) -> None:
    carol = world.peer("carol")
    world.peer("aud", role="auditor")
    for e in range(3):
        world.epoch(e, 700)
    world.run("rc", "carol", 0)
    world.audit("rc", range(2), "aud", 0)
    world.audit("rc", range(2, 5), "aud", 2)
    world.compute()
    assert world.state("rc") == ("verified", 2)
    assert world.summary(0)["pending_runs"] == 1 and world.summary(1)["pending_runs"] == 1
    # No eligible work in epochs 0 and 1: their pools roll over into epoch 2.
    assert world.summary(0)["carry_out"] == 700 and world.summary(1)["carry_out"] == 1_400
    assert world.summary(2)["carry_in"] == 1_400
    assert world.rewards(2) == {carol: 2_100}
    cumulative = world.exec("SELECT epoch, cumulative FROM payouts ORDER BY epoch")
    assert cumulative == [(2, 2_100)]


def test_last_epoch_without_work_keeps_its_pool_carried(world: World) -> None:
    world.peer("carol")
    world.epoch(0, 10)
    world.run("rc", "carol", 0)
    world.compute()
    assert world.summary(0)["paid"] == 0 and world.summary(0)["carry_out"] == 10
    assert world.exec("SELECT count(*) FROM payouts") == [(0,)]


def test_quorum_majority_and_tie(world: World) -> None:
    for name in ("a1", "a2", "a3"):
        world.peer(name, role="auditor")
    world.peer("p")
    world.peer("q")
    world.epoch(0, 100)
    world.epoch(1, 100)
    world.run("rp", "p", 0)
    world.run("rq", "q", 0)
    # rp step 0: two pass, one fail -> the step passes.
    world.audit("rp", range(5), "a1", 0)
    world.verdict("rp", 0, "a2", 0, "pass")
    world.verdict("rp", 0, "a3", 0, "fail")
    # rq step 0: one pass, one fail -> disputed, the run stays pending...
    world.audit("rq", range(5), "a1", 0)
    world.verdict("rq", 0, "a2", 0, "fail")
    world.compute()
    assert world.state("rp") == ("verified", 0)
    assert world.state("rq") == ("pending", None)
    # ...until a third auditor breaks the tie in epoch 1: fail wins, q is zeroed for epoch 1.
    world.verdict("rq", 0, "a3", 1, "invalid")
    world.compute()
    assert world.state("rq") == ("failed", 1)
    assert world.state("rp") == ("verified", 0)


def test_first_decision_is_final(world: World) -> None:
    world.peer("a1", role="auditor")
    world.peer("a2", role="auditor")
    world.peer("a3", role="auditor")
    world.peer("p")
    world.epoch(0, 100)
    world.epoch(1, 100)
    world.run("rp", "p", 0)
    world.verdict("rp", 0, "a1", 0, "fail")
    world.verdict("rp", 0, "a2", 1, "pass")
    world.verdict("rp", 0, "a3", 1, "pass")
    world.audit("rp", range(1, 6), "a2", 1)
    world.compute()
    assert world.state("rp") == ("failed", 0)


def test_usefulness_weight_changes_the_split(world: World) -> None:
    useful, idle = world.peer("useful"), world.peer("idle")
    world.peer("aud", role="auditor")
    world.epoch(0, 1_000_000)
    world.run("ru", "useful", 0)
    world.run("ri", "idle", 0)
    world.audit("ru", range(5), "aud", 0, gain=0.2)
    world.audit("ri", range(5), "aud", 0, gain=0.05)
    world.compute(PolicyParams(cheat_fraction=0.1, confidence=0.5, usefulness_ppm=0))
    assert world.rewards(0) == {useful: 500_000, idle: 500_000}
    world.compute(PolicyParams(cheat_fraction=0.1, confidence=0.5, usefulness_ppm=1_000_000))
    # weights 1.0 and 0.25: scores 1000 and 250 weighted tokens.
    assert world.rewards(0) == {useful: 800_000, idle: 200_000}
    world.compute(PolicyParams(cheat_fraction=0.1, confidence=0.5, usefulness_ppm=500_000))
    # weights 1.0 and 0.625: scores 1000 and 625 (the table in docs/payout-policy.md).
    assert world.rewards(0) == largest_remainder(0, 1_000_000, {useful: 1000, idle: 625})
    assert world.rewards(0) == {useful: 615_385, idle: 384_615}


def test_negative_usefulness_counts_as_zero(world: World) -> None:
    good, bad = world.peer("good"), world.peer("bad")
    world.peer("aud", role="auditor")
    world.epoch(0, 90)
    world.run("rg", "good", 0)
    world.run("rb", "bad", 0)
    world.audit("rg", range(5), "aud", 0, gain=0.3)
    world.audit("rb", range(5), "aud", 0, gain=-0.3)
    world.compute(PolicyParams(cheat_fraction=0.1, confidence=0.5, usefulness_ppm=1_000_000))
    assert world.rewards(0) == {good: 90, bad: 0}


def test_slashes_compound_on_remaining_stake(world: World) -> None:
    world.peer("p")
    world.peer("aud", role="auditor")
    for e in range(3):
        world.epoch(e, 100)
    world.stake("p", 0, 10_000)
    world.stake("p", 2, 1_000)
    for e in range(3):
        world.run(f"r{e}", "p", e)
        world.verdict(f"r{e}", 0, "aud", e, "fail")
    world.compute(PolicyParams(cheat_fraction=0.1, confidence=0.5, slash_bps=2_500))
    rows = world.exec("SELECT epoch, stake_before, amount FROM slashes ORDER BY epoch")
    stake, expected = 0, []
    for e, deposit in ((0, 10_000), (1, 0), (2, 1_000)):
        stake += deposit
        cut = stake * 2_500 // 10_000
        expected.append((e, stake, cut))
        stake -= cut
    assert rows == expected


def test_confidence_is_hypergeometric(world: World) -> None:
    world.peer("p")
    world.peer("aud", role="auditor")
    world.epoch(0, 100)
    world.run("r", "p", 0, steps=20)
    world.audit("r", range(7), "aud", 0)
    world.compute(PolicyParams(cheat_fraction=0.1, confidence=0.6))
    # k = 2 faked steps of 20, 7 sampled: P(miss both) = C(18,7)/C(20,7).
    from math import comb

    expected = 1 - comb(18, 7) / comb(20, 7)
    (got,) = world.exec("SELECT confidence FROM run_outcomes")[0]
    assert got == pytest.approx(expected, rel=1e-12)
    assert world.state("r")[0] == ("verified" if expected >= 0.6 else "pending")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pool=st.integers(min_value=1, max_value=10**38 - 1),
    tokens=st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=12),
)
def test_split_matches_oracle_and_sums_to_pool(pool: int, tokens: list[int]) -> None:
    w = World()
    w.peer("aud", role="auditor")
    w.epoch(0, pool)
    accounts: dict[str, int] = {}
    for i, t in enumerate(tokens):
        accounts[w.peer(f"p{i}")] = t
        w.run(f"r{i}", f"p{i}", 0, steps=1, tokens=t)
        w.verdict(f"r{i}", 0, "aud", 0)
    w.compute()
    got = w.rewards(0)
    assert sum(got.values()) == pool
    assert got == largest_remainder(0, pool, accounts)


def test_equal_scores_tie_break_is_deterministic(world: World) -> None:
    world.peer("aud", role="auditor")
    world.epoch(0, 10)
    accounts = {}
    for i in range(7):
        accounts[world.peer(f"p{i}")] = 1
        world.run(f"r{i}", f"p{i}", 0, steps=1)
        world.verdict(f"r{i}", 0, "aud", 0)
    world.compute()
    first = world.rewards(0)
    assert first == largest_remainder(0, 10, accounts)
    assert sorted(first.values()) == [1, 1, 1, 1, 2, 2, 2]
    world.compute()
    assert world.rewards(0) == first


def test_recomputation_is_byte_identical(world: World, tmp_path: object) -> None:
    world.peer("aud", role="auditor")
    for e in range(3):
        world.epoch(e, 10**24 + e)
    for i in range(9):
        world.peer(f"p{i}")
        world.run(f"r{i}", f"p{i}", i % 3, tokens=17 + i)
        world.audit(f"r{i}", range(5), "aud", i % 3, gain=0.01 * i)
    params = PolicyParams(cheat_fraction=0.1, confidence=0.5, usefulness_ppm=300_000)

    def dump() -> bytes:
        out = []
        for table, key in (
            ("rewards", "epoch, account"),
            ("payouts", "epoch, account"),
            ("epoch_summaries", "epoch"),
            ("run_outcomes", "run_id"),
        ):
            rows = world.exec(f"SELECT * FROM {table} ORDER BY {key}")
            out.append(repr(rows).encode())
        return b"\n".join(out)

    world.compute(params)
    first = dump()
    world.compute(params)
    assert dump() == first


def test_pool_must_be_positive_and_fit(world: World) -> None:
    with pytest.raises(warehouse.WarehouseValueError, match="positive"):
        world.epoch(0, 0)
    with pytest.raises(warehouse.WarehouseValueError, match="negative"):
        world.epoch(0, -5)
    with pytest.raises(warehouse.WarehouseValueError, match="overflows"):
        world.epoch(0, 10**38)
    world.epoch(0, 5)
    with pytest.raises(warehouse.WarehouseValueError, match="already open"):
        world.epoch(0, 6)
    world.epoch(0, 5)  # the same pool again is a no-op


def test_score_overflow_is_refused_and_nothing_changes(world: World) -> None:
    world.peer("aud", role="auditor")
    world.epoch(0, 100)
    world.peer("p")
    world.run("r", "p", 0, steps=1, tokens=10)
    world.verdict("r", 0, "aud", 0)
    world.compute()
    before = world.exec("SELECT * FROM rewards")
    world.peer("huge")
    world.run("rh", "huge", 0, steps=1, tokens=2**63 - 1)
    world.peer("huge2")
    world.run("rh2", "huge2", 0, steps=1, tokens=2**63 - 1)
    world.verdict("rh", 0, "aud", 0)
    world.verdict("rh2", 0, "aud", 0)
    with pytest.raises(PolicyError, match="2\\*\\*63"):
        world.compute()
    assert world.exec("SELECT * FROM rewards") == before


def test_posted_epoch_must_recompute_to_its_total(world: World) -> None:
    world.peer("aud", role="auditor")
    world.epoch(0, 100)
    a, b = world.peer("a"), world.peer("b")
    world.run("ra", "a", 0, tokens=1)
    world.run("rb", "b", 0, tokens=3)
    world.audit("ra", range(5), "aud", 0, gain=0.0)
    world.audit("rb", range(5), "aud", 0, gain=0.5)
    world.compute()
    assert world.rewards(0) == {a: 25, b: 75}
    warehouse.record_settlement_post(
        world.con,
        epoch=0,
        root="0x" + "11" * 32,
        cumulative_total=100,
        inputs_hash=b"\x22" * 32,
        tx_hash="0x" + "33" * 32,
        block_number=5,
        gas_used=1,
        contract="0x" + "44" * 20,
        chain_id=31337,
    )
    world.compute()  # same result: fine
    # A later epoch opened with more money changes nothing posted; a changed rule would.
    world.epoch(1, 50)
    world.compute()
    world.exec("DELETE FROM epochs WHERE epoch = 1")
    world.exec("UPDATE epochs SET pool = 200 WHERE epoch = 0")
    with pytest.raises(PolicyError, match="posted on chain"):
        world.compute()
    assert world.rewards(0) == {a: 25, b: 75}


def test_params_are_validated() -> None:
    for bad in (
        {"cheat_fraction": 0.0},
        {"cheat_fraction": float("nan")},
        {"confidence": 1.0},
        {"slash_bps": 10_001},
        {"usefulness_ppm": -1},
    ):
        with pytest.raises(warehouse.WarehouseValueError):
            PolicyParams(**bad)  # type: ignore[arg-type]


def test_stored_params_round_trip(world: World) -> None:
    assert policy.stored_params(world.con) == PolicyParams()
    p = PolicyParams(cheat_fraction=0.2, confidence=0.75, slash_bps=5, usefulness_ppm=7)
    policy.set_params(world.con, p)
    assert policy.stored_params(world.con) == p


def test_float_money_is_refused(world: World) -> None:
    with pytest.raises(warehouse.WarehouseValueError, match="integer"):
        world.epoch(0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(warehouse.WarehouseValueError, match="integer"):
        world.epoch(0, True)  # type: ignore[arg-type]


def test_preview_shows_a_what_if_and_changes_nothing(world: World) -> None:
    useful, idle = world.peer("useful"), world.peer("idle")
    world.peer("aud", role="auditor")
    world.epoch(0, 1_000)
    world.run("ru", "useful", 0)
    world.run("ri", "idle", 0)
    world.audit("ru", range(5), "aud", 0, gain=0.2)
    world.audit("ri", range(5), "aud", 0, gain=0.05)
    world.compute()
    before = world.exec("SELECT * FROM rewards ORDER BY account")
    what_if = PolicyParams(cheat_fraction=0.1, confidence=0.5, usefulness_ppm=1_000_000)
    rows = policy.preview(world.con, what_if, "SELECT account, amount FROM rewards")
    assert {str(a): int(m) for a, m in rows} == {useful: 800, idle: 200}
    assert world.exec("SELECT * FROM rewards ORDER BY account") == before
    assert policy.stored_params(world.con) == LENIENT
