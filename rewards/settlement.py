"""On-chain settlement: deploy, fund, record commitments, post payout roots, claim, read state.

Wraps the ``VeritrainSettlement`` contract (``rewards/contracts/``) with web3.py. Every write is a
locally signed transaction (the key never leaves this process), estimated first so a revert is
reported before anything is sent, and followed to its receipt. Reverts come back as
:class:`RevertError` carrying the contract's custom error decoded (``InvalidProof(account=...)``).

Posting is idempotent: posting an epoch's root again is a no-op; a different live root for an
already posted epoch is a :class:`RootConflictError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NewType

from web3 import Web3
from web3.logs import DISCARD

from audit.beacon import BeaconError
from audit.onchain import CommitmentRecord, Deployment, RegistryReader, run_id_bytes
from proofs.errors import VeritrainError
from rewards.chain import RevertError, TxResult, artifact, call_view, send

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount
    from web3.contract import Contract

log = logging.getLogger(__name__)

Wei = NewType("Wei", int)


class SettlementError(VeritrainError, RuntimeError):
    """A settlement operation failed (bad deployment file, unexpected chain state)."""


class RootConflictError(SettlementError, ValueError):
    """A different live root is already posted for this epoch."""


# ---------------------------------------------------------------------------------- records


@dataclass(frozen=True, kw_only=True, slots=True)
class RootRecord:
    """One entry of the contract's payout-root history."""

    index: int
    epoch: int
    root: bytes
    cumulative_total: int
    inputs_hash: bytes
    activated_at: int
    revoked: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class PostResult:
    """Outcome of :meth:`Settlement.post_root`; ``tx`` is None when the root was already posted."""

    index: int
    tx: TxResult | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimRequest:
    """One claim: ``account``'s cumulative amount in the active root and its proof."""

    account: str
    cumulative_amount: int
    proof: tuple[bytes, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimEvent:
    """A ``Claimed`` event: what one account was paid by a transaction."""

    account: str
    root_index: int
    amount: int
    cumulative_amount: int


def deploy_token(
    w3: Web3,
    sender: LocalAccount,
    *,
    supply: int,
    holder: str,
    name: str = "Veritrain Reward",
    symbol: str = "VTR",
) -> str:
    """Deploy the test ERC-20 (``RewardToken``) with ``supply`` minted to ``holder``; returns its
    address. For local chains and tests: production settles in an existing token."""
    art = artifact("RewardToken")
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    result = send(w3, sender, factory.constructor(name, symbol, supply, holder))
    return _created_address(w3, result)


def _created_address(w3: Web3, result: TxResult) -> str:
    address = w3.eth.get_transaction_receipt(result.tx_hash)["contractAddress"]  # type: ignore[arg-type]
    if address is None:
        raise SettlementError(f"transaction {result.tx_hash} created no contract")
    return Web3.to_checksum_address(address)


class Settlement:
    """A handle on one deployed ``VeritrainSettlement``: writes take the signing account."""

    def __init__(self, w3: Web3, address: str) -> None:
        self.w3 = w3
        self.address = Web3.to_checksum_address(address)
        if not w3.eth.get_code(self.address):
            raise SettlementError(f"no contract at {self.address} on chain {w3.eth.chain_id}")
        self.contract: Contract = w3.eth.contract(
            address=self.address, abi=artifact("VeritrainSettlement")["abi"]
        )
        self.token_address = Web3.to_checksum_address(call_view(self.contract.functions.token()))
        self.token: Contract = w3.eth.contract(
            address=self.token_address, abi=artifact("RewardToken")["abi"]
        )
        # The registry's reads are the auditor's (audit.onchain), shared rather than copied.
        self.registry = RegistryReader(w3, self.address, check_code=False)

    @classmethod
    def deploy(
        cls,
        w3: Web3,
        sender: LocalAccount,
        *,
        token: str,
        activation_delay: int,
        admin: str | None = None,
        poster: str | None = None,
        guardian: str | None = None,
    ) -> tuple[Settlement, TxResult]:
        """Deploy a settlement contract paying in ``token``; roles default to ``sender``."""
        if not 0 <= activation_delay < 2**48:
            raise SettlementError(
                f"activation delay must be in [0, 2**48) s, got {activation_delay}"
            )
        art = artifact("VeritrainSettlement")
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        me = sender.address
        ctor = factory.constructor(
            Web3.to_checksum_address(token),
            activation_delay,
            admin or me,
            poster or me,
            guardian or me,
        )
        result = send(w3, sender, ctor)
        return cls(w3, _created_address(w3, result)), result

    def deployment(self, block_number: int) -> Deployment:
        return Deployment(
            chain_id=int(self.w3.eth.chain_id),
            settlement=self.address,
            token=self.token_address,
            block_number=block_number,
        )

    # -------------------------------------------------------------- writes

    def fund(self, sender: LocalAccount, amount: int) -> TxResult:
        """Transfer ``amount`` reward tokens from ``sender`` to the contract."""
        return send(self.w3, sender, self.token.functions.transfer(self.address, amount))

    def record_commitment(self, sender: LocalAccount, run_id: str, root: bytes) -> TxResult:
        """Record ``root`` for ``run_id`` under ``sender``'s address (immutable once recorded)."""
        return send(
            self.w3, sender, self.contract.functions.recordCommitment(run_id_bytes(run_id), root)
        )

    def post_root(
        self,
        sender: LocalAccount,
        *,
        epoch: int,
        root: bytes,
        cumulative_total: int,
        inputs_hash: bytes,
    ) -> PostResult:
        """Post ``root`` for ``epoch``. Idempotent: if the same live root, total and inputs hash
        are already posted for ``epoch`` nothing is sent (``tx`` None). Raises
        :class:`RootConflictError` if a different live root holds the epoch, :class:`RevertError`
        if the contract refuses (e.g. ``InsufficientFunding``, ``EpochNotIncreasing``,
        ``TotalDecreasing``)."""
        existing = self.root_for_epoch(epoch)
        if existing is not None and not existing.revoked:
            same = (existing.root, existing.cumulative_total, existing.inputs_hash) == (
                bytes(root),
                cumulative_total,
                bytes(inputs_hash),
            )
            if same:
                log.info("epoch %d root already posted at index %d", epoch, existing.index)
                return PostResult(index=existing.index, tx=None)
            raise RootConflictError(
                f"epoch {epoch} already has root 0x{existing.root.hex()} "
                f"(total {existing.cumulative_total}) at index {existing.index}; "
                "a guardian must revoke it during its activation delay before a new one"
            )
        call = self.contract.functions.postRoot(epoch, root, cumulative_total, inputs_hash)
        tx = send(self.w3, sender, call)
        posted = self.root_for_epoch(epoch)
        if posted is None:
            raise SettlementError(f"root for epoch {epoch} not readable after {tx.tx_hash}")
        log.info("posted epoch %d root at index %d in %s", epoch, posted.index, tx.tx_hash)
        return PostResult(index=posted.index, tx=tx)

    def revoke_root(self, sender: LocalAccount, index: int) -> TxResult:
        return send(self.w3, sender, self.contract.functions.revokeRoot(index))

    def claim(self, sender: LocalAccount, request: ClaimRequest) -> TxResult:
        """Submit ``request`` (any sender; tokens go to ``request.account``)."""
        call = self.contract.functions.claim(
            Web3.to_checksum_address(request.account),
            request.cumulative_amount,
            [bytes(p) for p in request.proof],
        )
        return send(self.w3, sender, call)

    def claim_batch(self, sender: LocalAccount, requests: Sequence[ClaimRequest]) -> TxResult:
        """Submit several claims in one transaction; any bad entry reverts them all."""
        call = self.contract.functions.claimBatch(
            [Web3.to_checksum_address(r.account) for r in requests],
            [r.cumulative_amount for r in requests],
            [[bytes(p) for p in r.proof] for r in requests],
        )
        return send(self.w3, sender, call)

    def recover_excess(self, sender: LocalAccount, to: str, amount: int) -> TxResult:
        """Admin only: send tokens that no posted root ever promised to ``to``."""
        call = self.contract.functions.recoverExcess(Web3.to_checksum_address(to), amount)
        return send(self.w3, sender, call)

    def pause(self, sender: LocalAccount) -> TxResult:
        return send(self.w3, sender, self.contract.functions.pause())

    def unpause(self, sender: LocalAccount) -> TxResult:
        return send(self.w3, sender, self.contract.functions.unpause())

    # -------------------------------------------------------------- reads

    def claim_events(self, tx_hash: str) -> list[ClaimEvent]:
        """The ``Claimed`` events a mined transaction emitted (what was actually paid)."""
        receipt = self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        # The token's Transfer logs share the receipt: keep only this contract's Claimed events.
        events = self.contract.events.Claimed().process_receipt(receipt, errors=DISCARD)
        return [
            ClaimEvent(
                account=Web3.to_checksum_address(e["args"]["account"]),
                root_index=int(e["args"]["rootIndex"]),
                amount=int(e["args"]["amount"]),
                cumulative_amount=int(e["args"]["cumulativeAmount"]),
            )
            for e in events
            if e["address"] == self.address
        ]

    def root_at(self, index: int) -> RootRecord:
        r = call_view(self.contract.functions.rootAt(index))
        return RootRecord(
            index=index,
            root=bytes(r[0]),
            cumulative_total=int(r[1]),
            activated_at=int(r[2]),
            epoch=int(r[3]),
            revoked=bool(r[4]),
            inputs_hash=bytes(r[5]),
        )

    def roots(self) -> list[RootRecord]:
        """The whole root history, oldest first."""
        count = int(call_view(self.contract.functions.rootCount()))
        return [self.root_at(i) for i in range(count)]

    def root_for_epoch(self, epoch: int) -> RootRecord | None:
        found, index = call_view(self.contract.functions.rootIndexForEpoch(epoch))
        return self.root_at(int(index)) if found else None

    def active_root(self) -> RootRecord | None:
        """The root a claim sent now would use: the newest past its delay and not revoked, as
        of the pending block (the latest one may be old on a chain that mines on demand)."""
        try:
            index = call_view(self.contract.functions.activeRootIndex(), "pending")
        except RevertError as exc:
            if exc.name == "NoActiveRoot":
                return None
            raise
        return self.root_at(int(index))

    def claimed(self, account: str) -> int:
        """Cumulative amount already paid to ``account``."""
        return int(
            call_view(self.contract.functions.cumulativeClaimed(Web3.to_checksum_address(account)))
        )

    def token_balance(self, account: str) -> int:
        return int(call_view(self.token.functions.balanceOf(Web3.to_checksum_address(account))))

    def total_claimed(self) -> int:
        return int(call_view(self.contract.functions.totalClaimed()))

    def paused(self) -> bool:
        return bool(call_view(self.contract.functions.paused()))

    def commitment(self, committer: str, run_id: str) -> CommitmentRecord | None:
        """The commitment ``committer`` recorded for ``run_id``, or None."""
        return self.registry.commitment(committer, run_id)

    def find_commitment(self, run_id: str, *, from_block: int = 0) -> CommitmentRecord | None:
        """The earliest commitment recorded for ``run_id`` by anyone (from the event log), or
        None; see :meth:`audit.onchain.RegistryReader.find_commitment`."""
        return self.registry.find_commitment(run_id, from_block=from_block)


class RegistryCommitmentLocator:
    """The auditor's ``CommitmentLocator`` (audit/beacon.py) backed by the on-chain registry:
    ``commitment_block(run_id)`` is the block in which ``committer`` recorded the run."""

    def __init__(self, settlement: Settlement, *, committer: str | None = None) -> None:
        self._settlement = settlement
        self._committer = committer

    def commitment_block(self, run_id: str) -> int:
        if self._committer is not None:
            record = self._settlement.commitment(self._committer, run_id)
        else:
            record = self._settlement.find_commitment(run_id)
        if record is None:
            raise BeaconError(
                f"run {run_id!r} has no commitment in the registry at {self._settlement.address}"
            )
        return record.block_number
