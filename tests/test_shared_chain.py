"""Round records of a shared run committed in the on-chain registry (``rewards commit-rounds``)."""

from __future__ import annotations

from pathlib import Path

import conftest_chain
import pytest
from click.testing import CliRunner
from conftest_chain import Deployed, account
from test_shared_records import AGG, COORD, KEYS, h, make_genesis, make_round

from audit.onchain import round_registry_id, run_id_bytes
from proofs.hashing import keccak256
from rewards import chain as chainmod
from rewards.round_commits import RoundChainError, commit_rounds, commit_rounds_command
from trainer.roundrecord import SignedRoundRecord
from trainer.sharedrun import SignedGenesis
from trainer.sharedstore import SharedStore

chain = conftest_chain.chain  # fixtures, registered by name in this module
deployed = conftest_chain.deployed
GENESIS = make_genesis(rounds=3)


def _store(tmp_path: Path, *, bad_round1: bool = False) -> tuple[SharedStore, list[bytes]]:
    """A shared store with the genesis and two chained round records (signed by AGG, or round 1
    by an outsider key when ``bad_round1``); returns it and the records' hashes."""
    store = SharedStore(tmp_path / "shared")
    store.put_genesis(SignedGenesis.sign(COORD, GENESIS))
    r0 = make_round(genesis=GENESIS.hash(), prev=GENESIS.hash(), base_root=GENESIS.initial_root)
    r1 = make_round(
        genesis=GENESIS.hash(),
        round=1,
        prev=r0.hash(),
        base_root=r0.new_root,
        new_root=h("theta2"),
        opened_at=200,
        closed_at=300,
    )
    store.put_round(SignedRoundRecord.sign(AGG, r0))
    store.put_round(SignedRoundRecord.sign(KEYS["X"] if bad_round1 else AGG, r1))
    return store, [r0.hash(), r1.hash()]


def test_round_registry_id_is_distinct_from_solo_runs() -> None:
    assert round_registry_id("shared-test", 3) == "shared/shared-test/r000003"
    # The registry key is keccak256 of the UTF-8 id, checked against an independent keccak.
    assert run_id_bytes(round_registry_id("s", 0)) == keccak256(b"shared/s/r000000")
    with pytest.raises(ValueError):
        round_registry_id("s", -1)


def test_commit_rounds_records_each_hash_once(tmp_path: Path, deployed: Deployed) -> None:
    store, hashes = _store(tmp_path)
    sender = deployed.chain.admin
    first = commit_rounds(store, deployed.settlement, sender)
    assert [(c.round, c.status) for c in first] == [(0, "committed"), (1, "committed")]
    for r, digest in enumerate(hashes):
        held = deployed.settlement.find_commitment(round_registry_id("shared-test", r))
        assert held is not None and held.root == digest and held.committer == sender.address
    assert first[0].block_number < first[1].block_number
    again = commit_rounds(store, deployed.settlement, sender)
    assert [(c.round, c.status) for c in again] == [(0, "already"), (1, "already")]
    assert [c.block_number for c in again] == [c.block_number for c in first]


def test_a_record_not_signed_by_the_aggregator_is_not_committed(
    tmp_path: Path, deployed: Deployed
) -> None:
    store, _ = _store(tmp_path, bad_round1=True)
    with pytest.raises(RoundChainError, match="round 1: not signed by the genesis's aggregator"):
        commit_rounds(store, deployed.settlement, deployed.chain.admin)
    assert deployed.settlement.find_commitment(round_registry_id("shared-test", 0)) is not None
    assert deployed.settlement.find_commitment(round_registry_id("shared-test", 1)) is None


