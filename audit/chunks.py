"""Chunk-sampled verification: check a random subset of a gradient's Merkle leaves.

Fetching and comparing every chunk of a large gradient costs bytes; comparing ``m`` of its ``L``
leaves, proven against the committed root by one multiproof, costs ``m`` chunks plus
``O(m log L)`` hashes. A tampering that touches ``t`` leaves is then caught with probability
``1 - C(L - t, m) / C(L, m)`` (:func:`chunk_detection_probability`): dense tampering (a scaled or
fabricated gradient touches every leaf) is caught by a single chunk, sparse tampering (one chunk)
only with probability ``m / L``. docs/auditing.md tabulates it.

Also here: checking a multiproof from leaf *hashes* (what a verdict's evidence carries, so a
verdict does not embed megabytes of chunk data): :func:`verify_leaf_hashes` delegates to
proofs.merkle.verify_multiproof_leaf_hashes, the same RFC 6962 walk that verifies leaf bytes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

from audit.sampling import SamplingError, detection_probability_exact, sample_steps
from proofs.hashing import Hash32
from proofs.merkle import MultiProof, verify_multiproof_leaf_hashes

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


def verify_leaf_hashes(root: bytes, leaf_hashes: Mapping[int, bytes], proof: MultiProof) -> bool:
    """True iff leaf hashes (index -> sha256(0x00 || leaf)) are in the tree with ``root``.

    proofs.merkle's multiproof walk, minus the leaf hashing. Never raises.
    """
    return verify_multiproof_leaf_hashes(root, leaf_hashes, proof)


def leaf_hash_map(indices: tuple[int, ...], hashes: tuple[Hash32, ...]) -> dict[int, bytes]:
    """Pair evidence indices with their hashes (lengths are checked by the verdict parser)."""
    return {i: bytes(h) for i, h in zip(indices, hashes, strict=True)}
