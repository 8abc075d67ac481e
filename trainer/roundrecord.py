"""The aggregator's signed, hash-chained round record: which contributions round r applied.

Round r's record names the state it started from (theta_r), every contribution it included (in
aggregation order: by the peer's public key bytes), every contribution file it excluded and why
(sorted by file), the hash of the dense update it applied and the root of theta_{r+1}. Its
``prev`` is round r-1's record hash (the genesis hash for round 0), so the records form one chain
from the genesis. Signed by the genesis's aggregator key under Domain.ROUND.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Any

from proofs.codec import (
    as_float,
    as_object,
    check_keys,
    float_out,
    get_bytes,
    get_float,
    get_int,
    get_list,
    get_str,
    record_hash,
    to_hex,
)
from proofs.errors import EncodingError
from proofs.hashing import Hash32
from proofs.signatures import Domain
from proofs.signed import Signed
from trainer.recipe import check_run_id
from trainer.sharedrun import (
    MAX_PEERS,
    MAX_SHARED_RUN_ID,
    SHARED_VERSION,
    ZERO32,
    Genesis,
    check_round,
    check_shared_run_id,
)

EXCLUSION_REASONS = (
    "unreadable",
    "signature",
    "unregistered",
    "wrong-run",
    "wrong-round",
    "misnamed",
    "stale",
    "missing-payload",
    "malformed-payload",
    "missing-inner-run",
    "duplicate",
    "norm",
    "probe",
)
MAX_EXCLUDED = 4096
MAX_DETAIL = 512
MAX_FILE = 256
"""Characters of an excluded file's label (see :func:`file_label`)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise EncodingError(message)


def _hash32(value: bytes, what: str) -> None:
    _require(isinstance(value, bytes) and len(value) == 32, f"{what} must be 32 bytes")


def _opt_float(obj: Any, key: str) -> float | None:
    value = obj[key]
    return None if value is None else as_float(value, key)


