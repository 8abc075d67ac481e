"""Tests for proofs.merkle against independent oracles.

The oracle functions below (mth, audit_path, multiproof_hashes) are written from RFC 6962 section
2.1 with hashlib only; they share no code with proofs.merkle. tests/vectors/merkle/generate.py
loads them from this file to produce the JSON vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proofs.errors import MalformedProofError
from proofs.merkle import (
    EMPTY_ROOT,
    InclusionProof,
    MerkleTree,
    MultiProof,
    hash_leaves,
    legacy_root,
    merkle_root,
    verify_inclusion,
    verify_multiproof,
    verify_multiproof_leaf_hashes,
)

VECTORS = Path(__file__).parent / "vectors" / "merkle"
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Hypothesis favours small integers; the second branch makes big trees (up to 1000) common too.
TREE_SIZES = st.one_of(st.integers(1, 40), st.integers(41, 1000))


# --- independent oracle: RFC 6962 section 2.1, not sharing code with proofs.merkle -------------
def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = _split(n)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def audit_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PATH(m, D[n]), leaf end first."""
    n = len(leaves)
    if n <= 1:
        return []
    k = _split(n)
    if m < k:
        return [*audit_path(m, leaves[:k]), mth(leaves[k:])]
    return [*audit_path(m - k, leaves[k:]), mth(leaves[:k])]


def multiproof_hashes(indices: list[int], leaves: list[bytes]) -> list[bytes]:
    """Subtree hashes a verifier needs for ``indices``, sorted (height, first leaf).

    Recursive RFC 6962 decomposition: every maximal subtree with no proven leaf is needed. Its
    height is log2 of the split size k at which it hangs off the proven paths.
    """
    out: list[tuple[int, int, bytes]] = []

    def walk(lo: int, hi: int, idx: list[int]) -> None:
        if hi - lo == 1:
            return
        k = _split(hi - lo)
        height = k.bit_length() - 1
        for a, b in ((lo, lo + k), (lo + k, hi)):
            inside = [i for i in idx if a <= i < b]
            if inside:
                walk(a, b, inside)
            else:
                out.append((height, a, mth(leaves[a:b])))

    walk(0, len(leaves), sorted(set(indices)))
    return [h for _, _, h in sorted(out)]


def oracle_legacy_root(leaves: list[bytes]) -> bytes:
    """merkletools' tree, written from its description: no prefixes, odd node carried up."""
    level = [hashlib.sha256(leaf.hex().encode()).digest() for leaf in leaves]
    while len(level) > 1:
        nxt = [
            hashlib.sha256(level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        level = nxt + ([level[-1]] if len(level) % 2 else [])
    return level[0]


# --- helpers ------------------------------------------------------------------------------------
def make_leaves(n: int, seed: int = 0, min_len: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(min_len, 48)) for _ in range(n)]


def flip(data: bytes, pos: int, mask: int) -> bytes:
    pos %= len(data)
    return data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]


# --- roots and paths against the oracle --------------------------------------------------------
@pytest.mark.parametrize("n", range(71))
def test_root_matches_rfc6962_oracle(n: int) -> None:
    leaves = make_leaves(n, n)
    assert MerkleTree.build(leaves).root == mth(leaves)
    assert merkle_root(leaves, workers=1) == mth(leaves)
    assert MerkleTree.from_leaf_hashes(MerkleTree.build(leaves).leaf_hashes).root == mth(leaves)


def test_empty_tree_root() -> None:
    assert MerkleTree.build([]).root == EMPTY_ROOT == hashlib.sha256(b"").digest()
    assert MerkleTree.build([]).leaf_count == 0


@settings(max_examples=25, deadline=None)
@given(n=st.integers(71, 3000), seed=st.integers(0, 2**32))
def test_root_random_sizes(n: int, seed: int) -> None:
    leaves = make_leaves(n, seed)
    assert merkle_root(leaves) == mth(leaves)


