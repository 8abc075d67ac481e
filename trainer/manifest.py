"""Step records, window manifests and the hash chain that links them to the run header.

Every training step leaves a :class:`StepRecord` whose ``prev`` is the hash of the record before it
(the first record's ``prev`` is the run header hash), so the chain runs through every step. Steps
are grouped in windows, one per state checkpoint: a :class:`WindowManifest` lists the window's
records and the state checkpoint reached at its end, carries the previous manifest's hash (the
header hash for window 0) and is BLS-signed once (signing costs ~0.18 s, so per window, not step).

Hashes are sha256 over the canonical JSON of ``to_json()`` (proofs.codec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proofs.codec import (
    as_float,
    check_keys,
    float_out,
    get_bytes,
    get_float,
    get_int,
    get_list,
    get_object,
    get_str,
    is_uint,
    record_hash,
    to_hex,
)
from proofs.errors import EncodingError
from proofs.hashing import Hash32, Root
from proofs.signatures import Domain, KeyPair
from proofs.signed import Signed

MANIFEST_VERSION = 1
MAX_RECORDS = 100_000
"""Step records in one window manifest (a window is ``checkpoint_every`` steps)."""
MAX_BATCH = 1 << 20
"""Sample indices in one step record."""
MAX_GROUPS = 4096
"""Learning rates in one step record (one per optimizer param group)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class StateRef:
    """A state checkpoint: the model/optimizer state *before* step ``step`` runs."""

    step: int
    root: Root
    leaf_count: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "root": to_hex(self.root),
            "leaf_count": self.leaf_count,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, obj: Any) -> StateRef:
        check_keys(obj, "state ref", ("step", "root", "leaf_count", "nbytes"))
        return cls(
            step=get_int(obj, "step"),
            root=Root(get_bytes(obj, "root", 32)),
            leaf_count=get_int(obj, "leaf_count"),
            nbytes=get_int(obj, "nbytes"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class StepRecord:
    """What one step committed to. ``grad_root`` is the Merkle root over encode_tensors of the raw
    parameter gradients (after backward, before clipping and the optimizer step)."""

    step: int
    replay_seed: int
    batch: tuple[int, ...]
    """Sample indices (corpus byte offsets for the reference trainer); may be empty."""
    loss: float
    lrs: tuple[float, ...]
    """Learning rate of each optimizer param group, as used by this step's optimizer step."""
    grad_root: Root
    grad_leaves: int
    grad_bytes: int
    prev: Hash32

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "replay_seed": self.replay_seed,
            "batch": list(self.batch),
            "loss": float_out(self.loss),
            "lrs": [float_out(x) for x in self.lrs],
            "grad_root": to_hex(self.grad_root),
            "grad_leaves": self.grad_leaves,
            "grad_bytes": self.grad_bytes,
            "prev": to_hex(self.prev),
        }

    @classmethod
    def from_json(cls, obj: Any) -> StepRecord:
        keys = ("step", "replay_seed", "batch", "loss", "lrs", "grad_root", "grad_leaves")
        check_keys(obj, "step record", (*keys, "grad_bytes", "prev"))
        batch = get_list(obj, "batch", max_items=MAX_BATCH)
        if not all(is_uint(i) for i in batch):
            raise EncodingError("batch: expected a list of ints in [0, 2^64)")
        return cls(
            step=get_int(obj, "step"),
            replay_seed=get_int(obj, "replay_seed"),
            batch=tuple(batch),
            loss=get_float(obj, "loss"),
            lrs=tuple(as_float(x, "lrs") for x in get_list(obj, "lrs", max_items=MAX_GROUPS)),
            grad_root=Root(get_bytes(obj, "grad_root", 32)),
            grad_leaves=get_int(obj, "grad_leaves"),
            grad_bytes=get_int(obj, "grad_bytes"),
            prev=Hash32(get_bytes(obj, "prev", 32)),
        )

    def hash(self) -> Hash32:
        return record_hash(self.to_json())


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowManifest:
    """Window ``window``: records for steps ``first_step .. first_step + len(records) - 1`` and
    the state checkpoint at ``first_step + len(records)``."""

    version: int
    run_id: str
    window: int
    first_step: int
    records: tuple[StepRecord, ...]
    state: StateRef
    prev: Hash32
    """Hash of the previous window's manifest, or of the run header for window 0."""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "window": self.window,
            "first_step": self.first_step,
            "records": [r.to_json() for r in self.records],
            "state": self.state.to_json(),
            "prev": to_hex(self.prev),
        }

    @classmethod
    def from_json(cls, obj: Any) -> WindowManifest:
        keys = ("version", "run_id", "window", "first_step", "records", "state", "prev")
        check_keys(obj, "window manifest", keys)
        version = get_int(obj, "version")
        if version != MANIFEST_VERSION:
            raise EncodingError(f"manifest version {version}, this code reads {MANIFEST_VERSION}")
        return cls(
            version=version,
            run_id=get_str(obj, "run_id"),
            window=get_int(obj, "window"),
            first_step=get_int(obj, "first_step"),
            records=tuple(
                StepRecord.from_json(r) for r in get_list(obj, "records", max_items=MAX_RECORDS)
            ),
            state=StateRef.from_json(get_object(obj, "state")),
            prev=Hash32(get_bytes(obj, "prev", 32)),
        )

    def hash(self) -> Hash32:
        return record_hash(self.to_json())

    def signing_context(self) -> str:
        return self.run_id

    def signing_payload(self) -> bytes:
        return self.hash()

    @property
    def end_step(self) -> int:
        """The step the window's state checkpoint resumes at."""
        return self.first_step + len(self.records)

    def spans_checkpoint(self, checkpoint_every: int) -> bool:
        """True when the window is empty or crosses a multiple of ``checkpoint_every``: the hook
        closes a window at every multiple (and at ``close()``), so an honest one never does. The
        header's interval, checked against the assignment, thereby bounds every window."""
        if not self.records:
            return True
        return self.first_step // checkpoint_every != (self.end_step - 1) // checkpoint_every


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedWindowManifest(Signed[WindowManifest]):
    """A manifest and the peer's BLS signature over (STEP_MANIFEST, run id, manifest hash)."""

    KEY = "manifest"
    DOMAIN = Domain.STEP_MANIFEST
    RECORD = WindowManifest

    manifest: WindowManifest


def sign_manifest(keypair: KeyPair, manifest: WindowManifest) -> SignedWindowManifest:
    """Sign ``manifest`` (~0.18 s with py_ecc). Raises SignatureError on a bad key."""
    return SignedWindowManifest.sign(keypair, manifest)
