"""Payout trees: the `tree` command against @openzeppelin/merkle-tree, epoch roots, write-back."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rewards_policy import World

from proofs.payout import PayoutTree, verify_payout
from rewards import payouts, warehouse
from rewards.cli import main
from rewards.payouts import PayoutDataError

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "tests" / "js" / "payout_oracle.mjs"


def _oz(cases: list[dict[str, object]]) -> list[dict[str, object]]:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "@openzeppelin" / "merkle-tree").is_dir():
        pytest.fail("node and node_modules/@openzeppelin/merkle-tree are required (npm ci)")
    done = subprocess.run(
        [node, str(ORACLE)],
        input=json.dumps({"cases": cases}),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=120,
    )
    result: list[dict[str, object]] = json.loads(done.stdout)["cases"]
    return result


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "account,amount") -> Path:
    path.write_text(header + "\n" + "".join(f"{a},{m}\n" for a, m in rows), encoding="utf-8")
    return path


def test_tree_command_matches_openzeppelin(tmp_path: Path) -> None:
    rows = [(f"0x{i:040x}", str(10**24 * i + 7)) for i in range(1, 12)]
    rows.append(("0x" + "ab" * 20, str(2**256 - 1)))
    csv_path = _write_csv(tmp_path / "payouts.csv", rows)
    result = CliRunner().invoke(
        main, ["tree", "--csv", str(csv_path), "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 0, result.output
    root = result.stdout.strip().splitlines()[0]
    dump = json.loads((tmp_path / "t" / "tree.json").read_text())
    proofs = json.loads((tmp_path / "t" / "proofs.json").read_text())
    assert proofs["root"] == root
    ordered = [proofs["accounts"][v["value"][0]]["proof"] for v in dump["values"]]
    (oz,) = _oz([{"entries": [[a, m] for a, m in rows], "ours": {"dump": dump, "proofs": ordered}}])
    assert oz["root"] == root
    ours = oz["ours"]
    assert isinstance(ours, dict)
    assert ours["loadedRoot"] == root
    assert all(ours["treeVerify"]) and all(ours["staticVerify"]) and len(ours["treeVerify"]) == 12
    for account, entry in proofs["accounts"].items():
        proof = [bytes.fromhex(h[2:]) for h in entry["proof"]]
        assert verify_payout(bytes.fromhex(root[2:]), account, int(entry["amount"]), proof)


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("0x" + "11" * 20, "5"), ("0x" + "11" * 20, "6")], "account,amount", ":3: account"),
        ([("0x" + "11" * 20, "-5")], "account,amount", ":2: amount must be a non-negative"),
        ([("0x" + "11" * 20, "1.5")], "account,amount", ":2: amount must be a non-negative"),
        ([("0x" + "11" * 20, str(2**256))], "account,amount", ":2: amount"),
        ([("0xAbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAb", "1")], "account,amount", "checksum"),
        ([("0x1234", "5")], "account,amount", ":2: address must be"),
        ([("0x" + "11" * 20, "5")], "addr,amount", "header"),
        ([], "account,amount", "no payout rows"),
    ],
)
def test_tree_command_rejects_bad_csv(
    tmp_path: Path, rows: list[tuple[str, str]], header: str, message: str
) -> None:
    csv_path = _write_csv(tmp_path / "p.csv", rows, header)
    result = CliRunner().invoke(
        main, ["tree", "--csv", str(csv_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2  # bad input (trainer/cli_errors.py)
    assert message in result.output
    assert not (tmp_path / "o" / "tree.json").exists()


def _epochs_world() -> tuple[World, list[str]]:
    w = World()
    w.peer("aud", role="auditor")
    accounts = [w.peer(f"p{i}") for i in range(4)]
    for e in range(3):
        w.epoch(e, 1_000 + e)
    for i in range(4):
        for e in range(3):
            if (i + e) % 3 == 0:
                continue
            w.run(f"r{i}.{e}", f"p{i}", e, tokens=10 + i)
            w.audit(f"r{i}.{e}", range(5), "aud", e)
    w.compute()
    return w, accounts


def test_epoch_payout_is_the_cumulative_sum_of_rewards() -> None:
    w, _ = _epochs_world()
    per_epoch = w.exec("SELECT epoch, account, amount FROM rewards")
    for epoch in range(3):
        cumulative: dict[str, int] = {}
        for e, account, amount in per_epoch:
            if int(e) <= epoch:  # type: ignore[call-overload]
                cumulative[str(account)] = cumulative.get(str(account), 0) + int(amount)  # type: ignore[call-overload]
        expected = tuple(sorted((a, m) for a, m in cumulative.items() if m > 0))
        stored = payouts.epoch_payout(w.con, epoch, recompute=False)
        fresh = payouts.epoch_payout(w.con, epoch, recompute=True)
        assert stored.entries == expected == fresh.entries
        assert stored.root == PayoutTree.build(expected).root == fresh.root
        assert stored.cumulative_total == sum(m for _, m in expected)
        assert stored.inputs_hash == fresh.inputs_hash
    assert payouts.epoch_payout(w.con, 2).cumulative_total == 1_000 + 1_001 + 1_002


def test_recompute_trusts_and_changes_nothing_stored() -> None:
    w, _ = _epochs_world()
    good = payouts.epoch_payout(w.con, 1)
    w.exec("UPDATE payouts SET cumulative = cumulative + 1 WHERE epoch = 1")
    tampered = w.exec("SELECT * FROM payouts ORDER BY epoch, account")
    assert payouts.epoch_payout(w.con, 1, recompute=True) == good
    assert payouts.epoch_payout(w.con, 1, recompute=False).root != good.root
    assert w.exec("SELECT * FROM payouts ORDER BY epoch, account") == tampered


def test_inputs_hash_binds_only_inputs_up_to_the_epoch() -> None:
    w, _ = _epochs_world()
    before = [payouts.epoch_payout(w.con, e).inputs_hash for e in range(3)]
    w.verdict("r1.1", 7, "aud", 2, "pass", gain=0.3)  # a new verdict filed in epoch 2
    after = [payouts.epoch_payout(w.con, e).inputs_hash for e in range(3)]
    assert after[:2] == before[:2]
    assert after[2] != before[2]


def test_epoch_without_payouts_has_no_tree() -> None:
    w = World()
    w.epoch(0, 10)
    w.compute()
    with pytest.raises(PayoutDataError, match="nothing has been paid"):
        payouts.epoch_payout(w.con, 0)
    with pytest.raises(PayoutDataError, match="does not exist"):
        payouts.epoch_payout(w.con, 7)


def test_record_root_and_settlement_write_back(tmp_path: Path) -> None:
    w, accounts = _epochs_world()
    payout = payouts.record_root(w.con, 1)
    rows = w.exec("SELECT epoch, root, cumulative_total, leaf_count FROM payout_roots")
    assert rows == [(1, "0x" + payout.root.hex(), payout.cumulative_total, len(payout.entries))]
    post = dict(
        epoch=1,
        root=payout.root,
        cumulative_total=payout.cumulative_total,
        inputs_hash=payout.inputs_hash,
        tx_hash="0x" + "ab" * 32,
        block_number=9,
        gas_used=70_000,
        contract="0xCdCDCdCdcdcdcdCdcDcDCdcDcDCdCdcdCdcDCDcD",  # EIP-55 case; stored lowercase
        chain_id=31337,
    )
    assert warehouse.record_settlement_post(w.con, **post) is True  # type: ignore[arg-type]
    assert warehouse.record_settlement_post(w.con, **post) is False  # type: ignore[arg-type]
    with pytest.raises(warehouse.WarehouseError, match="already posted with root"):
        warehouse.record_settlement_post(
            w.con,
            **{**post, "root": b"\x01" * 32, "tx_hash": "0x" + "ef" * 32},  # type: ignore[arg-type]
        )
    claim = dict(
        account=accounts[1],
        cumulative_amount=5,
        paid=5,
        epoch=1,
        tx_hash="0x" + "12" * 32,
        block_number=10,
        gas_used=90_000,
        contract="0x" + "cd" * 20,
        chain_id=31337,
    )
    assert warehouse.record_claim(w.con, **claim) is True  # type: ignore[arg-type]
    assert warehouse.record_claim(w.con, **claim) is False  # type: ignore[arg-type]
    with pytest.raises(warehouse.WarehouseValueError, match="negative"):
        warehouse.record_claim(w.con, **{**claim, "paid": -1, "tx_hash": "0x" + "13" * 32})  # type: ignore[arg-type]
    assert w.exec("SELECT count(*) FROM claims") == [(1,)]
    # The posted epoch is now pinned: a warehouse that drifts from it is refused.
    w.exec("UPDATE settlement_posts SET root = '0x" + "99" * 32 + "'")
    with pytest.raises(PayoutDataError, match="was posted with root"):
        payouts.record_root(w.con, 1)


def test_write_back_through_a_path(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    warehouse.connect(db, create=True).close()
    ok = warehouse.record_claim(
        db,
        account="0x" + "aa" * 20,
        cumulative_amount=3,
        paid=3,
        epoch=0,
        tx_hash="0x" + "01" * 32,
        block_number=1,
        gas_used=2,
        contract="0x" + "bb" * 20,
        chain_id=1,
    )
    assert ok
    con = warehouse.connect_read_only(db)
    assert con.execute("SELECT account, paid FROM claims").fetchall() == [("0x" + "aa" * 20, 3)]
    con.close()


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.binary(min_size=20, max_size=20),
        st.integers(min_value=0, max_value=2**256 - 1),
        min_size=1,
        max_size=20,
    )
)
def test_csv_round_trip(tmp_path_factory: pytest.TempPathFactory, rows: dict[bytes, int]) -> None:
    path = tmp_path_factory.mktemp("csv") / "p.csv"
    _write_csv(path, [("0x" + a.hex(), str(m)) for a, m in rows.items()])
    assert payouts.read_csv(path) == tuple(("0x" + a.hex(), m) for a, m in rows.items())


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_csv_parser_never_crashes(tmp_path_factory: pytest.TempPathFactory, junk: str) -> None:
    path = tmp_path_factory.mktemp("junk") / "p.csv"
    path.write_text("account,amount\n" + junk, encoding="utf-8")
    with contextlib.suppress(PayoutDataError):
        payouts.read_csv(path)
