"""BLS12-381 signatures (IETF proof-of-possession suite) with domain-separated messages.

Every signed message is built by :func:`signing_message` from a :class:`Domain` (what kind of
record is signed), a context (the run id or epoch it belongs to) and the payload. Each part is
length-prefixed, so no (domain, context, payload) triple encodes to the same bytes as another one,
and a signature on a step manifest of run A can never be replayed as a verdict, a payout root or a
manifest of run B. The byte layout is specified in docs/signatures.md.

The curve arithmetic runs in :mod:`proofs.bls`: milagro-bls-binding (native) by default, py_ecc
(the pure-Python reference, ~0.18 s to sign and ~0.5 s to verify) when the native packages are
missing or ``VERITRAIN_BLS=py_ecc`` is set; both give the same bytes (docs/signatures.md).
``verify*`` functions return a bool and never raise; ``sign``, ``aggregate`` and key functions
raise :class:`~proofs.errors.SignatureError` or :class:`~proofs.errors.KeyFileError`.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import secrets
import stat
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from eth_typing import BLSPubkey, BLSSignature

from proofs import bls
from proofs.codec import as_bytes
from proofs.errors import EncodingError, KeyFileError, KeyFileExistsError, SignatureError
from proofs.jsonlimits import UntrustedJsonError, loads_untrusted

logger = logging.getLogger(__name__)

# py_ecc's own NewTypes (from eth-typing), re-exported: BLSPubkey is a compressed G1 point
# (48 bytes), BLSSignature a compressed G2 point (96 bytes).
__all__ = [
    "BLSPubkey",
    "BLSSignature",
    "Domain",
    "KeyPair",
    "aggregate",
    "aggregate_verify",
    "fast_aggregate_verify",
    "generate_keypair",
    "keypair_from_json",
    "keypair_from_seed",
    "keypair_to_json",
    "load_keypair",
    "save_keypair",
    "sign",
    "signing_message",
    "validate_pubkey",
    "verify",
]

PUBKEY_SIZE = 48
SIGNATURE_SIZE = 96
MIN_SEED_SIZE = 32  # KeyGen (draft-irtf-cfrg-bls-signature section 2.3) requires IKM >= 32 bytes
MAX_CONTEXT_SIZE = 1024  # bytes of UTF-8; a run id or an epoch number is far shorter

MESSAGE_MAGIC = b"veritrain/bls-msg/v1\x00"
"""Prefix of every signed message: names the format and its version (docs/signatures.md)."""

KEY_FILE_VERSION = 1
KEY_FILE_KIND = "veritrain-bls12381-keypair"
MAX_KEY_FILE_BYTES = 64 << 10  # a key file is ~230 bytes; anything near this is not one


class Domain(enum.Enum):
    """What kind of record a signature covers; its value is the tag inside the signed message."""

    RUN_HEADER = "run-header"
    STEP_MANIFEST = "step-manifest"
    VERDICT = "verdict"
    PAYOUT_ROOT = "payout-root"
    SHARED_GENESIS = "shared-genesis"
    CONTRIBUTION = "contribution"
    ROUND = "round"
    CONTRIBUTION_VERDICT = "contribution-verdict"


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyPair:
    """A BLS secret scalar and its public key. ``repr`` never shows the secret."""

    secret: int = field(repr=False)
    public: BLSPubkey

    def __post_init__(self) -> None:
        if isinstance(self.secret, bool) or not isinstance(self.secret, int):
            raise SignatureError("secret key must be an int")
        if not 0 < self.secret < bls.CURVE_ORDER:
            raise SignatureError("secret key out of range (0, curve order)")
        if not isinstance(self.public, bytes) or len(self.public) != PUBKEY_SIZE:
            raise SignatureError(f"public key must be {PUBKEY_SIZE} bytes")


def _keypair_from_secret(secret: int) -> KeyPair:
    return KeyPair(secret=secret, public=bls.sk_to_pk(secret))


def keypair_from_seed(seed: bytes) -> KeyPair:
    """Derive a key pair deterministically from ``seed`` (>= 32 bytes) with the IETF KeyGen.

    Raises SignatureError when the seed is not bytes or is shorter than 32 bytes.
    """
    if not isinstance(seed, bytes | bytearray):
        raise SignatureError("seed must be bytes")
    if len(seed) < MIN_SEED_SIZE:
        raise SignatureError(f"seed must be at least {MIN_SEED_SIZE} bytes, got {len(seed)}")
    return _keypair_from_secret(bls.keygen(bytes(seed)))


def generate_keypair() -> KeyPair:
    """A fresh key pair from 32 bytes of the OS's cryptographic randomness."""
    return keypair_from_seed(secrets.token_bytes(MIN_SEED_SIZE))


