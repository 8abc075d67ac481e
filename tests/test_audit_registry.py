"""The on-chain commitment registry as the auditor's beacon: a real run from the trainer, the real
settlement contract on the embedded py-evm chain (and on Anvil for the CLI), and block hashes
read back from the chain independently of the code under test."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from audit_runs import AUDITOR, corpus, make_run, threads
from click.testing import CliRunner
from conftest_chain import account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from audit.beacon import Beacon, BeaconError, BeaconNotReadyError, RunCommitment
from audit.cli import main
from audit.fetch import VerifiedRun, load_run
from audit.jobs import RunOutcome, SampleSpec, audit_run
from audit.onchain import REGISTRY_ABI, ChainError, Deployment, RegistryReader, connect
from audit.reexec import ReexecConfig
from audit.registry import (
    CommitmentMismatchError,
    RegistryBeacon,
    RegistryBeaconFor,
    UnrecordedRunError,
)
from audit.sampling import plan_sample
from audit.tolerance import Mode
from proofs.signatures import save_keypair
from rewards import chain as chainmod
from rewards.settlement import Settlement, deploy_token
from trainer.store import RunStore

GAS = 10**20


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


@pytest.fixture(scope="module")
def run() -> VerifiedRun:
    return load_run(RunStore(make_run("honest")))  # shared with the other audit tests


def commitment(run: VerifiedRun) -> RunCommitment:
    return RunCommitment(run_id=run.header.run_id, root=run.final_hash)


def deploy(w3: Web3) -> tuple[Settlement, LocalAccount, LocalAccount, int]:
    """A fresh settlement contract; the peer and another address, both funded for gas."""
    admin, peer, other = account("reg-admin"), account("reg-peer"), account("reg-other")
    for a in (admin, peer, other):
        chainmod.fund_from_dev_account(w3, a.address, GAS)
    token = deploy_token(w3, admin, supply=10**24, holder=admin.address)
    settlement, tx = Settlement.deploy(w3, admin, token=token, activation_delay=0)
    return settlement, peer, other, tx.block_number


def mine(w3: Web3) -> None:
    """One block, mined by a real transaction (eth-tester mines one block per transaction)."""
    chainmod.fund_from_dev_account(w3, account("reg-admin").address, 1)


@pytest.fixture
def tester() -> tuple[Settlement, LocalAccount, LocalAccount, int]:
    return deploy(chainmod.connect(None))


def test_matching_root_gives_a_later_block_hash_and_a_reproducible_sample(
    run: VerifiedRun, tester: tuple[Settlement, LocalAccount, LocalAccount, int]
) -> None:
    s, peer, _, _ = tester
    w3 = s.w3
    n = s.record_commitment(peer, run.header.run_id, run.final_hash).block_number
    source = RegistryBeacon(s, run=commitment(run), committer=peer.address, delay=2)
    with pytest.raises(BeaconNotReadyError):
        source.fetch()  # head is the record's own block
    mine(w3)
    with pytest.raises(BeaconNotReadyError):
        source.fetch()  # head n + 1: the beacon block n + 2 is still in the future
    mine(w3)
    beacon = source.fetch()
    hashes = [bytes(w3.eth.get_block(b)["hash"]) for b in (n, n + 1, n + 2)]
    assert beacon.value == hashes[2] and beacon.value not in hashes[:2]
    chain_id = int(w3.eth.chain_id)
    assert beacon.source == f"chain:{chain_id}:{n + 2}:registry:{s.address}:{peer.address}:{n}"
    mine(w3)  # later blocks change nothing
    assert source.fetch() == beacon
    plans = [
        plan_sample(
            beacon=value,
            manifest_hash=run.final_hash,
            auditor_pubkey=AUDITOR.public,
            total_steps=run.total_steps,
            count=3,
        )
        for value in (beacon.value, hashes[2], hashes[1])
    ]
    assert plans[0] == plans[1]  # anyone reading block n + 2 recomputes the sample
    assert plans[0].seed != plans[2].seed


def test_a_root_recorded_before_the_run_ended_is_refused(
    run: VerifiedRun, tester: tuple[Settlement, LocalAccount, LocalAccount, int]
) -> None:
    s, peer, _, _ = tester
    # The peer records the head of its hash chain after the first window, then keeps training.
    early = run.manifests[0].hash()
    assert len(run.manifests) > 1 and early != run.final_hash
    s.record_commitment(peer, run.header.run_id, early)
    mine(s.w3)
    source = RegistryBeacon(s, run=commitment(run), committer=peer.address)
    with pytest.raises(CommitmentMismatchError) as info:
        source.fetch()
    message = str(info.value)
    assert f"expected the run's final manifest hash 0x{run.final_hash.hex()}" in message
    assert f"has 0x{early.hex()}" in message
    assert isinstance(info.value, BeaconError) and isinstance(info.value, ValueError)


def test_an_unrecorded_run_is_refused(
    run: VerifiedRun, tester: tuple[Settlement, LocalAccount, LocalAccount, int]
) -> None:
    s, peer, other, _ = tester
    with pytest.raises(UnrecordedRunError, match="no commitment by anyone"):
        RegistryBeacon(s, run=commitment(run)).fetch()
    # The right root recorded by another address is not the peer's record.
    s.record_commitment(other, run.header.run_id, run.final_hash)
    mine(s.w3)
    with pytest.raises(UnrecordedRunError, match=f"no commitment by {peer.address}"):
        RegistryBeacon(s, run=commitment(run), committer=peer.address).fetch()


def test_without_a_committer_the_earliest_record_must_hold_the_root(
    run: VerifiedRun, tester: tuple[Settlement, LocalAccount, LocalAccount, int]
) -> None:
    s, peer, other, _ = tester
    s.record_commitment(other, run.header.run_id, b"\x13" * 32)  # a squatter comes first
    n = s.record_commitment(peer, run.header.run_id, run.final_hash).block_number
    mine(s.w3)
    with pytest.raises(CommitmentMismatchError, match="--committer"):
        RegistryBeacon(s, run=commitment(run)).fetch()
    beacon = RegistryBeacon(s, run=commitment(run), committer=peer.address).fetch()
    assert beacon.value == bytes(s.w3.eth.get_block(n + 1)["hash"])


class InProcessRegistry:
    """A beacon-for over the in-process chain (no URL reaches it), for the job path."""

    def __init__(self, settlement: Settlement, committer: str) -> None:
        self.settlement, self.committer = settlement, committer

    def for_run(self, run: RunCommitment) -> Beacon:
        return RegistryBeacon(self.settlement, run=run, committer=self.committer).fetch()


def test_a_job_waits_for_the_beacon_and_refuses_a_mismatch(
    run: VerifiedRun, tester: tuple[Settlement, LocalAccount, LocalAccount, int], tmp_path: Path
) -> None:
    s, peer, other, _ = tester
    url = make_run("honest")

    def audit(committer: str) -> RunOutcome:
        return audit_run(
            url,
            out=tmp_path,
            keypair=AUDITOR,
            spec=SampleSpec(count=1),
            beacon=InProcessRegistry(s, committer),
            config=ReexecConfig(mode=Mode.EXACT),
            corpus=None,
        )

    s.record_commitment(peer, run.header.run_id, run.final_hash)
    waiting = audit(peer.address)
    assert waiting.run_id == run.header.run_id and waiting.error is not None
    assert waiting.error.startswith("beacon:") and "not reached" in waiting.error
    s.record_commitment(other, run.header.run_id, run.manifests[0].hash())
    mine(s.w3)
    refused = audit(other.address)
    assert refused.error is not None and "expected the run's final manifest hash" in refused.error
    assert not list(tmp_path.rglob("*.json"))  # nothing planned, nothing judged


def test_registry_beacon_for_is_picklable_and_checked() -> None:
    d = Deployment(
        chain_id=31337, settlement="0x" + "11" * 20, token="0x" + "22" * 20, block_number=5
    )
    b = RegistryBeaconFor.from_deployment("http://127.0.0.1:1", d, committer=PEER_ADDRESS, delay=3)
    assert pickle.loads(pickle.dumps(b)) == b
    assert (b.from_block, b.chain_id, b.delay, b.committer) == (5, 31337, 3, PEER_ADDRESS)
    with pytest.raises(BeaconError):
        RegistryBeaconFor.from_deployment("http://127.0.0.1:1", d, delay=0)
    with pytest.raises(BeaconError):
        RegistryBeacon(object(), run=RunCommitment(run_id="r", root=b"\1" * 32), delay=0)  # type: ignore[arg-type]


PEER_ADDRESS = account("reg-peer").address


def test_the_auditors_registry_abi_is_the_compiled_contracts() -> None:
    """audit.onchain carries its own copy of the two ABI entries it reads (audit imports nothing
    from rewards): the copy must be the compiled contract's, entry for entry."""
    compiled = {e.get("name"): e for e in chainmod.artifact("VeritrainSettlement")["abi"]}
    assert [e["name"] for e in REGISTRY_ABI] == ["commitment", "CommitmentRecorded"]
    for entry in REGISTRY_ABI:
        assert entry == compiled[entry["name"]]


