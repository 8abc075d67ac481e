"""The payout policy (rewards/policy.sql) against an independent plain-Python oracle.

The oracle below implements docs/payout-policy.md as written, in Python, without reading the SQL:
quorum per step, the exact hypergeometric confidence (math.comb and Fraction, where the SQL uses
lgamma), first decision final, slashing compounding on the remaining stake, forfeits, usefulness
weighting, rollover, largest remainder with sha256 tie-breaks, cumulative payouts. It is compared
with rewards.policy.compute on seeded random small warehouses, and it produced the expected
values of the JSON vectors under tests/vectors/policy/ (regenerate them with
``python tests/test_rewards_policy_oracle.py --write-vectors``; see the README there).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
import sys
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from rewards import policy, warehouse
from rewards.policy import PolicyParams

VECTORS = Path(__file__).parent / "vectors" / "policy"
T0 = dt.datetime(2026, 1, 1)
World = dict[str, Any]


# ---------------------------------------------------------------- oracle (docs/payout-policy.md)


def _confidence(n_steps: int, passed: int, cheat_fraction: float) -> Fraction:
    """P = 1 - C(N-k, n) / C(N, n), k = max(1, ceil(f * N)), exactly."""
    k = max(1, math.ceil(Fraction(cheat_fraction) * n_steps))
    return 1 - Fraction(math.comb(n_steps - k, passed), math.comb(n_steps, passed))


def _decide(run: dict[str, Any], verdicts: list[dict[str, Any]], p: PolicyParams) -> dict[str, Any]:
    """Section 1-2: the run's state, decision epoch and audited steps (and its last confidence)."""
    out: dict[str, Any] = {"state": "pending", "decided_epoch": None, "audited_steps": 0}
    out["confidence"] = Fraction(0)
    for at in sorted({v["epoch"] for v in verdicts}):
        votes: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for v in verdicts:
            if v["epoch"] <= at:
                votes[v["step"]][0 if v["outcome"] == "pass" else 1] += 1
        failed = sum(1 for a, b in votes.values() if b > a)
        disputed = sum(1 for a, b in votes.values() if a == b)
        passed = sum(1 for a, b in votes.values() if a > b)
        conf = _confidence(run["step_count"], passed, p.cheat_fraction)
        out.update(audited_steps=passed, confidence=conf)
        if failed:
            state = "failed"
        elif disputed == 0 and conf + Fraction(1, 10**12) >= Fraction(p.confidence):
            state = "verified"
        else:
            continue
        out.update(state=state, decided_epoch=max(at, run["epoch"]))
        break
    return out


def _usefulness(verdicts: list[dict[str, Any]], decided: int) -> int:
    """Section 4: mean loss drop of passing verdicts up to the decision, in millionths, >= 0."""
    gains = [
        v["loss_before"] - v["loss_after"]
        for v in verdicts
        if v["outcome"] == "pass" and v["epoch"] <= decided
    ]
    gains = [g for g in gains if math.isfinite(g)]
    if not gains:
        return 0
    micro: float = 1e6 * (sum(gains) / len(gains))
    # DuckDB's round() goes half away from zero; below zero the result is 0 either way.
    return max(0, math.floor(micro + 0.5))