def test_parallel_big_leaves_match_oracle() -> None:
    # Large leaves take the threaded path; mixed sizes and memoryview slices like encode_tensors.
    rng = random.Random(7)
    blob = rng.randbytes(9 << 20)
    view = memoryview(blob)
    leaves = [view[:100], view[100 : 3 << 20], b"tiny", view[3 << 20 :]]
    expect = mth([bytes(x) for x in leaves])
    assert MerkleTree.build(leaves).root == expect
    assert MerkleTree.build(leaves, workers=1).root == expect
    assert MerkleTree.build(leaves, workers=3).root == expect


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 31, 33, 64, 65, 100])
def test_audit_path_matches_oracle_and_verifies(n: int) -> None:
    leaves = make_leaves(n, 1000 + n)
    tree = MerkleTree.build(leaves)
    root = mth(leaves)
    for m in range(n):
        proof = tree.proof(m)
        assert list(proof.siblings) == audit_path(m, leaves)
        assert verify_inclusion(root, leaves[m], proof, leaf_count=n)
        assert tree.multiproof([m]).hashes == proof.siblings


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_multiproof_matches_oracle(data: st.DataObject, n: int, seed: int) -> None:
    leaves = make_leaves(n, seed)
    indices = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12))
    proof = MerkleTree.build(leaves).multiproof(indices)
    assert proof.indices == tuple(sorted(set(indices)))
    assert list(proof.hashes) == multiproof_hashes(indices, leaves)
    assert verify_multiproof(mth(leaves), {i: leaves[i] for i in proof.indices}, proof)
    hashed = {i: hashlib.sha256(b"\x00" + leaves[i]).digest() for i in proof.indices}
    assert verify_multiproof_leaf_hashes(mth(leaves), hashed, proof, leaf_count=n)
    first = proof.indices[0]
    hashed[first] = flip(hashed[first], seed, 1)
    assert not verify_multiproof_leaf_hashes(mth(leaves), hashed, proof)
    hashed[first] = leaves[first]  # a raw leaf where a hash belongs
    assert not verify_multiproof_leaf_hashes(mth(leaves), hashed, proof)


# --- tampering: every change makes verification fail (trees of 1..1000 leaves) -----------------
@PROPERTY
@given(
    n=TREE_SIZES,
    seed=st.integers(0, 2**32),
    data=st.data(),
    target=st.sampled_from(["leaf", "sibling", "index", "root", "leaf_count"]),
)
def test_inclusion_tampering_fails(n: int, seed: int, data: st.DataObject, target: str) -> None:
    leaves = make_leaves(n, seed, min_len=1)
    tree = MerkleTree.build(leaves)
    m = data.draw(st.integers(0, n - 1), label="index")
    proof = tree.proof(m)
    root, leaf = tree.root, leaves[m]
    assert verify_inclusion(root, leaf, proof, leaf_count=n)
    pos, mask = data.draw(st.integers(0, 1 << 16)), data.draw(st.integers(1, 255))
    if target == "leaf":
        leaf = flip(leaf, pos, mask)
    elif target == "sibling":
        if not proof.siblings:  # n == 1: no sibling to flip, tamper the root instead
            root = flip(root, pos, mask)
        else:
            sibs = list(proof.siblings)
            j = pos % len(sibs)
            sibs[j] = flip(sibs[j], pos // len(sibs), mask)  # type: ignore[assignment]
            proof = dataclasses.replace(proof, siblings=tuple(sibs))
    elif target == "index":
        other = data.draw(st.integers(-5, n + 5).filter(lambda i: i != m), label="new index")
        proof = dataclasses.replace(proof, index=other)
    elif target == "root":
        root = flip(root, pos, mask)
    else:
        other = data.draw(st.integers(0, 1100).filter(lambda c: c != n), label="new count")
        proof = dataclasses.replace(proof, leaf_count=other)
    assert not verify_inclusion(root, leaf, proof, leaf_count=n)


@PROPERTY
@given(
    n=TREE_SIZES,
    seed=st.integers(0, 2**32),
    data=st.data(),
    target=st.sampled_from(["leaf", "hash", "index", "root", "extra", "missing", "count"]),
)
def test_multiproof_tampering_fails(n: int, seed: int, data: st.DataObject, target: str) -> None:
    leaves = make_leaves(n, seed, min_len=1)
    tree = MerkleTree.build(leaves)
    chosen = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=10, unique=True))
    proof = tree.multiproof(chosen)
    given_leaves = {i: leaves[i] for i in proof.indices}
    root = tree.root
    assert verify_multiproof(root, given_leaves, proof, leaf_count=n)
    pos, mask = data.draw(st.integers(0, 1 << 16)), data.draw(st.integers(1, 255))
    hashes = list(proof.hashes)
    if target == "leaf":
        i = proof.indices[pos % len(proof.indices)]
        given_leaves[i] = flip(given_leaves[i], pos, mask)
    elif target == "hash" and hashes:
        j = pos % len(hashes)
        hashes[j] = flip(hashes[j], pos, mask)  # type: ignore[assignment]
    elif target == "index":
        old = proof.indices[pos % len(proof.indices)]
        new = data.draw(
            st.integers(-3, n + 3).filter(lambda i: i not in proof.indices), label="new index"
        )
        given_leaves[new] = given_leaves.pop(old)
        proof = dataclasses.replace(proof, indices=tuple(sorted(given_leaves)))
    elif target == "extra":
        hashes.insert(pos % (len(hashes) + 1), hashlib.sha256(b"extra").digest())  # type: ignore[arg-type]
    elif target == "missing" and hashes:
        del hashes[pos % len(hashes)]
    elif target == "count":
        other = data.draw(st.integers(0, 1100).filter(lambda c: c != n), label="new count")
        proof = dataclasses.replace(proof, leaf_count=other)
    else:  # "root", or a hash-less proof (all leaves proven) where there is no hash to alter
        root = flip(root, pos, mask)
    proof = dataclasses.replace(proof, hashes=tuple(hashes))
    assert not verify_multiproof(root, given_leaves, proof, leaf_count=n)


