"""A peer's signed contribution to one round of a shared run (docs/protocol.md, "Shared runs").

Round r of peer P ends with a :class:`Contribution`: the theta_r root it started from, its previous
contribution and local state (the chain across rounds), its inner run's header and last manifest,
theta_H's root, the payload's sha256 and size, its new local state and its inner losses. P signs
(CONTRIBUTION, shared run id, record hash); the reader is strict like every record reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proofs.codec import (
    as_float,
    check_keys,
    get_bytes,
    get_int,
    get_list,
    get_str,
    record_hash,
    to_hex,
)
from proofs.hashing import Hash32
from proofs.signatures import PUBKEY_SIZE, Domain
from proofs.signed import Signed
from trainer.recipe import check_run_id
from trainer.sharedrun import (
    MAX_INNER_STEPS,
    MAX_SHARED_RUN_ID,
    SHARED_VERSION,
    Genesis,
    _finite,
    _hash32,
    _pubkey,
    _require,
    check_round,
    check_shared_run_id,
)

_HASH_FIELDS = (
    "genesis",
    "base_root",
    "prev_contribution",
    "prev_local_state",
    "inner_header",
    "inner_manifest",
    "final_state",
    "delta",
    "local_state",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Contribution:
    """What peer ``peer`` produced in round ``round``; see docs/protocol.md for each field."""

    version: int
    shared_run_id: str
    genesis: Hash32
    round: int
    peer: str
    pubkey: bytes
    base_root: Hash32
    prev_contribution: Hash32
    prev_local_state: Hash32
    inner_header: Hash32
    inner_manifest: Hash32
    final_state: Hash32
    delta: Hash32
    payload_bytes: int
    nnz: int
    local_state: Hash32
    losses: tuple[float, ...]

    def __post_init__(self) -> None:
        _require(self.version == SHARED_VERSION, f"contribution version must be {SHARED_VERSION}")
        check_shared_run_id(self.shared_run_id)
        check_round(self.round)
        check_run_id(self.peer)
        _pubkey(self.pubkey, "pubkey")
        for name in _HASH_FIELDS:
            _hash32(getattr(self, name), name)
        _require(0 <= self.nnz < 1 << 64 and 0 <= self.payload_bytes < 1 << 64, "sizes are u64")
        _require(
            1 <= len(self.losses) <= MAX_INNER_STEPS,
            f"losses: expected 1-{MAX_INNER_STEPS} values, got {len(self.losses)}",
        )
        for loss in self.losses:
            _finite(loss, "each inner loss")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "shared_run_id": self.shared_run_id,
            "round": self.round,
            "peer": self.peer,
            "pubkey": to_hex(self.pubkey),
            "payload_bytes": self.payload_bytes,
            "nnz": self.nnz,
            "losses": [float(x) for x in self.losses],
        }
        out.update({name: to_hex(getattr(self, name)) for name in _HASH_FIELDS})
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Contribution:
        check_keys(obj, "contribution", tuple(cls.__dataclass_fields__))
        losses = get_list(obj, "losses", max_items=MAX_INNER_STEPS)
        hashes = {name: Hash32(get_bytes(obj, name, 32)) for name in _HASH_FIELDS}
        return cls(
            version=get_int(obj, "version"),
            shared_run_id=get_str(obj, "shared_run_id", max_len=MAX_SHARED_RUN_ID),
            round=get_int(obj, "round"),
            peer=get_str(obj, "peer", max_len=64),
            pubkey=get_bytes(obj, "pubkey", PUBKEY_SIZE),
            payload_bytes=get_int(obj, "payload_bytes"),
            nnz=get_int(obj, "nnz"),
            losses=tuple(as_float(x, "losses") for x in losses),
            **hashes,
        )

    def hash(self) -> Hash32:
        return record_hash(self.to_json())

    def signing_context(self) -> str:
        return self.shared_run_id

    def signing_payload(self) -> bytes:
        return self.hash()


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedContribution(Signed[Contribution]):
    """A contribution and its peer's signature over (CONTRIBUTION, run id, record hash)."""

    KEY = "contribution"
    DOMAIN = Domain.CONTRIBUTION
    RECORD = Contribution

    contribution: Contribution

    def verify(self, pubkey: bytes | None = None) -> bool:
        """True when signed by ``pubkey`` (the record's own key by default); never raises."""
        return Signed.verify(self, self.contribution.pubkey if pubkey is None else pubkey)

    def verify_roster(self, genesis: Genesis) -> bool:
        """True when the record's peer is on ``genesis``'s roster with the record's key, and that
        key signed it. Never raises."""
        record = self.contribution
        key = genesis.peers.get(record.peer)
        return key is not None and key == record.pubkey and self.verify(key)
