"""The coordinator-signed genesis of a shared run (contributions: trainer.contribution).

A shared run (docs/protocol.md, "Shared runs") is fixed by its :class:`Genesis`: the model and its
initial weights, the inner optimizer and schedule of every round's H inner steps, the dataset,
the outer rule (error feedback, per-chunk top-k, quantization, outer rate), the screening rule
and the roster of peers (name -> BLS key). Round r of peer P is an ordinary audited solo run with
run id :func:`inner_run_id` and assignment ``genesis.hash()``, so its data is a pure function of
(shared run, r, P's key, step). Its result is a contribution record (trainer.contribution).

Hashes are sha256 of canonical JSON (proofs.codec); a signature covers (domain, shared run id,
record hash), as run headers do. Readers are strict: unknown keys, wrong sizes and out-of-range
values are refused with an EncodingError naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from proofs.codec import (
    as_bytes,
    as_float,
    check_keys,
    get_bytes,
    get_float,
    get_int,
    get_object,
    get_str,
    record_hash,
    to_hex,
)
from proofs.errors import EncodingError
from proofs.hashing import Hash32
from proofs.signatures import PUBKEY_SIZE, Domain
from proofs.signed import Signed
from trainer.compression import QUANTIZATIONS
from trainer.data import CorpusCommitment
from trainer.recipe import (
    GROUP_KEYS_NOT_HYPERPARAMETERS,
    RUN_ID_PATTERN,
    check_run_id,
)
from trainer.replay import optimizer_class

SHARED_VERSION = 1
ZERO32 = Hash32(bytes(32))
"""The "none" hash: no previous contribution, no previous local state, no aggregate."""
MAX_SHARED_RUN_ID = 56
"""Characters of a shared run id, so that ``inner_run_id`` (id + ".r" + 6 digits) fits 64."""
MAX_ROUND = 999_999
"""Largest round number: six digits in file names and inner run ids."""
MAX_PEERS = 4096
MAX_INNER_STEPS = 2048
"""Inner steps per round (H): bounds a contribution's losses, so its file stays under 64 KiB."""
MAX_CHUNK = 65536
"""Chunk length of the per-chunk top-k: within-chunk offsets are u16 in the payload."""
MAX_HYPERPARAMETERS = 64
MAX_NAME = 128
"""Characters of a model or optimizer name."""


def check_shared_run_id(shared_run_id: str) -> str:
    """Return ``shared_run_id``; EncodingError unless it is a run id of at most 56 characters."""
    if (
        not isinstance(shared_run_id, str)
        or len(shared_run_id) > MAX_SHARED_RUN_ID
        or RUN_ID_PATTERN.fullmatch(shared_run_id) is None
    ):
        raise EncodingError(
            f"shared run id must be 1-{MAX_SHARED_RUN_ID} of A-Z a-z 0-9 . _ - starting with a "
            f"letter or digit, got {shared_run_id!r:.80}"
        )
    return shared_run_id


def check_round(r: int, what: str = "round") -> int:
    """Return ``r``; EncodingError unless it is an int in [0, MAX_ROUND]."""
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= MAX_ROUND:
        raise EncodingError(f"{what} must be an int in [0, {MAX_ROUND}], got {r!r:.40}")
    return r


def inner_run_id(shared_run_id: str, r: int) -> str:
    """The run id of round ``r``'s inner steps: ``f"{shared_run_id}.r{r:06d}"``."""
    return f"{check_shared_run_id(shared_run_id)}.r{check_round(r):06d}"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise EncodingError(message)


def _finite(value: float, what: str) -> None:
    _require(
        isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value),
        f"{what} must be a finite number, got {value!r:.40}",
    )


def _hash32(value: bytes, what: str) -> None:
    _require(isinstance(value, bytes) and len(value) == 32, f"{what} must be 32 bytes")