def test_size_is_not_bound_by_root_alone() -> None:
    # Documented limit: index 0's path is the same in trees of 5 and 6 leaves, so a verifier that
    # does not pass the committed leaf_count accepts either claimed size.
    leaves = make_leaves(6, 3)
    tree5 = MerkleTree.build(leaves[:5])
    proof = dataclasses.replace(tree5.proof(4), leaf_count=5)
    assert verify_inclusion(tree5.root, leaves[4], proof)
    assert not verify_inclusion(tree5.root, leaves[4], proof, leaf_count=6)
    # Without the keyword, a claimed size whose path shape differs is still rejected (RFC 9162's
    # final sn == 0 check): index 0 of 4 leaves has 2 siblings, of 5 leaves 3.
    tree4 = MerkleTree.build(leaves[:4])
    for wrong in (1, 2, 5, 8):
        claimed = dataclasses.replace(tree4.proof(0), leaf_count=wrong)
        assert not verify_inclusion(tree4.root, leaves[0], claimed)
    assert verify_inclusion(tree4.root, leaves[0], tree4.proof(0))


# --- malformed input: raise MalformedProofError when building, False when verifying -----------
def test_build_and_proof_errors_are_specific() -> None:
    tree = MerkleTree.build(make_leaves(5))
    for bad in (-1, 5, 100):
        with pytest.raises(MalformedProofError, match="out of range: tree has 5 leaves"):
            tree.proof(bad)
        with pytest.raises(MalformedProofError, match="out of range"):
            tree.multiproof([0, bad])
    with pytest.raises(MalformedProofError, match="must be an int"):
        tree.proof("1")  # type: ignore[arg-type]
    with pytest.raises(MalformedProofError, match="at least one"):
        tree.multiproof([])
    with pytest.raises(MalformedProofError, match="out of range: tree has 0"):
        MerkleTree.build([]).proof(0)
    with pytest.raises(MalformedProofError, match="leaf 1: expected bytes"):
        MerkleTree.build([b"a", "b"])  # type: ignore[list-item]
    with pytest.raises(MalformedProofError, match="expected 32 bytes"):
        MerkleTree.from_leaf_hashes([b"\x00" * 31])  # type: ignore[list-item]
    with pytest.raises(MalformedProofError, match="workers"):
        MerkleTree.build([b"a"], workers=0)
    with pytest.raises(MalformedProofError, match="empty"):
        legacy_root([])


