"""Chunk-sampled verification: check a random subset of a gradient's Merkle leaves.

Fetching and comparing every chunk of a large gradient costs bytes; comparing ``m`` of its ``L``
leaves, proven against the committed root by one multiproof, costs ``m`` chunks plus
``O(m log L)`` hashes. A tampering that touches ``t`` leaves is then caught with probability
``1 - C(L - t, m) / C(L, m)`` (:func:`chunk_detection_probability`): dense tampering (a scaled or
fabricated gradient touches every leaf) is caught by a single chunk, sparse tampering (one chunk)
only with probability ``m / L``. docs/auditing.md tabulates it.

Also here: checking a multiproof from leaf *hashes* (what a verdict's evidence carries, so a
verdict does not embed megabytes of chunk data). proofs.merkle verifies multiproofs from leaf
bytes; :func:`verify_leaf_hashes` follows the same RFC 6962 level walk, starting one step later,
and the tests check both agree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from audit.sampling import SamplingError, detection_probability_exact, sample_steps
from proofs.hashing import NODE_PREFIX, Hash32
from proofs.merkle import MultiProof

CHUNK_SAMPLE_DOMAIN = b"veritrain/audit-chunks/v1"


def choose_chunks(seed: bytes, *, leaf_count: int, fraction: float) -> tuple[int, ...]:
    """A reproducible sample of ``ceil(fraction * leaf_count)`` leaf indices (at least one).

    The indices come from ``seed`` (the audit's sample seed plus the step) through the same
    unbiased hash stream as step sampling, so anyone can recompute them.
    """
    if not 0.0 < fraction <= 1.0:
        raise SamplingError(f"chunk fraction must be in (0, 1], got {fraction}")
    count = max(1, math.ceil(fraction * leaf_count - 1e-9))
    tagged = hashlib.sha256(CHUNK_SAMPLE_DOMAIN + bytes(seed)).digest()
    return tuple(int(i) for i in sample_steps(tagged, total_steps=leaf_count, count=count))


def chunk_detection_probability(*, leaf_count: int, tampered: int, sampled: int) -> float:
    """Chance that ``sampled`` random leaves out of ``leaf_count`` include a tampered one."""
    return detection_probability_exact(
        total_steps=leaf_count, cheated_steps=tampered, sampled=sampled
    )


def _level_sizes(leaf_count: int) -> list[int]:
    sizes = [leaf_count]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def verify_leaf_hashes(root: bytes, leaf_hashes: Mapping[int, bytes], proof: MultiProof) -> bool:
    """True iff leaf hashes (index -> sha256(0x00 || leaf)) are in the tree with ``root``.

    Same walk as proofs.merkle.verify_multiproof, minus the leaf hashing. Never raises.
    """
    try:
        n, indices = proof.leaf_count, proof.indices
        if not isinstance(n, int) or n < 1 or not indices or list(indices) != sorted(set(indices)):
            return False
        if indices[0] < 0 or indices[-1] >= n or set(leaf_hashes) != set(indices):
            return False
        nodes: dict[int, bytes] = {}
        for i in indices:
            h = leaf_hashes[i]
            if not isinstance(h, bytes) or len(h) != 32:
                return False
            nodes[i] = h
        if not all(isinstance(h, bytes) and len(h) == 32 for h in proof.hashes):
            return False
        feed = iter(proof.hashes)
        for size in _level_sizes(n)[:-1]:
            parents: dict[int, bytes] = {}
            for i in sorted(nodes):
                if i // 2 in parents:
                    continue
                sibling = i ^ 1
                if sibling >= size:
                    parents[i // 2] = nodes[i]
                    continue
                other = nodes.get(sibling)
                if other is None:
                    other = next(feed, None)
                    if other is None:
                        return False
                left, right = (nodes[i], other) if i % 2 == 0 else (other, nodes[i])
                parents[i // 2] = hashlib.sha256(NODE_PREFIX + left + right).digest()
            nodes = parents
        return next(feed, None) is None and len(nodes) == 1 and nodes.get(0) == bytes(root)
    except Exception:  # any malformed proof object is simply not a valid proof
        return False


def leaf_hash_map(indices: tuple[int, ...], hashes: tuple[Hash32, ...]) -> dict[int, bytes]:
    """Pair evidence indices with their hashes (lengths are checked by the verdict parser)."""
    return {i: bytes(h) for i, h in zip(indices, hashes, strict=True)}
