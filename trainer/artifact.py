"""The artifact file format: a Merkle-committed list of leaves with a leaf table up front.

An artifact (a gradient checkpoint or a state checkpoint) is the leaf list of
``proofs.encoding.encode_tensors``, stored as one file named after its Merkle root::

    b"VTAR" | u8 version (=1) | 3 zero bytes | u64be leaf_count
    | leaf_count x u64be leaf length | leaf_count x 32-byte leaf hash (RFC 6962, sha256(0x00||leaf))
    | the leaves, concatenated

The table lets a reader fetch only the leaves it needs (two small range reads, then one per run
of adjacent leaves) and still check them: the root rebuilt from the table must equal the
committed root, and each leaf read must hash to its table entry. Nothing in the table is trusted
on its own.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from proofs.errors import EncodingError
from proofs.hashing import Hash32, Root, leaf_hash
from proofs.merkle import MerkleTree

ARTIFACT_MAGIC = b"VTAR"
ARTIFACT_VERSION = 1
PREFIX_SIZE = 16
"""Bytes before the leaf table: magic, version, padding, leaf count."""
MAX_LEAVES = 1 << 32
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, kw_only=True, slots=True)
class ArtifactIndex:
    """The parsed leaf table of an artifact file."""

    lengths: tuple[int, ...]
    hashes: tuple[Hash32, ...]

    @property
    def leaf_count(self) -> int:
        return len(self.lengths)

    @property
    def data_offset(self) -> int:
        """File offset of leaf 0."""
        return PREFIX_SIZE + 40 * self.leaf_count

    @property
    def nbytes(self) -> int:
        """Total file size implied by the table."""
        return self.data_offset + sum(self.lengths)

    def leaf_range(self, index: int) -> tuple[int, int]:
        """File byte range ``[start, end)`` of leaf ``index``; IndexError if out of range."""
        if not 0 <= index < self.leaf_count:
            raise IndexError(f"leaf {index} out of range (artifact has {self.leaf_count})")
        start = self.data_offset + sum(self.lengths[:index])
        return start, start + self.lengths[index]

    def leaf_starts(self) -> list[int]:
        """File offset of every leaf, then the end of the file (``leaf_count + 1`` entries)."""
        return list(itertools.accumulate(self.lengths, initial=self.data_offset))

    def tree(self) -> MerkleTree:
        """The Merkle tree over the table's leaf hashes (for roots and multiproofs)."""
        return MerkleTree.from_leaf_hashes(self.hashes)


@dataclass(frozen=True, kw_only=True, slots=True)
class Encoded:
    """An artifact ready to write: its file bytes (as parts, so leaves are never copied into one
    buffer before the write), root and table."""

    root: Root
    index: ArtifactIndex
    parts: tuple[bytes | memoryview, ...]

    @property
    def nbytes(self) -> int:
        return self.index.nbytes

    @property
    def payload(self) -> bytes:
        """The whole file as one bytes object (copies; writers use ``parts``)."""
        return b"".join(self.parts)


def encode_artifact(leaves: Sequence[bytes | memoryview]) -> Encoded:
    """Hash ``leaves`` and lay out the artifact file. Raises EncodingError on too many leaves."""
    if len(leaves) >= MAX_LEAVES:
        raise EncodingError(f"{len(leaves)} leaves; at most {MAX_LEAVES - 1}")
    # One tree build on one thread: with the C accelerator that is a single GIL-free call over
    # every leaf (no per-leaf Python work, no thread pool per step competing with training).
    tree = MerkleTree.build(leaves, workers=1)
    hashes = tree.leaf_hashes
    lengths = tuple(memoryview(leaf).nbytes for leaf in leaves)
    index = ArtifactIndex(lengths=lengths, hashes=hashes)
    # Prefix and table as one buffer: fewer parts, fewer write calls.
    n = len(leaves)
    table = struct.pack(f">{n}Q", *lengths) + b"".join(hashes)
    head = ARTIFACT_MAGIC + bytes([ARTIFACT_VERSION, 0, 0, 0]) + _U64.pack(n) + table
    parts: list[bytes | memoryview] = [head]
    parts.extend(leaves)
    return Encoded(root=tree.root, index=index, parts=tuple(parts))


def parse_prefix(prefix: bytes) -> int:
    """The leaf count from the first ``PREFIX_SIZE`` bytes; EncodingError if malformed."""
    if len(prefix) != PREFIX_SIZE or prefix[:4] != ARTIFACT_MAGIC:
        raise EncodingError(f"not an artifact file (prefix {prefix[:8]!r})")
    if prefix[4] != ARTIFACT_VERSION or prefix[5:8] != b"\x00\x00\x00":
        raise EncodingError(f"unsupported artifact version {prefix[4]}")
    count = _U64.unpack_from(prefix, 8)[0]
    if count >= MAX_LEAVES:
        raise EncodingError(f"artifact claims {count} leaves")
    return int(count)


def parse_table(table: bytes, leaf_count: int) -> ArtifactIndex:
    """Parse the ``40 * leaf_count`` table bytes after the prefix; EncodingError if short."""
    if len(table) != 40 * leaf_count:
        raise EncodingError(f"artifact table is {len(table)} bytes, expected {40 * leaf_count}")
    lengths = tuple(_U64.unpack_from(table, 8 * i)[0] for i in range(leaf_count))
    base = 8 * leaf_count
    hashes = tuple(Hash32(table[base + 32 * i : base + 32 * i + 32]) for i in range(leaf_count))
    return ArtifactIndex(lengths=lengths, hashes=hashes)


def parse_artifact(payload: bytes) -> tuple[ArtifactIndex, list[bytes]]:
    """Split a whole artifact file into (table, leaves). Raises EncodingError if malformed."""
    count = parse_prefix(payload[:PREFIX_SIZE])
    index = parse_table(payload[PREFIX_SIZE : PREFIX_SIZE + 40 * count], count)
    if len(payload) != index.nbytes:
        raise EncodingError(f"artifact is {len(payload)} bytes, its table implies {index.nbytes}")
    leaves = []
    pos = index.data_offset
    for n in index.lengths:
        leaves.append(payload[pos : pos + n])
        pos += n
    return index, leaves


def first_bad_leaf(index: ArtifactIndex, leaves: Sequence[bytes], root: bytes) -> int | None:
    """The first leaf index whose bytes do not match the table, or ``-1`` when the table itself
    does not rebuild ``root``; None when every leaf and the root check out."""
    for i, (leaf, expected) in enumerate(zip(leaves, index.hashes, strict=True)):
        if leaf_hash(leaf) != expected:
            return i
    return None if index.tree().root == root else -1
