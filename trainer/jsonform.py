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

# Limits of the strict readers: a peer writes these records, so every count and length it controls
# is bounded (docs/run-store.md, "Limits"). The file size limits (trainer.store) bound them too;
# these give a precise message and keep one huge field from filling the whole budget.
MAX_STR = 1024
"""Characters in a string field (run id, model name, dtype, versions)."""
MAX_ITEMS = 1 << 20
"""Items in a list field unless the reader names a tighter limit."""
MAX_UINT = (1 << 64) - 1
"""Largest integer field: every count, step, size and seed is a u64."""


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
        # Bounded: the unknown keys are the peer's, and this message may end up in a verdict.
        raise EncodingError(
            f"{kind}: missing keys {missing}, unknown keys {_short(unknown[:5])}"
            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_uint(value: Any, minimum: int = 0) -> bool:
    """True for an int (not a bool) in ``[minimum, MAX_UINT]``."""
    return not isinstance(value, bool) and isinstance(value, int) and minimum <= value <= MAX_UINT


def get_int(obj: Mapping[str, Any], key: str, *, minimum: int = 0) -> int:
    value = obj[key]
    if not is_uint(value, minimum):
        raise EncodingError(f"{key}: expected an int in [{minimum}, 2^64), got {_short(value)}")
    return int(value)


def get_str(obj: Mapping[str, Any], key: str, *, max_len: int = MAX_STR) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise EncodingError(f"{key}: expected a string, got {_short(value)}")
    if len(value) > max_len:
        raise EncodingError(f"{key}: {len(value)} characters; the limit is {max_len}")
    return value


def get_float(obj: Mapping[str, Any], key: str) -> float:
    return float_in(obj[key], key)


def float_in(value: Any, key: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodingError(f"{key}: expected a number, got {_short(value)}")
    try:
        return float(value)
    except OverflowError:  # an int literal past 1e308
        raise EncodingError(f"{key}: {_short(value)} is out of float range") from None


def get_bytes(obj: Mapping[str, Any], key: str, size: int | None = None) -> bytes:
    """A 0x-hex field as bytes, of exactly ``size`` bytes when given."""
    value = obj[key]
    if not isinstance(value, str) or not value.startswith("0x"):
        raise EncodingError(f"{key}: expected 0x-hex, got {_short(value)}")
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


def get_list(obj: Mapping[str, Any], key: str, *, max_items: int = MAX_ITEMS) -> list[Any]:
    value = obj[key]
    if not isinstance(value, list):
        raise EncodingError(f"{key}: expected a JSON array")
    if len(value) > max_items:
        raise EncodingError(f"{key}: {len(value)} items; the limit is {max_items}")
    return value
