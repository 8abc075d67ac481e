"""Tests for proofs.encoding: canonical layout, zero copy, strict decoding, errors, vectors."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proofs.encoding import (
    DEFAULT_CHUNK_SIZE,
    ENCODING_VERSION,
    SUPPORTED_DTYPES,
    TensorBytes,
    chunk_layout,
    decode_header,
    decode_tensors,
    encode_header,
    encode_tensors,
    itemsize,
    parse_header,
)
from proofs.errors import EncodingError
from proofs.merkle import merkle_root

VECTORS = Path(__file__).parent / "vectors" / "encoding"


def tb(name: str, arr: np.ndarray, dtype: str | None = None) -> TensorBytes:
    return TensorBytes(
        name=name, dtype=dtype or str(arr.dtype), shape=tuple(arr.shape), data=memoryview(arr)
    )


def raw(leaves: list[memoryview]) -> list[bytes]:
    return [bytes(x) for x in leaves]


def test_round_trip_and_header() -> None:
    a = tb("b.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    b = tb("a.bias", np.arange(5, dtype=np.int64))
    leaves = encode_tensors([a, b], chunk_size=16)
    out = decode_tensors(leaves)
    assert [t.name for t in out] == ["a.bias", "b.weight"]
    assert bytes(out[1].data) == bytes(a.data) and out[1].shape == (3, 4)
    assert out[1].dtype == "float32"
    assert decode_header(leaves[0]) == ("a.bias", "int64", (5,), 40)
    assert parse_header(leaves[0]).chunk_size == 16
    assert bytes(leaves[0][:5]) == b"VTTH" + bytes([ENCODING_VERSION])
    assert DEFAULT_CHUNK_SIZE == 1 << 20


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), count=st.integers(1, 8), chunk=st.integers(1, 40))
def test_input_order_does_not_matter(seed: int, count: int, chunk: int) -> None:
    rng = random.Random(seed)
    tensors = [
        tb(
            f"t{rng.randrange(10**6)}.{i}",
            np.frombuffer(rng.randbytes(4 * rng.randrange(0, 20)), "<f4"),
        )
        for i in range(count)
    ]
    shuffled = tensors[:]
    rng.shuffle(shuffled)
    assert raw(encode_tensors(tensors, chunk_size=chunk)) == raw(
        encode_tensors(shuffled, chunk_size=chunk)
    )
    back = decode_tensors(encode_tensors(shuffled, chunk_size=chunk))
    assert [(t.name, bytes(t.data)) for t in back] == sorted(
        (t.name, bytes(t.data)) for t in tensors
    )


def test_header_binds_shape_name_dtype_and_chunk_size() -> None:
    arr = np.arange(12, dtype=np.float32)
    roots = {
        merkle_root(encode_tensors([tb("w", arr.reshape(3, 4))])),
        merkle_root(encode_tensors([tb("w", arr.reshape(4, 3))])),
        merkle_root(encode_tensors([tb("w", arr)])),
        merkle_root(encode_tensors([tb("v", arr)])),
        merkle_root(encode_tensors([tb("w", arr.view(np.int32))])),
        merkle_root(encode_tensors([tb("w", arr.view(np.uint8), "uint8")])),
        merkle_root(encode_tensors([tb("w", arr)], chunk_size=8)),
    }
    assert len(roots) == 7
    # Moving bytes between two tensors (same concatenated data) changes the commitment.
    data = np.arange(8, dtype=np.float32)
    split_a = [tb("a", data[:4].copy()), tb("b", data[4:].copy())]
    split_b = [tb("a", data[:2].copy()), tb("b", data[2:].copy())]
    assert merkle_root(encode_tensors(split_a)) != merkle_root(encode_tensors(split_b))


def test_data_leaves_are_zero_copy() -> None:
    arr = np.zeros(1000, dtype=np.float32)
    leaves = encode_tensors([tb("w", arr)], chunk_size=1024)
    arr[0] = 1.0  # visible through the leaf: no copy was taken
    assert bytes(leaves[1][:4]) == np.float32(1.0).tobytes()
    assert leaves[1].obj is arr


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=5),
    chunk=st.integers(1, 33),
)
def test_chunk_layout_and_boundaries(sizes: list[int], chunk: int) -> None:
    tensors = [tb(f"n{i}", np.arange(s, dtype=np.uint8)) for i, s in enumerate(sizes)]
    leaves = encode_tensors(tensors, chunk_size=chunk)
    refs = chunk_layout(tensors, chunk_size=chunk)
    assert len(refs) == len(leaves) == len(sizes) + sum(-(-s // chunk) for s in sizes)
    by_name = {t.name: t for t in tensors}
    for ref, leaf in zip(refs, leaves, strict=True):
        assert ref.index == refs.index(ref)
        tensor = by_name[ref.tensor]
        if ref.kind == "header":
            assert bytes(leaf) == encode_header(tensor, chunk_size=chunk)
            assert ref.offset == 0 and ref.length == len(leaf)
        else:
            # Chunks never span tensors: each lies inside its tensor, full size but the last.
            assert ref.offset % chunk == 0 and ref.offset + ref.length <= tensor.nbytes
            assert ref.length == min(chunk, tensor.nbytes - ref.offset)
            assert bytes(leaf) == bytes(tensor.data[ref.offset : ref.offset + ref.length])


def test_all_dtypes_round_trip() -> None:
    for i, dtype in enumerate(sorted(SUPPORTED_DTYPES)):
        data = bytes(range(i, i + 3 * itemsize(dtype)))
        t = TensorBytes(name=dtype, dtype=dtype, shape=(3,), data=memoryview(data))
        (back,) = decode_tensors(encode_tensors([t], chunk_size=5))
        assert (back.dtype, back.shape, bytes(back.data)) == (dtype, (3,), data)
    scalar = TensorBytes(name="s", dtype="bool", shape=(), data=memoryview(b"\x01"))
    assert decode_tensors(encode_tensors([scalar]))[0].shape == ()


def test_encoding_errors() -> None:
    arr = np.zeros(4, dtype=np.float32)
    with pytest.raises(EncodingError, match="duplicate tensor name 'w'"):
        encode_tensors([tb("w", arr), tb("w", arr)])
    with pytest.raises(
        EncodingError, match="16 data bytes, but shape \\(3,\\) of float32 needs 12"
    ):
        TensorBytes(name="w", dtype="float32", shape=(3,), data=memoryview(arr))
    with pytest.raises(EncodingError, match="unknown dtype 'float128'"):
        itemsize("float128")
    with pytest.raises(EncodingError, match="unknown dtype"):
        TensorBytes(name="w", dtype="torch.float32", shape=(4,), data=memoryview(arr))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(EncodingError, match="chunk_size"):
            encode_tensors([tb("w", arr)], chunk_size=bad)  # type: ignore[arg-type]
        with pytest.raises(EncodingError, match="chunk_size"):
            chunk_layout([tb("w", arr)], chunk_size=bad)  # type: ignore[arg-type]
    with pytest.raises(EncodingError, match="not C-contiguous"):
        tb("w", np.zeros((4, 4), dtype=np.float32)[:, 1])
    with pytest.raises(EncodingError, match="big-endian"):
        tb("w", np.zeros(4, dtype=">f4"), "float32")
    with pytest.raises(EncodingError, match="itemsize 8, dtype float32 needs 4"):
        TensorBytes(name="w", dtype="float32", shape=(6,), data=memoryview(np.zeros(3)))
    with pytest.raises(EncodingError, match="non-empty"):
        TensorBytes(name="", dtype="uint8", shape=(0,), data=memoryview(b""))
    with pytest.raises(EncodingError, match="shape"):
        TensorBytes(name="w", dtype="uint8", shape=[1], data=memoryview(b"x"))  # type: ignore[arg-type]
    with pytest.raises(EncodingError, match="shape"):
        TensorBytes(name="w", dtype="uint8", shape=(-1,), data=memoryview(b""))
    with pytest.raises(EncodingError, match="memoryview"):
        TensorBytes(name="w", dtype="uint8", shape=(1,), data=[1])  # type: ignore[arg-type]


def test_decoding_is_strict() -> None:
    t1 = tb("a", np.arange(10, dtype=np.uint8))
    t2 = tb("b", np.arange(3, dtype=np.uint8))
    good = raw(encode_tensors([t1, t2], chunk_size=4))  # [hA, 4, 4, 2, hB, 3]
    header = good[0]
    other_chunk = raw(encode_tensors([t2], chunk_size=8))
    cases = {
        "truncated": [header[:-1], *good[1:]],
        "trailing": [header + b"\x00", *good[1:]],
        "magic": [b"XTTH" + header[4:], *good[1:]],
        "version": [header[:4] + b"\x02" + header[5:], *good[1:]],
        "unsorted": good[4:] + good[:4],
        "duplicate": good[:4] + good[:4],
        "missing chunk": good[:3],
        "short chunk": [good[0], good[1][:3], good[2], good[3], *good[4:]],
        "data as header": good[1:],
        "mixed chunk sizes": good[:4] + other_chunk,
    }
    for label, chunks in cases.items():
        with pytest.raises(EncodingError):
            decode_tensors(chunks)
            pytest.fail(label)
    assert [t.name for t in decode_tensors(good)] == ["a", "b"]
    assert decode_tensors([]) == []


def _hex(s: str) -> bytes:
    assert s.startswith("0x")
    return bytes.fromhex(s[2:])


def test_vectors() -> None:
    doc = json.loads((VECTORS / "tensors.json").read_text())
    roots = {}
    for case in doc["cases"]:
        tensors = [
            TensorBytes(
                name=t["name"],
                dtype=t["dtype"],
                shape=tuple(t["shape"]),
                data=memoryview(_hex(t["data"])),
            )
            for t in case["tensors"]
        ]
        chunk = case["chunk_size"]
        leaves = encode_tensors(tensors, chunk_size=chunk)
        assert ["0x" + bytes(x).hex() for x in leaves] == case["leaves"], case["name"]
        layout = [
            {
                "index": r.index,
                "tensor": r.tensor,
                "kind": r.kind,
                "offset": r.offset,
                "length": r.length,
            }
            for r in chunk_layout(tensors, chunk_size=chunk)
        ]
        assert layout == case["layout"]
        assert "0x" + merkle_root(leaves).hex() == case["root"]
        back = decode_tensors([_hex(x) for x in case["leaves"]])
        assert sorted((t.name, t.dtype, t.shape, bytes(t.data)) for t in tensors) == [
            (t.name, t.dtype, t.shape, bytes(t.data)) for t in back
        ]
        roots[case["name"]] = case["root"]
    assert len(set(roots.values())) == len(roots) >= 7


@settings(max_examples=200, deadline=None)
@given(blob=st.binary(max_size=120), cut=st.integers(0, 120))
def test_parsers_only_raise_encoding_error(blob: bytes, cut: int) -> None:
    # Arbitrary bytes, and real headers cut or extended, must give EncodingError or a valid parse.
    header = encode_header(tb("w", np.zeros(3, dtype=np.float32)), chunk_size=7)
    for leaf in (blob, b"VTTH\x01" + blob, header[:cut] + blob):
        try:
            _name, dtype, shape, nbytes = decode_header(leaf)
            assert nbytes == itemsize(dtype) * int(np.prod(shape, dtype=object))
        except EncodingError:
            pass
        with contextlib.suppress(EncodingError):
            decode_tensors([leaf, blob])
    with pytest.raises(EncodingError):
        decode_header(12)  # type: ignore[arg-type]