def test_verify_returns_false_on_malformed() -> None:
    leaves = make_leaves(9, 11, min_len=1)
    tree = MerkleTree.build(leaves)
    root, good = tree.root, tree.proof(3)
    r = dataclasses.replace
    bad_inclusion = [
        r(good, index=-1),
        r(good, index=9),
        r(good, index=True),  # type: ignore[arg-type]
        r(good, leaf_count=0),
        r(good, leaf_count=-3),
        r(good, siblings=good.siblings[:-1]),
        r(good, siblings=(*good.siblings, good.siblings[0])),
        r(good, siblings=(good.siblings[0][:31], *good.siblings[1:])),  # type: ignore[arg-type]
        r(good, siblings=list(good.siblings)),  # type: ignore[arg-type]
    ]
    for proof in bad_inclusion:
        assert not verify_inclusion(root, leaves[3], proof)
    assert not verify_inclusion(root[:31], leaves[3], good)
    assert not verify_inclusion(root.hex(), leaves[3], good)  # type: ignore[arg-type]
    assert not verify_inclusion(root, 123, good)  # type: ignore[arg-type]
    assert not verify_inclusion(root, leaves[3], "proof")  # type: ignore[arg-type]

    multi = tree.multiproof([1, 4])
    lv = {1: leaves[1], 4: leaves[4]}
    assert verify_multiproof(root, lv, multi)
    bad_multi = [
        r(multi, indices=(1, 1, 4)),
        r(multi, indices=(4, 1)),
        r(multi, indices=()),
        r(multi, indices=(1, 9)),
        r(multi, leaf_count=0),
        r(multi, hashes=(*multi.hashes, multi.hashes[0])),
        r(multi, hashes=multi.hashes[1:]),
    ]
    for proof in bad_multi:
        assert not verify_multiproof(root, lv, proof)
    assert not verify_multiproof(root, {1: leaves[1]}, multi)
    assert not verify_multiproof(root, {**lv, 5: leaves[5]}, multi)
    assert not verify_multiproof(root, {1: leaves[1], 4: None}, multi)  # type: ignore[dict-item]
    assert not verify_multiproof(root, [leaves[1], leaves[4]], multi)  # type: ignore[arg-type]


def test_no_duplicate_leaf_ambiguity() -> None:
    # CVE-2012-2459: Bitcoin-style trees give [a, b, c] and [a, b, c, c] the same root.
    leaves = make_leaves(3, 5)
    assert merkle_root(leaves) != merkle_root([*leaves, leaves[-1]])
    # Domain separation: an inner node presented as a leaf does not reproduce the root.
    tree = MerkleTree.build(make_leaves(4, 6))
    inner = tree.proof(0).siblings[-1]
    assert merkle_root([tree.proof(3).siblings[-1], inner]) != tree.root


# --- JSON ---------------------------------------------------------------------------------------
def test_json_round_trip_and_rejects() -> None:
    tree = MerkleTree.build(make_leaves(10, 2))
    proof, multi = tree.proof(7), tree.multiproof([0, 7, 9])
    assert InclusionProof.from_json(proof.to_json()) == proof
    assert InclusionProof.from_json(json.dumps(proof.to_json())) == proof
    assert MultiProof.from_json(json.dumps(multi.to_json())) == multi
    assert proof.to_json()["siblings"][0] == "0x" + proof.siblings[0].hex()
    bad = [
        "not json",
        "[]",
        {**proof.to_json(), "version": 2},
        {**proof.to_json(), "kind": "multiproof"},
        {**proof.to_json(), "extra": 1},
        {**proof.to_json(), "index": -1},
        {**proof.to_json(), "index": "7"},
        {**proof.to_json(), "siblings": ["0x" + "ab" * 31]},
        {**proof.to_json(), "siblings": ["ab" * 32]},
        {**proof.to_json(), "siblings": ["0x" + "zz" * 32]},
    ]
    for item in bad:
        with pytest.raises(MalformedProofError):
            InclusionProof.from_json(item)  # type: ignore[arg-type]
    with pytest.raises(MalformedProofError):
        MultiProof.from_json({**multi.to_json(), "indices": "0,7"})


