"""Both BLS backends against the public Ethereum vectors and against each other, byte for byte.

The vectors (tests/vectors/bls) sign raw messages, so they run through proofs.bls, the raw-message
entry point; the cross-backend tests go through proofs.signatures' domain-separated API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proofs import bls, signatures
from proofs.errors import SignatureError
from proofs.signatures import Domain, keypair_from_seed

VECTORS: dict[str, list[dict[str, Any]]] = json.loads(
    (Path(__file__).resolve().parent / "vectors" / "bls" / "vectors.json").read_text("utf-8")
)
# A G2 point on the curve but outside the prime-order subgroup (bls12-381-tests).
NOT_IN_G2 = bytes.fromhex(VECTORS["deserialization_G2"][0]["input"]["signature"][2:])


def _b(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def _cases(kind: str) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in VECTORS[kind]]


@pytest.fixture(params=bls.BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = bls.set_backend(request.param)
    try:
        yield request.param
    finally:
        bls.set_backend(previous)


def test_native_backend_is_installed_and_default() -> None:
    # CI installs the pinned dependencies: the fast path must be the one that runs there.
    assert bls.make_backend("native").name == "native"


def test_unknown_backend_name_is_refused() -> None:
    with pytest.raises(SignatureError, match="unknown BLS backend 'blst'"):
        bls.set_backend("blst")


@pytest.mark.parametrize("case", _cases("sign"))
def test_vector_sign(backend: str, case: dict[str, Any]) -> None:
    secret = int.from_bytes(_b(case["input"]["privkey"]), "big")
    message = _b(case["input"]["message"])
    if case["output"] is None:
        with pytest.raises(SignatureError):
            bls.sign(secret, message)
        return
    signature = bls.sign(secret, message)
    assert signature == _b(case["output"])
    assert bls.verify(bls.sk_to_pk(secret), message, signature)


@pytest.mark.parametrize("case", _cases("verify"))
def test_vector_verify(backend: str, case: dict[str, Any]) -> None:
    given = case["input"]
    result = bls.verify(_b(given["pubkey"]), _b(given["message"]), _b(given["signature"]))
    assert result is case["output"]


@pytest.mark.parametrize("case", _cases("aggregate"))
def test_vector_aggregate(backend: str, case: dict[str, Any]) -> None:
    sigs = [_b(s) for s in case["input"]]
    if case["output"] is None:
        with pytest.raises(SignatureError):
            bls.aggregate(sigs)
        return
    assert bls.aggregate(sigs) == _b(case["output"])


@pytest.mark.parametrize("case", _cases("fast_aggregate_verify"))
def test_vector_fast_aggregate_verify(backend: str, case: dict[str, Any]) -> None:
    given = case["input"]
    keys = [_b(k) for k in given["pubkeys"]]
    result = bls.fast_aggregate_verify(keys, _b(given["message"]), _b(given["signature"]))
    assert result is case["output"]


@pytest.mark.parametrize("case", _cases("aggregate_verify"))
def test_vector_aggregate_verify(backend: str, case: dict[str, Any]) -> None:
    given = case["input"]
    keys = [_b(k) for k in given["pubkeys"]]
    messages = [_b(m) for m in given["messages"]]
    assert bls.aggregate_verify(keys, messages, _b(given["signature"])) is case["output"]


@pytest.mark.parametrize("case", _cases("deserialization_G2"))
def test_vector_bad_g2_point_is_refused_by_aggregate(backend: str, case: dict[str, Any]) -> None:
    with pytest.raises(SignatureError):
        bls.aggregate([_b(case["input"]["signature"])])


@pytest.mark.parametrize("case", _cases("deserialization_G1"))
def test_vector_bad_g1_point_is_not_a_valid_key(backend: str, case: dict[str, Any]) -> None:
    assert bls.key_validate(_b(case["input"]["pubkey"])) is case["output"]


def test_aggregate_refuses_off_subgroup_share_among_valid_ones(backend: str) -> None:
    key = keypair_from_seed(b"\x07" * 32)
    good = signatures.sign(key, Domain.VERDICT, "run-1", b"payload")
    with pytest.raises(SignatureError, match="G2"):
        signatures.aggregate([good, NOT_IN_G2])
    with pytest.raises(SignatureError, match="G2"):
        signatures.aggregate([NOT_IN_G2, good])


# --- The two backends against each other -------------------------------------------------------

KEYS = [keypair_from_seed(bytes([i]) * 32) for i in (1, 2, 3)]
PAYLOADS = [b"", b"manifest root", bytes(range(256))]


def _with(name: str) -> bls.Backend:
    return bls.make_backend(name)


def test_keys_are_identical_across_backends() -> None:
    native, reference = _with("native"), _with("py_ecc")
    for key in KEYS:
        assert native.sk_to_pk(key.secret) == reference.sk_to_pk(key.secret) == key.public


@pytest.mark.parametrize(("signer", "checker"), [("native", "py_ecc"), ("py_ecc", "native")])
def test_sign_with_one_backend_verify_with_the_other(signer: str, checker: str) -> None:
    sign_with, check_with = _with(signer), _with(checker)
    message = signatures.signing_message(Domain.STEP_MANIFEST, "run-x", b"root")
    for key in KEYS[:2]:
        sig = sign_with.sign(key.secret, message)
        assert sig == _with(checker).sign(key.secret, message)  # deterministic, same bytes
        assert check_with.verify(key.public, message, sig)
        assert not check_with.verify(key.public, message + b"!", sig)


def test_aggregates_and_aggregate_checks_agree_across_backends() -> None:
    native, reference = _with("native"), _with("py_ecc")
    messages = [signatures.signing_message(Domain.VERDICT, "run-7", p) for p in PAYLOADS]
    sigs = [native.sign(k.secret, m) for k, m in zip(KEYS, messages, strict=True)]
    agg = native.aggregate(sigs)
    assert agg == reference.aggregate(sigs)
    keys = [k.public for k in KEYS]
    assert native.aggregate_verify(keys, messages, agg)
    assert reference.aggregate_verify(keys, messages, agg)
    swapped = [messages[1], messages[0], messages[2]]
    assert not native.aggregate_verify(keys, swapped, agg)
    assert not reference.aggregate_verify(keys, swapped, agg)
    one = messages[0]
    same = native.aggregate([native.sign(k.secret, one) for k in KEYS])
    assert native.fast_aggregate_verify(keys, one, same)
    assert reference.fast_aggregate_verify(keys, one, same)


def test_signatures_api_gives_the_same_bytes_under_both_backends(backend: str) -> None:
    # The frozen domain-separated vectors (tests/vectors/signatures) pin these bytes too; this
    # checks the dispatch itself: whatever backend is active, the public API's output is equal.
    sig = signatures.sign(KEYS[0], Domain.PAYOUT_ROOT, "epoch-3", b"root")
    expected = _with("py_ecc").sign(
        KEYS[0].secret, signatures.signing_message(Domain.PAYOUT_ROOT, "epoch-3", b"root")
    )
    assert sig == expected
    assert signatures.verify(KEYS[0].public, Domain.PAYOUT_ROOT, "epoch-3", b"root", sig)
    assert not signatures.verify(KEYS[1].public, Domain.PAYOUT_ROOT, "epoch-3", b"root", sig)
    assert bls.active().name == backend


def test_frozen_signature_vectors_under_each_backend(backend: str) -> None:
    # tests/vectors/signatures pins veritrain's on-disk bytes; they must not depend on the backend.
    frozen = json.loads(
        (Path(__file__).resolve().parent / "vectors" / "signatures" / "vectors.json").read_text(
            "utf-8"
        )
    )
    keys = [keypair_from_seed(_b(k["seed"])) for k in frozen["keys"]]
    for key, row in zip(keys, frozen["keys"], strict=True):
        assert key.public == _b(row["pubkey"])
    triples = []
    for case in frozen["signatures"]:
        pair = keys[case["key"]]
        triple = (Domain(case["domain"]), case["context"], _b(case["payload"]))
        assert signatures.sign(pair, *triple) == _b(case["signature"])
        assert signatures.verify(pair.public, *triple, _b(case["signature"]))
        triples.append((pair.public, triple))
    agg = frozen["aggregate"]
    sigs = [_b(frozen["signatures"][i]["signature"]) for i in agg["of"]]
    assert signatures.aggregate(sigs) == _b(agg["signature"])
    assert signatures.aggregate_verify(
        [triples[i][0] for i in agg["of"]], [triples[i][1] for i in agg["of"]], _b(agg["signature"])
    )
