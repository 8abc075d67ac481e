"""Audit verdicts: what an auditor found on one (run, step), signed, in one versioned JSON form.

The signed payload is the canonical JSON of the verdict body (keys sorted, no spaces, UTF-8, no
NaN: non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``),
signed with proofs.signatures under ``Domain.VERDICT`` and the run id as context. Verdicts of
several auditors on the same run aggregate into one BLS signature (:class:`VerdictBundle`).
JSON layout and test vectors: docs/auditing.md and tests/vectors/verdict/.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from audit.jsonform import MAX_VERDICT_JSON as MAX_VERDICT_JSON
from audit.jsonform import VerdictError as VerdictError
from audit.jsonform import (
    canonical_json,
    dict_field,
    expect_header,
    expect_keys,
    float_in,
    float_out,
    hex_str,
    list_field,
    opt_float,
    opt_hash,
    opt_hex,
    read_verdict_json,
    str_field,
    uint_field,
    unhex,
)
from audit.tolerance import Mode
from proofs.errors import SignatureError
from proofs.hashing import Hash32, sha256
from proofs.signatures import (
    BLSPubkey,
    BLSSignature,
    Domain,
    KeyPair,
    sign,
    verify,
)

VERDICT_VERSION = 1
VERDICT_KIND = "veritrain-verdict"
BUNDLE_KIND = "veritrain-verdict-bundle"


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

    @classmethod
    def from_json(cls, obj: object) -> Verdict:
        body = expect_header(obj, VERDICT_KIND)
        return _verdict_from(body)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedVerdict:
    verdict: Verdict
    signature: BLSSignature

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict.to_json(), "signature": hex_str(self.signature)}

    @classmethod
    def from_json(cls, obj: object) -> SignedVerdict:
        if not isinstance(obj, dict) or set(obj) != {"verdict", "signature"}:
            raise VerdictError("signed verdict must be an object with verdict and signature")
        return cls(
            verdict=Verdict.from_json(obj["verdict"]),
            signature=BLSSignature(unhex(obj["signature"], 96)),
        )


def sign_verdict(keypair: KeyPair, verdict: Verdict) -> SignedVerdict:
    """Sign ``verdict``; raises SignatureError if the key is not the verdict's auditor."""
    if keypair.public != verdict.auditor:
        raise SignatureError("the signing key is not the verdict's auditor key")
    sig = sign(keypair, Domain.VERDICT, verdict.run_id, verdict.canonical_bytes())
    return SignedVerdict(verdict=verdict, signature=sig)


def verify_verdict(signed: SignedVerdict) -> bool:
    """True when the signature is the auditor's on this exact verdict. Never raises."""
    try:
        return verify(
            signed.verdict.auditor,
            Domain.VERDICT,
            signed.verdict.run_id,
            signed.verdict.canonical_bytes(),
            signed.signature,
        )
    except Exception:  # a malformed record is simply not a valid signature
        return False


def _to_obj(v: Verdict) -> dict[str, Any]:
    return {
        "run_id": v.run_id,
        "peer": hex_str(v.peer),
        "step": v.step,
        "outcome": v.outcome.value,
        "mode": v.mode.value,
        "reason": v.reason,
        "replay_seed": hex_str(v.replay_seed),
        "recipe_hash": hex_str(v.recipe_hash),
        "manifest_hash": hex_str(v.manifest_hash),
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
                "root": hex_str(e.root),
                "leaf_count": e.leaf_count,
                "indices": list(e.indices),
                "leaf_hashes": [hex_str(h) for h in e.leaf_hashes],
                "observed_hashes": [hex_str(h) for h in e.observed_hashes],
                "proof_hashes": [hex_str(h) for h in e.proof_hashes],
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
        "auditor": hex_str(v.auditor),
        "sample_seed": opt_hex(v.sample_seed),
        "device": v.device,
        "torch_version": v.torch_version,
    }


_VERDICT_KEYS = {
    "run_id", "peer", "step", "outcome", "mode", "reason", "replay_seed", "recipe_hash",
    "manifest_hash", "committed_root", "recomputed_root", "tensors", "evidence", "usefulness",
    "auditor", "sample_seed", "device", "torch_version",
}  # fmt: skip


