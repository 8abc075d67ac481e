"""Audit verdicts: what an auditor found on one (run, step), signed, in one versioned JSON form.

The signed payload is the canonical JSON of the verdict body (keys sorted, no spaces, UTF-8, no
NaN: non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``),
signed with proofs.signatures under ``Domain.VERDICT`` and the run id as context. Verdicts of
several auditors on the same run aggregate into one BLS signature (:class:`VerdictBundle`).
JSON layout and test vectors: docs/auditing.md and tests/vectors/verdict/.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from audit.tolerance import Mode
from proofs.codec import (
    as_bytes,
    as_float,
    as_list,
    as_object,
    as_str,
    as_uint,
    canonical_json,
    check_keys,
    float_out,
    opt_hex,
    to_hex,
)
from proofs.errors import EncodingError, SignatureError
from proofs.hashing import Hash32, sha256
from proofs.jsonlimits import UntrustedJsonError, loads_untrusted
from proofs.signatures import (
    BLSPubkey,
    Domain,
    KeyPair,
)
from proofs.signed import Signed

VERDICT_VERSION = 1
VERDICT_KIND = "veritrain-verdict"
BUNDLE_KIND = "veritrain-verdict-bundle"

# Limits of the strict readers (docs/auditing.md, section 7): a verdict file may come from any
# auditor, so every length and count it controls is bounded. ``reason`` may quote an error found
# in a peer's store, hence a string limit looser than the codec's default.
MAX_VERDICT_JSON = 1 << 20
"""Bytes of one signed verdict file: ~2 KB, plus ~130 bytes per parameter tensor checked."""
MAX_BUNDLE_JSON = 64 << 20
"""Bytes of one verdict bundle (many auditors' verdicts on one run)."""
MAX_STR = 1 << 16
"""Characters in a verdict's string field."""
MAX_ITEMS = 1 << 16
"""Items in a verdict's list field."""


class VerdictError(EncodingError):
    """A verdict JSON document is malformed or of an unknown version."""


def read_verdict_json(data: bytes, *, max_bytes: int = MAX_VERDICT_JSON) -> object:
    """Parse a verdict or bundle file's bytes through proofs.jsonlimits (size, nesting depth,
    strict JSON); raises :class:`VerdictError` naming the limit or the fault."""
    try:
        return loads_untrusted(data, max_bytes=max_bytes, what="verdict file")
    except UntrustedJsonError as exc:
        raise VerdictError(str(exc)) from exc


def expect_header(obj: object, kind: str) -> dict[str, object]:
    """The body of a versioned verdict document of ``kind`` (without kind and version)."""
    if not isinstance(obj, dict):
        raise VerdictError("a verdict document must be a JSON object")
    if obj.get("kind") != kind:
        raise VerdictError(f"expected kind {kind!r}, got {str(obj.get('kind'))[:40]!r}")
    if obj.get("version") != VERDICT_VERSION:
        raise VerdictError(f"unsupported verdict version {obj.get('version')!r}")
    return {k: v for k, v in obj.items() if k not in ("kind", "version")}


def as_verdict_error(exc: EncodingError) -> VerdictError:
    """A codec reader's error as the :class:`VerdictError` every verdict reader raises."""
    return exc if isinstance(exc, VerdictError) else VerdictError(str(exc))


class Outcome(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INVALID = "invalid"  # an artifact did not match its commitment or signature


class EvidenceKind(enum.Enum):
    MISMATCH = "mismatch"  # committed chunks that differ from the auditor's recomputation
    CORRUPT = "corrupt"  # stored bytes that do not hash to the committed leaf


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorCheck:
    """One parameter gradient: distances found and the thresholds applied (None in exact mode)."""

    name: str
    rel_l2: float
    cosine: float
    max_rel_l2: float | None
    max_cosine: float | None
    passed: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Evidence:
    """Merkle evidence on one artifact: leaves at ``indices`` of the tree with root ``root``.

    ``leaf_hashes`` are the committed leaf hashes at those indices, provable against ``root``
    with the multiproof ``proof_hashes``; ``observed_hashes`` are what the auditor found instead
    (the hash of its recomputed chunk, or of the stored bytes), one per index.
    """

    kind: EvidenceKind
    artifact: str
    root: Hash32
    leaf_count: int
    indices: tuple[int, ...]
    leaf_hashes: tuple[Hash32, ...]
    observed_hashes: tuple[Hash32, ...]
    proof_hashes: tuple[Hash32, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Usefulness:
    """Loss on a fixed held-out batch before and after applying the step's committed update."""

    heldout: str  # how the held-out batch was chosen, e.g. "seed=0x..;batch=8"
    loss_before: float
    loss_after: float

    @property
    def gain(self) -> float:
        return self.loss_before - self.loss_after


@dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    """An auditor's finding on one step of one run (unsigned body)."""

    run_id: str
    peer: BLSPubkey
    step: int
    outcome: Outcome
    mode: Mode
    reason: str
    replay_seed: bytes
    recipe_hash: Hash32
    manifest_hash: Hash32
    committed_root: Hash32 | None
    recomputed_root: Hash32 | None
    tensors: tuple[TensorCheck, ...]
    evidence: tuple[Evidence, ...]
    usefulness: Usefulness | None
    auditor: BLSPubkey
    sample_seed: Hash32 | None
    device: str
    torch_version: str

    def __post_init__(self) -> None:
        if not self.run_id or self.step < 0:
            raise VerdictError("a verdict needs a run id and a step >= 0")
        if len(self.peer) != 48 or len(self.auditor) != 48:
            raise VerdictError("peer and auditor must be 48-byte BLS public keys")

    def to_json(self) -> dict[str, Any]:
        return {"version": VERDICT_VERSION, "kind": VERDICT_KIND, **_to_obj(self)}

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed (see the module docstring)."""
        return canonical_json(self.to_json())

    def digest(self) -> Hash32:
        return sha256(self.canonical_bytes())

    def signing_context(self) -> str:
        return self.run_id

    def signing_payload(self) -> bytes:
        return self.canonical_bytes()

    @classmethod
    def from_json(cls, obj: object) -> Verdict:
        body = expect_header(obj, VERDICT_KIND)
        try:
            return _verdict_from(body)
        except EncodingError as exc:
            raise as_verdict_error(exc) from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedVerdict(Signed[Verdict]):
    """A verdict and its auditor's signature over (VERDICT, run id, canonical bytes)."""

    KEY = "verdict"
    DOMAIN = Domain.VERDICT
    RECORD = Verdict
    ERROR = VerdictError

    verdict: Verdict


def sign_verdict(keypair: KeyPair, verdict: Verdict) -> SignedVerdict:
    """Sign ``verdict``; raises SignatureError if the key is not the verdict's auditor."""
    if keypair.public != verdict.auditor:
        raise SignatureError("the signing key is not the verdict's auditor key")
    return SignedVerdict.sign(keypair, verdict)


def verify_verdict(signed: SignedVerdict) -> bool:
    """True when the signature is the auditor's on this exact verdict. Never raises."""
    return signed.verify(signed.verdict.auditor)


def _to_obj(v: Verdict) -> dict[str, Any]:
    return {
        "run_id": v.run_id,
        "peer": to_hex(v.peer),
        "step": v.step,
        "outcome": v.outcome.value,
        "mode": v.mode.value,
        "reason": v.reason,
        "replay_seed": to_hex(v.replay_seed),
        "recipe_hash": to_hex(v.recipe_hash),
        "manifest_hash": to_hex(v.manifest_hash),
        "committed_root": opt_hex(v.committed_root),
        "recomputed_root": opt_hex(v.recomputed_root),
        "tensors": [
            {
                "name": t.name,
                "rel_l2": float_out(t.rel_l2),
                "cosine": float_out(t.cosine),
                "max_rel_l2": None if t.max_rel_l2 is None else float_out(t.max_rel_l2),
                "max_cosine": None if t.max_cosine is None else float_out(t.max_cosine),
                "passed": t.passed,
            }
            for t in v.tensors
        ],
        "evidence": [
            {
                "kind": e.kind.value,
                "artifact": e.artifact,
                "root": to_hex(e.root),
                "leaf_count": e.leaf_count,
                "indices": list(e.indices),
                "leaf_hashes": [to_hex(h) for h in e.leaf_hashes],
                "observed_hashes": [to_hex(h) for h in e.observed_hashes],
                "proof_hashes": [to_hex(h) for h in e.proof_hashes],
            }
            for e in v.evidence
        ],
        "usefulness": None
        if v.usefulness is None
        else {
            "heldout": v.usefulness.heldout,
            "loss_before": float_out(v.usefulness.loss_before),
            "loss_after": float_out(v.usefulness.loss_after),
        },
        "auditor": to_hex(v.auditor),
        "sample_seed": opt_hex(v.sample_seed),
        "device": v.device,
        "torch_version": v.torch_version,
    }


_VERDICT_KEYS = (
    "run_id", "peer", "step", "outcome", "mode", "reason", "replay_seed", "recipe_hash",
    "manifest_hash", "committed_root", "recomputed_root", "tensors", "evidence", "usefulness",
    "auditor", "sample_seed", "device", "torch_version",
)  # fmt: skip
_EVIDENCE_KEYS = (
    "kind", "artifact", "root", "leaf_count", "indices", "leaf_hashes", "observed_hashes",
    "proof_hashes",
)  # fmt: skip


def _str(d: Mapping[str, Any], key: str) -> str:
    return as_str(d[key], key, max_len=MAX_STR)


def _list(d: Mapping[str, Any], key: str) -> list[Any]:
    return as_list(d[key], key, max_items=MAX_ITEMS)


def _opt_float(d: Mapping[str, Any], key: str) -> float | None:
    return None if d[key] is None else as_float(d[key], key)


def _opt_hash(d: Mapping[str, Any], key: str) -> Hash32 | None:
    return None if d[key] is None else Hash32(as_bytes(d[key], key, 32))


def _hashes(d: Mapping[str, Any], key: str) -> tuple[Hash32, ...]:
    return tuple(Hash32(as_bytes(h, key, 32)) for h in _list(d, key))


def _tensor_from(obj: object) -> TensorCheck:
    keys = ("name", "rel_l2", "cosine", "max_rel_l2", "max_cosine", "passed")
    check_keys(obj, "tensor check", keys)
    d = as_object(obj, "tensor check")
    if not isinstance(d["passed"], bool):
        raise VerdictError("passed must be a boolean")
    return TensorCheck(
        name=_str(d, "name"),
        rel_l2=as_float(d["rel_l2"], "rel_l2"),
        cosine=as_float(d["cosine"], "cosine"),
        max_rel_l2=_opt_float(d, "max_rel_l2"),
        max_cosine=_opt_float(d, "max_cosine"),
        passed=d["passed"],
    )


def _evidence_from(obj: object) -> Evidence:
    check_keys(obj, "evidence", _EVIDENCE_KEYS)
    d = as_object(obj, "evidence")
    try:
        kind = EvidenceKind(d["kind"])
    except ValueError as exc:
        raise VerdictError(f"unknown evidence kind {str(d['kind'])[:40]!r}") from exc
    ev = Evidence(
        kind=kind,
        artifact=_str(d, "artifact"),
        root=Hash32(as_bytes(d["root"], "root", 32)),
        leaf_count=as_uint(d["leaf_count"], "leaf_count"),
        indices=tuple(as_uint(i, "indices") for i in _list(d, "indices")),
        leaf_hashes=_hashes(d, "leaf_hashes"),
        observed_hashes=_hashes(d, "observed_hashes"),
        proof_hashes=_hashes(d, "proof_hashes"),
    )
    if not len(ev.indices) == len(ev.leaf_hashes) == len(ev.observed_hashes):
        raise VerdictError("evidence indices, leaf hashes and observed hashes differ in length")
    return ev


def _usefulness_from(obj: object) -> Usefulness | None:
    if obj is None:
        return None
    check_keys(obj, "usefulness", ("heldout", "loss_before", "loss_after"))
    d = as_object(obj, "usefulness")
    return Usefulness(
        heldout=_str(d, "heldout"),
        loss_before=as_float(d["loss_before"], "loss_before"),
        loss_after=as_float(d["loss_after"], "loss_after"),
    )


def _verdict_from(d: Mapping[str, Any]) -> Verdict:
    check_keys(d, "verdict", _VERDICT_KEYS)
    try:
        outcome = Outcome(d["outcome"])
        mode = Mode(d["mode"])
    except ValueError as exc:
        raise VerdictError(f"unknown outcome or mode: {exc}") from exc
    return Verdict(
        run_id=_str(d, "run_id"),
        peer=BLSPubkey(as_bytes(d["peer"], "peer", 48)),
        step=as_uint(d["step"], "step"),
        outcome=outcome,
        mode=mode,
        reason=_str(d, "reason"),
        replay_seed=as_bytes(d["replay_seed"], "replay_seed"),
        recipe_hash=Hash32(as_bytes(d["recipe_hash"], "recipe_hash", 32)),
        manifest_hash=Hash32(as_bytes(d["manifest_hash"], "manifest_hash", 32)),
        committed_root=_opt_hash(d, "committed_root"),
        recomputed_root=_opt_hash(d, "recomputed_root"),
        tensors=tuple(_tensor_from(t) for t in _list(d, "tensors")),
        evidence=tuple(_evidence_from(e) for e in _list(d, "evidence")),
        usefulness=_usefulness_from(d["usefulness"]),
        auditor=BLSPubkey(as_bytes(d["auditor"], "auditor", 48)),
        sample_seed=_opt_hash(d, "sample_seed"),
        device=_str(d, "device"),
        torch_version=_str(d, "torch_version"),
    )


def load_signed_verdict(data: bytes) -> SignedVerdict:
    """Parse a verdict file's bytes strictly (at most MAX_VERDICT_JSON bytes, nesting limited by
    proofs.jsonlimits); raises :class:`VerdictError`."""
    return SignedVerdict.from_json(read_verdict_json(data))
