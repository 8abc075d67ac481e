"""The run header (recipe): everything needed to rebuild and re-check a run, signed by the peer.

The header names the model (registry name + JSON config), the optimizer (a ``torch.optim`` class
and the parameter names of each param group, in optimizer order), gradient clipping, the dataset
commitment, batch shape, dtype, device, versions, determinism flags, the run seed, the checkpoint
interval, the encoding chunk size, the initial state checkpoint and the peer's BLS public key.
Its hash (sha256 of canonical JSON) roots the hash chain of step records and manifests.

Gradient clipping: the *raw* gradient is committed (what an auditor recomputes); the clip in
``grad_clip`` is applied after the commitment and before the optimizer step, and replay re-applies
it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proofs.errors import EncodingError
from proofs.hashing import Hash32
from proofs.signatures import Domain, KeyPair, sign, verify
from trainer.data import CorpusCommitment
from trainer.jsonform import (
    check_keys,
    get_bytes,
    get_int,
    get_list,
    get_object,
    get_str,
    hex_bytes,
    record_hash,
)
from trainer.manifest import StateRef

HEADER_VERSION = 1
VERITRAIN_VERSION = "0.1.0"


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """A ``torch.optim`` optimizer: class name, constructor defaults, and param groups by name."""

    name: str
    """Class name inside ``torch.optim`` (e.g. "AdamW"); replay resolves nothing else."""
    defaults: Mapping[str, Any]
    groups: tuple[tuple[str, ...], ...]
    """Parameter names of each param group, in the optimizer's order."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "defaults": dict(self.defaults),
            "groups": [list(g) for g in self.groups],
        }

    @classmethod
    def from_json(cls, obj: Any) -> OptimizerSpec:
        check_keys(obj, "optimizer", ("name", "defaults", "groups"))
        groups = get_list(obj, "groups")
        if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
            raise EncodingError("optimizer.groups: expected lists of parameter names")
        return cls(
            name=get_str(obj, "name"),
            defaults=dict(get_object(obj, "defaults")),
            groups=tuple(tuple(g) for g in groups),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RunHeader:
    """The recipe of one run. ``model`` is "" for a user model outside the registry."""

    version: int
    run_id: str
    run_seed: int
    model: str
    model_config: Mapping[str, Any]
    optimizer: OptimizerSpec
    grad_clip: float | None
    """Max L2 norm of all gradients (``clip_grad_norm_``), applied after commit; None = off."""
    dataset: CorpusCommitment | None
    batch_size: int
    context: int
    dtype: str
    device: str
    torch_version: str
    veritrain_version: str
    determinism: Mapping[str, Any]
    checkpoint_every: int
    chunk_size: int
    initial_state: StateRef
    pubkey: bytes
    aliases: Mapping[str, str]
    """State-dict keys that alias a parameter (tied weights): key -> parameter name."""

    def __post_init__(self) -> None:
        if not self.run_id or len(self.run_id) > 200:
            raise EncodingError(f"run_id must be 1..200 characters, got {self.run_id!r}")
        if self.checkpoint_every <= 0 or self.chunk_size <= 0:
            raise EncodingError("checkpoint_every and chunk_size must be positive")
        if len(self.pubkey) != 48:
            raise EncodingError(f"pubkey must be 48 bytes, got {len(self.pubkey)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "run_seed": self.run_seed,
            "model": self.model,
            "model_config": dict(self.model_config),
            "optimizer": self.optimizer.to_json(),
            "grad_clip": self.grad_clip,
            "dataset": None if self.dataset is None else self.dataset.to_json(),
            "batch_size": self.batch_size,
            "context": self.context,
            "dtype": self.dtype,
            "device": self.device,
            "torch_version": self.torch_version,
            "veritrain_version": self.veritrain_version,
            "determinism": dict(self.determinism),
            "checkpoint_every": self.checkpoint_every,
            "chunk_size": self.chunk_size,
            "initial_state": self.initial_state.to_json(),
            "pubkey": hex_bytes(self.pubkey),
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_json(cls, obj: Any) -> RunHeader:
        keys = tuple(_FIELDS)
        check_keys(obj, "run header", keys)
        version = get_int(obj, "version")
        if version != HEADER_VERSION:
            raise EncodingError(f"header version {version}, this code reads {HEADER_VERSION}")
        clip = obj["grad_clip"]
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, int | float)):
            raise EncodingError(f"grad_clip: expected a number or null, got {clip!r}")
        dataset = obj["dataset"]
        aliases = get_object(obj, "aliases")
        if not all(isinstance(v, str) for v in aliases.values()):
            raise EncodingError("aliases: expected string values")
        return cls(
            version=version,
            run_id=get_str(obj, "run_id"),
            run_seed=get_int(obj, "run_seed"),
            model=get_str(obj, "model"),
            model_config=dict(get_object(obj, "model_config")),
            optimizer=OptimizerSpec.from_json(obj["optimizer"]),
            grad_clip=None if clip is None else float(clip),
            dataset=None if dataset is None else CorpusCommitment.from_json(dataset),
            batch_size=get_int(obj, "batch_size"),
            context=get_int(obj, "context"),
            dtype=get_str(obj, "dtype"),
            device=get_str(obj, "device"),
            torch_version=get_str(obj, "torch_version"),
            veritrain_version=get_str(obj, "veritrain_version"),
            determinism=dict(get_object(obj, "determinism")),
            checkpoint_every=get_int(obj, "checkpoint_every", minimum=1),
            chunk_size=get_int(obj, "chunk_size", minimum=1),
            initial_state=StateRef.from_json(obj["initial_state"]),
            pubkey=get_bytes(obj, "pubkey", 48),
            aliases=dict(aliases),
        )

    def hash(self) -> Hash32:
        """sha256 of the canonical JSON: the root of the run's hash chain."""
        return record_hash(self.to_json())


_FIELDS = RunHeader.__dataclass_fields__


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedRunHeader:
    """A header and the peer's signature over (RUN_HEADER, run id, header hash)."""

    header: RunHeader
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {"header": self.header.to_json(), "signature": hex_bytes(self.signature)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SignedRunHeader:
        check_keys(obj, "signed header", ("header", "signature"))
        return cls(
            header=RunHeader.from_json(obj["header"]),
            signature=get_bytes(obj, "signature", 96),
        )

    def verify(self, pubkey: bytes | None = None) -> bool:
        """True when signed by ``pubkey`` (the header's own key by default); never raises."""
        h = self.header
        key = h.pubkey if pubkey is None else pubkey
        return verify(key, Domain.RUN_HEADER, h.run_id, h.hash(), self.signature)


def sign_header(keypair: KeyPair, header: RunHeader) -> SignedRunHeader:
    """Sign ``header``; EncodingError if its pubkey is not the keypair's."""
    if bytes(keypair.public) != header.pubkey:
        raise EncodingError("header pubkey does not match the signing key")
    signature = sign(keypair, Domain.RUN_HEADER, header.run_id, header.hash())
    return SignedRunHeader(header=header, signature=bytes(signature))