def test_a_broken_chain_is_not_committed(tmp_path: Path, deployed: Deployed) -> None:
    store = SharedStore(tmp_path / "shared")
    store.put_genesis(SignedGenesis.sign(COORD, GENESIS))
    r0 = make_round(genesis=GENESIS.hash(), prev=GENESIS.hash(), base_root=GENESIS.initial_root)
    r1 = make_round(
        genesis=GENESIS.hash(), round=1, prev=h("not round 0"), base_root=r0.new_root,
        opened_at=200, closed_at=300,
    )  # fmt: skip
    store.put_round(SignedRoundRecord.sign(AGG, r0))
    store.put_round(SignedRoundRecord.sign(AGG, r1))
    with pytest.raises(RoundChainError, match="round 1: prev"):
        commit_rounds(store, deployed.settlement, deployed.chain.admin)
    assert deployed.settlement.find_commitment(round_registry_id("shared-test", 1)) is None
    # A round built on another state than the previous round's result is refused as well.
    other = SharedStore(tmp_path / "other")
    other.put_genesis(SignedGenesis.sign(COORD, GENESIS))
    other.put_round(SignedRoundRecord.sign(AGG, r0))
    r1b = make_round(
        genesis=GENESIS.hash(), round=1, prev=r0.hash(), base_root=h("elsewhere"), opened_at=200,
        closed_at=300,
    )  # fmt: skip
    other.put_round(SignedRoundRecord.sign(AGG, r1b))
    with pytest.raises(RoundChainError, match="round 1: base_root"):
        commit_rounds(other, deployed.settlement, deployed.chain.admin)


def test_a_round_that_does_not_open_when_the_last_closed_is_not_committed(
    tmp_path: Path, deployed: Deployed
) -> None:
    store = SharedStore(tmp_path / "shared")
    store.put_genesis(SignedGenesis.sign(COORD, GENESIS))
    r0 = make_round(genesis=GENESIS.hash(), prev=GENESIS.hash(), base_root=GENESIS.initial_root)
    r1 = make_round(
        genesis=GENESIS.hash(), round=1, prev=r0.hash(), base_root=r0.new_root, opened_at=250,
        closed_at=300,
    )  # fmt: skip
    store.put_round(SignedRoundRecord.sign(AGG, r0))
    store.put_round(SignedRoundRecord.sign(AGG, r1))
    with pytest.raises(RoundChainError, match="round 1: opened_at 250 is not round 0's closed_at"):
        commit_rounds(store, deployed.settlement, deployed.chain.admin)


def test_another_hash_already_committed_is_refused(tmp_path: Path, deployed: Deployed) -> None:
    store, _ = _store(tmp_path)
    sender = deployed.chain.admin
    deployed.settlement.record_commitment(
        sender, round_registry_id("shared-test", 0), h("something else")
    )
    with pytest.raises(RoundChainError, match="already committed"):
        commit_rounds(store, deployed.settlement, sender)


def test_commit_rounds_cli(tmp_path: Path) -> None:
    try:
        binary = chainmod.find_anvil()
    except chainmod.ChainError as exc:
        pytest.skip(f"ANVIL ABSENT, the CLI against a node is not tested: {exc}")
    _, hashes = _store(tmp_path)
    node = chainmod.AnvilNode(binary=binary).start()
    try:
        signer = account("rounds-cli")
        w3 = chainmod.connect(node.url)
        chainmod.fund_from_dev_account(w3, signer.address, 10**20)
        env = {
            "VERITRAIN_RPC": node.url,
            "VERITRAIN_DEPLOYMENT": str(tmp_path / "deployment.json"),
            chainmod.KEY_ENV: signer.key.hex(),
        }
        from rewards.settlement_cli import deploy_command

        runner = CliRunner()
        assert runner.invoke(deploy_command, ["--mint", "10"], env=env).exit_code == 0
        args = ["--shared", str(tmp_path / "shared")]
        result = runner.invoke(commit_rounds_command, args, env=env)
        assert result.exit_code == 0, result.output
        assert f"round 1: 0x{hashes[1].hex()} committed" in result.output
        result = runner.invoke(commit_rounds_command, args, env=env)
        assert result.exit_code == 0 and "round 0" in result.output and "already" in result.output
        missing = runner.invoke(commit_rounds_command, ["--shared", str(tmp_path / "no")], env=env)
        assert missing.exit_code == 2 and missing.output.startswith("error:")
    finally:
        node.stop()


def test_genesis_not_signed_by_its_coordinator(tmp_path: Path, deployed: Deployed) -> None:
    store = SharedStore(tmp_path / "shared")
    store.put_genesis(SignedGenesis.sign(KEYS["X"], GENESIS))
    with pytest.raises(RoundChainError, match="not signed by its coordinator"):
        commit_rounds(store, deployed.settlement, deployed.chain.admin)
