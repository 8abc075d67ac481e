"""Beacons: randomness the peer could not know when it committed.

A beacon source yields a :class:`Beacon` (value plus a description anyone can use to look the value
up again). Two sources:

- :class:`StaticBeacon`: a value given on the command line (e.g. a drand round or a published
  lottery result the auditors agreed on). Trust rests on how that value was chosen.
- :class:`ChainBeacon`: the hash of a block mined *after* the block that recorded the run's
  commitment. The peer cannot predict it when it commits; a miner/validator could bias one block
  hash, hence ``delay`` (use a block several blocks later to raise the cost of grinding).

Where the commitment block comes from is a :class:`CommitmentLocator`: :class:`FixedCommitmentBlock`
takes it as given; ``audit/registry.py`` reads it from the settlement contract's commitment
registry (issue 6) and also checks that the recorded root is the run's final manifest hash.

A batch job needs one beacon per run, possibly in worker processes: a *beacon-for* is either a
picklable callable of the store URL (:class:`StaticBeaconFor`, :class:`ChainBeaconFor`) or a
:class:`BeaconForRun`, called with the run's :class:`RunCommitment` once the run is loaded and
authenticated (the registry beacon, which must compare roots).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, runtime_checkable

from audit.onchain import connect
from proofs.errors import VeritrainError

if TYPE_CHECKING:
    from web3 import Web3

log = logging.getLogger(__name__)

MIN_BEACON_BYTES = 16
MAX_BEACON_BYTES = 1024


class BeaconError(VeritrainError, ValueError):
    """A beacon value is malformed or cannot be read."""


class BeaconNotReadyError(BeaconError):
    """The block that gives the beacon has not been mined yet: try again later."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Beacon:
    """A beacon value and its origin (``source``: ``cli`` or ``chain:<chain id>:<block>``)."""

    value: bytes
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes):
            raise BeaconError("beacon value must be bytes")
        if not MIN_BEACON_BYTES <= len(self.value) <= MAX_BEACON_BYTES:
            raise BeaconError(
                f"beacon must hold {MIN_BEACON_BYTES}..{MAX_BEACON_BYTES} bytes "
                f"(too short is guessable), got {len(self.value)}"
            )


@runtime_checkable
class BeaconSource(Protocol):
    """Anything that produces the beacon for one run."""

    def fetch(self) -> Beacon:
        """Return the beacon; raise :class:`BeaconNotReadyError` if it does not exist yet."""
        ...


@runtime_checkable
class CommitmentLocator(Protocol):
    """Finds the block in which a run's commitment was recorded on chain (issue 6 supplies one)."""

    def commitment_block(self, run_id: str) -> int:
        """Block number of the record of ``run_id``; raise :class:`BeaconError` if unrecorded."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCommitment:
    """What a run commits to: its id and ``root``, the final manifest hash (the head of the signed
    hash chain that also seeds the sample). The on-chain registry must hold exactly this root."""

    run_id: str
    root: bytes


@runtime_checkable
class BeaconForRun(Protocol):
    """A per-run beacon that needs the loaded run's commitment (e.g. to check it on chain)."""

    def for_run(self, run: RunCommitment) -> Beacon:
        """The beacon of ``run``; raise :class:`BeaconError` (or its not-ready subclass)."""
        ...


BeaconFor: TypeAlias = Callable[[str], Beacon] | BeaconForRun
"""A batch job's beacon per run: a callable of the store URL, or a :class:`BeaconForRun`."""


def beacon_for_run(beacon_for: Beacon | BeaconFor, url: str, run: RunCommitment) -> Beacon:
    """The beacon ``beacon_for`` gives the run loaded from ``url`` whose commitment is ``run``
    (a :class:`Beacon` is its own value)."""
    if isinstance(beacon_for, Beacon):
        return beacon_for
    if isinstance(beacon_for, BeaconForRun):
        return beacon_for.for_run(run)
    return beacon_for(url)


