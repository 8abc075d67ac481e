"""Audit verdicts: what an auditor found on one (run, step), signed, in one versioned JSON form.

The signed payload is the canonical JSON of the verdict body (keys sorted, no spaces, UTF-8, no
NaN: non-finite floats are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``),
signed with proofs.signatures under ``Domain.VERDICT`` and the run id as context. Verdicts of
several auditors on the same run aggregate into one BLS signature (:class:`VerdictBundle`).
JSON layout and test vectors: docs/auditing.md and tests/vectors/verdict/.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from audit.tolerance import Mode
from proofs.errors import EncodingError, SignatureError
from proofs.hashing import Hash32, sha256
from proofs.signatures import (
    BLSPubkey,
    BLSSignature,
    Domain,
    KeyPair,
    aggregate,
    aggregate_verify,
    sign,
    verify,
)

VERDICT_VERSION = 1
VERDICT_KIND = "veritrain-verdict"
BUNDLE_KIND = "veritrain-verdict-bundle"
MAX_VERDICT_JSON = 16 << 20  # a verdict with evidence is kilobytes; refuse absurd files early


class VerdictError(EncodingError):
    """A verdict JSON document is malformed or of an unknown version."""


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
        body = _expect_header(obj, VERDICT_KIND)
        return _verdict_from(body)


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedVerdict:
    verdict: Verdict
    signature: BLSSignature

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict.to_json(), "signature": _hex(self.signature)}

    @classmethod
    def from_json(cls, obj: object) -> SignedVerdict:
        if not isinstance(obj, dict) or set(obj) != {"verdict", "signature"}:
            raise VerdictError("signed verdict must be an object with verdict and signature")
        return cls(
            verdict=Verdict.from_json(obj["verdict"]),
            signature=BLSSignature(_unhex(obj["signature"], 96)),
        )


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


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


@dataclass(frozen=True, kw_only=True, slots=True)
class VerdictBundle:
    """Verdicts of several auditors on one run under one aggregate BLS signature."""

    run_id: str
    verdicts: tuple[Verdict, ...]
    signature: BLSSignature

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERDICT_VERSION,
            "kind": BUNDLE_KIND,
            "run_id": self.run_id,
            "verdicts": [v.to_json() for v in self.verdicts],
            "signature": _hex(self.signature),
        }

    @classmethod
    def from_json(cls, obj: object) -> VerdictBundle:
        body = _expect_header(obj, BUNDLE_KIND)
        _expect_keys(body, {"run_id", "verdicts", "signature"})
        verdicts = body["verdicts"]
        if not isinstance(verdicts, list):
            raise VerdictError("bundle verdicts must be a list")
        return cls(
            run_id=_str(body["run_id"]),
            verdicts=tuple(Verdict.from_json(v) for v in verdicts),
            signature=BLSSignature(_unhex(body["signature"], 96)),
        )


def aggregate_verdicts(signed: Sequence[SignedVerdict]) -> VerdictBundle:
    """One signature for many auditors' verdicts on the same run (no verification is done here).

    Raises VerdictError when empty, when the verdicts name different runs, or when one
    (auditor, step) appears twice.
    """
    if not signed:
        raise VerdictError("nothing to aggregate")
    runs = {s.verdict.run_id for s in signed}
    if len(runs) != 1:
        raise VerdictError(f"verdicts of one bundle must share a run, got {sorted(runs)[:3]}")
    keys = [(s.verdict.auditor, s.verdict.step) for s in signed]
    if len(set(keys)) != len(keys):
        raise VerdictError("duplicate (auditor, step) in bundle")
    return VerdictBundle(
        run_id=next(iter(runs)),
        verdicts=tuple(s.verdict for s in signed),
        signature=aggregate([s.signature for s in signed]),
    )


def verify_bundle(bundle: VerdictBundle) -> bool:
    """One pairing check over all verdicts (each a distinct message). Never raises."""
    try:
        if not bundle.verdicts or any(v.run_id != bundle.run_id for v in bundle.verdicts):
            return False
        return aggregate_verify(
            [v.auditor for v in bundle.verdicts],
            [(Domain.VERDICT, v.run_id, v.canonical_bytes()) for v in bundle.verdicts],
            bundle.signature,
        )
    except Exception:
        return False


# --- JSON mapping -------------------------------------------------------------------------------


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def _unhex(value: object, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise VerdictError(f"expected a 0x-hex string, got {str(value)[:40]!r}")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise VerdictError(f"bad hex: {value[:40]!r}") from exc
    if size is not None and len(raw) != size:
        raise VerdictError(f"expected {size} bytes, got {len(raw)}")
    return raw


def _float_out(x: float) -> float | str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(x)


def _float_in(value: object) -> float:
    specials = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if isinstance(value, str) and value in specials:
        return specials[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VerdictError(f"expected a number, got {str(value)[:40]!r}")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise VerdictError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise VerdictError(f"expected a non-negative integer, got {str(value)[:40]!r}")
    return value


def _expect_keys(obj: Mapping[str, object], keys: set[str]) -> None:
    if set(obj) != keys:
        raise VerdictError(
            f"unexpected fields {sorted(set(obj) - keys)[:5]}, "
            f"missing {sorted(keys - set(obj))[:5]}"
        )


def _expect_header(obj: object, kind: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise VerdictError("a verdict document must be a JSON object")
    if obj.get("kind") != kind:
        raise VerdictError(f"expected kind {kind!r}, got {str(obj.get('kind'))[:40]!r}")
    if obj.get("version") != VERDICT_VERSION:
        raise VerdictError(f"unsupported verdict version {obj.get('version')!r}")
    return {k: v for k, v in obj.items() if k not in ("kind", "version")}


def _opt_hex(value: bytes | None) -> str | None:
    return None if value is None else _hex(value)


def _to_obj(v: Verdict) -> dict[str, Any]:
    return {
        "run_id": v.run_id,
        "peer": _hex(v.peer),
        "step": v.step,
        "outcome": v.outcome.value,
        "mode": v.mode.value,
        "reason": v.reason,
        "replay_seed": _hex(v.replay_seed),
        "recipe_hash": _hex(v.recipe_hash),
        "manifest_hash": _hex(v.manifest_hash),
        "committed_root": _opt_hex(v.committed_root),
        "recomputed_root": _opt_hex(v.recomputed_root),
        "tensors": [
            {
                "name": t.name,
                "rel_l2": _float_out(t.rel_l2),
                "cosine": _float_out(t.cosine),
                "max_rel_l2": None if t.max_rel_l2 is None else _float_out(t.max_rel_l2),
                "max_cosine": None if t.max_cosine is None else _float_out(t.max_cosine),
                "passed": t.passed,
            }
            for t in v.tensors
        ],
        "evidence": [
            {
                "kind": e.kind.value,
                "artifact": e.artifact,
                "root": _hex(e.root),
                "leaf_count": e.leaf_count,
                "indices": list(e.indices),
                "leaf_hashes": [_hex(h) for h in e.leaf_hashes],
                "observed_hashes": [_hex(h) for h in e.observed_hashes],
                "proof_hashes": [_hex(h) for h in e.proof_hashes],
            }
            for e in v.evidence
        ],
        "usefulness": None
        if v.usefulness is None
        else {
            "heldout": v.usefulness.heldout,
            "loss_before": _float_out(v.usefulness.loss_before),
            "loss_after": _float_out(v.usefulness.loss_after),
        },
        "auditor": _hex(v.auditor),
        "sample_seed": _opt_hex(v.sample_seed),
        "device": v.device,
        "torch_version": v.torch_version,
    }


_VERDICT_KEYS = {
    "run_id", "peer", "step", "outcome", "mode", "reason", "replay_seed", "recipe_hash",
    "manifest_hash", "committed_root", "recomputed_root", "tensors", "evidence", "usefulness",
    "auditor", "sample_seed", "device", "torch_version",
}  # fmt: skip


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise VerdictError(f"{what} must be a list")
    return value


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VerdictError(f"{what} must be an object")
    return value


def _opt_float(value: object) -> float | None:
    return None if value is None else _float_in(value)


def _tensor_from(obj: object) -> TensorCheck:
    d = _dict(obj, "tensor check")
    _expect_keys(d, {"name", "rel_l2", "cosine", "max_rel_l2", "max_cosine", "passed"})
    if not isinstance(d["passed"], bool):
        raise VerdictError("passed must be a boolean")
    return TensorCheck(
        name=_str(d["name"]),
        rel_l2=_float_in(d["rel_l2"]),
        cosine=_float_in(d["cosine"]),
        max_rel_l2=_opt_float(d["max_rel_l2"]),
        max_cosine=_opt_float(d["max_cosine"]),
        passed=d["passed"],
    )


def _evidence_from(obj: object) -> Evidence:
    d = _dict(obj, "evidence")
    _expect_keys(
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
        artifact=_str(d["artifact"]),
        root=Hash32(_unhex(d["root"], 32)),
        leaf_count=_int(d["leaf_count"]),
        indices=tuple(_int(i) for i in _list(d["indices"], "indices")),
        leaf_hashes=tuple(Hash32(_unhex(h, 32)) for h in _list(d["leaf_hashes"], "leaf_hashes")),
        observed_hashes=tuple(
            Hash32(_unhex(h, 32)) for h in _list(d["observed_hashes"], "observed_hashes")
        ),
        proof_hashes=tuple(Hash32(_unhex(h, 32)) for h in _list(d["proof_hashes"], "proof_hashes")),
    )
    if not len(ev.indices) == len(ev.leaf_hashes) == len(ev.observed_hashes):
        raise VerdictError("evidence indices, leaf hashes and observed hashes differ in length")
    return ev


def _usefulness_from(obj: object) -> Usefulness | None:
    if obj is None:
        return None
    d = _dict(obj, "usefulness")
    _expect_keys(d, {"heldout", "loss_before", "loss_after"})
    return Usefulness(
        heldout=_str(d["heldout"]),
        loss_before=_float_in(d["loss_before"]),
        loss_after=_float_in(d["loss_after"]),
    )


def _opt_hash(value: object) -> Hash32 | None:
    return None if value is None else Hash32(_unhex(value, 32))


def _verdict_from(d: dict[str, object]) -> Verdict:
    _expect_keys(d, _VERDICT_KEYS)
    try:
        outcome = Outcome(d["outcome"])
        mode = Mode(d["mode"])
    except ValueError as exc:
        raise VerdictError(f"unknown outcome or mode: {exc}") from exc
    return Verdict(
        run_id=_str(d["run_id"]),
        peer=BLSPubkey(_unhex(d["peer"], 48)),
        step=_int(d["step"]),
        outcome=outcome,
        mode=mode,
        reason=_str(d["reason"]),
        replay_seed=_unhex(d["replay_seed"]),
        recipe_hash=Hash32(_unhex(d["recipe_hash"], 32)),
        manifest_hash=Hash32(_unhex(d["manifest_hash"], 32)),
        committed_root=_opt_hash(d["committed_root"]),
        recomputed_root=_opt_hash(d["recomputed_root"]),
        tensors=tuple(_tensor_from(t) for t in _list(d["tensors"], "tensors")),
        evidence=tuple(_evidence_from(e) for e in _list(d["evidence"], "evidence")),
        usefulness=_usefulness_from(d["usefulness"]),
        auditor=BLSPubkey(_unhex(d["auditor"], 48)),
        sample_seed=_opt_hash(d["sample_seed"]),
        device=_str(d["device"]),
        torch_version=_str(d["torch_version"]),
    )


def load_signed_verdict(data: bytes) -> SignedVerdict:
    """Parse a verdict file's bytes strictly; raises :class:`VerdictError`."""
    if len(data) > MAX_VERDICT_JSON:
        raise VerdictError(f"verdict file too large ({len(data)} bytes)")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerdictError(f"verdict file is not JSON: {exc}") from exc
    return SignedVerdict.from_json(obj)