def _largest_remainder(epoch: int, payable: int, scores: dict[str, int]) -> dict[str, int]:
    """Section 6: floors of P * s / T, leftover units to the largest remainders, sha256 ties."""
    total = sum(scores.values())
    out = {a: payable * s // total for a, s in scores.items()}
    rema = {a: payable * s % total for a, s in scores.items()}
    order = sorted(
        scores, key=lambda a: (-rema[a], hashlib.sha256(f"{epoch}:{a}".encode()).hexdigest(), a)
    )
    for account in order[: payable - sum(out.values())]:
        out[account] += 1
    return out


def oracle(world: World, p: PolicyParams) -> dict[str, Any]:
    """Every computed result of the policy for ``world`` (the format of the vectors' expected)."""
    epochs = sorted(world["epochs"])
    address = {peer["peer_id"]: peer["payout_address"] for peer in world["peers"]}
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for v in world["verdicts"]:
        by_run[v["run_id"]].append(v)
    outcomes: dict[str, dict[str, Any]] = {}
    for run in world["runs"]:
        o = _decide(run, by_run[run["run_id"]], p)
        verified = o["state"] == "verified"
        o["verified_tokens"] = run["step_count"] * run["tokens_per_step"] if verified else 0
        o["usefulness_micro"] = (
            _usefulness(by_run[run["run_id"]], o["decided_epoch"]) if verified else 0
        )
        outcomes[run["run_id"]] = o
    peer_of = {run["run_id"]: run["peer_id"] for run in world["runs"]}
    filed = {run["run_id"]: run["epoch"] for run in world["runs"]}

    slashes: list[list[Any]] = []
    slashed: dict[str, int] = defaultdict(int)
    for e in epochs:
        failed: dict[str, int] = defaultdict(int)
        for rid, o in outcomes.items():
            if o["state"] == "failed" and o["decided_epoch"] == e:
                failed[peer_of[rid]] += 1
        for peer in sorted(failed):
            deposited = sum(
                s["amount"] for s in world["stakes"] if s["peer_id"] == peer and s["epoch"] <= e
            )
            before = deposited - slashed[peer]
            cut = before * p.slash_bps // 10_000
            slashed[peer] += cut
            slashes.append([e, peer, str(before), str(cut), failed[peer]])

    rewards: list[list[Any]] = []
    summaries: list[list[Any]] = []
    carry = 0
    for e in epochs:
        decided_here = [r for r, o in outcomes.items() if o["decided_epoch"] == e]
        failing = {peer_of[r] for r in decided_here if outcomes[r]["state"] == "failed"}
        verified = [r for r in decided_here if outcomes[r]["state"] == "verified"]
        paid_runs = [r for r in verified if peer_of[r] not in failing]
        u_max = max((outcomes[r]["usefulness_micro"] for r in paid_runs), default=0)
        scores: dict[str, int] = defaultdict(int)
        for r in paid_runs:
            o, w = outcomes[r], p.usefulness_ppm
            weight = 10**6 if u_max == 0 else (10**6 - w) + w * o["usefulness_micro"] // u_max
            scores[address[peer_of[r]]] += o["verified_tokens"] * weight // 10**6
        total, payable = sum(scores.values()), world["epochs"][e] + carry
        amounts = _largest_remainder(e, payable, scores) if total > 0 else {}
        rewards += [[e, a, str(scores[a]), str(amounts[a])] for a in sorted(amounts)]
        pending = sum(
            1
            for r, o in outcomes.items()
            if filed[r] <= e and (o["decided_epoch"] is None or o["decided_epoch"] > e)
        )
        paid = sum(amounts.values())
        summaries.append(
            [e, str(world["epochs"][e]), str(carry), str(paid), str(payable - paid), str(total),
             len(paid_runs), len(verified) - len(paid_runs),
             sum(1 for r in decided_here if outcomes[r]["state"] == "failed"), pending]
        )  # fmt: skip
        carry = payable if total == 0 else 0

    payouts: list[list[Any]] = []
    cumulative: dict[str, int] = defaultdict(int)
    for e in epochs:
        now = {row[1]: int(row[3]) for row in rewards if row[0] == e}
        for a, m in now.items():
            cumulative[a] += m
        payouts += [
            [e, a, str(now.get(a, 0)), str(c)] for a, c in sorted(cumulative.items()) if c > 0
        ]

    runs = [
        [rid, o["state"], o["decided_epoch"], o["audited_steps"], o["verified_tokens"],
         o["usefulness_micro"], float(o["confidence"])]
        for rid, o in sorted(outcomes.items())
    ]  # fmt: skip
    return {"run_outcomes": runs, "slashes": slashes, "rewards": rewards,
            "epoch_summaries": summaries, "payouts": payouts}  # fmt: skip


# ---------------------------------------------------------------- the SQL side


def load(world: World) -> warehouse.Connection:
    """A fresh in-memory warehouse holding ``world``'s input rows."""
    con = warehouse.connect(":memory:")
    for i, peer in enumerate(world["peers"]):
        con.execute(
            "INSERT INTO peers VALUES (?, ?, ?, ?, ?)",
            [peer["peer_id"], peer["role"], "0x" + f"{i + 1:096x}", peer["payout_address"], T0],
        )
    for e, pool in world["epochs"].items():
        policy.open_epoch(con, e, pool)
    for s in world["stakes"]:
        con.execute("INSERT INTO stakes VALUES (?, ?, ?)", [s["peer_id"], s["epoch"], s["amount"]])
    for r in world["runs"]:
        con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, 'h', 'tiny', 'adamw', 'd', 1, 1, ?, ?, 'f', 'cpu',"
            " 'mem', 'b')",
            [r["run_id"], r["peer_id"], r["epoch"], r["tokens_per_step"], r["step_count"]],
        )
    for i, v in enumerate(world["verdicts"]):
        con.execute(
            "INSERT INTO verdicts (verdict_id, run_id, step, auditor_id, epoch, outcome, mode,"
            " loss_before, loss_after, replay_seed, recipe_hash, manifest_hash, device, reason,"
            " batch_id) VALUES (?, ?, ?, ?, ?, ?, 'tolerant', ?, ?, 's', 'r', 'm', 'cpu', '', 'b')",
            [f"v{i:05d}", v["run_id"], v["step"], v["auditor_id"], v["epoch"], v["outcome"],
             v["loss_before"], v["loss_after"]],
        )  # fmt: skip
    return con


