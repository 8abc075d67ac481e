"""Canonical tensor encoding: a dict of tensors becomes an ordered list of Merkle leaves.

Layout (version 1), one tensor after another in sorted name order (Python ``str`` order, i.e. by
Unicode code point):

* one *header leaf* binding the tensor's name, dtype, shape, byte length and the chunk size;
* its data, as contiguous little-endian C-order bytes, cut into ``chunk_size`` pieces (the last one
  may be shorter; a tensor with zero bytes has no data leaf). Chunks never span two tensors, so a
  chunk's position alone says which tensor and byte range it covers (see :func:`chunk_layout`).

Header leaf, byte by byte (integers big-endian, unsigned)::

    magic      4 bytes  b"VTTH"
    version    1 byte   ENCODING_VERSION (1)
    name_len   2 bytes  then name, UTF-8, 1..65535 bytes
    dtype_len  1 byte   then dtype, ASCII (torch name without "torch.", e.g. "bfloat16")
    ndim       1 byte   then ndim dims, 8 bytes each
    nbytes     8 bytes  prod(shape) * itemsize(dtype)
    chunk_size 8 bytes  the chunk size the data leaves were cut with

Binding the shape, name and dtype in the header is what makes two dicts holding the same bytes in
different shapes commit differently. No torch import: callers hand over raw buffers.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from proofs.errors import EncodingError

ENCODING_VERSION = 1
DEFAULT_CHUNK_SIZE = 1 << 20
HEADER_MAGIC = b"VTTH"

# torch dtype name -> bytes per element. Only dtypes whose raw bytes are well defined on CPU.
_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
}
SUPPORTED_DTYPES: frozenset[str] = frozenset(_ITEMSIZE)

# Buffer formats that carry no element meaning (raw bytes): any itemsize-1 byte view is fine.
_BYTE_FORMATS = frozenset({"B", "b", "c", "<B", "=B", "@B", "<b", "=b", "@b"})
_MAX_NDIM = 255
_MAX_NAME = 0xFFFF
_U64 = struct.Struct(">Q")


def itemsize(dtype: str) -> int:
    """Bytes per element of ``dtype`` (a torch dtype name); EncodingError if unknown."""
    try:
        return _ITEMSIZE[dtype]
    except (KeyError, TypeError):
        raise EncodingError(
            f"unknown dtype {dtype!r}; expected one of {sorted(_ITEMSIZE)}"
        ) from None


def _as_byte_view(name: str, dtype: str, data: object) -> memoryview:
    """A flat, unsigned-byte, C-contiguous view of ``data`` without copying it."""
    if isinstance(data, bytes | bytearray):
        data = memoryview(data)
    if not isinstance(data, memoryview):
        raise EncodingError(f"tensor {name!r}: data must be a memoryview, got {type(data)!r}")
    if not data.c_contiguous:
        raise EncodingError(f"tensor {name!r}: data buffer is not C-contiguous")
    fmt = data.format
    if fmt[:1] in (">", "!"):
        raise EncodingError(
            f"tensor {name!r}: big-endian buffer format {fmt!r}; need little-endian"
        )
    if fmt not in _BYTE_FORMATS and data.itemsize != itemsize(dtype):
        raise EncodingError(
            f"tensor {name!r}: buffer format {fmt!r} has itemsize {data.itemsize}, "
            f"dtype {dtype} needs {itemsize(dtype)}"
        )
    if data.ndim == 1 and data.format == "B":
        return data
    try:
        return data.cast("B")
    except (TypeError, ValueError) as exc:  # e.g. a struct format memoryview cannot re-view
        raise EncodingError(f"tensor {name!r}: cannot view buffer as bytes: {exc}") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorBytes:
    """One tensor as raw bytes: ``data`` is contiguous little-endian C-order, never copied.

    ``data`` may be any C-contiguous buffer view (it is re-viewed as unsigned bytes); its length
    must be ``prod(shape) * itemsize(dtype)``. Raises EncodingError otherwise.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise EncodingError(f"tensor name must be a non-empty str, got {self.name!r}")
        try:
            encoded = self.name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EncodingError(f"tensor name {self.name!r} is not valid UTF-8: {exc}") from None
        if len(encoded) > _MAX_NAME:
            raise EncodingError(f"tensor name is {len(encoded)} bytes; at most {_MAX_NAME}")
        size = itemsize(self.dtype)
        shape = self.shape
        if not isinstance(shape, tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 64 for d in shape
        ):
            raise EncodingError(
                f"tensor {self.name!r}: shape must be a tuple of ints >= 0: {shape}"
            )
        if len(shape) > _MAX_NDIM:
            raise EncodingError(f"tensor {self.name!r}: {len(shape)} dims; at most {_MAX_NDIM}")
        view = _as_byte_view(self.name, self.dtype, self.data)
        expected = math.prod(shape) * size
        if view.nbytes != expected:
            raise EncodingError(
                f"tensor {self.name!r}: {view.nbytes} data bytes, but shape {shape} of "
                f"{self.dtype} needs {expected}"
            )
        object.__setattr__(self, "data", view)

    @property
    def nbytes(self) -> int:
        """Byte length of the data."""
        return self.data.nbytes


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorHeader:
    """The parsed contents of a header leaf."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunk_size: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkRef:
    """Where leaf ``index`` comes from: a header, or bytes [offset, offset+length) of a tensor."""

    index: int
    tensor: str
    kind: Literal["header", "data"]
    offset: int
    length: int


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise EncodingError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if chunk_size >= 1 << 64:
        raise EncodingError(f"chunk_size {chunk_size} does not fit in 8 bytes")


def encode_header(tensor: TensorBytes, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """The canonical header leaf of ``tensor`` (format in the module docstring)."""
    _check_chunk_size(chunk_size)
    name = tensor.name.encode("utf-8")
    dtype = tensor.dtype.encode("ascii")
    parts = [
        HEADER_MAGIC,
        bytes([ENCODING_VERSION]),
        len(name).to_bytes(2, "big"),
        name,
        bytes([len(dtype)]),
        dtype,
        bytes([len(tensor.shape)]),
        *(_U64.pack(d) for d in tensor.shape),
        _U64.pack(tensor.nbytes),
        _U64.pack(chunk_size),
    ]
    return b"".join(parts)


def parse_header(leaf: bytes | memoryview) -> TensorHeader:
    """Parse a header leaf strictly; EncodingError on anything non-canonical."""
    if not isinstance(leaf, bytes | bytearray | memoryview):
        raise EncodingError(f"header leaf must be bytes, got {type(leaf).__name__}")
    try:
        raw = bytes(leaf)
    except (BufferError, TypeError, ValueError) as exc:
        raise EncodingError(f"header leaf is not a readable byte buffer: {exc}") from None
    try:
        if raw[:4] != HEADER_MAGIC:
            raise EncodingError(f"header leaf must start with {HEADER_MAGIC!r}, got {raw[:4]!r}")
        if raw[4] != ENCODING_VERSION:
            raise EncodingError(f"header version {raw[4]}, this code reads {ENCODING_VERSION}")
        pos = 5
        name_len = int.from_bytes(raw[pos : pos + 2], "big")
        pos += 2
        name = raw[pos : pos + name_len].decode("utf-8")
        pos += name_len
        dtype_len = raw[pos]
        dtype = raw[pos + 1 : pos + 1 + dtype_len].decode("ascii")
        pos += 1 + dtype_len
        ndim = raw[pos]
        pos += 1
        shape = tuple(_U64.unpack_from(raw, pos + 8 * i)[0] for i in range(ndim))
        pos += 8 * ndim
        nbytes, chunk_size = _U64.unpack_from(raw, pos)[0], _U64.unpack_from(raw, pos + 8)[0]
        pos += 16
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EncodingError(
            f"truncated or malformed header leaf ({len(raw)} bytes): {exc}"
        ) from None
    if pos != len(raw):
        raise EncodingError(f"header leaf has {len(raw) - pos} trailing bytes")
    if not name or name_len != len(name.encode("utf-8")):
        raise EncodingError("header leaf has an empty tensor name")
    expected = math.prod(shape) * itemsize(dtype)
    if nbytes != expected:
        raise EncodingError(
            f"header says {nbytes} bytes but shape {shape} of {dtype} is {expected}"
        )
    _check_chunk_size(chunk_size)
    return TensorHeader(name=name, dtype=dtype, shape=shape, nbytes=nbytes, chunk_size=chunk_size)


def decode_header(leaf: bytes | memoryview) -> tuple[str, str, tuple[int, ...], int]:
    """(name, dtype, shape, nbytes) of a header leaf; EncodingError if malformed."""
    header = parse_header(leaf)
    return header.name, header.dtype, header.shape, header.nbytes


def _sorted_unique(tensors: Iterable[TensorBytes]) -> list[TensorBytes]:
    ordered = sorted(tensors, key=lambda t: t.name)
    for prev, cur in itertools.pairwise(ordered):
        if prev.name == cur.name:
            raise EncodingError(f"duplicate tensor name {cur.name!r}")
    for t in ordered:
        if not isinstance(t, TensorBytes):
            raise EncodingError(f"expected TensorBytes, got {type(t)!r}")
    return ordered


def encode_tensors(
    tensors: Iterable[TensorBytes], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[memoryview]:
    """The ordered leaves committing to ``tensors`` (input order does not matter).

    Data leaves are zero-copy slices of each tensor's buffer. Raises EncodingError on duplicate
    names or a bad ``chunk_size``.
    """
    _check_chunk_size(chunk_size)
    leaves: list[memoryview] = []
    for t in _sorted_unique(tensors):
        leaves.append(memoryview(encode_header(t, chunk_size=chunk_size)))
        data = t.data
        leaves.extend(data[o : o + chunk_size] for o in range(0, data.nbytes, chunk_size))
    return leaves


def chunk_layout(
    tensors: Iterable[TensorBytes], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[ChunkRef]:
    """For each leaf of :func:`encode_tensors`, which tensor and byte range it holds."""
    _check_chunk_size(chunk_size)
    refs: list[ChunkRef] = []
    for t in _sorted_unique(tensors):
        header_len = len(encode_header(t, chunk_size=chunk_size))
        refs.append(
            ChunkRef(index=len(refs), tensor=t.name, kind="header", offset=0, length=header_len)
        )
        for o in range(0, t.nbytes, chunk_size):
            length = min(chunk_size, t.nbytes - o)
            refs.append(
                ChunkRef(index=len(refs), tensor=t.name, kind="data", offset=o, length=length)
            )
    return refs


def decode_tensors(chunks: Sequence[bytes | memoryview]) -> list[TensorBytes]:
    """Inverse of :func:`encode_tensors`: the tensors, in leaf (sorted) order.

    Strict: raises EncodingError unless ``chunks`` is exactly what encode_tensors would produce
    (names sorted and unique, one chunk size throughout, full chunks but the last of each tensor).
    """
    out: list[TensorBytes] = []
    pos = 0
    chunk_size: int | None = None
    while pos < len(chunks):
        header = parse_header(chunks[pos])
        pos += 1
        if chunk_size is None:
            chunk_size = header.chunk_size
        elif header.chunk_size != chunk_size:
            raise EncodingError(
                f"tensor {header.name!r} uses chunk size {header.chunk_size}, earlier {chunk_size}"
            )
        if out and header.name <= out[-1].name:
            raise EncodingError(f"tensor {header.name!r} after {out[-1].name!r}: not sorted/unique")
        count = -(-header.nbytes // chunk_size)
        if pos + count > len(chunks):
            raise EncodingError(
                f"tensor {header.name!r} needs {count} data chunks, only {len(chunks) - pos} left"
            )
        parts = chunks[pos : pos + count]
        for i, part in enumerate(parts):
            want = min(chunk_size, header.nbytes - i * chunk_size)
            if not isinstance(part, bytes | bytearray | memoryview):
                raise EncodingError(f"tensor {header.name!r} chunk {i}: not bytes")
            size = part.nbytes if isinstance(part, memoryview) else len(part)
            if size != want:
                raise EncodingError(
                    f"tensor {header.name!r} chunk {i}: {size} bytes, expected {want}"
                )
        pos += count
        try:
            # A private, writable buffer: trainer.checkpoint.decode_checkpoint adopts it as the
            # tensor's storage instead of copying it a second time.
            data = memoryview(bytearray().join(parts))
        except (BufferError, TypeError, ValueError) as exc:
            raise EncodingError(f"tensor {header.name!r}: unreadable chunk: {exc}") from None
        out.append(TensorBytes(name=header.name, dtype=header.dtype, shape=header.shape, data=data))
    return out
