"""RFC 6962 consistency proofs (proofs/consistency.py, MerkleTree.consistency_proof, root_at).

Checked against three things that share no code with proofs/: the 98 consistency and 98 inclusion
probes of transparency-dev/merkle (tests/vectors/rfc6962/), a SUBPROOF oracle below written from
RFC 6962 section 2.1.2 with hashlib only, and roots of trees built over prefixes of the leaves.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proofs import merkle
from proofs.consistency import MAX_TREE_SIZE
from proofs.errors import MalformedProofError
from proofs.hashing import Hash32
from proofs.merkle import (
    EMPTY_ROOT,
    ConsistencyProof,
    InclusionProof,
    MerkleTree,
    MultiProof,
    verify_consistency,
    verify_inclusion,
    verify_multiproof_leaf_hashes,
)

VECTORS = Path(__file__).parent / "vectors" / "rfc6962"
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The one probe we answer differently, on purpose: its two "roots" are the 12-byte placeholder
# "don't care 2"; Go compares them as bytes and accepts, we refuse any root that is not a
# 32-byte sha256 digest before comparing (as verify_inclusion does).
DEVIATIONS = {"additional/sizes-are-equal-one-and-proof-is-empty.json"}


# --- independent oracle: RFC 6962 section 2.1.2 with hashlib only ------------------------------
def _mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def _subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), _mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


def oracle_proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 PROOF(m, D[n]) = SUBPROOF(m, D[n], true)."""
    return _subproof(m, leaves, True)


# --- helpers -----------------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["native", "hashlib"])
def native(request: pytest.FixtureRequest) -> Iterator[bool]:
    """Build trees both ways: the proofs read the stored levels, whichever code built them."""
    if request.param and not merkle.native_available():
        pytest.skip("C accelerator not built")
    before = merkle.native_enabled()
    merkle.set_native(request.param)
    try:
        yield request.param
    finally:
        merkle.set_native(before)


def _load(kind: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / f"{kind}.json").read_text())
    return doc


def _hex(s: str) -> bytes:
    assert s.startswith("0x")
    return bytes.fromhex(s[2:])


def _proof(case: dict[str, Any]) -> tuple[Hash32, ...]:
    return tuple(Hash32(_hex(h)) for h in case["proof"] or ())  # Go's nil proof is an empty one


def _leaves(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 40)) for _ in range(n)]


def _flip(h: bytes, pos: int) -> bytes:
    pos %= 32
    return h[:pos] + bytes([h[pos] ^ 1]) + h[pos + 1 :]


# --- transparency-dev/merkle probes ------------------------------------------------------------
def test_vector_files_are_complete() -> None:
    for kind in ("consistency", "inclusion"):
        doc = _load(kind)
        assert doc["source"]["repository"] == "https://github.com/transparency-dev/merkle"
        assert len(doc["cases"]) == 98
        assert sum(not c["wantErr"] for c in doc["cases"]) == 6


def test_consistency_probes(native: bool) -> None:
    doc = _load("consistency")
    leaves = [_hex(x) for x in doc["leaf_inputs"]]
    tree = MerkleTree.build(leaves)
    wrong = []
    for case in doc["cases"]:
        got = verify_consistency(
            case["size1"], case["size2"], _hex(case["root1"]), _hex(case["root2"]), _proof(case)
        )
        want = not case["wantErr"] and case["file"] not in DEVIATIONS
        if got != want:
            wrong.append(case["file"])
        if want:  # a valid probe: our tree over the same leaves gives the same roots and path
            m, n = case["size1"], case["size2"]
            assert tree.root_at(m) == _hex(case["root1"]), case["file"]
            assert tree.root_at(n) == _hex(case["root2"]), case["file"]
            assert tree.consistency_proof(m, n).hashes == _proof(case), case["file"]
    assert wrong == []


def test_consistency_deviation_is_only_the_placeholder_root() -> None:
    (case,) = [c for c in _load("consistency")["cases"] if c["file"] in DEVIATIONS]
    assert not case["wantErr"] and case["root1"] == case["root2"]
    assert len(_hex(case["root1"])) != 32
    # The same probe with real (equal, 32-byte) roots is accepted.
    assert verify_consistency(1, 1, b"\x07" * 32, b"\x07" * 32, ())