def test_the_registry_reader_alone_refuses_a_missing_contract_and_node() -> None:
    w3 = chainmod.connect(None)
    with pytest.raises(ChainError, match="no contract at"):
        RegistryReader(w3, "0x" + "11" * 20)
    with pytest.raises(ChainError, match="no JSON-RPC node"):
        connect(f"http://127.0.0.1:{chainmod.free_port()}")
    with pytest.raises(ChainError, match="http"):
        connect("tester")  # an in-process chain is no one else's: the auditor needs a node


# ---------------------------------------------------------------------------------- CLI, Anvil


@pytest.fixture(scope="module")
def anvil() -> Iterator[str]:
    try:
        binary = chainmod.find_anvil()
    except chainmod.ChainError as exc:
        pytest.skip(f"ANVIL ABSENT, audit registry CLI not tested: {exc}")
    with chainmod.AnvilNode(binary=binary) as node:
        yield node.url


def test_cli_samples_and_audits_with_the_registry_beacon(
    run: VerifiedRun, anvil: str, tmp_path: Path
) -> None:
    w3 = chainmod.connect(anvil)
    s, peer, other, deployed_at = deploy(w3)
    deployment = tmp_path / "deployment.json"
    deployment.write_text(s.deployment(deployed_at).to_json())
    key = tmp_path / "auditor.key"
    save_keypair(key, AUDITOR)
    url = make_run("honest")
    chain = ["--chain-url", anvil, "--deployment", str(deployment)]
    sample = ["sample", "--store", url, "--key", str(key), *chain, "--count", "3"]

    def invoke(args: list[str]) -> tuple[int, str]:
        result = CliRunner().invoke(main, args)
        return result.exit_code, " ".join(result.output.split())  # rich wraps long lines

    code, text = invoke([*sample, "--committer", peer.address])
    assert code == 2 and "no commitment by" in text
    n = s.record_commitment(peer, run.header.run_id, run.final_hash).block_number
    code, text = invoke([*sample, "--committer", peer.address])
    assert code == 2 and "not reached" in text  # Anvil mines only on demand
    chainmod.advance_time(w3, 0)  # mines block n + 1
    code, text = invoke([*sample, "--committer", peer.address.lower()])
    assert code == 0, text
    value = bytes(w3.eth.get_block(n + 1)["hash"])
    plan = plan_sample(
        beacon=value,
        manifest_hash=run.final_hash,
        auditor_pubkey=AUDITOR.public,
        total_steps=run.total_steps,
        count=3,
    )
    assert f"beacon 0x{value.hex()}" in text
    assert f"steps: {' '.join(str(t) for t in plan.steps)}" in text
    assert f"commitment root (final manifest hash) 0x{run.final_hash.hex()}" in text

    s.record_commitment(other, run.header.run_id, run.manifests[0].hash())
    code, text = invoke([*sample, "--committer", other.address])
    assert code == 2 and "expected the run's final manifest hash" in text

    out = tmp_path / "verdicts"
    corpus_dir = corpus().files[0].rsplit("/", 1)[0]
    audit = ["run", "--store", url, "--out", str(out), "--key", str(key), "--corpus", corpus_dir]
    code, text = invoke([*audit, *chain, "--committer", peer.address, "--count", "1"])
    assert code == 0, text
    written = json.loads((out / run.header.run_id / "plan.json").read_text())
    assert written["beacon"] == "0x" + value.hex()
    one = plan_sample(
        beacon=value,
        manifest_hash=run.final_hash,
        auditor_pubkey=AUDITOR.public,
        total_steps=run.total_steps,
        count=1,
    )
    assert written["steps"] == list(one.steps)
    assert len(list((out / run.header.run_id).glob("step-*.json"))) == 1


def test_cli_beacon_options_are_checked(tmp_path: Path) -> None:
    key = tmp_path / "auditor.key"
    save_keypair(key, AUDITOR)
    base = ["sample", "--store", str(tmp_path), "--key", str(key), "--count", "1"]
    cases = [
        ([], "give --beacon HEX"),
        (["--beacon", "0x" + "ab" * 32, "--chain-url", "http://127.0.0.1:1"], "not both"),
        (["--beacon", "0x" + "ab" * 32, "--committer", PEER_ADDRESS], "--committer selects"),
        (
            ["--chain-url", "http://127.0.0.1:1", "--deployment", str(tmp_path / "no.json")],
            "no deployment record",
        ),
    ]
    bad_committer = tmp_path / "deployment.json"
    bad_committer.write_text(
        Deployment(
            chain_id=1, settlement="0x" + "11" * 20, token="0x" + "22" * 20, block_number=0
        ).to_json()
    )
    cases.append(
        (
            [
                "--chain-url",
                "http://127.0.0.1:1",
                "--deployment",
                str(bad_committer),
                "--committer",
                "0x1234",
            ],
            "0x followed by 40 hex digits",
        ),
    )
    for extra, message in cases:
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
