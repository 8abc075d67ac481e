"""Contribution verdicts: what an auditor found on one peer's contribution to one shared-run round.

A :class:`ContributionVerdict` names the contribution by its record hash, gives one outcome
("pass", "fail" when a recomputation differs, "invalid" when a committed artifact does not match
its root or signature), the result of each check of docs/auditing.md ("Auditing shared-run
contributions") in the fixed order :data:`CHECK_NAMES`, the inner steps re-executed, and the
usefulness measurement (held-out loss at theta_r and at theta_r - alpha*d).

The JSON form is ``{"kind": "veritrain-contribution-verdict", "version": 1, ...fields}``; its hash
is sha256 of the canonical JSON (keys sorted, no spaces, ASCII; non-finite floats as the strings
"NaN", "Infinity", "-Infinity"). The auditor signs (``Domain.CONTRIBUTION_VERDICT``, shared run
id, that hash), as peers sign contributions. The reader is strict: unknown or missing keys, wrong
sizes, check names out of order and an outcome that contradicts the checks are refused with a
:class:`ContributionVerdictError` naming the field.
Vector: tests/vectors/shared/contribution_verdict.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from audit.tolerance import Mode
from audit.verdict import MAX_STR, Outcome, VerdictError, read_verdict_json
from proofs.codec import (
    as_float,
    as_object,
    as_str,
    check_keys,
    float_out,
    get_bytes,
    get_int,
    get_list,
    record_hash,
    to_hex,
)
from proofs.errors import EncodingError, SignatureError
from proofs.hashing import Hash32
from proofs.signatures import PUBKEY_SIZE, Domain, KeyPair
from proofs.signed import Signed

CONTRIBUTION_VERDICT_VERSION = 1
CONTRIBUTION_VERDICT_KIND = "veritrain-contribution-verdict"
MAX_CONTRIBUTION_VERDICT_JSON = 1 << 20
"""Bytes of one signed contribution verdict file (a few KB in practice)."""
MAX_STEPS = 2048
"""Step checks in one verdict: at most the inner steps of a round (trainer.sharedrun)."""

CHECK_NAMES = (
    "record",
    "start-state",
    "local-chain",
    "inner-steps",
    "final-state",
    "error-feedback",
)
"""Every verdict carries one :class:`Check` of each name, in this order."""

STEP_OUTCOMES = ("pass", "fail", "invalid")


class ContributionVerdictError(VerdictError):
    """A contribution verdict document is malformed, inconsistent or of an unknown version."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContributionVerdictError(message)


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    """One named check; ``detail`` says what was compared, and on failure what differed."""

    name: str
    passed: bool
    detail: str

    def __post_init__(self) -> None:
        _require(self.name in CHECK_NAMES, f"unknown check name {self.name!r:.40}")
        _require(isinstance(self.passed, bool), "check.passed must be a boolean")
        _require(isinstance(self.detail, str), "check.detail must be a string")


@dataclass(frozen=True, kw_only=True, slots=True)
class StepCheck:
    """One re-executed inner step: its solo-run verdict outcome and reason."""

    step: int
    outcome: str
    reason: str

    def __post_init__(self) -> None:
        _require(self.step >= 0, f"step must be >= 0, got {self.step}")
        _require(self.outcome in STEP_OUTCOMES, f"step outcome {self.outcome!r:.40} unknown")


