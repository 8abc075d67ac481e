"""Several auditors' verdicts on one run under one aggregate BLS signature."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from audit.verdict import (
    BUNDLE_KIND,
    MAX_BUNDLE_JSON,
    MAX_ITEMS,
    MAX_STR,
    VERDICT_VERSION,
    SignedVerdict,
    Verdict,
    VerdictError,
    as_verdict_error,
    expect_header,
    read_verdict_json,
)
from proofs.codec import as_bytes, as_list, as_str, check_keys, to_hex
from proofs.errors import EncodingError
from proofs.signatures import BLSSignature, Domain, aggregate, aggregate_verify


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
            "signature": to_hex(self.signature),
        }

    @classmethod
    def from_json(cls, obj: object) -> VerdictBundle:
        body = expect_header(obj, BUNDLE_KIND)
        try:
            check_keys(body, "verdict bundle", ("run_id", "verdicts", "signature"))
            verdicts = as_list(body["verdicts"], "bundle verdicts", max_items=MAX_ITEMS)
            run_id = as_str(body["run_id"], "run_id", max_len=MAX_STR)
            signature = BLSSignature(as_bytes(body["signature"], "signature", 96))
        except EncodingError as exc:
            raise as_verdict_error(exc) from exc
        return cls(
            run_id=run_id,
            verdicts=tuple(Verdict.from_json(v) for v in verdicts),
            signature=signature,
        )


def load_verdict_bundle(data: bytes) -> VerdictBundle:
    """Parse a bundle file's bytes strictly (at most MAX_BUNDLE_JSON bytes, nesting limited by
    proofs.jsonlimits); raises :class:`VerdictError`."""
    return VerdictBundle.from_json(read_verdict_json(data, max_bytes=MAX_BUNDLE_JSON))


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