def _pubkey(value: bytes, what: str) -> None:
    _require(
        isinstance(value, bytes) and len(value) == PUBKEY_SIZE,
        f"{what} must be a {PUBKEY_SIZE}-byte BLS public key",
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class OuterRule:
    """Error feedback ``e = beta*e + delta``, per-chunk top-k of ``e``, quantization, outer rate."""

    beta: float
    chunk: int
    topk: int
    quantization: str
    alpha: float

    def __post_init__(self) -> None:
        _finite(self.beta, "outer.beta")
        _require(0.0 <= self.beta <= 1.0, f"outer.beta must be in [0, 1], got {self.beta}")
        _require(
            1 <= self.topk <= self.chunk <= MAX_CHUNK,
            f"outer rule needs 1 <= topk <= chunk <= {MAX_CHUNK}, got topk {self.topk} "
            f"and chunk {self.chunk}",
        )
        _require(
            self.quantization in QUANTIZATIONS,
            f"outer.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r:.40}",
        )
        _finite(self.alpha, "outer.alpha")
        _require(self.alpha > 0, f"outer.alpha must be > 0, got {self.alpha}")

    def to_json(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "chunk": self.chunk,
            "topk": self.topk,
            "quantization": self.quantization,
            "alpha": self.alpha,
        }

    @classmethod
    def from_json(cls, obj: Any) -> OuterRule:
        check_keys(obj, "outer", ("beta", "chunk", "topk", "quantization", "alpha"))
        return cls(
            beta=get_float(obj, "beta"),
            chunk=get_int(obj, "chunk"),
            topk=get_int(obj, "topk"),
            quantization=get_str(obj, "quantization", max_len=16),
            alpha=get_float(obj, "alpha"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Screening:
    """How the aggregator screens contributions (trainer.aggregation)."""

    norm_factor: float
    """Exclude a payload whose norm exceeds this factor times the median norm."""
    probe: bool
    probe_batch: int
    probe_margin: float
    """Relative loss increase on the probe batch beyond which a contribution is excluded."""
    min_contributions: int
    max_contributions: int
    deadline_s: float
    probe_gain: float = 0.0
    """Also exclude a contribution whose probe gain (base loss - its loss) is below this fraction
    of the median gain of the round's probed contributions, when that median is positive (in
    [0, 1); 0 disables). Catches updates of plausible norm that do nothing: random directions
    barely move the loss, honest updates lower it."""

    def __post_init__(self) -> None:
        _finite(self.norm_factor, "screening.norm_factor")
        _require(self.norm_factor > 1, f"norm_factor must be > 1, got {self.norm_factor}")
        _require(isinstance(self.probe, bool), "screening.probe must be a bool")
        _require(
            not self.probe or self.probe_batch >= 1,
            f"probe_batch must be >= 1 when probing, got {self.probe_batch}",
        )
        _finite(self.probe_margin, "screening.probe_margin")
        _require(self.probe_margin >= 0, f"probe_margin must be >= 0, got {self.probe_margin}")
        _require(
            1 <= self.min_contributions <= self.max_contributions,
            f"need 1 <= min_contributions <= max_contributions, got {self.min_contributions} "
            f"and {self.max_contributions}",
        )
        _finite(self.deadline_s, "screening.deadline_s")
        _require(self.deadline_s > 0, f"deadline_s must be > 0, got {self.deadline_s}")
        _finite(self.probe_gain, "screening.probe_gain")
        _require(0 <= self.probe_gain < 1, f"probe_gain must be in [0, 1), got {self.probe_gain}")

    def to_json(self) -> dict[str, Any]:
        return {
            "norm_factor": self.norm_factor,
            "probe": self.probe,
            "probe_batch": self.probe_batch,
            "probe_margin": self.probe_margin,
            "min_contributions": self.min_contributions,
            "max_contributions": self.max_contributions,
            "deadline_s": self.deadline_s,
            "probe_gain": self.probe_gain,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Screening:
        check_keys(obj, "screening", tuple(cls.__dataclass_fields__))
        probe = obj["probe"]
        _require(isinstance(probe, bool), f"probe: expected true or false, got {probe!r:.40}")
        return cls(
            norm_factor=get_float(obj, "norm_factor"),
            probe=probe,
            probe_batch=get_int(obj, "probe_batch"),
            probe_margin=get_float(obj, "probe_margin"),
            min_contributions=get_int(obj, "min_contributions"),
            max_contributions=get_int(obj, "max_contributions"),
            deadline_s=get_float(obj, "deadline_s"),
            probe_gain=get_float(obj, "probe_gain"),
        )


def _check_hyperparameters(optimizer: str, values: Mapping[str, Any]) -> None:
    """The optimizer must exist in torch.optim and accept ``values`` (no rate among them)."""
    optimizer_class(optimizer)  # EncodingError naming the optimizer
    _require(len(values) <= MAX_HYPERPARAMETERS, "too many optimizer hyperparameters")
    for key, value in values.items():
        _require(isinstance(key, str), "hyperparameter names must be strings")
        _require(
            key not in GROUP_KEYS_NOT_HYPERPARAMETERS,
            f"hyperparameters must not set {key!r}: inner_lr is the rate",
        )
        flat = value if isinstance(value, list) else [value]
        _require(
            all(v is None or isinstance(v, bool | int | float | str) for v in flat),
            f"hyperparameter {key!r} must be a JSON scalar or a list of them",
        )
    try:
        _build([torch.zeros(1, requires_grad=True)], optimizer, 1e-3, values)
    except (TypeError, ValueError, KeyError) as exc:
        raise EncodingError(f"optimizer {optimizer} refuses the hyperparameters: {exc}") from None


def _build(
    params: Any, optimizer: str, lr: float, values: Mapping[str, Any]
) -> torch.optim.Optimizer:
    # Lists come from JSON; torch's own defaults for such arguments (betas) are tuples.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    cls: Any = optimizer_class(optimizer)
    built: torch.optim.Optimizer = cls(params, lr=lr, **kwargs)
    return built


@dataclass(frozen=True, kw_only=True, slots=True)
class Genesis:
    """Everything that fixes a shared run; signed by ``coordinator``."""

    version: int
    shared_run_id: str
    model: str
    model_config: Mapping[str, Any]
    init_seed: int
    initial_root: Hash32
    """Root of theta_0 (trainer.globalstate.theta_artifact of initial_model(genesis))."""
    optimizer: str
    hyperparameters: Mapping[str, Any]
    """Inner optimizer keyword arguments besides ``lr`` (see build_inner_optimizer)."""
    inner_lr: float
    grad_clip: float | None
    inner_steps: int
    batch_size: int
    context: int
    dataset: CorpusCommitment
    heldout: CorpusCommitment | None = None
    """The held-out corpus (disjoint files from ``dataset``) on which auditors measure how much a
    contribution lowers the loss (its usefulness, what a round's pool is shared by); no peer's
    batches are cut from it. None: usefulness is measured on ``dataset`` at offsets no inner step
    uses (weaker: the text overlaps what peers train on)."""
    checkpoint_every: int
    chunk_size: int
    outer: OuterRule
    screening: Screening
    rounds: int
    """Rounds to run; 0 = until stopped."""
    coordinator: bytes
    aggregator: bytes
    peers: Mapping[str, bytes]
    """The roster: peer name -> BLS public key."""

    def __post_init__(self) -> None:
        _require(self.version == SHARED_VERSION, f"genesis version must be {SHARED_VERSION}")
        check_shared_run_id(self.shared_run_id)
        _require(0 < len(self.model) <= MAX_NAME, "genesis model name must be 1-128 characters")
        _require(isinstance(self.model_config, Mapping), "model_config must be a JSON object")
        _require(0 <= self.init_seed < 1 << 64, "init_seed must be a u64")
        _hash32(self.initial_root, "initial_root")
        _check_hyperparameters(self.optimizer, self.hyperparameters)
        _finite(self.inner_lr, "inner_lr")
        _require(self.inner_lr > 0, f"inner_lr must be > 0, got {self.inner_lr}")
        if self.grad_clip is not None:
            _finite(self.grad_clip, "grad_clip")
            _require(self.grad_clip > 0, f"grad_clip must be > 0 or null, got {self.grad_clip}")
        _require(
            1 <= self.inner_steps <= MAX_INNER_STEPS,
            f"inner_steps must be in [1, {MAX_INNER_STEPS}], got {self.inner_steps}",
        )
        for name in ("batch_size", "context", "checkpoint_every", "chunk_size"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1")
        check_round(self.rounds, "rounds")
        if self.heldout is not None:
            _require(
                self.heldout.root != self.dataset.root,
                "the held-out corpus must not be the training corpus",
            )
        _pubkey(self.coordinator, "coordinator")
        _pubkey(self.aggregator, "aggregator")
        _require(0 < len(self.peers) <= MAX_PEERS, f"the roster must hold 1-{MAX_PEERS} peers")
        for name, key in self.peers.items():
            check_run_id(name)
            _pubkey(key, f"roster key of {name}")
        _require(
            len(set(self.peers.values())) == len(self.peers),
            "two roster peers share one public key",
        )
        _require(
            self.screening.min_contributions <= len(self.peers),
            f"min_contributions {self.screening.min_contributions} exceeds the roster size "
            f"{len(self.peers)}: no round could ever be applied",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "shared_run_id": self.shared_run_id,
            "model": self.model,
            "model_config": dict(self.model_config),
            "init_seed": self.init_seed,
            "initial_root": to_hex(self.initial_root),
            "optimizer": self.optimizer,
            "hyperparameters": dict(self.hyperparameters),
            "inner_lr": self.inner_lr,
            "grad_clip": self.grad_clip,
            "inner_steps": self.inner_steps,
            "batch_size": self.batch_size,
            "context": self.context,
            "dataset": self.dataset.to_json(),
            "heldout": None if self.heldout is None else self.heldout.to_json(),
            "checkpoint_every": self.checkpoint_every,
            "chunk_size": self.chunk_size,
            "outer": self.outer.to_json(),
            "screening": self.screening.to_json(),
            "rounds": self.rounds,
            "coordinator": to_hex(self.coordinator),
            "aggregator": to_hex(self.aggregator),
            "peers": {name: to_hex(key) for name, key in self.peers.items()},
        }

    @classmethod
    def from_json(cls, obj: Any) -> Genesis:
        check_keys(obj, "genesis", tuple(cls.__dataclass_fields__))
        clip, heldout = obj["grad_clip"], obj["heldout"]
        peers = get_object(obj, "peers")
        _require(len(peers) <= MAX_PEERS, f"peers: more than {MAX_PEERS}")
        return cls(
            version=get_int(obj, "version"),
            shared_run_id=get_str(obj, "shared_run_id", max_len=MAX_SHARED_RUN_ID),
            model=get_str(obj, "model", max_len=MAX_NAME),
            model_config=dict(get_object(obj, "model_config")),
            init_seed=get_int(obj, "init_seed"),
            initial_root=Hash32(get_bytes(obj, "initial_root", 32)),
            optimizer=get_str(obj, "optimizer", max_len=MAX_NAME),
            hyperparameters=dict(get_object(obj, "hyperparameters")),
            inner_lr=get_float(obj, "inner_lr"),
            grad_clip=None if clip is None else as_float(clip, "grad_clip"),
            inner_steps=get_int(obj, "inner_steps"),
            batch_size=get_int(obj, "batch_size"),
            context=get_int(obj, "context"),
            dataset=CorpusCommitment.from_json(get_object(obj, "dataset")),
            heldout=None
            if heldout is None
            else CorpusCommitment.from_json(get_object(obj, "heldout")),
            checkpoint_every=get_int(obj, "checkpoint_every"),
            chunk_size=get_int(obj, "chunk_size"),
            outer=OuterRule.from_json(obj["outer"]),
            screening=Screening.from_json(obj["screening"]),
            rounds=get_int(obj, "rounds"),
            coordinator=get_bytes(obj, "coordinator", PUBKEY_SIZE),
            aggregator=get_bytes(obj, "aggregator", PUBKEY_SIZE),
            peers={n: as_bytes(k, f"peers.{n:.64}", PUBKEY_SIZE) for n, k in peers.items()},
        )

    def hash(self) -> Hash32:
        """sha256 of the canonical JSON: the assignment of every inner run."""
        return record_hash(self.to_json())

    def signing_context(self) -> str:
        return self.shared_run_id

    def signing_payload(self) -> bytes:
        return self.hash()


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedGenesis(Signed[Genesis]):
    """A genesis and the coordinator's signature over (SHARED_GENESIS, run id, genesis hash)."""

    KEY = "genesis"
    DOMAIN = Domain.SHARED_GENESIS
    RECORD = Genesis

    genesis: Genesis

    def verify(self, pubkey: bytes | None = None) -> bool:
        """True when signed by ``pubkey`` (the genesis's coordinator by default); never raises."""
        return Signed.verify(self, self.genesis.coordinator if pubkey is None else pubkey)
