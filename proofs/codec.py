"""The one wire format of veritrain records: canonical JSON, 0x-hex, strict field readers.

Canonical JSON = sorted keys, separators ``,`` and ``:`` (no whitespace), ASCII only, no NaN or
Infinity literals. Non-finite floats (a diverged loss) are written as the strings ``"NaN"``,
``"Infinity"``, ``"-Infinity"``. Bytes are ``0x`` + lowercase hex. Record hashes are sha256 over
the canonical bytes, and signatures are over them too, so every implementation (trainer, auditor,
the JS oracles in tests/) must produce them identically: tests/vectors pin them.

Readers parse what a peer wrote. Each comes in two forms: ``as_*(value, what)`` checks one value
(a list item), ``get_*(obj, key)`` reads ``obj[key]`` and names the key in its error. Every reader
raises :class:`~proofs.errors.EncodingError` with a message that names the field, what was
expected and (bounded) what was seen. Every length and count a peer controls is bounded: the
defaults below, or a tighter or looser limit the caller names (docs/run-store.md, "Limits";
docs/auditing.md, section 7). Parse the raw bytes first with :mod:`proofs.jsonlimits`.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NewType, cast

from proofs.errors import EncodingError
from proofs.hashing import Hash32, keccak256, sha256

__all__ = [
    "DECIMAL38_MAX",
    "MAX_ITEMS",
    "MAX_STR",
    "MAX_UINT",
    "UINT256_LIMIT",
    "Address",
    "as_bytes",
    "as_float",
    "as_list",
    "as_object",
    "as_str",
    "as_uint",
    "canonical_json",
    "check_decimal38",
    "check_keys",
    "check_uint256",
    "fast_keccak256",
    "float_out",
    "get_bytes",
    "get_float",
    "get_int",
    "get_list",
    "get_object",
    "get_str",
    "is_uint",
    "make_fast_keccak",
    "normalize_address",
    "opt_hex",
    "record_hash",
    "short",
    "to_hex",
]

MAX_STR = 1024
"""Characters in a string field unless the reader names another limit (ids, names, versions)."""
MAX_ITEMS = 1 << 20
"""Items in a list field unless the reader names another limit."""
MAX_UINT = (1 << 64) - 1
"""Largest integer field: every count, step, size and seed is a u64."""

UINT256_LIMIT = 1 << 256
"""Amounts on chain are uint256: ``0 <= amount < UINT256_LIMIT``."""
DECIMAL38_MAX = 10**38 - 1
"""The largest amount a DECIMAL(38,0) warehouse column holds (about 2**126, inside uint256)."""

Address = NewType("Address", str)
"""An EVM address as 0x + 40 hex digits in EIP-55 checksum case."""

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Whole string, even number of hex digits. bytes.fromhex alone would also accept spaces between
# bytes, which no canonical writer produces. Either case is accepted, as every reader did before.
_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})*\Z")


# ---- writers ------------------------------------------------------------------------------------


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Canonical bytes of a JSON object; EncodingError on NaN/inf or non-JSON values."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode(
            "ascii"
        )
    except (TypeError, ValueError) as exc:
        raise EncodingError(f"record is not canonical JSON: {exc}") from exc


def record_hash(obj: Mapping[str, Any]) -> Hash32:
    """sha256 of :func:`canonical_json`."""
    return sha256(canonical_json(obj))


def to_hex(data: bytes) -> str:
    """``0x`` + lowercase hex of ``data``."""
    return "0x" + bytes(data).hex()


def opt_hex(data: bytes | None) -> str | None:
    """:func:`to_hex`, or None (JSON null) for None."""
    return None if data is None else to_hex(data)


def float_out(value: float) -> float | str:
    """A float for JSON: itself when finite, else its string name."""
    if math.isfinite(value):
        return float(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


# ---- readers of one value -----------------------------------------------------------------------


def short(value: Any) -> str:
    """``repr(value)`` cut to 80 characters: peer data quoted in a message stays bounded."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_bytes(value: Any, what: str, size: int | None = None) -> bytes:
    """A ``0x``-hex string as bytes, of exactly ``size`` bytes when given."""
    if not isinstance(value, str) or not value.startswith("0x"):
        raise EncodingError(f"{what}: expected 0x-hex, got {short(value)}")
    if not _HEX.match(value):
        raise EncodingError(f"{what}: expected an even number of hex digits, got {short(value)}")
    if size is not None and len(value) != 2 + 2 * size:
        raise EncodingError(f"{what}: expected {size} bytes, got {(len(value) - 2) // 2}")
    return bytes.fromhex(value[2:])


def is_uint(value: Any, minimum: int = 0) -> bool:
    """True for an int (not a bool) in ``[minimum, MAX_UINT]``."""
    return not isinstance(value, bool) and isinstance(value, int) and minimum <= value <= MAX_UINT


def as_uint(value: Any, what: str, *, minimum: int = 0) -> int:
    """An int (not a bool) in ``[minimum, 2^64)``."""
    if not is_uint(value, minimum):
        raise EncodingError(f"{what}: expected an int in [{minimum}, 2^64), got {short(value)}")
    return int(value)


def as_str(value: Any, what: str, *, max_len: int = MAX_STR) -> str:
    """A string of at most ``max_len`` characters."""
    if not isinstance(value, str):
        raise EncodingError(f"{what}: expected a string, got {short(value)}")
    if len(value) > max_len:
        raise EncodingError(f"{what}: {len(value)} characters; the limit is {max_len}")
    return value


def as_float(value: Any, what: str) -> float:
    """A JSON number, or one of the strings "NaN", "Infinity", "-Infinity"."""
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodingError(f"{what}: expected a number, got {short(value)}")
    try:
        return float(value)
    except OverflowError:  # an int literal past 1e308
        raise EncodingError(f"{what}: {short(value)} is out of float range") from None