def file_label(peer_folder: str, name: str) -> str:
    """How a round record names the contribution file ``contributions/<peer_folder>/<name>``:
    ``"<peer_folder>/<name>"``, or, when that is over MAX_FILE characters (names are whatever a
    peer wrote), its first 190 characters, ``"~"`` and the sha256 hex of the whole label, so the
    label stays bounded and still tells files apart."""
    full = f"{peer_folder}/{name}"
    if len(full) <= MAX_FILE:
        return full
    digest = hashlib.sha256(full.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{full[:190]}~{digest}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Included:
    """A contribution applied in the round: its record hash, payload hash, norm, probe loss."""

    peer: str
    contribution: Hash32
    delta: Hash32
    norm: float
    probe_loss: float | None

    def __post_init__(self) -> None:
        check_run_id(self.peer)
        _hash32(self.contribution, "included contribution")
        _hash32(self.delta, "included delta")
        _require(
            math.isfinite(self.norm) and self.norm >= 0, f"norm must be finite, >= 0: {self.norm}"
        )
        _require(
            self.probe_loss is None or math.isfinite(self.probe_loss),
            f"an included contribution's probe loss is finite, got {self.probe_loss}",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "contribution": to_hex(self.contribution),
            "delta": to_hex(self.delta),
            "norm": self.norm,
            "probe_loss": self.probe_loss,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Included:
        check_keys(obj, "included", tuple(cls.__dataclass_fields__))
        return cls(
            peer=get_str(obj, "peer", max_len=64),
            contribution=Hash32(get_bytes(obj, "contribution", 32)),
            delta=Hash32(get_bytes(obj, "delta", 32)),
            norm=get_float(obj, "norm"),
            probe_loss=_opt_float(obj, "probe_loss"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Excluded:
    """A contribution file the round did not apply, and why. Fields the aggregator could not
    establish (an unreadable record has no peer) are None; ``file_hash`` is the sha256 of the
    file's bytes (ZERO32 when they could not be read)."""

    file: str
    file_hash: Hash32
    peer: str | None
    contribution: Hash32 | None
    reason: str
    detail: str
    built_on: int | None
    """For "stale": the round whose theta the contribution started from (None: unknown)."""
    norm: float | None
    probe_loss: float | None
    """Non-finite values are kept (a probe that diverged): written as "NaN"/"Infinity"."""

    def __post_init__(self) -> None:
        _require(0 < len(self.file) <= MAX_FILE, f"file must be 1-{MAX_FILE} characters")
        _hash32(self.file_hash, "file_hash")
        if self.peer is not None:
            check_run_id(self.peer)
        if self.contribution is not None:
            _hash32(self.contribution, "excluded contribution")
        _require(
            self.reason in EXCLUSION_REASONS,
            f"reason must be one of {', '.join(EXCLUSION_REASONS)}, got {self.reason!r:.40}",
        )
        _require(len(self.detail) <= MAX_DETAIL, f"detail is over {MAX_DETAIL} characters")
        if self.built_on is not None:
            check_round(self.built_on, "built_on")

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "file_hash": to_hex(self.file_hash),
            "peer": self.peer,
            "contribution": None if self.contribution is None else to_hex(self.contribution),
            "reason": self.reason,
            "detail": self.detail,
            "built_on": self.built_on,
            "norm": None if self.norm is None else float_out(self.norm),
            "probe_loss": None if self.probe_loss is None else float_out(self.probe_loss),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Excluded:
        check_keys(obj, "excluded", tuple(cls.__dataclass_fields__))
        return cls(
            file=get_str(obj, "file", max_len=MAX_FILE),
            file_hash=Hash32(get_bytes(obj, "file_hash", 32)),
            peer=None if obj["peer"] is None else get_str(obj, "peer", max_len=64),
            contribution=(
                None if obj["contribution"] is None else Hash32(get_bytes(obj, "contribution", 32))
            ),
            reason=get_str(obj, "reason", max_len=32),
            detail=get_str(obj, "detail", max_len=MAX_DETAIL),
            built_on=None if obj["built_on"] is None else get_int(obj, "built_on"),
            norm=_opt_float(obj, "norm"),
            probe_loss=_opt_float(obj, "probe_loss"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundRecord:
    """Round ``round``: theta_r (``base_root``) -> theta_{r+1} (``new_root``)."""

    version: int
    shared_run_id: str
    genesis: Hash32
    round: int
    prev: Hash32
    """Round r-1's record hash; the genesis hash for round 0."""
    base_root: Hash32
    opened_at: int
    closed_at: int
    included: tuple[Included, ...]
    """In aggregation order: ascending peer public key bytes (check_roster checks it)."""
    excluded: tuple[Excluded, ...]
    """Strictly ascending by file."""
    base_probe_loss: float | None
    aggregate: Hash32
    """sha256 of the float32 little-endian bytes of the dense update u; ZERO32 if carried over."""
    new_root: Hash32
    carried_over: bool
    """True when too few contributions were included: theta_{r+1} = theta_r."""

    def __post_init__(self) -> None:
        _require(self.version == SHARED_VERSION, f"round record version must be {SHARED_VERSION}")
        check_shared_run_id(self.shared_run_id)
        check_round(self.round)
        for name in ("genesis", "prev", "base_root", "aggregate", "new_root"):
            _hash32(getattr(self, name), name)
        _require(
            self.round > 0 or self.prev == self.genesis,
            "round 0's prev must be the genesis hash",
        )
        _require(
            0 <= self.opened_at <= self.closed_at < 1 << 64,
            f"need 0 <= opened_at <= closed_at, got {self.opened_at} and {self.closed_at}",
        )
        _require(len(self.included) <= MAX_PEERS, f"more than {MAX_PEERS} included")
        _require(len(self.excluded) <= MAX_EXCLUDED, f"more than {MAX_EXCLUDED} excluded")
        peers = [i.peer for i in self.included]
        _require(len(set(peers)) == len(peers), "a peer is included twice")
        files = [e.file for e in self.excluded]
        _require(
            all(a < b for a, b in itertools.pairwise(files)),
            "excluded files must be strictly ascending",
        )
        if self.base_probe_loss is not None:
            _require(math.isfinite(self.base_probe_loss), "base_probe_loss must be finite")
        if self.carried_over:
            _require(
                self.aggregate == ZERO32 and self.new_root == self.base_root,
                "a carried-over round has aggregate ZERO32 and new_root == base_root",
            )
        else:
            _require(
                bool(self.included) and self.aggregate != ZERO32,
                "an applied round includes contributions and has an aggregate hash",
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "shared_run_id": self.shared_run_id,
            "genesis": to_hex(self.genesis),
            "round": self.round,
            "prev": to_hex(self.prev),
            "base_root": to_hex(self.base_root),
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "included": [i.to_json() for i in self.included],
            "excluded": [e.to_json() for e in self.excluded],
            "base_probe_loss": self.base_probe_loss,
            "aggregate": to_hex(self.aggregate),
            "new_root": to_hex(self.new_root),
            "carried_over": self.carried_over,
        }

    @classmethod
    def from_json(cls, obj: Any) -> RoundRecord:
        check_keys(obj, "round record", tuple(cls.__dataclass_fields__))
        included = get_list(obj, "included", max_items=MAX_PEERS)
        excluded = get_list(obj, "excluded", max_items=MAX_EXCLUDED)
        carried = obj["carried_over"]
        _require(isinstance(carried, bool), f"carried_over: expected a bool, got {carried!r:.40}")
        return cls(
            version=get_int(obj, "version"),
            shared_run_id=get_str(obj, "shared_run_id", max_len=MAX_SHARED_RUN_ID),
            genesis=Hash32(get_bytes(obj, "genesis", 32)),
            round=get_int(obj, "round"),
            prev=Hash32(get_bytes(obj, "prev", 32)),
            base_root=Hash32(get_bytes(obj, "base_root", 32)),
            opened_at=get_int(obj, "opened_at"),
            closed_at=get_int(obj, "closed_at"),
            included=tuple(Included.from_json(as_object(i, "included")) for i in included),
            excluded=tuple(Excluded.from_json(as_object(e, "excluded")) for e in excluded),
            base_probe_loss=_opt_float(obj, "base_probe_loss"),
            aggregate=Hash32(get_bytes(obj, "aggregate", 32)),
            new_root=Hash32(get_bytes(obj, "new_root", 32)),
            carried_over=carried,
        )

    def hash(self) -> Hash32:
        return record_hash(self.to_json())

    def signing_context(self) -> str:
        return self.shared_run_id

    def signing_payload(self) -> bytes:
        return self.hash()

    def check_roster(self, genesis: Genesis) -> list[str]:
        """How this record disagrees with ``genesis``: run id, genesis hash, included peers
        that are not on the roster or not in ascending public-key order. Empty when none."""
        problems = []
        if self.shared_run_id != genesis.shared_run_id:
            problems.append(f"shared run id {self.shared_run_id}, genesis {genesis.shared_run_id}")
        if self.genesis != genesis.hash():
            problems.append("genesis hash differs from the genesis's")
        unknown = [i.peer for i in self.included if i.peer not in genesis.peers]
        if unknown:
            problems.append(f"included peers not on the roster: {', '.join(unknown[:5])}")
        else:
            keys = [genesis.peers[i.peer] for i in self.included]
            if keys != sorted(keys):
                problems.append("included contributions are not in public-key order")
        return problems


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedRoundRecord(Signed[RoundRecord]):
    """A round record and the aggregator's signature over (ROUND, run id, record hash).
    Verify with ``verify(genesis.aggregator)``."""

    KEY = "round"
    DOMAIN = Domain.ROUND
    RECORD = RoundRecord

    round: RoundRecord