def test_inclusion_probes(native: bool) -> None:
    doc = _load("inclusion")
    leaves = [_hex(x) for x in doc["leaf_inputs"]]
    by_hash = {hashlib.sha256(b"\x00" + leaf).digest(): leaf for leaf in leaves}
    tree = MerkleTree.build(leaves)
    wrong = []
    for case in doc["cases"]:
        index, size = case["leafIdx"], case["treeSize"]
        root, leaf_hash, path = _hex(case["root"]), _hex(case["leafHash"]), _proof(case)
        multi = MultiProof(indices=(index,), leaf_count=size, hashes=path)
        got = [verify_multiproof_leaf_hashes(root, {index: leaf_hash}, multi, leaf_count=size)]
        if leaf_hash in by_hash:
            single = InclusionProof(index=index, leaf_count=size, siblings=path)
            got.append(verify_inclusion(root, by_hash[leaf_hash], single, leaf_count=size))
        if got != [not case["wantErr"]] * len(got):
            wrong.append(case["file"])
        if not case["wantErr"] and leaf_hash in by_hash:  # a probe over the 8 standard leaves
            small = MerkleTree.build(leaves[:size])
            assert small.root == root and small.proof(index).siblings == path, case["file"]
            assert tree.root_at(size) == root, case["file"]
        elif not case["wantErr"]:  # single-entry/: a one-leaf tree of another leaf
            assert MerkleTree.from_leaf_hashes([Hash32(leaf_hash)]).root == root, case["file"]
    assert wrong == []


# --- our proofs against the oracle, and their properties ---------------------------------------
@pytest.mark.parametrize("n", range(1, 34))
def test_every_pair_matches_oracle(n: int, native: bool) -> None:
    leaves = _leaves(n, n)
    tree = MerkleTree.build(leaves)
    for new in range(1, n + 1):
        assert tree.root_at(new) == _mth(leaves[:new])
        for old in range(1, new + 1):
            proof = tree.consistency_proof(old, new)
            assert list(proof.hashes) == oracle_proof(old, leaves[:new]), (old, new)
            assert verify_consistency(
                old, new, _mth(leaves[:old]), _mth(leaves[:new]), proof.hashes
            )


def test_range_hash_of_any_range(native: bool) -> None:
    """The helper behind root_at and the proofs is right for unaligned ranges too."""
    leaves = _leaves(13, 6)
    tree = MerkleTree.build(leaves)
    for a in range(13):
        for b in range(a + 1, 14):
            assert tree._range_hash(a, b) == _mth(leaves[a:b]), (a, b)


@PROPERTY
@given(
    n=st.one_of(st.integers(1, 40), st.integers(41, 2000)),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_proof_verifies_and_tampering_fails(n: int, data: st.DataObject, seed: int) -> None:
    m = data.draw(st.integers(1, n), label="m")
    leaves = _leaves(n, seed)
    old_root, new_root = MerkleTree.build(leaves[:m]).root, MerkleTree.build(leaves).root
    proof = MerkleTree.build(leaves).consistency_proof(m).hashes
    assert proof == MerkleTree.build(leaves).consistency_proof(m, n).hashes
    assert verify_consistency(m, n, old_root, new_root, proof)
    assert verify_consistency(m, n, old_root, new_root, list(proof))

    # Another history: one of the first m leaves rewritten, or a new tree over other leaves.
    i = data.draw(st.integers(0, m - 1), label="rewritten leaf")
    other = [*leaves[:i], leaves[i] + b"!", *leaves[i + 1 :]]
    assert not verify_consistency(m, n, MerkleTree.build(other[:m]).root, new_root, proof)
    assert not verify_consistency(m, n, old_root, MerkleTree.build(other).root, proof)
    if m < n:  # equal sizes carry no path to tamper with
        j = data.draw(st.integers(0, len(proof) - 1), label="tampered element")
        pos = data.draw(st.integers(0, 31), label="byte")
        bad = [*proof[:j], _flip(proof[j], pos), *proof[j + 1 :]]
        assert not verify_consistency(m, n, old_root, new_root, bad)
        assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
        assert not verify_consistency(m, n, old_root, new_root, (*proof, proof[-1]))
        assert not verify_consistency(m, n, new_root, old_root, proof)


def test_sizes_are_not_bound_by_roots_alone() -> None:
    """Why a verifier takes both sizes from signed tree heads: the path from 1 to 3 leaves has
    the same shape as from 1 to 4, so the same roots check out for either claimed new size."""
    tree = MerkleTree.build(_leaves(3, 5))
    path = tree.consistency_proof(1).hashes
    assert verify_consistency(1, 3, tree.root_at(1), tree.root, path)
    assert verify_consistency(1, 4, tree.root_at(1), tree.root, path)
    assert not verify_consistency(1, 5, tree.root_at(1), tree.root, path)


def test_degenerate_sizes() -> None:
    tree = MerkleTree.build(_leaves(5, 1))
    r1, r5 = tree.root_at(1), tree.root
    assert tree.consistency_proof(5).hashes == ()
    assert verify_consistency(5, 5, r5, r5, ())
    assert not verify_consistency(5, 5, r5, r1, ())  # same size, other root
    assert not verify_consistency(5, 5, r5, r5, (r5,))  # same size needs an empty path
    assert not verify_consistency(0, 5, EMPTY_ROOT, r5, ())  # from the empty tree: meaningless
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, ())
    assert not verify_consistency(5, 1, r5, r1, tree.consistency_proof(1).hashes)
    assert not verify_consistency(1, 5, r1, r5, ())  # growth needs a path
    assert tree.root_at(0) == EMPTY_ROOT