def parse_beacon_hex(text: str) -> bytes:
    """Parse a 0x-prefixed (or bare) hex beacon given by a user; raise :class:`BeaconError`."""
    body = text[2:] if text.startswith(("0x", "0X")) else text
    try:
        value = bytes.fromhex(body)
    except ValueError as exc:
        raise BeaconError(f"beacon is not hex: {text[:40]!r}") from exc
    if not MIN_BEACON_BYTES <= len(value) <= MAX_BEACON_BYTES:
        raise BeaconError(f"beacon must hold {MIN_BEACON_BYTES}..{MAX_BEACON_BYTES} bytes")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class StaticBeacon:
    """A beacon value supplied directly (command line, config)."""

    value: bytes

    def fetch(self) -> Beacon:
        return Beacon(value=self.value, source="cli")

    @classmethod
    def from_hex(cls, text: str) -> StaticBeacon:
        return cls(value=parse_beacon_hex(text))


@dataclass(frozen=True, kw_only=True, slots=True)
class FixedCommitmentBlock:
    """A locator that already knows the commitment block (tests, or a block given by hand)."""

    block: int

    def commitment_block(self, run_id: str) -> int:
        return self.block


class ChainBeacon:
    """The hash of block ``commitment_block(run_id) + delay``, read through web3.

    ``delay`` >= 1: the commitment block's own hash is fixed by the very transaction the peer
    chose, so it must never serve as its beacon. ``confirmations`` asks for that many blocks on
    top of the beacon block before it is used, so a shallow reorg cannot swap it.
    """

    def __init__(
        self,
        web3: Web3,
        *,
        run_id: str,
        locator: CommitmentLocator,
        delay: int = 1,
        confirmations: int = 0,
    ) -> None:
        if delay < 1:
            raise BeaconError(f"delay must be >= 1 block after the commitment, got {delay}")
        if confirmations < 0:
            raise BeaconError(f"confirmations must be >= 0, got {confirmations}")
        self._web3 = web3
        self._run_id = run_id
        self._locator = locator
        self._delay = delay
        self._confirmations = confirmations

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ChainBeacon:
        """Connect to a JSON-RPC endpoint (``http(s)://``) and read the beacon from it."""
        return cls(connect(url), **kwargs)

    def beacon_block(self) -> int:
        """The number of the block whose hash is the beacon."""
        start = self._locator.commitment_block(self._run_id)
        if start < 0:
            raise BeaconError(f"commitment block must be >= 0, got {start}")
        return start + self._delay

    def fetch(self) -> Beacon:
        number = self.beacon_block()
        head = int(self._web3.eth.block_number)
        if head < number + self._confirmations:
            raise BeaconNotReadyError(
                f"beacon block {number} (+{self._confirmations} confirmations) not reached; "
                f"chain head is {head}"
            )
        block = self._web3.eth.get_block(number)
        block_hash = bytes(block["hash"])
        chain_id = int(self._web3.eth.chain_id)
        log.info("beacon for run %s: block %d on chain %d", self._run_id, number, chain_id)
        return Beacon(value=block_hash, source=f"chain:{chain_id}:{number}")


@dataclass(frozen=True, kw_only=True, slots=True)
class StaticBeaconFor:
    """The same command-line beacon for every run of a batch (picklable for worker processes)."""

    value: bytes

    def __call__(self, url: str) -> Beacon:
        return Beacon(value=self.value, source="cli")


@dataclass(frozen=True, kw_only=True, slots=True)
class ChainBeaconFor:
    """A chain beacon per run: the block hash ``delay`` blocks after ``commit_block`` on the
    JSON-RPC node at ``rpc_url``. The block is taken on trust: nothing checks what was recorded
    there (``audit.registry.RegistryBeaconFor`` looks it up and checks the root)."""

    rpc_url: str
    commit_block: int
    delay: int = 1
    confirmations: int = 0

    def __call__(self, url: str) -> Beacon:
        return ChainBeacon.from_url(
            self.rpc_url,
            run_id=url,
            locator=FixedCommitmentBlock(block=self.commit_block),
            delay=self.delay,
            confirmations=self.confirmations,
        ).fetch()
