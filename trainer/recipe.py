"""The run header (recipe): everything needed to rebuild and re-check a run, signed by the peer.

The header names the model (registry name + JSON config), the optimizer (a ``torch.optim`` class
and the parameter names of each param group, in optimizer order), gradient clipping, the dataset
commitment, batch shape, dtype, device, torch version, determinism flags, the run seed, the
checkpoint interval, the encoding chunk size, the initial state checkpoint and the peer's BLS
public key.
Its hash (sha256 of canonical JSON) roots the hash chain of step records and manifests.

Version 2 binds a run to its peer and its work: ``assignment`` names the work an epoch pays for
(trainer.assignment; 32 zero bytes for none), ``run_seed`` must be the one derived from the
peer's key, that assignment and the run id (trainer.seeds.run_seed_for), and ``schedule`` gives
the learning rate of every step (trainer.schedule). ``run_id`` is restricted to RUN_ID_PATTERN.
The optimizer's recorded defaults leave out ``lr``: every step's rate comes from the schedule.

Gradient clipping: the *raw* gradient is committed (what an auditor recomputes); the clip in
``grad_clip`` is applied after the commitment and before the optimizer step, and replay re-applies
it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proofs.codec import (
    check_keys,
    get_bytes,
    get_int,
    get_list,
    get_object,
    get_str,
    record_hash,
    to_hex,
)
from proofs.errors import EncodingError
from proofs.hashing import Hash32
from proofs.signatures import Domain, KeyPair
from proofs.signed import Signed
from trainer.data import CorpusCommitment
from trainer.manifest import StateRef
from trainer.schedule import Schedule
from trainer.seeds import run_seed_for

HEADER_VERSION = 2
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Run ids: 1-64 ASCII letters, digits, '.', '_' and '-', starting with a letter or digit. They
name folders, appear in tables and terminals, and are joined to a peer's name as ``peer/run``
in the warehouse, so nothing in them can be markup, a path or a separator."""


def check_run_id(run_id: str) -> str:
    """Return ``run_id``; EncodingError unless it matches RUN_ID_PATTERN."""
    if not isinstance(run_id, str) or RUN_ID_PATTERN.fullmatch(run_id) is None:
        raise EncodingError(
            f"run id must be 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit, "
            f"got {run_id!r:.80}"
        )
    return run_id


GROUP_KEYS_NOT_HYPERPARAMETERS = ("params", "lr", "initial_lr")
"""Keys of a torch param group that are no hyperparameter the header records: the parameters,
and the rates (the schedule's; ``initial_lr`` is what torch's lr schedulers leave behind)."""