def _encode_context(context: str) -> bytes:
    if not isinstance(context, str):
        raise SignatureError("context must be a str (a run id or an epoch)")
    try:
        raw = context.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SignatureError("context is not valid UTF-8 text") from exc
    if not 0 < len(raw) <= MAX_CONTEXT_SIZE:
        raise SignatureError(f"context must be 1..{MAX_CONTEXT_SIZE} UTF-8 bytes, got {len(raw)}")
    return raw


def signing_message(domain: Domain, context: str, payload: bytes) -> bytes:
    """The exact bytes signed for ``payload`` of kind ``domain`` in run/epoch ``context``.

    Layout: MAGIC || u8 len(tag) || tag || u16be len(context) || context || u64be len(payload)
    || payload. Raises SignatureError on a non-Domain domain, an empty or over-long context, or a
    payload that is not bytes.
    """
    if not isinstance(domain, Domain):
        raise SignatureError(f"domain must be a Domain, got {type(domain).__name__}")
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise SignatureError("payload must be bytes")
    tag = domain.value.encode("ascii")
    ctx = _encode_context(context)
    body = bytes(payload)
    return b"".join(
        (
            MESSAGE_MAGIC,
            struct.pack(">B", len(tag)),
            tag,
            struct.pack(">H", len(ctx)),
            ctx,
            struct.pack(">Q", len(body)),
            body,
        )
    )


def sign(keypair: KeyPair, domain: Domain, context: str, payload: bytes) -> BLSSignature:
    """Sign ``signing_message(domain, context, payload)``. Raises SignatureError on bad input."""
    if not isinstance(keypair, KeyPair):
        raise SignatureError("keypair must be a KeyPair")
    message = signing_message(domain, context, payload)
    return bls.sign(keypair.secret, message)