def as_object(value: Any, what: str) -> Mapping[str, Any]:
    """A JSON object."""
    if not isinstance(value, Mapping):
        raise EncodingError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def as_list(value: Any, what: str, *, max_items: int = MAX_ITEMS) -> list[Any]:
    """A JSON array of at most ``max_items`` items."""
    if not isinstance(value, list):
        raise EncodingError(f"{what}: expected a JSON array, got {type(value).__name__}")
    if len(value) > max_items:
        raise EncodingError(f"{what}: {len(value)} items; the limit is {max_items}")
    return value


def check_keys(obj: Any, kind: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """EncodingError unless ``obj`` is an object with all ``required`` and no unknown keys."""
    as_object(obj, kind)
    missing = [k for k in required if k not in obj]
    unknown = sorted(set(obj) - set(required) - set(optional))
    if missing or unknown:
        # Bounded: the unknown keys are the peer's, and this message may end up in a verdict.
        raise EncodingError(
            f"{kind}: missing keys {missing}, unknown keys {short(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )


# ---- readers of one field (obj[key], named in the error) ----------------------------------------


def get_bytes(obj: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
    return as_bytes(obj[key], key, size)


def get_int(obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    return as_uint(obj[key], key, minimum=minimum)


def get_str(obj: Mapping[str, Any], key: str, *, max_len: int = MAX_STR) -> str:
    return as_str(obj[key], key, max_len=max_len)


def get_float(obj: Mapping[str, Any], key: str) -> float:
    return as_float(obj[key], key)


def get_object(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    return as_object(obj[key], key)


def get_list(obj: Mapping[str, Any], key: str, *, max_items: int = MAX_ITEMS) -> list[Any]:
    return as_list(obj[key], key, max_items=max_items)


# ---- EVM addresses and amounts ------------------------------------------------------------------


def make_fast_keccak() -> Callable[[bytes], bytes]:
    """The cheapest keccak256 available: hashing 100k payout leaves (and checksumming their
    addresses) is dominated by per-call overhead.

    pysha3 (C) is about 6x cheaper per call than eth-hash's checked front end; all three give
    identical digests (tests/test_payout.py checks this against proofs.hashing.keccak256).
    """
    try:
        sha3: Any = importlib.import_module("sha3")
        pysha3_keccak = sha3.keccak_256
        return lambda data: cast(bytes, pysha3_keccak(data).digest())
    except ImportError:
        pass
    try:
        crypto: Any = importlib.import_module("Crypto.Hash.keccak")
        new = crypto.new
        return lambda data: cast(bytes, new(data=data, digest_bits=256).digest())
    except ImportError:
        return keccak256


fast_keccak256 = make_fast_keccak()

_HEX40 = re.compile(r"0x[0-9a-fA-F]{40}\Z")
_ONES = int.from_bytes(b"\x01" * 40, "big")
_BIT6 = int.from_bytes(b"\x40" * 40, "big")


def _checksum(lower_hex: str) -> str:
    """EIP-55 case for 40 lowercase hex digits: uppercase where the digest nibble is >= 8.

    Done with whole-string integer masks instead of a per-character loop (5x faster, and payout
    tree builds checksum every address). Digest hex digit d is >= 8 iff ASCII bit 3 ('8', '9') or
    bit 6 ('a'..'f') is set; a letter of the address has bit 6 set and becomes uppercase by
    clearing bit 5.
    """
    raw = lower_hex.encode("ascii")
    digest = int.from_bytes(fast_keccak256(raw).hex()[:40].encode("ascii"), "big")
    high = ((digest >> 3) | (digest >> 6)) & _ONES
    letters = (int.from_bytes(raw, "big") & _BIT6) >> 1
    upper = int.from_bytes(raw, "big") ^ (high * 0x20 & letters)
    return "0x" + upper.to_bytes(40, "big").decode("ascii")


def normalize_address(value: Any, what: str = "address") -> Address:
    """The one address rule: ``value`` in EIP-55 checksum case.

    Raises EncodingError unless ``value`` is a str of 0x + 40 hex digits; a mixed-case address
    must carry a correct EIP-55 checksum (all-lowercase or all-uppercase digits carry none, and
    are accepted). Stores that keep addresses lowercase (the warehouse) lower the result.
    """
    if not isinstance(value, str) or not _HEX40.match(value):
        raise EncodingError(
            f"{what} must be an EVM address: 0x followed by 40 hex digits, got {short(value)}"
        )
    digits = value[2:]
    lower = digits.lower()
    checksummed = _checksum(lower)
    if digits not in (lower, digits.upper()) and checksummed != value:
        raise EncodingError(f"{what}: {value} has an invalid EIP-55 checksum")
    return Address(checksummed)


def _check_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EncodingError(f"{what} must be an integer in base units, got {short(value)}")
    if value < 0:
        raise EncodingError(f"{what} must not be negative, got {value}")
    return value


def check_uint256(value: Any, what: str = "amount") -> int:
    """An amount paid on chain: an int (not a bool) in ``[0, 2**256)``; EncodingError if not."""
    if _check_int(value, what) >= UINT256_LIMIT:
        raise EncodingError(f"{what} {value} is outside uint256 range [0, 2**256)")
    return int(value)


def check_decimal38(value: Any, what: str = "amount") -> int:
    """An amount stored in the warehouse: an int (not a bool) in ``[0, 10**38)`` (DECIMAL(38,0),
    which every uint256 check also passes); EncodingError if not."""
    if _check_int(value, what) > DECIMAL38_MAX:
        raise EncodingError(f"{what} overflows DECIMAL(38,0) (max 10**38 - 1), got {value}")
    return int(value)