def jsonable_hyperparameters(
    values: Mapping[str, Any], *, drop: Sequence[str] = ()
) -> dict[str, Any]:
    """Optimizer hyperparameters as the header records them: tuples become lists, values JSON
    cannot hold become their repr, keys in ``drop`` are left out."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in drop:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, bool | int | float | str | list):
            out[key] = value
        else:
            out[key] = repr(value)
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimizerSpec:
    """A ``torch.optim`` optimizer: class name, constructor defaults, and param groups by name."""

    name: str
    """Class name inside ``torch.optim`` (e.g. "AdamW"); replay resolves nothing else."""
    defaults: Mapping[str, Any]
    """Constructor defaults as :func:`jsonable_hyperparameters` records them, without ``lr``."""
    groups: tuple[tuple[str, ...], ...]
    """Parameter names of each param group, in the optimizer's order."""
    overrides: tuple[Mapping[str, Any], ...]
    """Per param group, the hyperparameters that differ from ``defaults`` (e.g. no weight decay
    on biases); replay refuses a state whose groups hold anything else."""

    def __post_init__(self) -> None:
        if len(self.overrides) != len(self.groups):
            raise EncodingError(
                f"optimizer: {len(self.overrides)} overrides for {len(self.groups)} groups"
            )

    def group_hyperparameters(self, index: int) -> dict[str, Any]:
        """Every hyperparameter of param group ``index`` but its learning rate."""
        return {**self.defaults, **self.overrides[index]}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "defaults": dict(self.defaults),
            "groups": [list(g) for g in self.groups],
            "overrides": [dict(o) for o in self.overrides],
        }

    @classmethod
    def from_json(cls, obj: Any) -> OptimizerSpec:
        check_keys(obj, "optimizer", ("name", "defaults", "groups", "overrides"))
        groups = get_list(obj, "groups")
        if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
            raise EncodingError("optimizer.groups: expected lists of parameter names")
        overrides = get_list(obj, "overrides")
        if not all(isinstance(o, dict) for o in overrides):
            raise EncodingError("optimizer.overrides: expected one object per group")
        return cls(
            name=get_str(obj, "name"),
            defaults=dict(get_object(obj, "defaults")),
            groups=tuple(tuple(g) for g in groups),
            overrides=tuple(dict(o) for o in overrides),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RunHeader:
    """The recipe of one run. ``model`` is "" for a user model outside the registry."""

    version: int
    run_id: str
    run_seed: int
    """Derived, never chosen: ``run_seed_for(pubkey, assignment, run_id)``."""
    assignment: Hash32
    """Hash of the assignment this run was trained for (32 zero bytes: none)."""
    model: str
    model_config: Mapping[str, Any]
    optimizer: OptimizerSpec
    grad_clip: float | None
    """Max L2 norm of all gradients (``clip_grad_norm_``), applied after commit; None = off."""
    schedule: Schedule
    dataset: CorpusCommitment | None
    batch_size: int
    context: int
    dtype: str
    device: str
    torch_version: str
    determinism: Mapping[str, Any]
    checkpoint_every: int
    chunk_size: int
    initial_state: StateRef
    pubkey: bytes
    aliases: Mapping[str, str]
    """State-dict keys that alias a parameter (tied weights): key -> parameter name."""

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if len(self.pubkey) != 48:
            raise EncodingError(f"pubkey must be 48 bytes, got {len(self.pubkey)}")
        if len(self.assignment) != 32:
            raise EncodingError(f"assignment must be 32 bytes, got {len(self.assignment)}")
        expected = run_seed_for(self.pubkey, self.assignment, self.run_id)
        if self.run_seed != expected:
            raise EncodingError(
                f"run seed {self.run_seed} is not derived from the peer's key, the assignment and "
                f"the run id (expected {expected}): a run cannot be re-signed or re-run by another "
                "peer"
            )
        if "lr" in self.optimizer.defaults:
            raise EncodingError("optimizer defaults record no lr: the schedule gives every rate")
        if self.checkpoint_every <= 0 or self.chunk_size <= 0:
            raise EncodingError("checkpoint_every and chunk_size must be positive")

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "run_seed": self.run_seed,
            "assignment": to_hex(self.assignment),
            "model": self.model,
            "model_config": dict(self.model_config),
            "optimizer": self.optimizer.to_json(),
            "grad_clip": self.grad_clip,
            "schedule": self.schedule.to_json(),
            "dataset": None if self.dataset is None else self.dataset.to_json(),
            "batch_size": self.batch_size,
            "context": self.context,
            "dtype": self.dtype,
            "device": self.device,
            "torch_version": self.torch_version,
            "determinism": dict(self.determinism),
            "checkpoint_every": self.checkpoint_every,
            "chunk_size": self.chunk_size,
            "initial_state": self.initial_state.to_json(),
            "pubkey": to_hex(self.pubkey),
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
            assignment=Hash32(get_bytes(obj, "assignment", 32)),
            model=get_str(obj, "model"),
            model_config=dict(get_object(obj, "model_config")),
            optimizer=OptimizerSpec.from_json(obj["optimizer"]),
            grad_clip=None if clip is None else float(clip),
            schedule=Schedule.from_json(obj["schedule"]),
            dataset=None if dataset is None else CorpusCommitment.from_json(dataset),
            batch_size=get_int(obj, "batch_size"),
            context=get_int(obj, "context"),
            dtype=get_str(obj, "dtype"),
            device=get_str(obj, "device"),
            torch_version=get_str(obj, "torch_version"),
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

    def signing_context(self) -> str:
        return self.run_id

    def signing_payload(self) -> bytes:
        return self.hash()


_FIELDS = RunHeader.__dataclass_fields__


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedRunHeader(Signed[RunHeader]):
    """A header and the peer's signature over (RUN_HEADER, run id, header hash)."""

    KEY = "header"
    DOMAIN = Domain.RUN_HEADER
    RECORD = RunHeader

    header: RunHeader

    def verify(self, pubkey: bytes | None = None) -> bool:
        """True when signed by ``pubkey`` (the header's own key by default); never raises."""
        return Signed.verify(self, self.header.pubkey if pubkey is None else pubkey)


def sign_header(keypair: KeyPair, header: RunHeader) -> SignedRunHeader:
    """Sign ``header``; EncodingError if its pubkey is not the keypair's."""
    if bytes(keypair.public) != header.pubkey:
        raise EncodingError("header pubkey does not match the signing key")
    return SignedRunHeader.sign(keypair, header)
