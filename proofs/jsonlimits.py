"""The one strict loader for JSON that a peer wrote: size and nesting limits before ``json.loads``.

``json.loads`` recurses once per nested ``[`` or ``{`` on the C stack. py_ecc raises Python's
recursion limit to 100000 when imported, so a file of ~200k nested brackets overflowed the C stack
and killed the process (exit 139) instead of raising. :func:`loads_untrusted` therefore refuses,
before parsing:

* a document over ``max_bytes`` (each caller passes the limit for its kind of file, documented in
  docs/run-store.md, docs/auditing.md and docs/signatures.md);
* a document nested deeper than ``max_depth`` (default :data:`MAX_DEPTH`), measured by a linear
  scan that skips string contents (escaped quotes included), so ``"[[["`` inside a string does
  not count;

then parses with ``json.loads``, refusing what a canonical writer never produces: bytes that are
not UTF-8, duplicate keys in one object (which copy would a reader believe?), and the ``NaN`` /
``Infinity`` literals. Every failure raises :class:`UntrustedJsonError` (a ``ValueError``); limits
raise its subclass :class:`JsonLimitError`, whose message names the limit and what was seen.
"""

from __future__ import annotations

import json
import os
import re
import stat
from itertools import accumulate
from typing import Any

from proofs.errors import EncodingError

__all__ = [
    "MAX_DEPTH",
    "JsonLimitError",
    "UntrustedJsonError",
    "loads_untrusted",
    "nesting_depth",
    "read_untrusted",
]

MAX_DEPTH = 64
"""Deepest nesting any veritrain record uses is 5 (a verdict's evidence hash lists); 64 leaves
room for user model configs while staying far below any stack limit."""


class UntrustedJsonError(EncodingError):
    """JSON from a peer is not UTF-8, not valid JSON, or not in the strict form we accept."""


class JsonLimitError(UntrustedJsonError):
    """JSON from a peer is larger or more deeply nested than its limit allows."""


# A JSON string from its opening quote: runs of ordinary bytes, a backslash with the byte it
# escapes (a lone trailing backslash too), then the closing quote or the end of the input. The
# pattern can always match once started, so the scan is linear even on an unterminated string
# (a pattern that could fail would be retried from every later quote: quadratic).
_STRING = re.compile(rb'"[^"\\]*+(?:\\[\s\S]?[^"\\]*+)*+(?:"|\Z)')
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_STEP = [0] * 256
for _open, _close in (b"[]", b"{}"):
    _STEP[_open], _STEP[_close] = 1, -1


def nesting_depth(raw: bytes) -> int:
    """How deep the brackets of ``raw`` nest outside strings (0 for a scalar).

    Exact for valid JSON; for invalid JSON, at least the depth ``json.loads`` would reach before
    it finds the error (both read strings the same way up to that point). Linear time.
    """
    structural = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    return max(accumulate(map(_STEP.__getitem__, structural)), default=0)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise UntrustedJsonError(f"duplicate key {key[:40]!r} in one JSON object")
            seen.add(key)
    return obj


def _constant(name: str) -> Any:
    raise UntrustedJsonError(
        f"the literal {name} is not JSON (write non-finite numbers as strings)"
    )


def loads_untrusted(
    data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH, what: str = "JSON document"
) -> Any:
    """Parse ``data`` (UTF-8 bytes, or text) from a peer, refusing it unless it is at most
    ``max_bytes`` bytes and ``max_depth`` levels deep.

    ``what`` names the document in error messages ("key file k.json", "verdict file").
    Raises :class:`JsonLimitError` over a limit and :class:`UntrustedJsonError` when the bytes are
    not UTF-8, not JSON, repeat a key in one object or use ``NaN``/``Infinity`` literals.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise JsonLimitError(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise JsonLimitError(f"{what} nests {depth} levels deep; the limit is {max_depth}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedJsonError(f"{what} is not UTF-8: {exc}") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except UntrustedJsonError as exc:
        raise UntrustedJsonError(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, and ints over Python's 4300-digit limit. RecursionError
        # cannot happen below MAX_DEPTH; it is caught so that a raised limit never becomes a crash.
        raise UntrustedJsonError(f"{what} is not valid JSON: {exc}") from None


def read_untrusted(
    path: str | os.PathLike[str], *, max_bytes: int, max_depth: int = MAX_DEPTH, what: str = ""
) -> Any:
    """Read and parse the JSON file at ``path`` (a regular file of at most ``max_bytes``).

    Never reads more than ``max_bytes + 1`` bytes. Raises :class:`JsonLimitError`,
    :class:`UntrustedJsonError`, or ``OSError`` when the file cannot be opened; a directory or
    other non-regular file is an :class:`UntrustedJsonError` naming the path.
    """
    target = os.fspath(path)
    label = what or f"JSON file {target}"
    try:
        handle = open(target, "rb")  # noqa: SIM115 - closed by the with below
    except IsADirectoryError:
        raise UntrustedJsonError(f"{label} is a directory") from None
    with handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedJsonError(f"{label} is not a regular file")
        if info.st_size > max_bytes:
            raise JsonLimitError(f"{label} is {info.st_size} bytes; the limit is {max_bytes}")
        raw = handle.read(max_bytes + 1)
    return loads_untrusted(raw, max_bytes=max_bytes, max_depth=max_depth, what=label)