def _tensor_from(obj: object) -> TensorCheck:
    d = dict_field(obj, "tensor check")
    expect_keys(d, {"name", "rel_l2", "cosine", "max_rel_l2", "max_cosine", "passed"})
    if not isinstance(d["passed"], bool):
        raise VerdictError("passed must be a boolean")
    return TensorCheck(
        name=str_field(d["name"]),
        rel_l2=float_in(d["rel_l2"]),
        cosine=float_in(d["cosine"]),
        max_rel_l2=opt_float(d["max_rel_l2"]),
        max_cosine=opt_float(d["max_cosine"]),
        passed=d["passed"],
    )


def _evidence_from(obj: object) -> Evidence:
    d = dict_field(obj, "evidence")
    expect_keys(
        d,
        {"kind", "artifact", "root", "leaf_count", "indices", "leaf_hashes", "observed_hashes",
         "proof_hashes"},
    )  # fmt: skip
    try:
        kind = EvidenceKind(d["kind"])
    except ValueError as exc:
        raise VerdictError(f"unknown evidence kind {str(d['kind'])[:40]!r}") from exc
    ev = Evidence(
        kind=kind,
        artifact=str_field(d["artifact"]),
        root=Hash32(unhex(d["root"], 32)),
        leaf_count=uint_field(d["leaf_count"]),
        indices=tuple(uint_field(i) for i in list_field(d["indices"], "indices")),
        leaf_hashes=tuple(
            Hash32(unhex(h, 32)) for h in list_field(d["leaf_hashes"], "leaf_hashes")
        ),
        observed_hashes=tuple(
            Hash32(unhex(h, 32)) for h in list_field(d["observed_hashes"], "observed_hashes")
        ),
        proof_hashes=tuple(
            Hash32(unhex(h, 32)) for h in list_field(d["proof_hashes"], "proof_hashes")
        ),
    )
    if not len(ev.indices) == len(ev.leaf_hashes) == len(ev.observed_hashes):
        raise VerdictError("evidence indices, leaf hashes and observed hashes differ in length")
    return ev


def _usefulness_from(obj: object) -> Usefulness | None:
    if obj is None:
        return None
    d = dict_field(obj, "usefulness")
    expect_keys(d, {"heldout", "loss_before", "loss_after"})
    return Usefulness(
        heldout=str_field(d["heldout"]),
        loss_before=float_in(d["loss_before"]),
        loss_after=float_in(d["loss_after"]),
    )


def _verdict_from(d: dict[str, object]) -> Verdict:
    expect_keys(d, _VERDICT_KEYS)
    try:
        outcome = Outcome(d["outcome"])
        mode = Mode(d["mode"])
    except ValueError as exc:
        raise VerdictError(f"unknown outcome or mode: {exc}") from exc
    return Verdict(
        run_id=str_field(d["run_id"]),
        peer=BLSPubkey(unhex(d["peer"], 48)),
        step=uint_field(d["step"]),
        outcome=outcome,
        mode=mode,
        reason=str_field(d["reason"]),
        replay_seed=unhex(d["replay_seed"]),
        recipe_hash=Hash32(unhex(d["recipe_hash"], 32)),
        manifest_hash=Hash32(unhex(d["manifest_hash"], 32)),
        committed_root=opt_hash(d["committed_root"]),
        recomputed_root=opt_hash(d["recomputed_root"]),
        tensors=tuple(_tensor_from(t) for t in list_field(d["tensors"], "tensors")),
        evidence=tuple(_evidence_from(e) for e in list_field(d["evidence"], "evidence")),
        usefulness=_usefulness_from(d["usefulness"]),
        auditor=BLSPubkey(unhex(d["auditor"], 48)),
        sample_seed=opt_hash(d["sample_seed"]),
        device=str_field(d["device"]),
        torch_version=str_field(d["torch_version"]),
    )


def load_signed_verdict(data: bytes) -> SignedVerdict:
    """Parse a verdict file's bytes strictly (at most MAX_VERDICT_JSON bytes, nesting limited by
    proofs.jsonlimits); raises :class:`VerdictError`."""
    return SignedVerdict.from_json(read_verdict_json(data))
