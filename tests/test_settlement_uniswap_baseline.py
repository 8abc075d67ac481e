"""Uniswap's published MerkleDistributor bytecode (npm @uniswap/merkle-distributor 1.0.1), the gas
peer of benchmarks/gas_report.py, accepts the proofs the benchmark builds and refuses bad ones.

The benchmark measures claims against a root built by ``path_root`` (two leaves and d - 1 random
siblings). If those proofs were wrong, the peer would revert and no gas would be measured, but a
peer that skipped verification would measure too little: here the same construction pays the
right account, a second claim of the index and a proof for the wrong amount or with a wrong
sibling revert with Uniswap's messages, so the measured claims are real, verified claims.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest_chain import account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract.contract import ContractFunction

from rewards import chain as chainmod
from rewards.settlement import deploy_token

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from settlement_bench import UNISWAP_JSON, airdrop_leaf, path_root, uniswap_artifact

AMOUNT = 10**18


def refused(w3: Web3, sender: LocalAccount, call: ContractFunction, message: str) -> None:
    """``call`` reverts with Uniswap's require message, and ``send`` refuses it (nothing mined),
    naming the message as a decoded Error(string)."""
    with pytest.raises(Exception, match=f"MerkleDistributor: {message}"):
        call.call({"from": sender.address})
    block = w3.eth.block_number
    with pytest.raises(chainmod.RevertError) as err:
        chainmod.send(w3, sender, call)
    assert err.value.name == "Error"
    assert err.value.args_decoded == {"message": f"MerkleDistributor: {message}"}
    assert w3.eth.block_number == block


@pytest.fixture(scope="module")
def art() -> dict[str, Any]:
    if not UNISWAP_JSON.exists():
        pytest.skip(f"UNISWAP ARTIFACT ABSENT ({UNISWAP_JSON}): run `npm ci`")
    return uniswap_artifact()


def test_source_is_the_pinned_package(art: dict[str, Any]) -> None:
    assert art["source"].startswith(
        "npm @uniswap/merkle-distributor 1.0.1, bytecode by solc 0.6.11"
    )


@pytest.mark.parametrize("depth", [1, 10, 20])
def test_uniswap_bytecode_pays_benchmark_proofs_once(art: dict[str, Any], depth: int) -> None:
    w3 = chainmod.connect(None)
    admin = account("uniswap-admin")
    chainmod.fund_from_dev_account(w3, admin.address, 10**19)
    token_addr = deploy_token(w3, admin, supply=10**30, holder=admin.address)
    token = w3.eth.contract(address=token_addr, abi=chainmod.artifact("RewardToken")["abi"])
    a, b = account(f"uniswap-a-{depth}").address, account(f"uniswap-b-{depth}").address
    leaves = (airdrop_leaf(0, a, AMOUNT), airdrop_leaf(1, b, AMOUNT))
    root, upper = path_root(leaves, depth, os.urandom(8))
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    tx = chainmod.send(w3, admin, factory.constructor(token_addr, root))
    addr = Web3.to_checksum_address(w3.eth.get_transaction_receipt(tx.tx_hash)["contractAddress"])  # type: ignore[arg-type]
    dist = w3.eth.contract(address=addr, abi=art["abi"])
    assert dist.functions.merkleRoot().call() == root
    chainmod.send(w3, admin, token.functions.transfer(addr, 10 * AMOUNT))

    proof_a = [leaves[1], *upper]
    bad_sibling = [leaves[1], *upper[:-1], bytes(32)] if upper else [bytes(32)]
    for index, who, amount, proof in [
        (0, a, AMOUNT + 1, proof_a),  # wrong amount: another leaf
        (0, a, AMOUNT, bad_sibling),  # wrong proof
        (1, a, AMOUNT, proof_a),  # right proof, wrong index
    ]:
        refused(w3, admin, dist.functions.claim(index, who, amount, proof), "Invalid proof.")
    chainmod.send(w3, admin, dist.functions.claim(0, a, AMOUNT, proof_a))
    assert token.functions.balanceOf(a).call() == AMOUNT
    assert token.functions.balanceOf(addr).call() == 9 * AMOUNT
    assert dist.functions.isClaimed(0).call() and not dist.functions.isClaimed(1).call()
    refused(w3, admin, dist.functions.claim(0, a, AMOUNT, proof_a), "Drop already claimed.")
    assert token.functions.balanceOf(a).call() == AMOUNT

    chainmod.send(w3, admin, dist.functions.claim(1, b, AMOUNT, [leaves[0], *upper]))
    assert token.functions.balanceOf(b).call() == AMOUNT
