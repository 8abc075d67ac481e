"""Hash primitives and the byte domains they produce.

sha256 comes from hashlib (it releases the GIL on large buffers, which the tree builder relies on
for parallel hashing); keccak256 from eth-hash, the same backend web3.py uses.
"""

from __future__ import annotations

import hashlib
from typing import NewType

from eth_hash.auto import keccak as _keccak

Hash32 = NewType("Hash32", bytes)
"""Any 32-byte digest."""

Root = NewType("Root", bytes)
"""The 32-byte root of a Merkle tree."""

# RFC 6962 section 2.1: distinct prefixes for leaves and interior nodes, so a node can never be
# presented as a leaf (second-preimage resistance).
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"


def sha256(data: bytes | memoryview) -> Hash32:
    """Plain sha256 of ``data``."""
    return Hash32(hashlib.sha256(data).digest())


def keccak256(data: bytes | memoryview) -> Hash32:
    """Ethereum's keccak256 (not NIST SHA3-256) of ``data``."""
    return Hash32(_keccak(bytes(data)))


def leaf_hash(data: bytes | memoryview) -> Hash32:
    """RFC 6962 leaf hash: sha256(0x00 || data), without copying ``data``."""
    h = hashlib.sha256(LEAF_PREFIX)
    h.update(data)
    return Hash32(h.digest())


def node_hash(left: bytes, right: bytes) -> Hash32:
    """RFC 6962 interior node hash: sha256(0x01 || left || right)."""
    return Hash32(hashlib.sha256(NODE_PREFIX + left + right).digest())


def is_hash32(value: object) -> bool:
    """True when ``value`` is a bytes object of exactly 32 bytes."""
    return isinstance(value, bytes) and len(value) == 32
