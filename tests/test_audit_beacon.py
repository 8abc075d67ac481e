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
    RunCommitment,
    StaticBeacon,
    StaticBeaconFor,
    beacon_for_run,
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


def test_beacon_for_run_dispatches_on_what_it_is_given() -> None:
    commitment = RunCommitment(run_id="run-9", root=b"\x07" * 32)
    asked: list[object] = []

    def by_url(url: str) -> Beacon:
        asked.append(url)
        return Beacon(value=url.encode().ljust(16, b"."), source="cli")

    class ByRun:
        def for_run(self, run: RunCommitment) -> Beacon:
            asked.append(run)
            return Beacon(value=run.root, source="test")

    given = Beacon(value=b"\x01" * 16, source="cli")
    assert beacon_for_run(given, "runs/a", commitment) is given
    assert beacon_for_run(by_url, "runs/a", commitment).value == b"runs/a.........."
    assert beacon_for_run(ByRun(), "runs/a", commitment).value == b"\x07" * 32
    assert beacon_for_run(StaticBeaconFor(value=b"\x02" * 16), "x", commitment).source == "cli"
    assert asked == ["runs/a", commitment]


def test_chain_beacon_waits_for_confirmations() -> None:
    w3 = Web3(EthereumTesterProvider())
    head = int(w3.eth.block_number)
    source = ChainBeacon(
        w3, run_id="r", locator=FixedCommitmentBlock(block=head), delay=1, confirmations=2
    )
    for _ in range(2):
        w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": w3.eth.accounts[1], "value": 1})
        with pytest.raises(BeaconNotReadyError, match=r"\+2 confirmations"):
            source.fetch()
    w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": w3.eth.accounts[1], "value": 1})
    assert source.fetch().value == bytes(w3.eth.get_block(head + 1)["hash"])
