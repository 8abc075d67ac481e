"""Verdict JSON, signatures and aggregation, checked against the frozen vectors and py_ecc."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from py_ecc.bls import G2ProofOfPossession

from audit.bundle import VerdictBundle, aggregate_verdicts, verify_bundle
from audit.chunks import leaf_hash_map, verify_leaf_hashes
from audit.verdict import (
    SignedVerdict,
    VerdictError,
    load_signed_verdict,
    verify_verdict,
)
from proofs.merkle import MultiProof
from proofs.signatures import keypair_from_seed

VECTORS = Path(__file__).parent / "vectors" / "verdict"
SINGLE = ["pass_tolerant", "fail_tolerant_nan", "invalid_exact"]


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def _message(run_id: str, payload: bytes) -> bytes:
    # Independent rebuild of the layout in docs/signatures.md.
    tag, ctx = b"verdict", run_id.encode()
    return (
        b"veritrain/bls-msg/v1\x00"
        + struct.pack(">B", len(tag))
        + tag
        + struct.pack(">H", len(ctx))
        + ctx
        + struct.pack(">Q", len(payload))
        + payload
    )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("name", SINGLE)
def test_vector_round_trips_and_hashes(name: str) -> None:
    doc = _load(name)
    signed = SignedVerdict.from_json(doc["signed"])
    assert signed.to_json() == doc["signed"]
    canon = _canonical(doc["signed"]["verdict"])
    assert signed.verdict.canonical_bytes() == canon
    assert "0x" + hashlib.sha256(canon).hexdigest() == doc["canonical_sha256"]
    assert (
        signed.verdict.auditor == keypair_from_seed(bytes.fromhex(doc["auditor_seed"][2:])).public
    )


def test_vector_signature_verifies_with_py_ecc_and_ours() -> None:
    doc = _load("pass_tolerant")
    v = doc["signed"]["verdict"]
    msg = _message(v["run_id"], _canonical(v))
    sig = bytes.fromhex(doc["signed"]["signature"][2:])
    assert G2ProofOfPossession.Verify(bytes.fromhex(v["auditor"][2:]), msg, sig)
    signed = load_signed_verdict((json.dumps(doc["signed"])).encode())
    assert verify_verdict(signed)


def test_changed_verdict_does_not_verify() -> None:
    signed = SignedVerdict.from_json(_load("fail_tolerant_nan")["signed"])
    forged = dataclasses.replace(signed.verdict, reason="within tolerance")
    assert not verify_verdict(SignedVerdict(verdict=forged, signature=signed.signature))


def test_vector_evidence_proof_checks_against_root() -> None:
    for name in ("fail_tolerant_nan", "invalid_exact"):
        signed = SignedVerdict.from_json(_load(name)["signed"])
        (ev,) = signed.verdict.evidence
        proof = MultiProof(indices=ev.indices, leaf_count=ev.leaf_count, hashes=ev.proof_hashes)
        assert verify_leaf_hashes(ev.root, leaf_hash_map(ev.indices, ev.leaf_hashes), proof)
        assert not verify_leaf_hashes(ev.root, leaf_hash_map(ev.indices, ev.observed_hashes), proof)


def test_bundle_vector_aggregates_and_verifies() -> None:
    doc = _load("bundle_two_auditors")
    bundle = VerdictBundle.from_json(doc["bundle"])
    assert bundle.to_json() == doc["bundle"]
    # The aggregate is the G2 sum of the individual signatures (py_ecc as oracle).
    sigs = [bytes.fromhex(s[2:]) for s in doc["individual_signatures"]]
    assert bundle.signature == G2ProofOfPossession.Aggregate(sigs)
    assert verify_bundle(bundle)
    # Swapping one verdict for a changed copy breaks the aggregate.
    changed = dataclasses.replace(bundle.verdicts[1], step=4)
    broken = dataclasses.replace(bundle, verdicts=(bundle.verdicts[0], changed))
    assert not verify_bundle(broken)


def test_aggregation_refuses_mixed_runs_and_duplicates() -> None:
    signed = SignedVerdict.from_json(_load("pass_tolerant")["signed"])
    other = SignedVerdict(
        verdict=dataclasses.replace(signed.verdict, run_id="another-run"),
        signature=signed.signature,
    )
    with pytest.raises(VerdictError):
        aggregate_verdicts([signed, other])
    with pytest.raises(VerdictError):
        aggregate_verdicts([signed, signed])
    with pytest.raises(VerdictError):
        aggregate_verdicts([])


def _mutations(obj: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(sorted(obj))


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_malformed_documents_raise_verdict_error_only(data: st.DataObject) -> None:
    doc = _load("fail_tolerant_nan")["signed"]
    verdict = dict(doc["verdict"])
    key = data.draw(_mutations(verdict))
    verdict[key] = data.draw(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.just("0x12"),
            st.lists(st.integers(), max_size=2),
            st.just(float("nan")),
        )
    )
    try:
        parsed = SignedVerdict.from_json({"verdict": verdict, "signature": doc["signature"]})
    except VerdictError:
        return
    # Whatever parses must serialise back to exactly what was given.
    assert parsed.verdict.to_json()[key] == verdict[key]


@pytest.mark.parametrize(
    "data", [b"", b"{", b"[]", b'{"verdict": 1, "signature": "0x"}', b"\xff\xfe", b"1" * 10]
)
def test_garbage_files_raise_verdict_error(data: bytes) -> None:
    with pytest.raises(VerdictError):
        load_signed_verdict(data)
