"""The one JSON form of trainer records: canonical bytes, 0x-hex bytes, strict field readers.

Canonical JSON = sorted keys, no whitespace, ASCII only, finite numbers only. Non-finite floats
(a diverged loss) are written as the strings "NaN", "Infinity", "-Infinity". Record hashes are
sha256 over these bytes, so every implementation must produce them identically.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from proofs.errors import EncodingError
from proofs.hashing import Hash32, sha256

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


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


def hex_bytes(data: bytes) -> str:
    return "0x" + data.hex()


def float_out(value: float) -> float | str:
    """A float for JSON: itself when finite, else its string name."""
    if math.isfinite(value):
        return float(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def check_keys(obj: Any, kind: str, required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """EncodingError unless ``obj`` is an object with all ``required`` and no unknown keys."""
    if not isinstance(obj, Mapping):
        raise EncodingError(f"{kind}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    unknown = sorted(set(obj) - set(required) - set(optional))
    if missing or unknown:
        raise EncodingError(f"{kind}: missing keys {missing}, unknown keys {unknown}")


def get_int(obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EncodingError(f"{key}: expected an int >= {minimum}, got {value!r}")
    return value


def get_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise EncodingError(f"{key}: expected a string, got {value!r}")
    return value


def get_float(obj: Mapping[str, Any], key: str) -> float:
    return float_in(obj[key], key)


def float_in(value: Any, key: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodingError(f"{key}: expected a number, got {value!r}")
    return float(value)


def get_bytes(obj: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
    """A 0x-hex field as bytes, of exactly ``size`` bytes when given."""
    value = obj[key]
    if not isinstance(value, str) or not value.startswith("0x"):
        raise EncodingError(f"{key}: expected 0x-hex, got {value!r:.80}")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise EncodingError(f"{key}: bad hex: {exc}") from None
    if size is not None and len(raw) != size:
        raise EncodingError(f"{key}: expected {size} bytes, got {len(raw)}")
    return raw


def get_object(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj[key]
    if not isinstance(value, Mapping):
        raise EncodingError(f"{key}: expected a JSON object")
    return value


def get_list(obj: Mapping[str, Any], key: str) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise EncodingError(f"{key}: expected a JSON array")
    return value
