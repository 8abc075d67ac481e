"""The one JSON form of audit records: strict field readers and writers, canonical bytes.

0x-hex for bytes; non-finite floats as the strings "NaN", "Infinity", "-Infinity"; canonical bytes
= sorted keys, separators "," and ":", no NaN literals. Every reader raises :class:`VerdictError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from proofs.errors import EncodingError
from proofs.hashing import Hash32
from proofs.jsonlimits import UntrustedJsonError, loads_untrusted

VERSION = 1

# Limits of the strict readers (docs/auditing.md, section 7): a verdict file may come from any
# auditor, so every length and count it controls is bounded. ``reason`` may quote an error found
# in a peer's store, hence the generous string limit.
MAX_VERDICT_JSON = 1 << 20
"""Bytes of one signed verdict file: ~2 KB, plus ~130 bytes per parameter tensor checked."""
MAX_BUNDLE_JSON = 64 << 20
"""Bytes of one verdict bundle (many auditors' verdicts on one run)."""
MAX_STR = 1 << 16
MAX_ITEMS = 1 << 16
MAX_UINT = (1 << 64) - 1


class VerdictError(EncodingError):
    """A verdict JSON document is malformed or of an unknown version."""


def read_verdict_json(data: bytes, *, max_bytes: int = MAX_VERDICT_JSON) -> object:
    """Parse a verdict or bundle file's bytes through proofs.jsonlimits (size, nesting depth,
    strict JSON); raises :class:`VerdictError` naming the limit or the fault."""
    try:
        return loads_untrusted(data, max_bytes=max_bytes, what="verdict file")
    except UntrustedJsonError as exc:
        raise VerdictError(str(exc)) from exc


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def hex_str(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def unhex(value: object, size: int | None = None) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise VerdictError(f"expected a 0x-hex string, got {str(value)[:40]!r}")
    try:
        raw = bytes.fromhex(value[2:])
    except ValueError as exc:
        raise VerdictError(f"bad hex: {value[:40]!r}") from exc
    if size is not None and len(raw) != size:
        raise VerdictError(f"expected {size} bytes, got {len(raw)}")
    return raw


def float_out(x: float) -> float | str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return float(x)


def float_in(value: object) -> float:
    specials = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if isinstance(value, str) and value in specials:
        return specials[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VerdictError(f"expected a number, got {str(value)[:40]!r}")
    return float(value)


def str_field(value: object, max_len: int = MAX_STR) -> str:
    if not isinstance(value, str):
        raise VerdictError(f"expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        raise VerdictError(f"string of {len(value)} characters; the limit is {max_len}")
    return value


def uint_field(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_UINT:
        raise VerdictError(f"expected an integer in [0, 2^64), got {str(value)[:40]!r}")
    return value


def expect_keys(obj: Mapping[str, object], keys: set[str]) -> None:
    if set(obj) != keys:
        raise VerdictError(
            f"unexpected fields {sorted(set(obj) - keys)[:5]}, "
            f"missing {sorted(keys - set(obj))[:5]}"
        )


def expect_header(obj: object, kind: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise VerdictError("a verdict document must be a JSON object")
    if obj.get("kind") != kind:
        raise VerdictError(f"expected kind {kind!r}, got {str(obj.get('kind'))[:40]!r}")
    if obj.get("version") != VERSION:
        raise VerdictError(f"unsupported verdict version {obj.get('version')!r}")
    return {k: v for k, v in obj.items() if k not in ("kind", "version")}


def opt_hex(value: bytes | None) -> str | None:
    return None if value is None else hex_str(value)


def list_field(value: object, what: str, max_items: int = MAX_ITEMS) -> list[Any]:
    if not isinstance(value, list):
        raise VerdictError(f"{what} must be a list")
    if len(value) > max_items:
        raise VerdictError(f"{what} has {len(value)} items; the limit is {max_items}")
    return value


def dict_field(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise VerdictError(f"{what} must be an object")
    return value


def opt_float(value: object) -> float | None:
    return None if value is None else float_in(value)


def opt_hash(value: object) -> Hash32 | None:
    return None if value is None else Hash32(unhex(value, 32))


def hash_tuple(value: object, what: str) -> tuple[Hash32, ...]:
    return tuple(Hash32(unhex(h, 32)) for h in list_field(value, what))