@dataclass(frozen=True, kw_only=True, slots=True)
class ContributionVerdict:
    """An auditor's finding on one contribution (unsigned body). See the module docstring."""

    version: int
    shared_run_id: str
    genesis: Hash32
    round: int
    peer: str
    pubkey: bytes
    contribution: Hash32
    outcome: Outcome
    mode: Mode
    reason: str
    checks: tuple[Check, ...]
    steps: tuple[StepCheck, ...]
    inner_steps: int
    loss_before: float
    loss_after: float
    heldout: str
    sample_seed: Hash32
    auditor: bytes
    device: str
    torch_version: str

    def __post_init__(self) -> None:
        _require(
            self.version == CONTRIBUTION_VERDICT_VERSION,
            f"contribution verdict version must be {CONTRIBUTION_VERDICT_VERSION}",
        )
        _require(bool(self.shared_run_id) and bool(self.peer), "shared_run_id and peer needed")
        for name in ("genesis", "contribution", "sample_seed"):
            _require(len(getattr(self, name)) == 32, f"{name} must be 32 bytes")
        for name in ("pubkey", "auditor"):
            _require(len(getattr(self, name)) == PUBKEY_SIZE, f"{name} must be a BLS key")
        _require(self.round >= 0 and self.inner_steps >= 1, "round >= 0 and inner_steps >= 1")
        names = tuple(c.name for c in self.checks)
        _require(names == CHECK_NAMES, f"checks must be {list(CHECK_NAMES)} in order, got {names}")
        _require(len(self.steps) <= MAX_STEPS, f"more than {MAX_STEPS} step checks")
        all_passed = all(c.passed for c in self.checks)
        if self.outcome is Outcome.PASS:
            _require(all_passed and self.reason == "", "a pass needs every check passed, no reason")
        else:
            _require(not all_passed and self.reason != "", "a fail or invalid needs a failed check")

    @property
    def usefulness(self) -> float:
        """Held-out loss improvement of applying this contribution alone (not clipped)."""
        return self.loss_before - self.loss_after

    def check(self, name: str) -> Check:
        """The check called ``name``; KeyError for a name outside CHECK_NAMES."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": CONTRIBUTION_VERDICT_KIND,
            "version": self.version,
            "shared_run_id": self.shared_run_id,
            "genesis": to_hex(self.genesis),
            "round": self.round,
            "peer": self.peer,
            "pubkey": to_hex(self.pubkey),
            "contribution": to_hex(self.contribution),
            "outcome": self.outcome.value,
            "mode": self.mode.value,
            "reason": self.reason,
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
            "steps": [
                {"step": s.step, "outcome": s.outcome, "reason": s.reason} for s in self.steps
            ],
            "inner_steps": self.inner_steps,
            "loss_before": float_out(self.loss_before),
            "loss_after": float_out(self.loss_after),
            "heldout": self.heldout,
            "sample_seed": to_hex(self.sample_seed),
            "auditor": to_hex(self.auditor),
            "device": self.device,
            "torch_version": self.torch_version,
        }

    def hash(self) -> Hash32:
        """sha256 of the canonical JSON: what the auditor signs."""
        return record_hash(self.to_json())

    def signing_context(self) -> str:
        return self.shared_run_id

    def signing_payload(self) -> bytes:
        return self.hash()

    @classmethod
    def from_json(cls, obj: Any) -> ContributionVerdict:
        try:
            return _from_json(obj)
        except ContributionVerdictError:
            raise
        except EncodingError as exc:
            raise ContributionVerdictError(str(exc)) from exc


_KEYS = (
    "kind", "version", "shared_run_id", "genesis", "round", "peer", "pubkey", "contribution",
    "outcome", "mode", "reason", "checks", "steps", "inner_steps", "loss_before", "loss_after",
    "heldout", "sample_seed", "auditor", "device", "torch_version",
)  # fmt: skip


def _s(d: Mapping[str, Any], key: str) -> str:
    return as_str(d[key], key, max_len=MAX_STR)


def _check_from(obj: object) -> Check:
    check_keys(obj, "check", ("name", "passed", "detail"))
    d = as_object(obj, "check")
    _require(isinstance(d["passed"], bool), "check.passed must be true or false")
    return Check(name=_s(d, "name"), passed=d["passed"], detail=_s(d, "detail"))


def _step_from(obj: object) -> StepCheck:
    check_keys(obj, "step check", ("step", "outcome", "reason"))
    d = as_object(obj, "step check")
    return StepCheck(step=get_int(d, "step"), outcome=_s(d, "outcome"), reason=_s(d, "reason"))


def _from_json(obj: Any) -> ContributionVerdict:
    check_keys(obj, "contribution verdict", _KEYS)
    _require(
        obj["kind"] == CONTRIBUTION_VERDICT_KIND,
        f"expected kind {CONTRIBUTION_VERDICT_KIND!r}, got {str(obj['kind'])[:40]!r}",
    )
    version = get_int(obj, "version")
    _require(version == CONTRIBUTION_VERDICT_VERSION, f"unsupported version {version}")
    try:
        outcome, mode = Outcome(obj["outcome"]), Mode(obj["mode"])
    except ValueError as exc:
        raise ContributionVerdictError(f"unknown outcome or mode: {exc}") from None
    return ContributionVerdict(
        version=version,
        shared_run_id=_s(obj, "shared_run_id"),
        genesis=Hash32(get_bytes(obj, "genesis", 32)),
        round=get_int(obj, "round"),
        peer=_s(obj, "peer"),
        pubkey=get_bytes(obj, "pubkey", PUBKEY_SIZE),
        contribution=Hash32(get_bytes(obj, "contribution", 32)),
        outcome=outcome,
        mode=mode,
        reason=_s(obj, "reason"),
        checks=tuple(_check_from(c) for c in get_list(obj, "checks", max_items=len(CHECK_NAMES))),
        steps=tuple(_step_from(s) for s in get_list(obj, "steps", max_items=MAX_STEPS)),
        inner_steps=get_int(obj, "inner_steps"),
        loss_before=as_float(obj["loss_before"], "loss_before"),
        loss_after=as_float(obj["loss_after"], "loss_after"),
        heldout=_s(obj, "heldout"),
        sample_seed=Hash32(get_bytes(obj, "sample_seed", 32)),
        auditor=get_bytes(obj, "auditor", PUBKEY_SIZE),
        device=_s(obj, "device"),
        torch_version=_s(obj, "torch_version"),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class SignedContributionVerdict(Signed[ContributionVerdict]):
    """A contribution verdict and its auditor's signature over (CONTRIBUTION_VERDICT, shared run
    id, verdict hash). On disk: ``{"verdict": {...}, "signature": "0x..."}``."""

    KEY = "verdict"
    DOMAIN = Domain.CONTRIBUTION_VERDICT
    RECORD = ContributionVerdict
    ERROR = ContributionVerdictError

    verdict: ContributionVerdict

    def verify(self, pubkey: bytes | None = None) -> bool:
        """True when signed by ``pubkey`` (the verdict's auditor by default); never raises."""
        return Signed.verify(self, self.verdict.auditor if pubkey is None else pubkey)


def sign_contribution_verdict(
    keypair: KeyPair, verdict: ContributionVerdict
) -> SignedContributionVerdict:
    """Sign ``verdict``; SignatureError when ``keypair`` is not the verdict's auditor."""
    if keypair.public != verdict.auditor:
        raise SignatureError("the signing key is not the contribution verdict's auditor key")
    return SignedContributionVerdict.sign(keypair, verdict)


def load_contribution_verdict(data: bytes) -> SignedContributionVerdict:
    """Parse a signed contribution verdict file's bytes strictly (size and nesting limited by
    proofs.jsonlimits). Raises :class:`ContributionVerdictError`; does not check the signature
    (call ``.verify()``)."""
    try:
        return SignedContributionVerdict.from_json(
            read_verdict_json(data, max_bytes=MAX_CONTRIBUTION_VERDICT_JSON)
        )
    except ContributionVerdictError:
        raise
    except EncodingError as exc:
        raise ContributionVerdictError(str(exc)) from exc
