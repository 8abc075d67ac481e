"""BLS12-381 proof-of-possession signatures over raw messages, with two interchangeable backends.

Both implement the IETF ciphersuite ``BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_`` that Ethereum
uses (draft-irtf-cfrg-bls-signature-05), so keys and signatures are byte-identical:

- ``"py_ecc"``: py_ecc's pure-Python ``G2ProofOfPossession``, the reference and the oracle.
- ``"native"``: milagro-bls-binding (Rust) for keys, signing and verification, 30-100x faster;
  py-arkworks-bls12381 for the G2 subgroup check that ``aggregate`` needs (milagro has none).

The backend is chosen once at import: ``VERITRAIN_BLS=py_ecc`` or ``VERITRAIN_BLS=native`` forces
one; unset, the native backend is used when both packages import, py_ecc otherwise.
:func:`set_backend` switches it (the tests run both). Any other value raises SignatureError.

This module is the raw-message entry point: callers sign exact bytes with no domain separation.
Applications use :mod:`proofs.signatures`, which builds the domain-separated message; the public
Ethereum vectors (tests/vectors/bls) run here because they sign raw messages. Functions that
return a bool never raise; ``sign``, ``sk_to_pk`` and ``aggregate`` raise SignatureError.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from eth_typing import BLSPubkey, BLSSignature

# py_ecc's package __init__ raises Python's recursion limit to 100000 (its pure-Python field
# arithmetic once recursed deeply; signing and verifying need far less, tests/test_signatures.py
# runs under the restored limit). With that limit a deeply nested JSON document from a peer
# overflows the C stack inside json.loads (a segfault, not an exception), so the limit is put back
# right after the import. If py_ecc was already imported (web3 imports it too), the limit seen here
# is already raised: Python's default (1000) is restored instead.
_RECURSION_LIMIT = sys.getrecursionlimit()
from py_ecc.bls.ciphersuites import G2ProofOfPossession as _PyEccBls  # noqa: E402
from py_ecc.bls.g2_primitives import signature_to_G2, subgroup_check  # noqa: E402
from py_ecc.optimized_bls12_381.optimized_curve import curve_order as _CURVE_ORDER  # noqa: E402

sys.setrecursionlimit(_RECURSION_LIMIT if _RECURSION_LIMIT < 100_000 else 1000)

from proofs.errors import SignatureError  # noqa: E402

logger = logging.getLogger(__name__)

CURVE_ORDER: Final[int] = _CURVE_ORDER
ENV_VAR: Final = "VERITRAIN_BLS"
BACKENDS: Final = ("native", "py_ecc")


class Backend(Protocol):
    """What each backend provides, over raw messages. ``secret`` is in (0, CURVE_ORDER)."""

    name: str

    def sk_to_pk(self, secret: int) -> BLSPubkey: ...
    def sign(self, secret: int, message: bytes) -> BLSSignature: ...
    def key_validate(self, pubkey: bytes) -> bool: ...
    def verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool: ...
    def aggregate(self, signatures: Sequence[bytes]) -> BLSSignature: ...
    def fast_aggregate_verify(
        self, pubkeys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool: ...
    def aggregate_verify(
        self, pubkeys: Sequence[bytes], messages: Sequence[bytes], signature: bytes
    ) -> bool: ...


class PyEccBackend:
    """py_ecc's ``G2ProofOfPossession``: the reference implementation."""

    name = "py_ecc"

    def sk_to_pk(self, secret: int) -> BLSPubkey:
        return BLSPubkey(bytes(_PyEccBls.SkToPk(secret)))

    def sign(self, secret: int, message: bytes) -> BLSSignature:
        return BLSSignature(bytes(_PyEccBls.Sign(secret, message)))

    def key_validate(self, pubkey: bytes) -> bool:
        return bool(_PyEccBls.KeyValidate(BLSPubkey(pubkey)))

    def verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        return bool(_PyEccBls.Verify(BLSPubkey(pubkey), message, BLSSignature(signature)))

    def aggregate(self, signatures: Sequence[bytes]) -> BLSSignature:
        for sig in signatures:
            # The IETF Aggregate only decodes its inputs; the subgroup check is ours (an
            # off-subgroup share could cancel another's torsion and hide in a valid aggregate).
            if not subgroup_check(signature_to_G2(BLSSignature(sig))):
                raise SignatureError("signature is not in the G2 subgroup")
        return BLSSignature(bytes(_PyEccBls.Aggregate([BLSSignature(s) for s in signatures])))

    def fast_aggregate_verify(
        self, pubkeys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool:
        keys = [BLSPubkey(k) for k in pubkeys]
        return bool(_PyEccBls.FastAggregateVerify(keys, message, BLSSignature(signature)))

    def aggregate_verify(
        self, pubkeys: Sequence[bytes], messages: Sequence[bytes], signature: bytes
    ) -> bool:
        keys = [BLSPubkey(k) for k in pubkeys]
        return bool(_PyEccBls.AggregateVerify(keys, list(messages), BLSSignature(signature)))


class NativeBackend:
    """milagro-bls-binding, with py-arkworks-bls12381's point decoding for subgroup checks."""

    name = "native"

    def __init__(self) -> None:
        # milagro-bls-binding warns on import that it is unmaintained; it still implements the
        # suite byte-for-byte (checked against py_ecc and the Ethereum vectors in the tests).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import milagro_bls_binding
        import py_arkworks_bls12381

        self._m = milagro_bls_binding
        self._g1 = py_arkworks_bls12381.G1Point
        self._g2 = py_arkworks_bls12381.G2Point

    def sk_to_pk(self, secret: int) -> BLSPubkey:
        return BLSPubkey(bytes(self._m.SkToPk(secret.to_bytes(32, "big"))))

    def sign(self, secret: int, message: bytes) -> BLSSignature:
        return BLSSignature(bytes(self._m.Sign(secret.to_bytes(32, "big"), message)))

    def key_validate(self, pubkey: bytes) -> bool:
        # arkworks' checked decoding refuses bad encodings, points off the curve and outside G1;
        # KeyValidate also refuses the identity (draft-irtf-cfrg-bls-signature section 2.5).
        point = self._g1.from_compressed_bytes(pubkey)
        return bool(point != self._g1.identity())

    def verify(self, pubkey: bytes, message: bytes, signature: bytes) -> bool:
        return bool(self._m.Verify(pubkey, message, signature))

    def aggregate(self, signatures: Sequence[bytes]) -> BLSSignature:
        for sig in signatures:
            try:
                self._g2.from_compressed_bytes(sig)  # checked: on the curve and in G2
            except Exception as exc:  # arkworks raises a bare Exception
                raise SignatureError("signature is not a valid G2 point in the subgroup") from exc
        return BLSSignature(bytes(self._m.Aggregate(list(signatures))))

    def fast_aggregate_verify(
        self, pubkeys: Sequence[bytes], message: bytes, signature: bytes
    ) -> bool:
        return bool(self._m.FastAggregateVerify(list(pubkeys), message, signature))

    def aggregate_verify(
        self, pubkeys: Sequence[bytes], messages: Sequence[bytes], signature: bytes
    ) -> bool:
        return bool(self._m.AggregateVerify(list(pubkeys), list(messages), signature))


def make_backend(name: str) -> Backend:
    """A backend by name ("native" or "py_ecc"). Raises SignatureError on another name, or when
    "native" is asked for and milagro-bls-binding or py-arkworks-bls12381 is not installed."""
    if name == "py_ecc":
        return PyEccBackend()
    if name == "native":
        try:
            return NativeBackend()
        except ImportError as exc:
            raise SignatureError(f"BLS backend 'native' is not installed: {exc}") from exc
    raise SignatureError(f"unknown BLS backend {name!r}; expected one of {', '.join(BACKENDS)}")


def _default_backend() -> Backend:
    wanted = os.environ.get(ENV_VAR, "").strip()
    if wanted:
        return make_backend(wanted)
    try:
        return NativeBackend()
    except ImportError:
        logger.info("milagro-bls-binding not importable; using py_ecc for BLS")
        return PyEccBackend()


_active: Backend = _default_backend()


def active() -> Backend:
    """The backend every function of this module and of proofs.signatures uses now."""
    return _active


def set_backend(name: str) -> str:
    """Switch every BLS operation to backend ``name``; returns the previous backend's name.

    Raises SignatureError as :func:`make_backend` does (the active backend is then unchanged).
    """
    global _active
    previous = _active.name
    _active = make_backend(name)
    return previous


def sk_to_pk(secret: int) -> BLSPubkey:
    """The compressed G1 public key of ``secret``. Raises SignatureError when out of range."""
    if isinstance(secret, bool) or not isinstance(secret, int) or not 0 < secret < CURVE_ORDER:
        raise SignatureError("secret key must be an int in (0, curve order)")
    return _active.sk_to_pk(secret)


def keygen(ikm: bytes) -> int:
    """IETF KeyGen (HKDF over SHA-256, no curve arithmetic): py_ecc for both backends."""
    return int(_PyEccBls.KeyGen(ikm))


def sign(secret: int, message: bytes) -> BLSSignature:
    """Sign the raw ``message``. Raises SignatureError on a secret out of range."""
    if isinstance(secret, bool) or not isinstance(secret, int) or not 0 < secret < CURVE_ORDER:
        raise SignatureError("secret key must be an int in (0, curve order)")
    if not isinstance(message, bytes):
        raise SignatureError("message must be bytes")
    return _active.sign(secret, message)


def _guard(what: str, call: Callable[..., object], *args: object) -> bool:
    try:
        return bool(call(*args))
    except Exception:  # backends raise on some malformed points; bool results must not
        logger.debug("BLS %s rejected malformed input", what, exc_info=True)
        return False


def key_validate(pubkey: bytes) -> bool:
    """KeyValidate: 48 bytes of a G1 point in the subgroup, not the identity. Never raises."""
    if not isinstance(pubkey, bytes) or len(pubkey) != 48:
        return False
    return _guard("key validation", _active.key_validate, pubkey)


def verify(pubkey: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is ``pubkey``'s signature on the raw ``message``. Never raises."""
    return _guard("verify", _active.verify, pubkey, message, signature)


def aggregate(signatures: Sequence[bytes]) -> BLSSignature:
    """Sum of one or more signatures, each checked to be a G2 point in the prime-order subgroup.

    Raises SignatureError on none, one that is not 96 bytes, or one that is not a point in G2.
    """
    sigs = list(signatures)
    if not sigs:
        raise SignatureError("cannot aggregate zero signatures")
    if not all(isinstance(s, bytes) and len(s) == 96 for s in sigs):
        raise SignatureError("every signature must be 96 bytes")
    try:
        return _active.aggregate(sigs)
    except SignatureError:
        raise
    except Exception as exc:  # py_ecc raises ValidationError/ValueError on invalid points
        raise SignatureError(f"invalid signature in aggregate: {exc}") from exc


def fast_aggregate_verify(pubkeys: Sequence[bytes], message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` aggregates every key's signature on ``message``. Never raises."""
    return _guard(
        "fast aggregate verify", _active.fast_aggregate_verify, pubkeys, message, signature
    )


def aggregate_verify(pubkeys: Sequence[bytes], messages: Sequence[bytes], signature: bytes) -> bool:
    """True iff ``signature`` aggregates pubkeys[i]'s signature on messages[i]. Never raises."""
    return _guard("aggregate verify", _active.aggregate_verify, pubkeys, messages, signature)
