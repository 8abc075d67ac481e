"""Read-only chain access, as much as the auditor's beacon needs and no more.

The auditor reads three things from a chain: a JSON-RPC node (:func:`connect`), the settlement
deployment record that says where the contract lives (:class:`Deployment`, the file
``python -m rewards deploy`` writes), and the contract's commitment registry
(:class:`RegistryReader`: a peer's record of a run and the earliest record by anyone). They live
here, the lowest layer that needs them, so that the layers only point down: ``rewards`` deploys
and writes the contract and builds on these (``rewards.chain.connect``,
``rewards.settlement.Settlement``), while nothing in ``audit`` imports ``rewards``.

The registry's ABI is the two entries the reads use, copied from the compiled contract
(``rewards/contracts/artifacts.json``); tests/test_audit_registry.py checks that they are equal.
web3 is imported only when a chain is used: the rest of the auditor starts without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proofs.errors import VeritrainError
from proofs.hashing import keccak256
from proofs.payout import normalize_address

if TYPE_CHECKING:
    from web3 import Web3
    from web3.contract import Contract

log = logging.getLogger(__name__)

DEPLOYMENT_VERSION = 1
RPC_TIMEOUT_S = 30

# The registry's entries of VeritrainSettlement's ABI, verbatim from the compiled artifact.
REGISTRY_ABI: tuple[dict[str, Any], ...] = (
    {
        "inputs": [
            {"internalType": "address", "name": "committer", "type": "address"},
            {"internalType": "bytes32", "name": "runId", "type": "bytes32"},
        ],
        "name": "commitment",
        "outputs": [
            {"internalType": "bytes32", "name": "root", "type": "bytes32"},
            {"internalType": "uint64", "name": "blockNumber", "type": "uint64"},
        ],
        "stateMutability": "view",
        "type": "function",
    },
    {
        "anonymous": False,
        "inputs": [
            {"indexed": True, "internalType": "address", "name": "committer", "type": "address"},
            {"indexed": True, "internalType": "bytes32", "name": "runId", "type": "bytes32"},
            {"indexed": False, "internalType": "bytes32", "name": "root", "type": "bytes32"},
            {"indexed": False, "internalType": "uint256", "name": "blockNumber", "type": "uint256"},
        ],
        "name": "CommitmentRecorded",
        "type": "event",
    },
)


class ChainError(VeritrainError, RuntimeError):
    """A chain backend is unreachable, absent or misbehaving."""


class DeploymentError(VeritrainError, ValueError):
    """A deployment record is malformed."""


def connect(url: str) -> Web3:
    """A Web3 for the ``http(s)://`` JSON-RPC endpoint ``url``. Raises :class:`ChainError` for
    another scheme or an endpoint that does not answer."""
    if not url.startswith(("http://", "https://")):
        raise ChainError(f"chain URL must be http(s)://..., got {url!r}")
    from web3 import Web3

    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": RPC_TIMEOUT_S}))
    if not w3.is_connected():
        raise ChainError(
            f"no JSON-RPC node answers at {url} (start one with `python -m rewards chain`)"
        )
    return w3


def run_id_bytes(run_id: str) -> bytes:
    """The registry key of a run: keccak256 of its UTF-8 id, whatever the id looks like."""
    return bytes(keccak256(run_id.encode("utf-8")))


def round_registry_id(shared_run_id: str, r: int) -> str:
    """The registry run id under which a shared run's round ``r`` record hash is committed:
    ``shared/<shared run id>/r<round, 6 digits>``. Solo run ids cannot contain ``/``, so the two
    never collide; the block of that commitment anchors the round's audit beacon."""
    if r < 0:
        raise ValueError(f"round must be >= 0, got {r}")
    return f"shared/{shared_run_id}/r{r:06d}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Deployment:
    """Where the contracts live; saved as JSON so separate commands find them."""

    chain_id: int
    settlement: str
    token: str
    block_number: int

    def to_json(self) -> str:
        body: dict[str, object] = {
            "version": DEPLOYMENT_VERSION,
            "chain_id": self.chain_id,
            "settlement": self.settlement,
            "token": self.token,
            "block_number": self.block_number,
        }
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        """Parse a record strictly; any defect raises :class:`DeploymentError`."""
        try:
            body = json.loads(text)
            if not isinstance(body, dict) or body.get("version") != DEPLOYMENT_VERSION:
                raise DeploymentError("not a version-1 deployment record")
            return cls(
                chain_id=_count(body["chain_id"]),
                settlement=normalize_address(body["settlement"]),  # EIP-55 checked if mixed case
                token=normalize_address(body["token"]),
                block_number=_count(body["block_number"]),
            )
        except DeploymentError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DeploymentError(f"malformed deployment record: {exc}") from exc


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeploymentError(f"expected a non-negative integer, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class CommitmentRecord:
    """A run's commitment as the registry holds it: the block is the auditors' beacon anchor."""

    committer: str
    run_id: bytes
    root: bytes
    block_number: int


class RegistryReader:
    """The commitment registry of the settlement contract at ``address``, read-only.

    Raises :class:`ChainError` when no contract is there (``check_code=False`` skips that read,
    for a caller that has just made it)."""

    def __init__(self, w3: Web3, address: str, *, check_code: bool = True) -> None:
        from web3 import Web3

        self.w3 = w3
        self.address = Web3.to_checksum_address(address)
        if check_code and not w3.eth.get_code(self.address):
            raise ChainError(f"no contract at {self.address} on chain {w3.eth.chain_id}")
        self._contract: Contract = w3.eth.contract(address=self.address, abi=list(REGISTRY_ABI))

    def commitment(self, committer: str, run_id: str) -> CommitmentRecord | None:
        """The commitment ``committer`` recorded for ``run_id``, or None."""
        from web3 import Web3

        key = run_id_bytes(run_id)
        who = Web3.to_checksum_address(committer)
        root, block = self._contract.functions.commitment(who, key).call()
        if int(block) == 0:
            return None
        return CommitmentRecord(
            committer=who, run_id=key, root=bytes(root), block_number=int(block)
        )

    def find_commitment(self, run_id: str, *, from_block: int = 0) -> CommitmentRecord | None:
        """The earliest commitment recorded for ``run_id`` by anyone (from the event log), or
        None. Use :meth:`commitment` when the committer is known: a log scan trusts no one's
        address, so a caller must still check that the committer is the run's peer."""
        from web3 import Web3

        event = self._contract.events.CommitmentRecorded()
        logs = event.get_logs(
            from_block=from_block, argument_filters={"runId": run_id_bytes(run_id)}
        )
        if not logs:
            return None
        first = min(logs, key=lambda e: (e["blockNumber"], e["logIndex"]))
        return CommitmentRecord(
            committer=Web3.to_checksum_address(first["args"]["committer"]),
            run_id=bytes(first["args"]["runId"]),
            root=bytes(first["args"]["root"]),
            block_number=int(first["args"]["blockNumber"]),
        )
