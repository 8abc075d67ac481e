"""Types of the optional C accelerator built from proofs/_sha256tree.c (see proofs/merkle.py)."""

from collections.abc import Sequence

from _typeshed import ReadableBuffer as Buffer

OPENSSL_VERSION: str

def leaf_hashes(leaves: Sequence[Buffer], /, *, strict: bool = False) -> bytes:
    """Concatenated sha256(0x00 || leaf), 32 bytes per leaf; releases the GIL.

    strict: accept only bytes, bytearray and memoryview leaves (TypeError otherwise).
    """

def tree_levels(leaf_hashes: Buffer, /) -> list[bytes]:
    """RFC 6962 levels above ``leaf_hashes``, bottom-up, ending with the root; [] if < 2 leaves."""

def legacy_root(leaves: Sequence[Buffer], /, *, strict: bool = False) -> bytes:
    """merkletools sha256 root: leaf = sha256(hex text), node = sha256(l || r); ValueError if 0."""

def set_sha_ni(enabled: bool, /) -> bool:
    """Use SHA-NI for short messages where the CPU has it (default) or OpenSSL; for tests."""

def legacy_root_from_hashes(hashes: Buffer, /) -> bytes:
    """merkletools root over concatenated 32-byte nodes; ValueError if empty or not 32-aligned."""