def _is_bytes(value: object, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def validate_pubkey(pubkey: bytes) -> bool:
    """True iff ``pubkey`` is a usable BLS public key: 48 bytes that decompress to a G1 point on
    the curve, in the prime-order subgroup and not the point at infinity (KeyValidate of
    draft-irtf-cfrg-bls-signature section 2.5). Never raises."""
    return bls.key_validate(pubkey)


def verify(pubkey: bytes, domain: Domain, context: str, payload: bytes, signature: bytes) -> bool:
    """True iff ``pubkey`` signed this domain, context and payload. Never raises."""
    if not (_is_bytes(pubkey, PUBKEY_SIZE) and _is_bytes(signature, SIGNATURE_SIZE)):
        return False
    try:
        message = signing_message(domain, context, payload)
    except SignatureError:
        return False
    return bls.verify(pubkey, message, signature)


def aggregate(signatures: Sequence[bytes]) -> BLSSignature:
    """Aggregate one or more signatures, each checked to be a point of the G2 subgroup.

    Raises SignatureError on none, one that is not 96 bytes, or one that is not in G2.
    """
    return bls.aggregate(signatures)


def fast_aggregate_verify(
    pubkeys: Sequence[bytes], domain: Domain, context: str, payload: bytes, signature: bytes
) -> bool:
    """True iff ``signature`` aggregates signatures of every key in ``pubkeys`` on one message.

    Safe against rogue-key attacks only for keys whose proof of possession was checked (or that
    were registered by their owners); never raises.
    """
    try:
        keys = list(pubkeys)
        if not keys or not all(_is_bytes(k, PUBKEY_SIZE) for k in keys):
            return False
        if not _is_bytes(signature, SIGNATURE_SIZE):
            return False
        message = signing_message(domain, context, payload)
    except Exception:  # a bad iterable or message part; verify* must not raise
        logger.debug("BLS fast aggregate verify rejected malformed input", exc_info=True)
        return False
    return bls.fast_aggregate_verify(keys, message, signature)


def aggregate_verify(
    pubkeys: Sequence[bytes], messages: Sequence[tuple[Domain, str, bytes]], signature: bytes
) -> bool:
    """True iff ``signature`` aggregates, for each i, pubkeys[i]'s signature on messages[i].

    Each message is a (domain, context, payload) triple. Never raises.
    """
    try:
        keys = list(pubkeys)
        triples = list(messages)
        if not keys or len(keys) != len(triples):
            return False
        if not all(_is_bytes(k, PUBKEY_SIZE) for k in keys):
            return False
        if not _is_bytes(signature, SIGNATURE_SIZE):
            return False
        raw = [signing_message(d, c, p) for d, c, p in triples]
    except Exception:  # a bad iterable or triple; verify* must not raise
        logger.debug("BLS aggregate verify rejected malformed input", exc_info=True)
        return False
    return bls.aggregate_verify(keys, raw, signature)


def keypair_to_json(keypair: KeyPair) -> dict[str, object]:
    """The one versioned JSON form of a key pair (docs/signatures.md). Contains the secret."""
    return {
        "version": KEY_FILE_VERSION,
        "kind": KEY_FILE_KIND,
        "secret": "0x" + keypair.secret.to_bytes(32, "big").hex(),
        "public": "0x" + keypair.public.hex(),
    }


def _hex_field(obj: dict[str, object], name: str, size: int) -> bytes:
    try:
        return as_bytes(obj.get(name), f"key file field {name!r}", size)
    except EncodingError as exc:
        raise KeyFileError(str(exc)) from None


def keypair_from_json(obj: object) -> KeyPair:
    """Parse :func:`keypair_to_json` output strictly. Raises KeyFileError when malformed."""
    if not isinstance(obj, dict):
        raise KeyFileError("key file must hold a JSON object")
    if obj.get("version") != KEY_FILE_VERSION or obj.get("kind") != KEY_FILE_KIND:
        raise KeyFileError(f"not a {KEY_FILE_KIND} version {KEY_FILE_VERSION} key file")
    if set(obj) != {"version", "kind", "secret", "public"}:
        raise KeyFileError("key file has unexpected or missing fields")
    secret = int.from_bytes(_hex_field(obj, "secret", 32), "big")
    public = _hex_field(obj, "public", PUBKEY_SIZE)
    if not 0 < secret < bls.CURVE_ORDER:
        raise KeyFileError("key file secret is out of range")
    derived = _keypair_from_secret(secret)
    if derived.public != public:
        raise KeyFileError("key file public key does not match its secret")
    return derived


def save_keypair(
    path: str | os.PathLike[str], keypair: KeyPair, *, overwrite: bool = False
) -> None:
    """Write ``keypair`` as JSON with mode 0600, atomically (temp file, fsync, link or rename).

    An existing key file is never replaced unless ``overwrite`` is set (then only once the new
    file is fully on disk): replacing it would lose that identity for good. Raises
    KeyFileExistsError (a FileExistsError) when ``path`` exists and ``overwrite`` is not set, and
    KeyFileError when ``path`` is a directory, its folder does not exist, or the write fails.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise KeyFileError(f"key file {target} is a directory")
    if not overwrite and os.path.lexists(target):
        raise KeyFileExistsError(f"key file {target} already exists; refusing to overwrite it")
    if not os.path.isdir(directory):
        raise KeyFileError(f"cannot create key file {target}: folder {directory} does not exist")
    data = json.dumps(keypair_to_json(keypair), indent=2).encode("utf-8") + b"\n"
    try:
        # mkstemp creates the file with 0600 from the start, so the secret is never exposed.
        fd, tmp = tempfile.mkstemp(prefix=".keypair-", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file in {directory}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # atomic, and fails if a file appeared meanwhile
    except FileExistsError as exc:
        raise KeyFileExistsError(
            f"key file {target} already exists; refusing to overwrite it"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {target}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):  # gone after a rename; a leftover name after a link
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # make the new name durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_keypair(path: str | os.PathLike[str]) -> KeyPair:
    """Read a key file written by :func:`save_keypair`.

    Raises KeyFileError when the file is missing, a directory or otherwise not a regular file,
    readable or writable by group or others, over MAX_KEY_FILE_BYTES, or malformed (including a
    public key that does not match the secret). Each message names the file.
    """
    target = os.fspath(path)
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise KeyFileError(f"key file {target} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {target}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        # Checked on the descriptor (no race with a rename), before fdopen, which refuses a
        # directory with a message naming the descriptor number instead of the file.
        if stat.S_ISDIR(info.st_mode):
            raise KeyFileError(f"key file {target} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {target} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"key file {target} has mode {stat.S_IMODE(info.st_mode):04o}; "
                "it must not be accessible by group or others (chmod 600)"
            )
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(
                f"key file {target} is {info.st_size} bytes; the limit is {MAX_KEY_FILE_BYTES}"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            raw = handle.read(MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        obj = loads_untrusted(raw, max_bytes=MAX_KEY_FILE_BYTES, what=f"key file {target}")
    except UntrustedJsonError as exc:
        raise KeyFileError(str(exc)) from exc
    return keypair_from_json(obj)
