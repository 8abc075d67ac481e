"""The settlement commands against a real Anvil node (the CLI needs one chain across commands)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from eth_account import Account

from audit.onchain import Deployment, run_id_bytes
from rewards import chain as chainmod
from rewards.settlement import Settlement
from rewards.settlement_cli import COMMANDS

CMD = {c.name: c for c in COMMANDS}


@pytest.fixture(scope="module")
def node() -> Iterator[chainmod.AnvilNode]:
    try:
        binary = chainmod.find_anvil()
    except chainmod.ChainError as exc:
        pytest.skip(f"ANVIL ABSENT, settlement CLI not tested: {exc}")
    with chainmod.AnvilNode(binary=binary) as n:
        yield n


@pytest.fixture
def env(node: chainmod.AnvilNode, tmp_path: Path) -> dict[str, str]:
    signer = Account.create()
    chainmod.fund_from_dev_account(chainmod.connect(node.url), signer.address, 10**20)
    return {
        "VERITRAIN_RPC": node.url,
        "VERITRAIN_DEPLOYMENT": str(tmp_path / "deployment.json"),
        chainmod.KEY_ENV: signer.key.hex(),
    }


def run(name: str, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(CMD[name], args, env=env, catch_exceptions=False)
    return result.exit_code, result.output


def test_deploy_fund_status_and_commitments(env: dict[str, str]) -> None:
    code, out = run("deploy", ["--mint", "1000000", "--delay", "60"], env)
    assert code == 0, out
    record = Deployment.from_json(Path(env["VERITRAIN_DEPLOYMENT"]).read_text())
    settlement = Settlement(chainmod.connect(env["VERITRAIN_RPC"]), record.settlement)
    assert settlement.token_address == record.token
    code, out = run("deploy", ["--mint", "1"], env)
    assert code != 0 and "exists" in out  # never silently replaces a deployment

    assert run("fund", ["2500"], env)[0] == 0
    assert settlement.token_balance(settlement.address) == 2500
    code, out = run("chain-status", [], env)
    assert code == 0 and "balance=2500" in out and "paused=False" in out

    root = "0x" + "ab" * 32
    code, out = run("commit-run", ["run-7", root], env)
    assert code == 0, out
    found = settlement.find_commitment("run-7")
    assert found is not None and found.root == bytes.fromhex("ab" * 32)
    assert found.run_id == run_id_bytes("run-7")
    code, out = run("commitment", ["run-7"], env)
    assert code == 0 and f"block {found.block_number}" in out
    code, out = run("commit-run", ["run-7", root], env)
    assert code == 2 and "CommitmentExists(" in out  # revert decoded for the user
    code, out = run("commitment", ["run-unknown"], env)
    assert code == 2 and "no commitment" in out


def test_key_never_comes_from_arguments_and_is_not_echoed(env: dict[str, str]) -> None:
    secret = env[chainmod.KEY_ENV]
    for name in ("deploy", "fund", "post", "claim", "commit-run"):
        assert not any("key" in (p.name or "") for p in CMD[name].params if p.name != "keystore")
    no_key = {k: v for k, v in env.items() if k != chainmod.KEY_ENV}
    code, out = run("deploy", ["--mint", "5"], no_key)
    assert code == 2 and chainmod.KEY_ENV in out
    bad = {**env, chainmod.KEY_ENV: secret[:-4] + "zzzz"}
    code, out = run("deploy", ["--mint", "5"], bad)
    assert code == 2 and secret[:-4] not in out


def test_commands_without_deployment_say_so(env: dict[str, str]) -> None:
    code, out = run("chain-status", [], env)
    assert code == 2 and "run `deploy` first" in out


def test_chain_command_keeps_state_across_restarts(tmp_path: Path) -> None:
    try:
        chainmod.find_anvil()
    except chainmod.ChainError as exc:
        pytest.skip(f"ANVIL ABSENT: {exc}")
    state, port = tmp_path / "state.json", chainmod.free_port()
    target = Account.create().address
    code = "from rewards.settlement_cli import chain_command; chain_command()"
    args = [sys.executable, "-c", code, "--port", str(port), "--state", str(state)]
    proc = subprocess.Popen(
        [*args, "--fund", target],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                w3 = chainmod.connect(url)
                if w3.eth.get_balance(target) == 100 * 10**18:
                    break
            except chainmod.ChainError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(
                f"chain command did not come up: {proc.stderr.read() if proc.poll() else ''}"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert json.loads(state.read_text())  # anvil wrote its state on the way out
    with chainmod.AnvilNode(port=chainmod.free_port(), state_file=state) as again:
        assert chainmod.connect(again.url).eth.get_balance(target) == 100 * 10**18


def test_post_claim_verify_from_the_warehouse(env: dict[str, str], tmp_path: Path) -> None:
    from test_rewards_policy import World

    from rewards import payouts, warehouse

    db = str(tmp_path / "w.duckdb")
    w = World(db)
    w.peer("aud", role="auditor")
    for i in range(3):
        w.peer(f"p{i}")
    for e in range(2):
        w.epoch(e, 1_000 + e)
        for i in range(3):
            w.run(f"r{i}.{e}", f"p{i}", e, tokens=10 + i)
            w.audit(f"r{i}.{e}", range(5), "aud", e)
    w.compute()
    w.con.close()
    expected = {e: payouts.epoch_payout(db, e, recompute=False) for e in range(2)}
    env = {**env, "VERITRAIN_DB": db}
    w3 = chainmod.connect(env["VERITRAIN_RPC"])

    assert run("deploy", ["--mint", str(10**9), "--delay", "60"], env)[0] == 0
    assert run("fund", [str(expected[1].cumulative_total)], env)[0] == 0
    code, out = run("post", ["0"], env)
    assert code == 0 and "posted epoch 0" in out, out
    code, out = run("post", ["0"], env)
    assert code == 0 and "already posted" in out
    code, out = run("claim", ["--all"], env)
    assert code == 2 and "no active root" in out
    chainmod.advance_time(w3, 60)
    code, out = run("claim", ["--all", "--batch-size", "2"], env)
    assert code == 0, out
    record = Deployment.from_json(Path(env["VERITRAIN_DEPLOYMENT"]).read_text())
    s = Settlement(w3, record.settlement)
    for account, amount in expected[0].entries:
        assert s.token_balance(account) == amount

    assert run("post", ["1"], env)[0] == 0
    chainmod.advance_time(w3, 60)
    code, out = run("claim", ["--all"], env)
    assert code == 0, out
    code, out = run("claim", ["--all"], env)
    assert code == 0 and "nothing to claim" in out
    for account, amount in expected[1].entries:
        assert s.token_balance(account) == s.claimed(account) == amount
    con = warehouse.connect_read_only(db)
    try:
        posts = con.execute("SELECT epoch, root, chain_id FROM settlement_posts ORDER BY epoch")
        assert [(int(e), r) for e, r, _ in posts.fetchall()] == [
            (e, "0x" + expected[e].root.hex()) for e in range(2)
        ]
        paid = con.execute("SELECT account, SUM(paid) FROM claims GROUP BY account").fetchall()
        assert {str(a).lower(): int(p) for a, p in paid} == {
            a.lower(): m for a, m in expected[1].entries
        }
    finally:
        con.close()

    code, out = run("verify-root", ["1"], env)
    assert code == 0, out
    tampered = warehouse.connect(db)
    # Shift weight between peers (same pool): another root, same total, another inputs hash.
    tampered.execute("UPDATE runs SET tokens_per_step = tokens_per_step * 5 WHERE run_id = 'r0.1'")
    tampered.close()
    code, out = run("verify-root", ["1"], env)
    assert code == 1 and "does not match" in out, out
    assert out.count("NO") == 2  # root and inputs hash differ; the total still matches
