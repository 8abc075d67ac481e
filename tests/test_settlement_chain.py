"""Settlement contract on both backends (eth-tester in-process, Anvil over JSON-RPC).

The EVM's OpenZeppelin MerkleProof is the independent oracle for proofs/payout.py: every claim
that pays proves that the Python tree and the Solidity verifier agree, and tampered proofs fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import conftest_chain
import pytest
from conftest_chain import ACTIVATION_DELAY, Deployed, account
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web3 import Web3

from proofs.payout import PayoutTree
from rewards.chain import RevertError, advance_time, connect, fund_from_dev_account, send
from rewards.settlement import (
    ClaimRequest,
    PostResult,
    RootConflictError,
    Settlement,
    SettlementError,
    deploy_token,
)

INPUTS = b"\x5a" * 32
chain = conftest_chain.chain  # fixtures, registered by name in this module
deployed = conftest_chain.deployed


def peers(n: int, tag: str = "peer") -> list[str]:
    return [account(f"{tag}-{i}").address for i in range(n)]


def post(
    d: Deployed, epoch: int, entries: list[tuple[str, int]], total: int | None = None
) -> PayoutTree:
    tree = PayoutTree.build(entries)
    d.settlement.post_root(
        d.chain.poster,
        epoch=epoch,
        root=tree.root,
        cumulative_total=sum(a for _, a in entries) if total is None else total,
        inputs_hash=INPUTS,
    )
    return tree


def req(tree: PayoutTree, account_: str, amount: int) -> ClaimRequest:
    return ClaimRequest(account=account_, cumulative_amount=amount, proof=tree.proof_for(account_))


def reverts(name: str) -> pytest.RaisesExc[RevertError]:
    return pytest.raises(RevertError, match=rf"^{name}\(")


def test_two_epochs_pay_only_the_difference(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(5)
    first = [(a, 100 * (i + 1)) for i, a in enumerate(who)]
    s.fund(d.chain.admin, 5_000)
    tree1 = post(d, 1, first)
    with reverts("NoActiveRoot"):
        s.claim(d.chain.relayer, req(tree1, who[0], 100))
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    for a, amount in first:
        s.claim(d.chain.relayer, req(tree1, a, amount))  # anyone submits; tokens go to `a`
        assert s.token_balance(a) == amount
        assert s.claimed(a) == amount
    assert s.token_balance(d.chain.relayer.address) == 0
    with reverts("NothingToClaim"):
        s.claim(d.chain.relayer, req(tree1, who[0], 100))

    second = [(a, amount + 7 * (i + 1)) for i, (a, amount) in enumerate(first)]
    tree2 = post(d, 2, second)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    for i, (a, amount) in enumerate(second):
        tx = s.claim(d.chain.relayer, req(tree2, a, amount))
        assert tx.gas_used > 0
        assert s.token_balance(a) == amount  # received first + (second - first), no more
        assert s.claimed(a) == amount
        assert amount - first[i][1] == 7 * (i + 1)
    # Epoch-1 leaves are no longer in the active root.
    with reverts("InvalidProof"):
        s.claim(d.chain.relayer, req(tree1, who[0], 100))
    assert s.total_claimed() == sum(a for _, a in second)
    assert s.token_balance(s.address) == 5_000 - sum(a for _, a in second)


def test_batch_claim_is_all_or_nothing(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(4, "batch")
    entries = [(a, 10 + i) for i, a in enumerate(who)]
    s.fund(d.chain.admin, 1_000)
    tree = post(d, 1, entries)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    good = [req(tree, a, amt) for a, amt in entries]
    bad = [*good[:3], ClaimRequest(account=who[3], cumulative_amount=99, proof=good[3].proof)]
    with reverts("InvalidProof"):
        s.claim_batch(d.chain.relayer, bad)
    assert [s.token_balance(a) for a in who] == [0, 0, 0, 0]
    s.claim_batch(d.chain.relayer, good)
    assert [s.token_balance(a) for a in who] == [amt for _, amt in entries]
    with reverts("NothingToClaim"):
        s.claim_batch(d.chain.relayer, good[:1])


def test_bad_proofs_are_refused(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(3, "bad")
    entries = [(a, 50) for a in who]
    s.fund(d.chain.admin, 1_000)
    tree = post(d, 1, entries)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    proof = tree.proof_for(who[0])
    flipped = (bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:])
    cases = [
        ClaimRequest(account=who[0], cumulative_amount=51, proof=proof),  # more than the leaf
        ClaimRequest(account=who[1], cumulative_amount=50, proof=proof),  # another's proof
        ClaimRequest(account=who[0], cumulative_amount=50, proof=flipped),  # tampered sibling
        ClaimRequest(account=who[0], cumulative_amount=50, proof=()),  # empty
    ]
    for case in cases:
        with reverts("InvalidProof"):
            s.claim(d.chain.relayer, case)
    s.claim(d.chain.relayer, ClaimRequest(account=who[0], cumulative_amount=50, proof=proof))


def test_revoked_root_is_never_claimable(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(2, "rev")
    s.fund(d.chain.admin, 1_000)
    tree1 = post(d, 1, [(who[0], 10), (who[1], 20)])
    s.revoke_root(d.chain.guardian, 0)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    with reverts("NoActiveRoot"):
        s.claim(d.chain.relayer, req(tree1, who[0], 10))
    with reverts("RootAlreadyRevoked"):
        s.revoke_root(d.chain.guardian, 0)
    # The revoked epoch may be posted again; once active it cannot be revoked any more.
    tree1b = post(d, 1, [(who[0], 11), (who[1], 20)])
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    with reverts("RootAlreadyActive"):
        s.revoke_root(d.chain.guardian, 1)
    # A newer root revoked during its delay leaves the older active root in force.
    tree2 = post(d, 2, [(who[0], 30), (who[1], 40)])
    s.revoke_root(d.chain.guardian, 2)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    with reverts("InvalidProof"):
        s.claim(d.chain.relayer, req(tree2, who[0], 30))
    s.claim(d.chain.relayer, req(tree1b, who[0], 11))
    assert s.token_balance(who[0]) == 11
    active = s.active_root()
    assert active is not None and active.index == 1 and active.root == tree1b.root
    assert [r.revoked for r in s.roots()] == [True, False, True]
    with reverts("AccessControlUnauthorizedAccount"):
        s.revoke_root(d.chain.poster, 2)


def test_posting_rules(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(2, "post")
    tree = PayoutTree.build([(who[0], 300), (who[1], 200)])

    def attempt(sender: LocalAccount, *, epoch: int = 3, total: int = 500) -> PostResult:
        return s.post_root(
            sender, epoch=epoch, root=tree.root, cumulative_total=total, inputs_hash=INPUTS
        )

    with reverts("InsufficientFunding"):  # nothing funded yet
        attempt(d.chain.poster)
    s.fund(d.chain.admin, 499)
    with reverts("InsufficientFunding"):  # one short
        attempt(d.chain.poster)
    s.fund(d.chain.admin, 1)
    with reverts("AccessControlUnauthorizedAccount"):
        attempt(d.chain.relayer)
    first = attempt(d.chain.poster)
    assert first.tx is not None and first.index == 0
    again = attempt(d.chain.poster)  # idempotent: nothing sent
    assert again.tx is None and again.index == 0
    assert s.w3.eth.block_number == first.tx.block_number
    with pytest.raises(RootConflictError):
        attempt(d.chain.poster, total=499)
    with reverts("EpochNotIncreasing"):
        attempt(d.chain.poster, epoch=2)
    record = s.root_for_epoch(3)
    assert record is not None and record.root == tree.root and record.inputs_hash == INPUTS
    assert record.cumulative_total == 500 and record.epoch == 3 and not record.revoked
    posted_at = s.w3.eth.get_block(first.tx.block_number)["timestamp"]
    assert record.activated_at == posted_at + ACTIVATION_DELAY


def test_claims_cannot_exceed_the_root_total(deployed: Deployed) -> None:
    # A poster bug: the tree pays 150 but the root declares 100. Claims stop at the declared total.
    d, s = deployed, deployed.settlement
    who = peers(2, "over")
    s.fund(d.chain.admin, 1_000)
    tree = post(d, 1, [(who[0], 80), (who[1], 70)], total=100)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    s.claim(d.chain.relayer, req(tree, who[0], 80))
    with reverts("ClaimExceedsRootTotal"):
        s.claim(d.chain.relayer, req(tree, who[1], 70))


def test_an_older_root_pays_while_the_newest_waits(deployed: Deployed) -> None:
    # While epoch 2 waits out its delay, claims go to epoch 1 (the history walk, not the one-slot
    # fast path) and stop at epoch 1's total; once epoch 2 is active it pays the difference.
    d, s = deployed, deployed.settlement
    who = peers(3, "older")
    s.fund(d.chain.admin, 1_000)
    tree1 = post(d, 1, [(who[0], 50), (who[1], 40), (who[2], 30)], total=100)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    s.claim(d.chain.relayer, req(tree1, who[0], 50))
    tree2 = post(d, 2, [(who[0], 80), (who[1], 40), (who[2], 30)], total=150)
    active = s.active_root()
    assert active is not None and active.index == 0
    with reverts("InvalidProof"):  # epoch 2 is not claimable yet
        s.claim(d.chain.relayer, req(tree2, who[0], 80))
    s.claim(d.chain.relayer, req(tree1, who[1], 40))
    assert s.total_claimed() == 90
    with reverts("ClaimExceedsRootTotal"):  # 90 + 30 > epoch 1's declared 100
        s.claim(d.chain.relayer, req(tree1, who[2], 30))
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    s.claim_batch(d.chain.relayer, [req(tree2, who[0], 80), req(tree2, who[2], 30)])
    assert [s.token_balance(a) for a in who] == [80, 40, 30]
    assert s.total_claimed() == 150 and s.token_balance(s.address) == 850
    with reverts("InvalidProof"):
        s.claim(d.chain.relayer, req(tree1, who[2], 30))


def test_totals_may_not_decrease_and_revoking_restores_the_older_root(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(2, "decr")
    s.fund(d.chain.admin, 1_000)
    tree1 = post(d, 1, [(who[0], 60), (who[1], 40)])
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    s.claim(d.chain.relayer, req(tree1, who[0], 60))
    with reverts("TotalDecreasing"):  # cumulative payouts cannot shrink
        post(d, 2, [(who[0], 60), (who[1], 30)])
    post(d, 2, [(who[0], 500), (who[1], 400)])
    assert s.total_claimed() == 60
    s.revoke_root(d.chain.guardian, 1)
    assert s.total_claimed() == 60  # the paid-out sum moves back to epoch 1 unchanged
    with reverts("TotalDecreasing"):
        post(d, 2, [(who[0], 60), (who[1], 39)])
    tree2 = post(d, 2, [(who[0], 70), (who[1], 45)])  # lower than the revoked one: fine
    s.claim(d.chain.relayer, req(tree1, who[1], 40))  # epoch 1 still pays during the delay
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    s.claim_batch(d.chain.relayer, [req(tree2, a, amt) for a, amt in [(who[0], 70), (who[1], 45)]])
    assert [s.token_balance(a) for a in who] == [70, 45]
    assert s.total_claimed() == 115


def test_pause_stops_claims_only_admin_resumes(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(1, "pause")
    s.fund(d.chain.admin, 100)
    tree = post(d, 1, [(who[0], 100)])
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    with reverts("AccessControlUnauthorizedAccount"):
        s.pause(d.chain.relayer)
    s.pause(d.chain.guardian)
    assert s.paused()
    with reverts("EnforcedPause"):
        s.claim(d.chain.relayer, req(tree, who[0], 100))
    with reverts("EnforcedPause"):
        s.claim_batch(d.chain.relayer, [req(tree, who[0], 100)])
    with reverts("AccessControlUnauthorizedAccount"):
        s.unpause(d.chain.guardian)
    s.unpause(d.chain.admin)
    s.claim(d.chain.relayer, req(tree, who[0], 100))
    assert s.token_balance(who[0]) == 100


def test_pause_holds_across_posting_and_revoking(deployed: Deployed) -> None:
    # The fast path reads a copy of the pause flag in the reference root's word: a root posted or
    # restored by a revocation while paused must carry it.
    d, s = deployed, deployed.settlement
    who = peers(2, "pausepost")
    s.fund(d.chain.admin, 1_000)
    tree1 = post(d, 1, [(who[0], 10), (who[1], 20)])
    s.pause(d.chain.guardian)
    tree2 = post(d, 2, [(who[0], 30), (who[1], 40)])
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    with reverts("EnforcedPause"):
        s.claim(d.chain.relayer, req(tree2, who[0], 30))
    with reverts("EnforcedPause"):
        s.pause(d.chain.guardian)
    tree3 = post(d, 3, [(who[0], 50), (who[1], 60)])
    s.revoke_root(d.chain.guardian, 2)  # epoch 2 becomes the reference again, still paused
    with reverts("EnforcedPause"):
        s.claim(d.chain.relayer, req(tree2, who[0], 30))
    s.unpause(d.chain.admin)
    with reverts("ExpectedPause"):
        s.unpause(d.chain.admin)
    with reverts("InvalidProof"):
        s.claim(d.chain.relayer, req(tree3, who[0], 50))
    with reverts("InvalidProof"):
        s.claim(d.chain.relayer, req(tree1, who[0], 10))
    s.claim(d.chain.relayer, req(tree2, who[0], 30))
    assert s.token_balance(who[0]) == 30 and not s.paused()


def test_the_same_root_posted_for_two_epochs(deployed: Deployed) -> None:
    # An epoch with no new payouts repeats the previous root: one claim word serves both postings.
    d, s = deployed, deployed.settlement
    who = peers(2, "same")
    entries = [(who[0], 25), (who[1], 35)]
    s.fund(d.chain.admin, 100)
    tree = post(d, 1, entries)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    post(d, 2, entries)  # pending: the word now describes index 1, so epoch 1 pays via the walk
    slow = s.claim(d.chain.relayer, req(tree, who[0], 25))
    s.revoke_root(d.chain.guardian, 1)  # the word goes back to index 0
    fast = s.claim(d.chain.relayer, req(tree, who[1], 35))
    assert [e.root_index for e in s.claim_events(slow.tx_hash)] == [0]
    assert [e.root_index for e in s.claim_events(fast.tx_hash)] == [0]
    assert fast.gas_used < slow.gas_used  # one slot read instead of the walk
    assert s.total_claimed() == 60
    with reverts("EmptyBatch"):
        s.claim_batch(d.chain.relayer, [])
    with reverts("NothingToClaim"):
        s.claim(d.chain.relayer, req(tree, who[1], 35))
    assert [s.token_balance(a) for a in who] == [25, 35]


def test_recover_excess_keeps_promised_funds(deployed: Deployed) -> None:
    d, s = deployed, deployed.settlement
    who = peers(1, "excess")
    s.fund(d.chain.admin, 1_000)
    post(d, 1, [(who[0], 600)])
    with reverts("ExcessTooSmall"):
        s.recover_excess(d.chain.admin, d.chain.relayer.address, 401)
    with reverts("AccessControlUnauthorizedAccount"):
        s.recover_excess(d.chain.poster, d.chain.relayer.address, 1)
    s.recover_excess(d.chain.admin, d.chain.relayer.address, 400)
    assert s.token_balance(d.chain.relayer.address) == 400
    assert s.token_balance(s.address) == 600


def test_commitment_registry_anchors_the_beacon(deployed: Deployed) -> None:
    from audit.beacon import BeaconError, ChainBeacon
    from rewards.settlement import RegistryCommitmentLocator

    d, s = deployed, deployed.settlement
    peer, squatter = d.chain.poster, d.chain.relayer
    root = b"\x42" * 32
    assert s.commitment(peer.address, "run-a") is None
    squat = s.record_commitment(squatter, "run-a", b"\x43" * 32)  # another address, own slot
    tx = s.record_commitment(peer, "run-a", root)
    record = s.commitment(peer.address, "run-a")
    assert record is not None
    assert (record.root, record.block_number, record.committer) == (
        root,
        tx.block_number,
        peer.address,
    )
    with reverts("CommitmentExists"):
        s.record_commitment(peer, "run-a", b"\x44" * 32)
    with reverts("ZeroRoot"):
        s.record_commitment(peer, "run-b", bytes(32))
    # Without a committer the earliest record wins, whoever made it: callers must check it.
    first = s.find_commitment("run-a")
    assert first is not None and first.committer == squatter.address
    assert first.block_number == squat.block_number
    locator = RegistryCommitmentLocator(s, committer=peer.address)
    assert locator.commitment_block("run-a") == tx.block_number
    with pytest.raises(BeaconError):
        locator.commitment_block("run-unknown")
    beacon = ChainBeacon(d.chain.w3, run_id="run-a", locator=locator, delay=1)
    advance_time(d.chain.w3, 1)  # mines the beacon block
    value = beacon.fetch().value
    assert value == bytes(d.chain.w3.eth.get_block(tx.block_number + 1)["hash"])


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13])
def test_evm_verifies_every_proof_of_odd_shaped_trees(deployed: Deployed, size: int) -> None:
    d, s = deployed, deployed.settlement
    entries = [(a, 1 + i) for i, a in enumerate(peers(size, f"shape{size}"))]
    s.fund(d.chain.admin, sum(a for _, a in entries))
    tree = post(d, 1, entries)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    s.claim_batch(d.chain.relayer, [req(tree, a, amt) for a, amt in entries])
    assert [s.claimed(a) for a, _ in entries] == [amt for _, amt in entries]


def test_settlement_handle_rejects_an_address_without_code(deployed: Deployed) -> None:
    with pytest.raises(SettlementError, match="no contract"):
        Settlement(deployed.chain.w3, deployed.chain.relayer.address)


VECTORS = Path(__file__).resolve().parent / "vectors" / "payout"


@pytest.mark.parametrize("name", ["single", "size_2", "size_3", "size_5", "size_8", "size_33"])
def test_evm_accepts_openzeppelin_js_proofs(deployed: Deployed, name: str) -> None:
    # Roots and proofs made by @openzeppelin/merkle-tree itself (tests/vectors/payout/README.md).
    vector = json.loads((VECTORS / f"{name}.json").read_text())
    d, s = deployed, deployed.settlement
    entries = [(a, int(m)) for a, m in vector["entries"]]
    total = sum(m for _, m in entries)
    s.fund(d.chain.admin, total)
    root = bytes.fromhex(vector["root"][2:])
    s.post_root(d.chain.poster, epoch=1, root=root, cumulative_total=total, inputs_hash=INPUTS)
    advance_time(d.chain.w3, ACTIVATION_DELAY)
    reqs = [
        ClaimRequest(
            account=a, cumulative_amount=m, proof=tuple(bytes.fromhex(h[2:]) for h in proof)
        )
        for (a, m), proof in zip(entries, vector["proofs"], strict=True)
    ]
    s.claim_batch(d.chain.relayer, reqs)
    assert [s.token_balance(a) for a, _ in entries] == [m for _, m in entries]
    assert s.token_balance(s.address) == 0


def test_root_total_beyond_uint128_is_refused(deployed: Deployed) -> None:
    vector = json.loads((VECTORS / "extremes.json").read_text())
    total = sum(int(m) for _, m in vector["entries"])
    with reverts("TotalTooLarge"):
        deployed.settlement.post_root(
            deployed.chain.poster,
            epoch=1,
            root=bytes.fromhex(vector["root"][2:]),
            cumulative_total=min(total, 2**256 - 1),  # uint256 cannot hold the true sum
            inputs_hash=INPUTS,
        )


def test_a_taken_nonce_is_retried(deployed: Deployed, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process with the same key sent a transaction between our nonce read and our send:
    # simulate it by handing out the stale nonce once.
    d, s = deployed, deployed.settlement
    s.fund(d.chain.admin, 1)  # the admin's nonce is now > 0
    eth = d.chain.w3.eth
    real = type(eth).get_transaction_count
    stale = {"left": 1}

    def once_stale(self: object, address: str, block: str = "latest") -> int:
        n = int(real(self, address, block))  # type: ignore[arg-type]
        if stale["left"]:
            stale["left"] -= 1
            return n - 1
        return n

    monkeypatch.setattr(type(eth), "get_transaction_count", once_stale)
    s.fund(d.chain.admin, 2)
    assert stale["left"] == 0
    assert s.token_balance(s.address) == 3


def test_a_token_cannot_reenter_a_claim(chain: conftest_chain.Chain) -> None:
    # No reentrancy guard: claims write every effect before the transfer (checks-effects-
    # interactions), so a token that calls back mid-payment meets the updated state. It cannot
    # be paid twice, and a legitimate inner claim pays exactly once.
    art = json.loads(
        (Path(__file__).resolve().parents[1] / "rewards/contracts/test/artifacts.json").read_text()
    )["contracts"]["ReentrantToken"]
    w3, admin = chain.w3, chain.admin
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    created = send(w3, admin, factory.constructor(10**24, admin.address))
    address = w3.eth.get_transaction_receipt(created.tx_hash)["contractAddress"]  # type: ignore[arg-type]
    token = w3.eth.contract(address=address, abi=art["abi"])
    s, _ = Settlement.deploy(w3, admin, token=str(address), activation_delay=ACTIVATION_DELAY)
    who = peers(3, "reenter")
    s.fund(admin, 1_000)
    tree = PayoutTree.build([(who[0], 40), (who[1], 60), (who[2], 70)])
    s.post_root(admin, epoch=1, root=tree.root, cumulative_total=170, inputs_hash=INPUTS)
    advance_time(w3, ACTIVATION_DELAY)

    def arm(account_: str, amount: int) -> None:
        inner = s.contract.encode_abi("claim", [account_, amount, list(tree.proof_for(account_))])
        send(w3, admin, token.functions.arm(s.address, inner))

    arm(who[0], 40)  # the same claim again from inside its own payment
    with reverts("NothingToClaim"):
        s.claim(chain.relayer, req(tree, who[0], 40))
    assert s.claimed(who[0]) == 0 and s.token_balance(who[0]) == 0
    arm(who[1], 60)  # inside a batch: the second entry's effects are already written
    with reverts("NothingToClaim"):
        s.claim_batch(chain.relayer, [req(tree, who[0], 40), req(tree, who[1], 60)])
    assert s.claimed(who[0]) == s.claimed(who[1]) == 0
    arm(who[1], 60)  # another account's valid claim from inside a payment: each paid once
    s.claim(chain.relayer, req(tree, who[0], 40))
    assert [s.token_balance(a) for a in who[:2]] == [40, 60]
    assert [s.claimed(a) for a in who[:2]] == [40, 60]
    assert s.total_claimed() == 100 and s.token_balance(s.address) == 900
    send(w3, admin, token.functions.arm("0x" + "00" * 20, b""))
    s.claim(chain.relayer, req(tree, who[2], 70))
    assert s.token_balance(who[2]) == 70 and s.total_claimed() == 170


@pytest.fixture(scope="module")
def model_chain() -> tuple[Web3, LocalAccount]:
    # Built outside hypothesis's run: py-evm raises the recursion limit when it first starts.
    w3 = connect(None)
    admin = account("model-admin")
    fund_from_dev_account(w3, admin.address, 10**21)
    return w3, admin


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_cumulative_claims_follow_a_model(
    model_chain: tuple[Web3, LocalAccount], data: st.DataObject
) -> None:
    # Random top-ups over four epochs, random subsets claiming (some skip epochs): every account
    # always holds exactly its cumulative amount as of the epoch it last claimed in.
    w3, admin = model_chain
    token = deploy_token(w3, admin, supply=10**30, holder=admin.address)
    s, _ = Settlement.deploy(w3, admin, token=token, activation_delay=0)
    who = [Account.create().address for _ in range(3)]
    cumulative = dict.fromkeys(who, 0)
    held = dict.fromkeys(who, 0)
    for epoch in range(1, 5):
        rises = data.draw(st.lists(st.integers(0, 10**6), min_size=3, max_size=3))
        for a, rise in zip(who, rises, strict=True):
            cumulative[a] += rise
        entries = [(a, c) for a, c in cumulative.items() if c > 0]
        if not entries:
            continue
        s.fund(admin, sum(rises) or 1)
        tree = PayoutTree.build(entries)
        total = sum(c for _, c in entries)
        s.post_root(admin, epoch=epoch, root=tree.root, cumulative_total=total, inputs_hash=INPUTS)
        for a in data.draw(st.lists(st.sampled_from([a for a, _ in entries]), unique=True)):
            if cumulative[a] > held[a]:
                s.claim(admin, req(tree, a, cumulative[a]))
                held[a] = cumulative[a]
            else:
                with reverts("NothingToClaim"):
                    s.claim(admin, req(tree, a, cumulative[a]))
            assert s.token_balance(a) == held[a] == s.claimed(a)
    assert s.total_claimed() == sum(held.values())


MODEL_DELAY = 1_000  # far above the seconds a test takes: a root is clearly pending or active
OPS = ["post"] * 3 + ["advance"] * 3 + ["revoke"] * 2 + ["pause"] + ["claim"] * 7


@dataclass(kw_only=True, slots=True)
class ModelRoot:
    tree: PayoutTree
    total: int
    amounts: dict[str, int]
    activated_at: int
    revoked: bool = False


def expected_claim(
    roots: list[ModelRoot],
    now: int,
    paused: bool,
    claimed: dict[str, int],
    tree: PayoutTree,
    account_: str,
    amount: int,
) -> str:
    """The model's rule: pay the newest active root, within its declared total ('' = pays)."""
    live = [r for r in roots if not r.revoked and r.activated_at <= now]
    if paused:
        return "EnforcedPause"
    if not live:
        return "NoActiveRoot"
    if live[-1].tree.root != tree.root:
        return "InvalidProof"
    if amount <= claimed[account_]:
        return "NothingToClaim"
    if sum(claimed.values()) + amount - claimed[account_] > live[-1].total:
        return "ClaimExceedsRootTotal"
    return ""


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_roots_revocations_and_pauses_follow_a_model(
    model_chain: tuple[Web3, LocalAccount], data: st.DataObject
) -> None:
    # Random posts (some repeating the last root, some declaring less than their leaves), revokes
    # of pending roots, pauses, clock jumps and claims from the trees of both the active and the
    # newest root. The model predicts every outcome, error name and the paid-out sum, so the
    # claim word's fast path, the history walk and the moves of the reference root are all held
    # to one rule.
    w3, admin = model_chain
    token = deploy_token(w3, admin, supply=10**30, holder=admin.address)
    s, _ = Settlement.deploy(w3, admin, token=token, activation_delay=MODEL_DELAY)
    s.fund(admin, 10**9)
    who = [Account.create().address for _ in range(3)]
    cumulative = dict.fromkeys(who, 1)
    claimed = dict.fromkeys(who, 0)
    roots: list[ModelRoot] = []
    paused = False
    steps = ["post", "advance"] + [data.draw(st.sampled_from(OPS)) for _ in range(14)]
    for op in steps:
        now = int(w3.eth.get_block("latest")["timestamp"]) + 1  # the next block's, give or take
        if op == "post":
            for a in who:
                cumulative[a] += data.draw(st.sampled_from([0, 0, 5, 40]))
            live = [r.total for r in roots if not r.revoked]
            total = max(
                live[-1] if live else 0,
                sum(cumulative.values()) - data.draw(st.sampled_from([0, 0, 30])),
            )
            tree = PayoutTree.build(list(cumulative.items()))
            posted = s.post_root(
                admin,
                epoch=len(roots) + 1,
                root=tree.root,
                cumulative_total=total,
                inputs_hash=INPUTS,
            )
            record = s.root_at(posted.index)
            roots.append(
                ModelRoot(
                    tree=tree,
                    total=total,
                    amounts=dict(cumulative),
                    activated_at=record.activated_at,
                )
            )
        elif op == "advance":
            advance_time(w3, 2 * MODEL_DELAY)
        elif op == "revoke":
            pending = [i for i, r in enumerate(roots) if not r.revoked and r.activated_at > now]
            if pending:
                i = data.draw(st.sampled_from(pending))
                s.revoke_root(admin, i)
                roots[i].revoked = True
        elif op == "pause":
            (s.unpause if paused else s.pause)(admin)
            paused = not paused
        elif roots:
            a = data.draw(st.sampled_from(who))
            live = [r for r in roots if not r.revoked and r.activated_at <= now]
            source = data.draw(st.sampled_from([roots[-1], *live[-1:], *live[-1:], *roots]))
            amount = source.amounts[a]
            expected = expected_claim(roots, now, paused, claimed, source.tree, a, amount)
            if expected:
                with reverts(expected):
                    s.claim(admin, req(source.tree, a, amount))
            else:
                s.claim(admin, req(source.tree, a, amount))
                claimed[a] = amount
        assert s.total_claimed() == sum(claimed.values())
        assert [s.token_balance(a) for a in who] == [claimed[a] for a in who]


