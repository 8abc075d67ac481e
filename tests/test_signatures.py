"""BLS signatures: replay protection, tampering, aggregation, key files.

py_ecc is pure Python (sign ~0.2 s, verify ~0.5 s), so signatures are made once per module and the
number of sign/verify calls is kept small; properties over many inputs exercise only the message
format, which costs nothing.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from py_ecc.bls import G2ProofOfPossession

from proofs.errors import KeyFileError, KeyFileExistsError, SignatureError, VeritrainError
from proofs.signatures import (
    Domain,
    KeyPair,
    aggregate,
    aggregate_verify,
    fast_aggregate_verify,
    generate_keypair,
    keypair_from_seed,
    load_keypair,
    save_keypair,
    sign,
    signing_message,
    verify,
)

PAYLOAD = bytes.fromhex("11" * 32)
OTHER_PAYLOAD = bytes.fromhex("22" * 32)


@pytest.fixture(scope="module")
def alice() -> KeyPair:
    return keypair_from_seed(b"alice-seed-".ljust(32, b"\x00"))


@pytest.fixture(scope="module")
def bob() -> KeyPair:
    return keypair_from_seed(b"bob-seed-".ljust(32, b"\x00"))


@pytest.fixture(scope="module")
def sig_alice(alice: KeyPair) -> bytes:
    return sign(alice, Domain.STEP_MANIFEST, "run-1", PAYLOAD)


@pytest.fixture(scope="module")
def sig_bob(bob: KeyPair) -> bytes:
    return sign(bob, Domain.STEP_MANIFEST, "run-1", PAYLOAD)


@pytest.fixture(scope="module")
def sig_bob_verdict(bob: KeyPair) -> bytes:
    return sign(bob, Domain.VERDICT, "epoch-7", OTHER_PAYLOAD)


def test_sign_verify_roundtrip(alice: KeyPair, sig_alice: bytes) -> None:
    assert len(sig_alice) == 96
    assert verify(alice.public, Domain.STEP_MANIFEST, "run-1", PAYLOAD, sig_alice)


def test_py_ecc_verifies_our_signature_on_the_documented_message(
    alice: KeyPair, sig_alice: bytes
) -> None:
    message = signing_message(Domain.STEP_MANIFEST, "run-1", PAYLOAD)
    assert G2ProofOfPossession.Verify(alice.public, message, sig_alice)


@pytest.mark.parametrize("domain", [d for d in Domain if d is not Domain.STEP_MANIFEST])
def test_signature_cannot_be_replayed_in_another_domain(
    alice: KeyPair, sig_alice: bytes, domain: Domain
) -> None:
    assert not verify(alice.public, domain, "run-1", PAYLOAD, sig_alice)


@pytest.mark.parametrize("context", ["run-2", "run-10"])
def test_signature_cannot_be_replayed_in_another_run(
    alice: KeyPair, sig_alice: bytes, context: str
) -> None:
    assert not verify(alice.public, Domain.STEP_MANIFEST, context, PAYLOAD, sig_alice)


def test_tampered_payload_fails(alice: KeyPair, sig_alice: bytes) -> None:
    tampered = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]
    assert not verify(alice.public, Domain.STEP_MANIFEST, "run-1", tampered, sig_alice)


def test_tampered_signature_fails(alice: KeyPair, sig_alice: bytes) -> None:
    tampered = sig_alice[:50] + bytes([sig_alice[50] ^ 0x01]) + sig_alice[51:]
    assert not verify(alice.public, Domain.STEP_MANIFEST, "run-1", PAYLOAD, tampered)


def test_other_signer_fails(bob: KeyPair, sig_alice: bytes) -> None:
    assert not verify(bob.public, Domain.STEP_MANIFEST, "run-1", PAYLOAD, sig_alice)


def test_tampered_pubkey_fails(alice: KeyPair, sig_alice: bytes) -> None:
    tampered = alice.public[:-1] + bytes([alice.public[-1] ^ 1])
    assert not verify(tampered, Domain.STEP_MANIFEST, "run-1", PAYLOAD, sig_alice)


@pytest.mark.parametrize(
    ("pubkey", "domain", "context", "payload", "signature"),
    [
        (b"", Domain.VERDICT, "r", b"", b"\x00" * 96),
        (b"\x00" * 48, Domain.VERDICT, "r", b"", b"\x00" * 95),
        (b"\xff" * 48, Domain.VERDICT, "r", b"", b"\xff" * 96),
        ("00" * 48, Domain.VERDICT, "r", b"", b"\x00" * 96),
        (b"\x00" * 48, "verdict", "r", b"", b"\x00" * 96),
        (b"\x00" * 48, Domain.VERDICT, "", b"", b"\x00" * 96),
        (b"\x00" * 48, Domain.VERDICT, 7, b"", b"\x00" * 96),
        (b"\x00" * 48, Domain.VERDICT, "r", "payload", b"\x00" * 96),
        (None, None, None, None, None),
    ],
)
def test_verify_never_raises_on_garbage(
    pubkey: object, domain: object, context: object, payload: object, signature: object
) -> None:
    assert verify(pubkey, domain, context, payload, signature) is False  # type: ignore[arg-type]


def test_fast_aggregate_verify(
    alice: KeyPair, bob: KeyPair, sig_alice: bytes, sig_bob: bytes
) -> None:
    agg = aggregate([sig_alice, sig_bob])
    keys = [alice.public, bob.public]
    assert fast_aggregate_verify(keys, Domain.STEP_MANIFEST, "run-1", PAYLOAD, agg)
    # A missing signer, or the aggregate presented in another run, must not verify.
    assert not fast_aggregate_verify([alice.public], Domain.STEP_MANIFEST, "run-1", PAYLOAD, agg)
    assert not fast_aggregate_verify(keys, Domain.STEP_MANIFEST, "run-2", PAYLOAD, agg)


def test_aggregate_verify_distinct_messages(
    alice: KeyPair, bob: KeyPair, sig_alice: bytes, sig_bob_verdict: bytes
) -> None:
    agg = aggregate([sig_alice, sig_bob_verdict])
    keys = [alice.public, bob.public]
    msgs = [
        (Domain.STEP_MANIFEST, "run-1", PAYLOAD),
        (Domain.VERDICT, "epoch-7", OTHER_PAYLOAD),
    ]
    assert aggregate_verify(keys, msgs, agg)
    assert not aggregate_verify(keys, msgs[::-1], agg)


def test_aggregate_helpers_reject_malformed_input(alice: KeyPair, sig_alice: bytes) -> None:
    with pytest.raises(SignatureError):
        aggregate([])
    with pytest.raises(SignatureError):
        aggregate([sig_alice[:-1]])
    with pytest.raises(SignatureError):
        aggregate([b"\xff" * 96])
    msg = (Domain.VERDICT, "r", b"")
    assert not fast_aggregate_verify([], Domain.VERDICT, "r", b"", sig_alice)
    assert not aggregate_verify([alice.public], [msg, msg], sig_alice)
    assert not aggregate_verify([], [], sig_alice)
    assert not aggregate_verify([alice.public], [msg], b"short")


def test_keygen_is_deterministic_and_repr_hides_secret(alice: KeyPair) -> None:
    again = keypair_from_seed(b"alice-seed-".ljust(32, b"\x00"))
    assert again == alice
    assert str(alice.secret) not in repr(alice)
    assert "secret" not in repr(alice)
    assert G2ProofOfPossession.SkToPk(alice.secret) == alice.public
    assert generate_keypair().public != alice.public


@pytest.mark.parametrize("seed", [b"", b"x" * 31, "x" * 32])
def test_short_or_non_bytes_seed_rejected(seed: object) -> None:
    with pytest.raises(SignatureError) as info:
        keypair_from_seed(seed)  # type: ignore[arg-type]
    assert isinstance(info.value, VeritrainError) and isinstance(info.value, ValueError)


def test_sign_rejects_bad_context(alice: KeyPair) -> None:
    for context in ["", "x" * 1025]:
        with pytest.raises(SignatureError):
            sign(alice, Domain.VERDICT, context, PAYLOAD)


def test_key_file_roundtrip_and_permissions(tmp_path: Path, alice: KeyPair) -> None:
    path = tmp_path / "alice.key"
    save_keypair(path, alice)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keypair(path) == alice
    assert json.loads(path.read_text())["version"] == 1
    # Overwriting is atomic: no temporary file is left behind.
    save_keypair(path, alice, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.key"]


def test_key_file_never_overwritten_by_default(
    tmp_path: Path, alice: KeyPair, bob: KeyPair
) -> None:
    path = tmp_path / "alice.key"
    save_keypair(path, alice)
    with pytest.raises(KeyFileExistsError, match="already exists") as info:
        save_keypair(path, bob)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, KeyFileError)
    assert load_keypair(path) == alice  # the old identity is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.key"]
    save_keypair(path, bob, overwrite=True)
    assert load_keypair(path) == bob


def test_key_file_paths_that_cannot_hold_a_key(tmp_path: Path, alice: KeyPair) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        save_keypair(tmp_path / "no" / "such" / "alice.key", alice)
    with pytest.raises(KeyFileError, match=r"is a directory$"):
        save_keypair(tmp_path, alice, overwrite=True)
    with pytest.raises(KeyFileError, match=r"is a directory$"):
        load_keypair(tmp_path)
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keypair(tmp_path / "missing.key")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("first", ["", "import py_ecc; "])
def test_py_ecc_import_leaves_the_recursion_limit_low(first: str) -> None:
    # py_ecc sets 100000 on import; with it, deeply nested JSON overflows the C stack. A fresh
    # interpreter, as other tests start py-evm, which raises the limit again at run time.
    code = first + "import sys, proofs.signatures; print(sys.getrecursionlimit())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == 1000


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_key_file_readable_by_others_refused(tmp_path: Path, alice: KeyPair, mode: int) -> None:
    path = tmp_path / "alice.key"
    save_keypair(path, alice)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_keypair(path)


def _write_private(path: Path, text: str) -> None:
    path.write_text(text)
    os.chmod(path, 0o600)


def test_malformed_key_files_refused(tmp_path: Path, alice: KeyPair, bob: KeyPair) -> None:
    good = json.loads(
        json.dumps(
            {
                "version": 1,
                "kind": "veritrain-bls12381-keypair",
                "secret": "0x" + alice.secret.to_bytes(32, "big").hex(),
                "public": "0x" + alice.public.hex(),
            }
        )
    )
    cases = [
        "not json",
        "[]",
        json.dumps({**good, "version": 2}),
        json.dumps({**good, "kind": "other"}),
        json.dumps({**good, "public": "0x" + bob.public.hex()}),
        json.dumps({**good, "secret": "0x" + "00" * 32}),
        json.dumps({**good, "secret": "0x" + "ff" * 32}),
        json.dumps({**good, "secret": "0x" + "zz" * 32}),
        json.dumps({**good, "secret": alice.secret}),
        json.dumps({**good, "extra": 1}),
        json.dumps({k: v for k, v in good.items() if k != "public"}),
    ]
    path = tmp_path / "k.json"
    _write_private(path, json.dumps(good))
    assert load_keypair(path) == alice
    for text in cases:
        _write_private(path, text)
        with pytest.raises(KeyFileError):
            load_keypair(path)
    with pytest.raises(KeyFileError):
        load_keypair(tmp_path / "missing.json")


def test_symlinked_key_file_refused(tmp_path: Path, alice: KeyPair) -> None:
    real = tmp_path / "real.key"
    save_keypair(real, alice)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError):
        load_keypair(link)


_domains = st.sampled_from(list(Domain))
_contexts = st.text(min_size=1, max_size=40).filter(lambda s: len(s.encode("utf-8")) <= 1024)


@given(
    a=st.tuples(_domains, _contexts, st.binary(max_size=64)),
    b=st.tuples(_domains, _contexts, st.binary(max_size=64)),
)
def test_signing_message_is_injective(
    a: tuple[Domain, str, bytes], b: tuple[Domain, str, bytes]
) -> None:
    # Distinct (domain, context, payload) triples never share signed bytes: this is what makes
    # cross-domain and cross-run replay impossible for every input, not only the ones signed above.
    if a != b:
        assert signing_message(*a) != signing_message(*b)
    else:
        assert signing_message(*a) == signing_message(*b)


# --- Frozen vectors (tests/vectors/signatures, generated without veritrain's code) -------------

VECTORS = json.loads(
    (Path(__file__).resolve().parent / "vectors" / "signatures" / "vectors.json").read_text(
        encoding="utf-8"
    )
)


def _b(hex_string: str) -> bytes:
    return bytes.fromhex(hex_string.removeprefix("0x"))


def test_vectors_keys() -> None:
    for key in VECTORS["keys"]:
        pair = keypair_from_seed(_b(key["seed"]))
        assert pair.secret.to_bytes(32, "big") == _b(key["secret"])
        assert pair.public == _b(key["pubkey"])


def test_vectors_messages() -> None:
    assert len(VECTORS["messages"]) >= 7
    for case in VECTORS["messages"]:
        domain = Domain(case["domain"])
        message = signing_message(domain, case["context"], _b(case["payload"]))
        assert message == _b(case["message"])
        assert message.startswith(_b(VECTORS["magic"]))
    for context in VECTORS["invalidContexts"]:
        with pytest.raises(SignatureError):
            signing_message(Domain.VERDICT, context, b"")


def test_vectors_signatures_and_aggregate() -> None:
    keys = [keypair_from_seed(_b(k["seed"])) for k in VECTORS["keys"]]
    triples = []
    for case in VECTORS["signatures"]:
        pair = keys[case["key"]]
        triple = (Domain(case["domain"]), case["context"], _b(case["payload"]))
        # BLS signing is deterministic: the same key and message give the same bytes.
        assert sign(pair, *triple) == _b(case["signature"])
        assert G2ProofOfPossession.Verify(
            pair.public, signing_message(*triple), _b(case["signature"])
        )
        triples.append((pair.public, triple))
    agg = VECTORS["aggregate"]
    signatures = [_b(VECTORS["signatures"][i]["signature"]) for i in agg["of"]]
    assert aggregate(signatures) == _b(agg["signature"])
    assert aggregate_verify(
        [triples[i][0] for i in agg["of"]], [triples[i][1] for i in agg["of"]], _b(agg["signature"])
    )
