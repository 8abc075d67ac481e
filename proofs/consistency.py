"""RFC 6962 consistency proofs: a tree of ``new_size`` leaves extends the one of ``old_size``.

A consistency proof shows that the first ``old_size`` leaves of a ``new_size``-leaf tree are
exactly the leaves under an older root: the log only grew, nothing was rewritten or removed.

- :func:`consistency_path` is RFC 6962 section 2.1.2 ``PROOF(m, D[n])`` (the SUBPROOF recursion,
  written as a loop), over a callback that returns the Merkle Tree Hash of a leaf range; the
  tree in ``proofs.merkle`` supplies it from its stored levels.
- :func:`verify_consistency` is RFC 9162 section 2.1.4.2, plus the degenerate cases as the
  transparency-dev/merkle test data defines them: equal sizes need an empty path and equal
  roots; an old size of 0 is refused (every tree extends the empty one, so such a proof says
  nothing). It returns False on any bad input and never raises.

Tree sizes are capped at 2**64 - 1, the uint64 of Certificate Transparency's tree heads, so an
untrusted size can never make the verifier shift a huge integer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from proofs.errors import MalformedProofError
from proofs.hashing import NODE_PREFIX, Hash32

MAX_TREE_SIZE = (1 << 64) - 1


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TREE_SIZE


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def consistency_path(
    old_size: int, new_size: int, range_hash: Callable[[int, int], Hash32]
) -> tuple[Hash32, ...]:
    """RFC 6962 ``PROOF(old_size, D[new_size])``: the hashes proving the new tree extends the old.

    ``range_hash(a, b)`` must return ``MTH(D[a:b])`` of the new tree's leaves. Every range asked
    for starts at a multiple of a power of two at least its length, i.e. it is a node of the
    new tree (a lone right-edge node carried up counts). Raises MalformedProofError unless
    ``0 < old_size <= new_size``; ``old_size == new_size`` gives an empty path.
    """
    if not (_is_size(old_size) and _is_size(new_size) and 0 < old_size <= new_size):
        raise MalformedProofError(
            f"consistency proof needs 0 < old_size <= new_size, got {old_size!r} and {new_size!r}"
        )
    # SUBPROOF(m, D[start:end], complete) appends its sibling after the inner subproof, so the
    # loop collects siblings outermost first and reverses them at the end.
    outer: list[Hash32] = []
    start, end, complete = 0, new_size, True
    while old_size != end:
        k = 1 << ((end - start - 1).bit_length() - 1)  # largest power of two < end - start
        if old_size - start <= k:
            outer.append(range_hash(start + k, end))
            end = start + k
        else:
            outer.append(range_hash(start, start + k))
            start += k
            complete = False
    # SUBPROOF(m, D[m], false) = {MTH(D[m])}: the old tree's last subtree, which the verifier
    # cannot take from the old root unless that root is the subtree itself (complete).
    inner = [] if complete else [range_hash(start, end)]
    return tuple(inner + outer[::-1])


def root_from_consistency(
    old_size: int, new_size: int, old_root: bytes, path: Sequence[bytes]
) -> tuple[bytes, bytes] | None:
    """RFC 9162 section 2.1.4.2 for ``0 < old_size < new_size``: (old root, new root) the path
    implies, or None if its shape does not fit the sizes. Inputs must already be type-checked.
    """
    if not 0 < old_size < new_size:
        return None  # the shifts below would never end for old_size 0
    if not path:
        return None  # step 1: an empty path proves nothing between different sizes
    # Step 2: when old_size is a power of two the old root is the first node on the path.
    nodes = [old_root, *path] if old_size & (old_size - 1) == 0 else list(path)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:  # step 4: climb to the lowest node that is not a right child
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    sha = hashlib.sha256
    for c in nodes[1:]:
        if sn == 0:
            return None  # more hashes than the sizes allow
        if fn & 1 or fn == sn:
            fr = sha(NODE_PREFIX + c + fr).digest()
            sr = sha(NODE_PREFIX + c + sr).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = sha(NODE_PREFIX + sr + c).digest()
        fn >>= 1
        sn >>= 1
    return (fr, sr) if sn == 0 else None


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """True iff ``proof`` shows the ``new_size``-leaf tree with ``new_root`` extends the
    ``old_size``-leaf tree with ``old_root`` (its first ``old_size`` leaves are that tree).

    ``proof`` is the path (a list or tuple of 32-byte hashes, RFC 6962 order) that
    :meth:`proofs.merkle.MerkleTree.consistency_proof` returns as ``.hashes``. Take the sizes and
    roots from tree heads you trust (signed), never from the proof's sender. Rules:
    ``old_size == new_size`` needs an empty proof and equal roots; ``old_size == 0`` and
    ``old_size > new_size`` are refused. Returns False (never raises) on any malformed input.
    """
    if not (_is_size(old_size) and _is_size(new_size) and 0 < old_size <= new_size):
        return False
    if not (_is_hash(old_root) and _is_hash(new_root)):
        return False
    if not isinstance(proof, list | tuple) or not all(map(_is_hash, proof)):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    roots = root_from_consistency(old_size, new_size, old_root, proof)
    return roots is not None and roots == (old_root, new_root)
