"""Chunk sampling: leaf-hash multiproofs against proofs.merkle, detection against simulation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.chunks import choose_chunks, chunk_detection_probability, verify_leaf_hashes
from proofs.hashing import leaf_hash
from proofs.merkle import MerkleTree, MultiProof, verify_multiproof


@given(
    leaves=st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=40),
    data=st.data(),
)
@settings(max_examples=120, deadline=None)
def test_leaf_hash_check_agrees_with_proofs_merkle(
    leaves: list[bytes], data: st.DataObject
) -> None:
    tree = MerkleTree.build(leaves)
    picks = data.draw(
        st.lists(st.integers(0, len(leaves) - 1), min_size=1, max_size=len(leaves), unique=True)
    )
    proof = tree.multiproof(picks)
    by_bytes = {i: leaves[i] for i in proof.indices}
    by_hash = {i: leaf_hash(leaves[i]) for i in proof.indices}
    assert verify_multiproof(tree.root, by_bytes, proof)  # the oracle
    assert verify_leaf_hashes(tree.root, by_hash, proof)
    # A changed leaf hash or a dropped proof hash fails in both.
    i = proof.indices[0]
    extra = {**by_hash, len(leaves): leaf_hash(b"x")}  # keys must be exactly the proof's indices
    assert not verify_leaf_hashes(tree.root, extra, proof)
    flipped = dict(by_hash)
    flipped[i] = bytes([by_hash[i][0] ^ 1]) + by_hash[i][1:]
    assert not verify_leaf_hashes(tree.root, flipped, proof)
    if proof.hashes:
        short = MultiProof(
            indices=proof.indices, leaf_count=proof.leaf_count, hashes=proof.hashes[:-1]
        )
        assert not verify_leaf_hashes(tree.root, by_hash, short)
        assert not verify_multiproof(tree.root, by_bytes, short)


def test_chunk_choice_is_reproducible_and_sized() -> None:
    a = choose_chunks(b"s" * 32, leaf_count=100, fraction=0.1)
    assert a == choose_chunks(b"s" * 32, leaf_count=100, fraction=0.1)
    assert len(a) == 10 and len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    assert len(choose_chunks(b"s" * 32, leaf_count=100, fraction=0.001)) == 1
    assert a != choose_chunks(b"t" * 32, leaf_count=100, fraction=0.1)


@pytest.mark.parametrize(("tampered", "fraction"), [(1, 0.1), (5, 0.1), (1, 0.5), (20, 0.05)])
def test_sparse_tampering_detection_matches_simulation(tampered: int, fraction: float) -> None:
    leaf_count, trials = 100, 3000
    rng = random.Random(tampered)
    caught = 0
    for t in range(trials):
        bad = set(rng.sample(range(leaf_count), tampered))
        picked = choose_chunks(t.to_bytes(4, "big"), leaf_count=leaf_count, fraction=fraction)
        caught += bool(bad & set(picked))
    p = chunk_detection_probability(
        leaf_count=leaf_count, tampered=tampered, sampled=round(fraction * leaf_count)
    )
    assert abs(caught / trials - p) < 4 * (p * (1 - p) / trials) ** 0.5 + 1e-9
