"""The on-chain commitment registry as the auditor's beacon source.

A peer records ``(run id, root)`` in the settlement contract from its own address
(``python -m rewards commit-run RUN_ID ROOT``); the root must be the run's **final manifest hash**
(``audit.fetch.load_run(store).final_hash``, the head of the signed hash chain that also seeds the
sample). The beacon is the hash of block ``N + delay``, ``N`` being the block of that record.

Before using the block, :class:`RegistryBeacon` checks the record against the run the auditor
loaded: a record of another root is refused (:class:`CommitmentMismatchError`), so a peer that
records early and keeps committing steps afterwards (or re-signs a different run under the same
id) cannot know the beacon while it still chooses what it commits. No record is refused too
(:class:`UnrecordedRunError`), and so is a beacon block not yet mined
(:class:`~audit.beacon.BeaconNotReadyError`).

Whose record counts: the run header names the peer's BLS key but no payout address, so the
auditor names the committer (``--committer ADDR``). Without one, the earliest record of the run
id by anyone is used (an event-log scan): its root must still match, so a squatter can block the
audit (the peer's own record then needs ``--committer``) but cannot move the beacon to a block
before the run's final hash existed.

The registry is read through :mod:`audit.onchain` (a JSON-RPC connection, the deployment record,
the contract's two registry reads); ``rewards.settlement.Settlement`` serves as a registry too,
with the same reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from audit.beacon import (
    Beacon,
    BeaconError,
    ChainBeacon,
    FixedCommitmentBlock,
    RunCommitment,
)
from audit.onchain import CommitmentRecord, Deployment, RegistryReader, connect

if TYPE_CHECKING:
    from web3 import Web3

log = logging.getLogger(__name__)


class UnrecordedRunError(BeaconError):
    """The registry holds no commitment of the run (by the committer asked for)."""


class CommitmentMismatchError(BeaconError):
    """The registry's root for the run is not the run's final manifest hash."""


class CommitmentRegistry(Protocol):
    """What the beacon reads from the registry: :class:`audit.onchain.RegistryReader` provides it
    (and so does ``rewards.settlement.Settlement``, which builds on it)."""

    @property
    def w3(self) -> Web3: ...

    @property
    def address(self) -> str: ...

    def commitment(self, committer: str, run_id: str) -> CommitmentRecord | None: ...

    def find_commitment(self, run_id: str, *, from_block: int = 0) -> CommitmentRecord | None: ...


class RegistryBeacon:
    """The beacon of one loaded run: the hash of block ``record block + delay``, after checking
    that the registry's record of ``run`` (by ``committer``, else the earliest by anyone) holds
    ``run.root``. ``delay`` and ``confirmations`` are as in :class:`~audit.beacon.ChainBeacon`."""

    def __init__(
        self,
        registry: CommitmentRegistry,
        *,
        run: RunCommitment,
        committer: str | None = None,
        delay: int = 1,
        confirmations: int = 0,
        from_block: int = 0,
    ) -> None:
        if delay < 1:
            raise BeaconError(f"delay must be >= 1 block after the commitment, got {delay}")
        self._registry = registry
        self._run = run
        self._committer = committer
        self._delay = delay
        self._confirmations = confirmations
        self._from_block = from_block

    def record(self) -> CommitmentRecord:
        """The registry's record of the run, checked; raises :class:`UnrecordedRunError` or
        :class:`CommitmentMismatchError`."""
        run_id, where = self._run.run_id, f"registry {self._registry.address}"
        if self._committer is not None:
            record = self._registry.commitment(self._committer, run_id)
            by = f"by {self._committer}"
        else:
            record = self._registry.find_commitment(run_id, from_block=self._from_block)
            by = "by anyone"
        if record is None:
            raise UnrecordedRunError(
                f"run {run_id!r} has no commitment {by} in {where}: the peer must record its "
                f"final manifest hash 0x{self._run.root.hex()} (python -m rewards commit-run)"
            )
        if bytes(record.root) != bytes(self._run.root):
            hint = "" if self._committer is not None else " (give the peer's address: --committer)"
            raise CommitmentMismatchError(
                f"run {run_id!r}: expected the run's final manifest hash 0x{self._run.root.hex()}, "
                f"{where} has 0x{bytes(record.root).hex()} recorded by {record.committer} in "
                f"block {record.block_number}{hint}"
            )
        return record

    def fetch(self) -> Beacon:
        record = self.record()
        chain = ChainBeacon(
            self._registry.w3,
            run_id=self._run.run_id,
            locator=FixedCommitmentBlock(block=record.block_number),
            delay=self._delay,
            confirmations=self._confirmations,
        ).fetch()
        # "chain:<chain id>:<beacon block>" plus what anyone needs to look the record up again.
        source = (
            f"{chain.source}:registry:{self._registry.address}:"
            f"{record.committer}:{record.block_number}"
        )
        log.info("run %s: registry record in block %d", self._run.run_id, record.block_number)
        return Beacon(value=chain.value, source=source)


@dataclass(frozen=True, kw_only=True, slots=True)
class RegistryBeaconFor:
    """A registry beacon per run for batch jobs (picklable: worker processes connect anew).

    ``rpc_url`` is a JSON-RPC node of chain ``chain_id`` holding the settlement contract at
    ``settlement``; ``from_block`` bounds the event-log scan used without ``committer``.
    """

    rpc_url: str
    settlement: str
    chain_id: int
    committer: str | None = None
    delay: int = 1
    confirmations: int = 0
    from_block: int = 0

    def __post_init__(self) -> None:
        if self.delay < 1:
            raise BeaconError(f"delay must be >= 1 block after the commitment, got {self.delay}")
        if self.confirmations < 0:
            raise BeaconError(f"confirmations must be >= 0, got {self.confirmations}")

    @classmethod
    def from_deployment(
        cls,
        rpc_url: str,
        deployment: Deployment,
        *,
        committer: str | None = None,
        delay: int = 1,
        confirmations: int = 0,
    ) -> RegistryBeaconFor:
        """Read the registry of a deployment record (``--deployment FILE``, as written by
        ``python -m rewards deploy``)."""
        return cls(
            rpc_url=rpc_url,
            settlement=deployment.settlement,
            chain_id=deployment.chain_id,
            committer=committer,
            delay=delay,
            confirmations=confirmations,
            from_block=deployment.block_number,
        )

    def for_run(self, run: RunCommitment) -> Beacon:
        w3 = connect(self.rpc_url)
        chain_id = int(w3.eth.chain_id)
        if chain_id != self.chain_id:
            raise BeaconError(
                f"{self.rpc_url} is chain {chain_id}, the registry is on chain {self.chain_id}"
            )
        return RegistryBeacon(
            RegistryReader(w3, self.settlement),
            run=run,
            committer=self.committer,
            delay=self.delay,
            confirmations=self.confirmations,
            from_block=self.from_block,
        ).fetch()