def computed(con: warehouse.Connection) -> dict[str, Any]:
    """The policy's tables, in the oracle's format."""

    def rows(sql: str) -> list[list[Any]]:
        out = con.execute(sql).fetchall()
        return [[str(x) if type(x).__name__ == "Decimal" else x for x in row] for row in out]

    return {
        "run_outcomes": rows(
            "SELECT run_id, state, decided_epoch, audited_steps, verified_tokens,"
            " usefulness_micro, confidence FROM run_outcomes ORDER BY run_id"
        ),
        "slashes": rows(
            "SELECT epoch, peer_id, stake_before, amount, failed_runs FROM slashes"
            " ORDER BY epoch, peer_id"
        ),
        "rewards": rows("SELECT epoch, account, score, amount FROM rewards ORDER BY ALL"),
        "epoch_summaries": rows("SELECT * FROM epoch_summaries ORDER BY epoch"),
        "payouts": rows("SELECT * FROM payouts ORDER BY epoch, account"),
    }


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for table in ("slashes", "rewards", "epoch_summaries", "payouts"):
        assert got[table] == want[table], table
    assert len(got["run_outcomes"]) == len(want["run_outcomes"])
    for g, w in zip(got["run_outcomes"], want["run_outcomes"], strict=True):
        assert g[:6] == w[:6]
        assert math.isclose(g[6], w[6], rel_tol=1e-9, abs_tol=1e-12)  # lgamma vs exact


# ---------------------------------------------------------------- random small warehouses


