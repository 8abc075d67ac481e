"""Tests for proofs.encoding: canonical layout, strict decoding, errors."""

from __future__ import annotations

import numpy as np
import pytest

from proofs.encoding import (
    TensorBytes,
    chunk_layout,
    decode_header,
    decode_tensors,
    encode_tensors,
    itemsize,
)
from proofs.errors import EncodingError
from proofs.merkle import merkle_root


def tb(name: str, arr: np.ndarray, dtype: str | None = None) -> TensorBytes:
    return TensorBytes(
        name=name, dtype=dtype or str(arr.dtype), shape=tuple(arr.shape), data=memoryview(arr)
    )


def test_round_trip_and_order_independence() -> None:
    a = tb("b.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    b = tb("a.bias", np.arange(5, dtype=np.int64))
    leaves = encode_tensors([a, b], chunk_size=16)
    assert [bytes(x) for x in leaves] == [bytes(x) for x in encode_tensors([b, a], chunk_size=16)]
    out = decode_tensors(leaves)
    assert [t.name for t in out] == ["a.bias", "b.weight"]
    assert bytes(out[1].data) == bytes(a.data) and out[1].shape == (3, 4)
    assert decode_header(leaves[0]) == ("a.bias", "int64", (5,), 40)


def test_shape_changes_root() -> None:
    arr = np.arange(12, dtype=np.float32)
    r1 = merkle_root(encode_tensors([tb("w", arr.reshape(3, 4))]))
    r2 = merkle_root(encode_tensors([tb("w", arr.reshape(4, 3))]))
    assert r1 != r2


def test_errors() -> None:
    arr = np.zeros(4, dtype=np.float32)
    with pytest.raises(EncodingError, match="duplicate"):
        encode_tensors([tb("w", arr), tb("w", arr)])
    with pytest.raises(EncodingError, match="needs 12"):
        TensorBytes(name="w", dtype="float32", shape=(3,), data=memoryview(arr))
    with pytest.raises(EncodingError, match="unknown dtype"):
        itemsize("float128")
    with pytest.raises(EncodingError, match="chunk_size"):
        encode_tensors([tb("w", arr)], chunk_size=0)
    with pytest.raises(EncodingError, match="contiguous"):
        tb("w", np.zeros((4, 4), dtype=np.float32)[:, 1])


def test_layout_matches_leaves() -> None:
    t = tb("w", np.arange(10, dtype=np.int8))
    leaves = encode_tensors([t], chunk_size=4)
    refs = chunk_layout([t], chunk_size=4)
    assert [(r.kind, r.offset, r.length) for r in refs] == [
        ("header", 0, len(leaves[0])),
        ("data", 0, 4),
        ("data", 4, 4),
        ("data", 8, 2),
    ]