def test_generation_errors_are_specific() -> None:
    tree = MerkleTree.build(_leaves(5, 2))
    for old, new in [(0, 5), (0, 0), (6, None), (3, 2), (1, 6), (-1, 5), (True, 5), (1.0, 5)]:
        with pytest.raises(MalformedProofError):
            tree.consistency_proof(old, new)  # type: ignore[arg-type]
    for size in (-1, 6, True, "3"):
        with pytest.raises(MalformedProofError):
            tree.root_at(size)  # type: ignore[arg-type]
    with pytest.raises(MalformedProofError, match="0 < old_size"):
        MerkleTree.build([]).consistency_proof(0)


def test_verify_never_raises_on_malformed() -> None:
    tree = MerkleTree.build(_leaves(9, 3))
    r3, r9, good = tree.root_at(3), tree.root, tree.consistency_proof(3).hashes
    assert verify_consistency(3, 9, r3, r9, good)
    junk: list[tuple[Any, ...]] = [
        (3, 9, r3, r9, None),
        (3, 9, r3, r9, "abc"),
        (3, 9, r3, r9, [*good[:-1], good[-1][:31]]),
        (3, 9, r3, r9, [*good[:-1], bytearray(good[-1])]),
        (3, 9, r3, r9, iter(good)),
        (3, 9, r3[:31], r9, good),
        (3, 9, r3, "0x" + r9.hex(), good),
        ("3", 9, r3, r9, good),
        (3, 9.0, r3, r9, good),
        (True, 9, r3, r9, good),
        (3, MAX_TREE_SIZE + 1, r3, r9, good),
        (3, 2**4096, r3, r9, good),
        (3, 9, r3, r9, [b"\x00" * 32] * 10_000),
    ]
    for args in junk:
        assert verify_consistency(*args) is False, args


def test_json_round_trip_and_rejects() -> None:
    proof = MerkleTree.build(_leaves(11, 4)).consistency_proof(6, 10)
    obj = proof.to_json()
    assert obj["kind"] == "consistency" and obj["old_size"] == 6 and obj["new_size"] == 10
    assert ConsistencyProof.from_json(obj) == proof
    assert ConsistencyProof.from_json(json.dumps(obj)) == proof
    for bad in (
        {**obj, "kind": "inclusion"},
        {**obj, "version": 2},
        {**obj, "extra": 1},
        {k: v for k, v in obj.items() if k != "hashes"},
        {**obj, "old_size": -1},
        {**obj, "new_size": True},
        {**obj, "hashes": ["0x" + "00" * 31]},
        {**obj, "hashes": "0x" + "00" * 32},
        "[1, 2]",
        "{",
    ):
        with pytest.raises(MalformedProofError):
            ConsistencyProof.from_json(bad)


def test_proof_size_is_logarithmic() -> None:
    """A store of 100,000 records proves growth with a few dozen hashes, not a rescan."""
    hashes = [Hash32(hashlib.sha256(i.to_bytes(4, "big")).digest()) for i in range(100_000)]
    tree = MerkleTree.from_leaf_hashes(hashes)
    old, new = 65_537, 99_999
    proof = tree.consistency_proof(old, new)
    assert len(proof.hashes) <= 2 * 17
    assert verify_consistency(old, new, tree.root_at(old), tree.root_at(new), proof.hashes)
    assert tree.root_at(old) == MerkleTree.from_leaf_hashes(hashes[:old]).root
