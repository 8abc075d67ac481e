"""Auditing shared-run contributions (issue #16, part A): verdict format, checks, attacks, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from audit.contribution_verdict import (
    CHECK_NAMES,
    ContributionVerdictError,
    SignedContributionVerdict,
    load_contribution_verdict,
    sign_contribution_verdict,
)
from audit.verdict import Outcome
from proofs.codec import canonical_json
from proofs.signatures import keypair_from_seed

VECTOR = json.loads(
    (Path(__file__).parent / "vectors" / "shared" / "contribution_verdict.json").read_text()
)


# ---- the verdict format ---------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(VECTOR["verdicts"])))
def test_contribution_verdict_vector(index: int) -> None:
    entry = VECTOR["verdicts"][index]
    data = json.dumps(entry["signed"]).encode()
    signed = load_contribution_verdict(data)
    verdict = signed.verdict
    # Written back, the record gives exactly the independent generator's bytes and hash.
    assert canonical_json(verdict.to_json()).decode("ascii") == entry["canonical"]
    assert verdict.hash() == hashlib.sha256(entry["canonical"].encode()).digest()
    assert "0x" + verdict.hash().hex() == entry["hash"]
    assert signed.verify()
    auditor = keypair_from_seed(bytes.fromhex(VECTOR["auditor_seed"][2:]))
    resigned = sign_contribution_verdict(auditor, verdict)
    assert resigned.to_json() == entry["signed"]
    assert [c.name for c in verdict.checks] == list(CHECK_NAMES)


def test_contribution_verdict_reader_is_strict() -> None:
    good = VECTOR["verdicts"][0]["signed"]

    def refused(mutate: object) -> None:
        doc = json.loads(json.dumps(good))
        mutate(doc)  # type: ignore[operator]
        with pytest.raises(ContributionVerdictError):
            load_contribution_verdict(json.dumps(doc).encode())

    refused(lambda d: d["verdict"].update(extra=1))
    refused(lambda d: d["verdict"].pop("heldout"))
    refused(lambda d: d["verdict"].update(kind="veritrain-verdict"))
    refused(lambda d: d["verdict"].update(version=2))
    refused(lambda d: d["verdict"].update(outcome="maybe"))
    refused(lambda d: d["verdict"].update(pubkey="0x00"))
    refused(lambda d: d["verdict"]["checks"].reverse())
    refused(lambda d: d["verdict"]["checks"].pop())
    refused(lambda d: d["verdict"]["checks"][0].update(passed=1))
    refused(lambda d: d["verdict"]["checks"][1].update(passed=False))  # a pass with a failed check
    refused(lambda d: d["verdict"].update(reason="x"))  # a pass with a reason
    refused(lambda d: d["verdict"]["steps"][0].update(outcome="ok"))
    with pytest.raises(ContributionVerdictError):
        load_contribution_verdict(b"[1,")
    with pytest.raises(ContributionVerdictError):
        load_contribution_verdict(b" " * (2 << 20))


def test_contribution_verdict_signature_binds_domain_and_body() -> None:
    signed = load_contribution_verdict(json.dumps(VECTOR["verdicts"][0]["signed"]).encode())
    other = keypair_from_seed(b"someone-else-entirely-0123456789")
    assert not signed.verify(other.public)

    changed = dataclasses.replace(signed.verdict, loss_after=5.0)
    forged = SignedContributionVerdict(signature=signed.signature, verdict=changed)
    assert not forged.verify()
    assert signed.verdict.outcome is Outcome.PASS