def random_case(seed: int) -> tuple[World, PolicyParams]:
    rng = random.Random(seed)
    epochs = sorted(rng.sample(range(6), rng.randint(1, 4)))
    pools = [rng.choice([1, 7, 1000, 10**6 + 3, 10**24 + rng.randrange(10**6)]) for _ in epochs]
    world: World = {"epochs": dict(zip(epochs, pools, strict=True))}
    # A crowd: many accounts with equal scores, so leftover units fall inside a tie of remainders.
    crowd = rng.random() < 0.4
    addresses = ["0x" + hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()[:40] for i in range(12)]
    trainers = [f"t{i}" for i in range(rng.randint(5, 12) if crowd else rng.randint(1, 6))]
    auditors = [f"a{i}" for i in range(3)]
    world["peers"] = [
        {
            "peer_id": t,
            "role": "trainer",
            "payout_address": addresses[i] if crowd else rng.choice(addresses),
        }
        for i, t in enumerate(trainers)
    ] + [{"peer_id": a, "role": "auditor", "payout_address": None} for a in auditors]
    world["stakes"] = [
        {"peer_id": t, "epoch": e, "amount": rng.randrange(10**6)}
        for t in trainers
        for e in epochs
        if rng.random() < 0.4
    ]
    world["runs"], world["verdicts"] = [], []
    for r in range(rng.randint(6, 14) if crowd else rng.randint(0, 8)):
        run: dict[str, Any] = {
            "run_id": f"r{r}",
            "peer_id": trainers[r % len(trainers)] if crowd else rng.choice(trainers),
            "epoch": rng.choice(epochs),
            "step_count": 2 if crowd else rng.randint(1, 8),
            "tokens_per_step": 100 if crowd else rng.choice([100, 100, 64, rng.randint(1, 5000)]),
        }
        world["runs"].append(run)
        later = [e for e in epochs if e >= run["epoch"]]
        for step in rng.sample(range(run["step_count"]), rng.randint(0, run["step_count"])):
            for auditor in rng.sample(auditors, rng.choice([1, 1, 1, 2, 3])):
                gain = rng.randint(-50, 300) / 1000
                world["verdicts"].append(
                    {"run_id": run["run_id"], "step": step, "auditor_id": auditor,
                     "epoch": rng.choice(later),
                     "outcome": rng.choices(["pass", "fail", "invalid"], [85, 10, 5])[0],
                     "loss_before": 2.0, "loss_after": 2.0 - gain}
                )  # fmt: skip
    params = PolicyParams(
        cheat_fraction=rng.choice([0.1, 0.25, 0.5, 1.0]),
        confidence=rng.choice([0.0, 0.5, 0.7, 0.9]),
        slash_bps=rng.choice([0, 1000, 2500, 10_000, rng.randint(0, 10_000)]),
        usefulness_ppm=rng.choice([0, 300_000, 1_000_000, rng.randint(0, 10**6)]),
    )
    return world, params


@pytest.mark.parametrize("seed", range(40))
def test_policy_matches_the_oracle(seed: int) -> None:
    world, params = random_case(seed)
    con = load(world)
    policy.compute(con, params)
    assert_same(computed(con), oracle(world, params))


# ---------------------------------------------------------------- JSON vectors


def _vector_files() -> list[Path]:
    return sorted(VECTORS.glob("*.json"))


def _decode(vector: dict[str, Any]) -> tuple[World, PolicyParams]:
    inputs = vector["inputs"]
    world: World = {
        "epochs": {int(e): int(pool) for e, pool in inputs["epochs"].items()},
        "peers": inputs["peers"],
        "stakes": [{**s, "amount": int(s["amount"])} for s in inputs["stakes"]],
        "runs": inputs["runs"],
        "verdicts": inputs["verdicts"],
    }
    return world, PolicyParams(**vector["params"])


def test_vectors_exist() -> None:
    assert len(_vector_files()) >= 4


@pytest.mark.parametrize("path", _vector_files(), ids=lambda p: p.stem)
def test_policy_vectors(path: Path) -> None:
    vector = json.loads(path.read_text())
    assert vector["version"] == 1
    world, params = _decode(vector)
    con = load(world)
    policy.compute(con, params)
    assert_same(computed(con), vector["expected"])
    assert_same(oracle(world, params), vector["expected"])


def write_vectors() -> None:
    """Regenerate tests/vectors/policy/*.json from the oracle (never from policy.sql)."""
    VECTORS.mkdir(parents=True, exist_ok=True)
    # Seeds picked to cover: failures, slashes, forfeits, rollover, pending runs, usefulness
    # weighting, and leftover units that fall inside a tie of remainders (62, 112, 159).
    for seed in (0, 62, 92, 112, 159, 175):
        world, params = random_case(seed)
        inputs = {
            "epochs": {str(e): str(pool) for e, pool in world["epochs"].items()},
            "peers": world["peers"],
            "stakes": [{**s, "amount": str(s["amount"])} for s in world["stakes"]],
            "runs": world["runs"],
            "verdicts": world["verdicts"],
        }
        vector = {
            "version": 1,
            "description": f"random small warehouse, seed {seed}",
            "params": {
                "cheat_fraction": params.cheat_fraction,
                "confidence": params.confidence,
                "slash_bps": params.slash_bps,
                "usefulness_ppm": params.usefulness_ppm,
            },
            "inputs": inputs,
            "expected": oracle(world, params),
        }
        (VECTORS / f"seed{seed}.json").write_text(json.dumps(vector, indent=1) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--write-vectors"]:
    write_vectors()