def test_advance_time_moves_the_clock_and_mines(chain: conftest_chain.Chain) -> None:
    w3 = chain.w3
    height, before = w3.eth.block_number, w3.eth.get_block("latest")["timestamp"]
    assert advance_time(w3, 0) >= before
    assert advance_time(w3, 100) >= before + 100
    assert w3.eth.block_number >= height + 2  # at least one new block per call


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
def test_a_root_is_claimable_once_due_even_if_no_block_was_mined(deployed: Deployed) -> None:
    # On a chain that mines on demand the latest block can predate the activation time; checks
    # must judge by the pending block, which the next transaction will actually be mined in.
    # Anvil only: eth-tester's time_travel mines a block, so it cannot leave the head stale.
    d, s = deployed, deployed.settlement
    who = peers(1, "due")
    s.fund(d.chain.admin, 10)
    tree = post(d, 1, [(who[0], 10)])
    latest = d.chain.w3.eth.get_block("latest")
    d.chain.w3.provider.make_request("evm_increaseTime", [ACTIVATION_DELAY + 1])  # type: ignore[arg-type]
    head = d.chain.w3.eth.get_block("latest")
    assert head["number"] == latest["number"]  # nothing mined: the head still says "pending"
    active = s.active_root()
    assert active is not None and active.root == tree.root
    s.claim(d.chain.relayer, req(tree, who[0], 10))
    assert s.token_balance(who[0]) == 10
