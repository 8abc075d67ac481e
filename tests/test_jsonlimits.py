"""proofs.jsonlimits: the strict loader every reader of peer JSON goes through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proofs.errors import EncodingError
from proofs.jsonlimits import (
    MAX_DEPTH,
    JsonLimitError,
    UntrustedJsonError,
    loads_untrusted,
    nesting_depth,
    read_untrusted,
)

BIG = 1 << 20


def _nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def _objects(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


@pytest.mark.parametrize("make", [_nested, _objects])
def test_depth_exactly_at_the_limit_parses_and_one_more_is_refused(make: Any) -> None:
    assert loads_untrusted(make(MAX_DEPTH), max_bytes=BIG) is not None
    with pytest.raises(JsonLimitError, match=f"nests {MAX_DEPTH + 1} levels deep; the limit is 64"):
        loads_untrusted(make(MAX_DEPTH + 1), max_bytes=BIG)
    assert loads_untrusted(make(3), max_bytes=BIG, max_depth=3) is not None
    with pytest.raises(JsonLimitError):
        loads_untrusted(make(4), max_bytes=BIG, max_depth=3)


@pytest.mark.parametrize("char", ["[", "{"])
def test_200k_nested_brackets_raise_instead_of_crashing(char: str) -> None:
    # What used to overflow the C stack (exit 139) once py_ecc had raised the recursion limit.
    data = (char * 200_000).encode()
    with pytest.raises(JsonLimitError, match="nests 200000 levels deep") as info:
        loads_untrusted(data, max_bytes=BIG, what="header.json")
    assert str(info.value).startswith("header.json ")
    assert isinstance(info.value, EncodingError) and isinstance(info.value, ValueError)


def test_brackets_inside_strings_do_not_count() -> None:
    deep_text = "[" * 1000 + "{" * 1000
    doc = json.dumps({"name": deep_text, "list": [deep_text, "]]]}}}"]}).encode()
    assert nesting_depth(doc) == 2
    assert loads_untrusted(doc, max_bytes=BIG)["name"] == deep_text


@pytest.mark.parametrize(
    ("doc", "depth"),
    [
        (rb'["\"[[[", 1]', 1),  # an escaped quote does not end the string
        (rb'["\\", [[1]]]', 3),  # an escaped backslash does: the brackets after it count
        (rb'["\\\"[[[", 1]', 1),  # backslash, then escaped quote: still inside the string
        (rb'{"k\"[": {"\u005b": [1]}}', 3),
        (b"1", 0),
        (b'"[[["', 0),
        (b"", 0),
    ],
)
def test_string_escapes_are_skipped_correctly(doc: bytes, depth: int) -> None:
    assert nesting_depth(doc) == depth
    if doc:
        assert loads_untrusted(doc, max_bytes=BIG) == json.loads(doc)


def test_an_unterminated_string_hides_no_depth_and_is_refused() -> None:
    # The brackets after an open quote are string text to json.loads too: it fails on the string.
    doc = b'["abc' + b"[" * 200_000
    assert nesting_depth(doc) == 1
    with pytest.raises(UntrustedJsonError, match="not valid JSON"):
        loads_untrusted(doc, max_bytes=BIG)
    # Many escaped quotes after an unterminated one: the scan stays linear (no retry per quote).
    assert nesting_depth(b'"' + b'\\"' * 300_000 + b"[") == 0


def test_size_limit_says_limit_and_size() -> None:
    doc = b"[" + b" " * 100 + b"]"
    assert loads_untrusted(doc, max_bytes=len(doc)) == []
    with pytest.raises(JsonLimitError, match=f"verdict file is {len(doc)} bytes; the limit is 10"):
        loads_untrusted(doc, max_bytes=10, what="verdict file")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"[NaN]", "NaN is not JSON"),
        (b"[-Infinity]", "Infinity is not JSON"),
        (b"\xff\xfe[]", "not UTF-8"),
        (b"[1,]", "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),  # past Python's int digit limit: a plain ValueError
        (b"{} {}", "not valid JSON"),
    ],
)
def test_non_canonical_or_broken_json_is_refused(doc: bytes, match: str) -> None:
    with pytest.raises(UntrustedJsonError, match=match):
        loads_untrusted(doc, max_bytes=BIG)


def test_read_untrusted_refuses_directories_and_big_files_without_reading(tmp_path: Path) -> None:
    with pytest.raises(UntrustedJsonError, match="is a directory"):
        read_untrusted(tmp_path, max_bytes=BIG)
    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b" " * 2000 + b"]")
    with pytest.raises(JsonLimitError, match="is 2002 bytes; the limit is 1000"):
        read_untrusted(big, max_bytes=1000)
    assert read_untrusted(big, max_bytes=BIG) == []
    with pytest.raises(FileNotFoundError):
        read_untrusted(tmp_path / "missing.json", max_bytes=BIG)


def _depth(value: Any) -> int:
    """Independent oracle: the nesting depth of a parsed value."""
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_documents = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=_documents, ensure_ascii=st.booleans(), indent=st.sampled_from([None, 0, 2]))
def test_loader_agrees_with_json_loads_on_shallow_documents(
    value: Any, ensure_ascii: bool, indent: int | None
) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    raw = text.encode("utf-8", "surrogatepass")
    expected = json.loads(text)
    assert nesting_depth(raw) == _depth(expected)
    try:
        parsed = loads_untrusted(text, max_bytes=len(raw))
    except UntrustedJsonError as exc:
        # Only lone surrogates (not UTF-8 once written raw) may be refused.
        assert not ensure_ascii and "not UTF-8" in str(exc)
        return
    assert parsed == expected