# --- merkletools interop ------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 17, 100, 257])
def test_legacy_root_matches_merkletools(n: int) -> None:
    import merkletools  # installed --no-deps: its pysha3 dependency does not build on 3.11

    leaves = make_leaves(n, 50 + n)
    mt = merkletools.MerkleTools(hash_type="sha256")
    for leaf in leaves:
        mt.add_leaf(leaf.hex(), do_hash=True)
    mt.make_tree()
    expected = mt.get_merkle_root()
    assert legacy_root(leaves).hex() == expected
    assert oracle_legacy_root(leaves).hex() == expected
    assert legacy_root(leaves) != merkle_root(leaves)


# --- JSON vectors -------------------------------------------------------------------------------
def _hex(s: str) -> bytes:
    assert s.startswith("0x")
    return bytes.fromhex(s[2:])


def test_vectors() -> None:
    files = sorted(VECTORS.glob("*.json"))
    assert files, "no merkle vectors found"
    checked = 0
    for path in files:
        for case in json.loads(path.read_text())["cases"]:
            leaves = [_hex(x) for x in case["leaves"]]
            tree = MerkleTree.build(leaves)
            assert tree.root.hex() == case["root"][2:], (path.name, case["name"])
            if "legacy_root" in case:
                assert legacy_root(leaves).hex() == case["legacy_root"][2:]
            for p in case.get("proofs", []):
                proof = InclusionProof.from_json(p)
                assert tree.proof(proof.index) == proof
                assert verify_inclusion(tree.root, leaves[proof.index], proof)
            for p in case.get("multiproofs", []):
                multi = MultiProof.from_json(p)
                assert tree.multiproof(multi.indices) == multi
                assert verify_multiproof(tree.root, {i: leaves[i] for i in multi.indices}, multi)
            checked += 1
    assert checked >= 10


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    value=JSONISH,
    key=st.sampled_from(["index", "leaf_count", "siblings", "indices", "hashes", "version"]),
)
def test_from_json_fuzz_only_malformed_proof_error(value: object, key: str) -> None:
    tree = MerkleTree.build(make_leaves(6, 4))
    for cls, good in (
        (InclusionProof, tree.proof(2).to_json()),
        (MultiProof, tree.multiproof([1, 5]).to_json()),
    ):
        for candidate in (value, {**good, key: value}):
            try:
                parsed = cls.from_json(candidate)  # type: ignore[attr-defined]
            except MalformedProofError:
                continue
            assert isinstance(parsed, cls)


@settings(max_examples=150, deadline=None)
@given(
    index=st.one_of(st.integers(-(2**65), 2**65), st.none(), st.text(max_size=3)),
    count=st.one_of(st.integers(-(2**65), 2**65), st.none(), st.floats()),
    siblings=st.lists(st.binary(min_size=30, max_size=34), max_size=12),
    root=st.binary(min_size=31, max_size=33),
    leaf=st.one_of(st.binary(max_size=8), st.none(), st.integers()),
)
def test_verify_never_raises(
    index: object, count: object, siblings: list[bytes], root: bytes, leaf: object
) -> None:
    inc = InclusionProof(index=index, leaf_count=count, siblings=tuple(siblings))  # type: ignore[arg-type]
    assert isinstance(verify_inclusion(root, leaf, inc), bool)  # type: ignore[arg-type]
    multi = MultiProof(indices=(index,), leaf_count=count, hashes=tuple(siblings))  # type: ignore[arg-type]
    assert isinstance(verify_multiproof(root, {index: leaf}, multi), bool)  # type: ignore[arg-type, dict-item]
    assert isinstance(verify_multiproof(root, {0: leaf}, multi, leaf_count=3), bool)  # type: ignore[dict-item]


@pytest.mark.parametrize("workers", [1, 2])
def test_hash_leaves_is_hashlib_leaf_hash_of_each_leaf(workers: int) -> None:
    rng = random.Random(5)
    # Small leaves and, past the threading threshold, 1 MiB ones; bytes and memoryviews.
    leaves: list[bytes | memoryview] = [rng.randbytes(rng.randrange(0, 300)) for _ in range(50)]
    leaves += [memoryview(rng.randbytes(1 << 20)) for _ in range(5)]
    expected = b"".join(hashlib.sha256(b"\x00" + bytes(leaf)).digest() for leaf in leaves)
    assert hash_leaves(leaves, workers=workers) == expected
    with pytest.raises(MalformedProofError):
        hash_leaves([b"ok", "text"], workers=workers)  # type: ignore[list-item]
