"""Tests for proofs.merkle against an independent RFC 6962 oracle written here with hashlib."""

from __future__ import annotations

import hashlib
import random

import pytest

from proofs.errors import MalformedProofError
from proofs.merkle import (
    InclusionProof,
    MerkleTree,
    MultiProof,
    merkle_root,
    verify_inclusion,
    verify_multiproof,
)


# --- independent oracle: RFC 6962 section 2.1, written from the RFC, not from proofs.merkle ---
def mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def audit_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n <= 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*audit_path(m, leaves[:k]), mth(leaves[k:])]
    return [*audit_path(m - k, leaves[k:]), mth(leaves[:k])]


def make_leaves(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 80)) for _ in range(n)]


@pytest.mark.parametrize("n", range(71))
def test_root_matches_rfc6962_oracle(n: int) -> None:
    leaves = make_leaves(n, n)
    assert MerkleTree.build(leaves).root == mth(leaves)
    assert merkle_root(leaves) == mth(leaves)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 13, 31, 33, 64, 65, 100])
def test_audit_path_matches_oracle_and_verifies(n: int) -> None:
    leaves = make_leaves(n, 1000 + n)
    tree = MerkleTree.build(leaves)
    root = mth(leaves)
    for m in range(n):
        proof = tree.proof(m)
        assert list(proof.siblings) == audit_path(m, leaves)
        assert verify_inclusion(root, leaves[m], proof)


def test_multiproof_basic() -> None:
    leaves = make_leaves(37, 5)
    tree = MerkleTree.build(leaves)
    proof = tree.multiproof([30, 2, 3, 36, 2])
    assert proof.indices == (2, 3, 30, 36)
    assert verify_multiproof(mth(leaves), {i: leaves[i] for i in proof.indices}, proof)


def test_malformed_raise_not_indexerror() -> None:
    tree = MerkleTree.build(make_leaves(5))
    for bad in (-1, 5, 100):
        with pytest.raises(MalformedProofError, match="out of range"):
            tree.proof(bad)
    with pytest.raises(MalformedProofError):
        MerkleTree.build([]).proof(0)
    assert not verify_inclusion(tree.root, b"x", InclusionProof(index=9, leaf_count=5, siblings=()))
    assert not verify_multiproof(tree.root, {}, MultiProof(indices=(), leaf_count=5, hashes=()))
