"""Beacon sources: a command-line value and a block hash read from a real (in-process) EVM."""

from __future__ import annotations

import pytest
from web3 import EthereumTesterProvider, Web3

from audit.beacon import (
    Beacon,
    BeaconError,
    BeaconNotReadyError,
    BeaconSource,
    ChainBeacon,
    FixedCommitmentBlock,
    StaticBeacon,
    parse_beacon_hex,
)


def test_static_beacon_from_hex() -> None:
    b = StaticBeacon.from_hex("0x" + "ab" * 32)
    assert isinstance(b, BeaconSource)
    assert b.fetch() == Beacon(value=bytes.fromhex("ab" * 32), source="cli")


@pytest.mark.parametrize("text", ["0xzz", "0x" + "00" * 4, "", "0x" + "11" * 2000])
def test_bad_beacon_hex_is_refused(text: str) -> None:
    with pytest.raises(BeaconError):
        parse_beacon_hex(text)


def test_chain_beacon_is_a_later_block_hash() -> None:
    w3 = Web3(EthereumTesterProvider())
    accounts = w3.eth.accounts
    commit_block = int(w3.eth.block_number)
    source = ChainBeacon(
        w3, run_id="run-1", locator=FixedCommitmentBlock(block=commit_block), delay=2
    )
    assert isinstance(source, BeaconSource)
    with pytest.raises(BeaconNotReadyError):
        source.fetch()
    for _ in range(3):  # mine blocks with real transactions
        w3.eth.send_transaction({"from": accounts[0], "to": accounts[1], "value": 1})
    beacon = source.fetch()
    expected = bytes(w3.eth.get_block(commit_block + 2)["hash"])
    assert beacon.value == expected
    assert beacon.value != bytes(w3.eth.get_block(commit_block)["hash"])
    assert beacon.source == f"chain:{w3.eth.chain_id}:{commit_block + 2}"


def test_chain_beacon_refuses_the_commitment_block_itself() -> None:
    w3 = Web3(EthereumTesterProvider())
    with pytest.raises(BeaconError):
        ChainBeacon(w3, run_id="r", locator=FixedCommitmentBlock(block=0), delay=0)
