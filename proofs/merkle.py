"""RFC 6962 Merkle trees over byte leaves (sha256), with inclusion proofs and multiproofs.

Hashing follows RFC 6962 section 2.1: leaf = sha256(0x00 || data), node = sha256(0x01 || l || r),
empty tree = sha256(b""). A tree of n leaves splits at the largest power of two k < n; built level
by level this is the same as carrying a lone last node up unchanged, which is what we do. Nothing
is ever duplicated, so the CVE-2012-2459 ambiguity (a list and the list with its last leaf
repeated sharing a root) cannot arise.

``verify_*`` return False on any bad input and never raise; tree construction and proof
generation raise MalformedProofError. See docs/merkle.md for formats. Consistency proofs (the
tree only grew) are computed by proofs/consistency.py from this tree's stored nodes.

Tree construction uses the optional C accelerator (proofs/accelerator.py) when it was built, and
the hashlib code below otherwise; both give the same bytes. ``VERITRAIN_NO_NATIVE=1`` in the
environment, or ``set_native(False)``, forces hashlib.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from proofs import accelerator
from proofs.accelerator import native_available as native_available
from proofs.accelerator import native_enabled as native_enabled
from proofs.accelerator import set_native as set_native
from proofs.codec import as_bytes
from proofs.consistency import consistency_path
from proofs.consistency import verify_consistency as verify_consistency
from proofs.errors import EncodingError, MalformedProofError
from proofs.hashing import LEAF_PREFIX, NODE_PREFIX, Hash32, Root, node_hash
from proofs.jsonlimits import UntrustedJsonError, loads_untrusted

PROOF_VERSION = 1
MAX_PROOF_JSON = 64 << 20  # a proof's JSON text: ~70 bytes per hash, ~1M hashes
EMPTY_ROOT = Root(hashlib.sha256(b"").digest())

# Below this many leaf bytes in total, threads cost more than they save: hash inline.
PARALLEL_MIN_BYTES = 4 << 20
# hashlib drops the GIL only for buffers of >= 2 KiB; smaller leaves gain nothing from threads.
_GIL_RELEASE_BYTES = 2048

_SMALL_LEAF = 4096  # below this, one concatenation beats a hasher copy + update


def _hash_leaf_range(leaves: Sequence[bytes | memoryview], start: int, stop: int) -> bytes:
    """Concatenated leaf hashes of leaves[start:stop], never copying a large leaf."""
    sha = hashlib.sha256
    seed = sha(LEAF_PREFIX)
    out = []
    for i in range(start, stop):
        leaf = leaves[i]
        if len(leaf) < _SMALL_LEAF:  # len() counts items of a typed view: a heuristic, still exact
            out.append(sha(LEAF_PREFIX + leaf).digest())
        else:
            h = seed.copy()
            h.update(leaf)
            out.append(h.digest())
    return b"".join(out)


def _leaf_bytes_total(leaves: Sequence[bytes | memoryview]) -> int:
    """Total byte length of ``leaves``; MalformedProofError on anything but contiguous buffers."""
    kinds = set(map(type, leaves))  # C-level pass: cheap even for millions of leaves
    if kinds <= {bytes, bytearray}:
        return sum(map(len, leaves))
    total = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, memoryview):
            if not leaf.contiguous:
                raise MalformedProofError(f"leaf {i}: memoryview is not contiguous")
            total += leaf.nbytes
        elif isinstance(leaf, bytes | bytearray):
            total += len(leaf)
        else:
            raise MalformedProofError(f"leaf {i}: expected bytes or memoryview, got {type(leaf)!r}")
    return total


def _hash_leaves(leaves: Sequence[bytes | memoryview], workers: int | None) -> bytes:
    """Concatenated leaf hashes; big leaves are hashed in threads (hashlib releases the GIL)."""
    if not isinstance(leaves, list | tuple):
        leaves = list(leaves)  # accept any iterable; threads need random access
    n = len(leaves)
    # The C code type-checks leaves as it reads them: a separate Python pass over a million
    # scattered objects would cost about as much as hashing them.
    native = accelerator.native_enabled()
    many = n >= accelerator.PARALLEL_MIN_LEAVES
    total = -1 if native and many else _leaf_bytes_total(leaves)
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise MalformedProofError(f"workers must be an int >= 1, got {workers!r}")
    if native:
        try:
            return accelerator.leaf_hashes(leaves, workers, many or total >= PARALLEL_MIN_BYTES)
        except (TypeError, ValueError) as exc:
            _leaf_bytes_total(leaves)  # names the bad leaf by its index in ``leaves``
            raise MalformedProofError(str(exc)) from None
    if n and set(map(type, leaves)) == {bytes} and max(map(len, leaves)) < _SMALL_LEAF:
        sha = hashlib.sha256  # many small leaves (payouts, hashes): one tight loop, no threads
        return b"".join([sha(LEAF_PREFIX + leaf).digest() for leaf in leaves])
    if workers == 1 or n < 2 or total < PARALLEL_MIN_BYTES or total < n * _GIL_RELEASE_BYTES:
        return _hash_leaf_range(leaves, 0, n)
    # Several batches per worker balance uneven leaves (header leaves are tiny).
    batches = min(n, workers * 4)
    bounds = [n * b // batches for b in range(batches + 1)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = pool.map(_hash_leaf_range, [leaves] * batches, bounds[:-1], bounds[1:])
        return b"".join(parts)


def _parent_level(level: bytes) -> bytes:
    """Hashes of the next level up; a lone last node is carried up unchanged (RFC 6962)."""
    # Slicing the bytes object (not a memoryview) measured fastest for these 65-byte inputs.
    sha = hashlib.sha256
    end = len(level) // 64 * 64
    out = [sha(NODE_PREFIX + level[i : i + 64]).digest() for i in range(0, end, 64)]
    if end != len(level):
        out.append(level[end:])
    return b"".join(out)


@dataclass(frozen=True, kw_only=True, slots=True)
class InclusionProof:
    """RFC 6962 audit path of leaf ``index`` in a tree of ``leaf_count`` leaves, bottom-up."""

    index: int
    leaf_count: int
    siblings: tuple[Hash32, ...]

    def to_json(self) -> dict[str, Any]:
        """Versioned JSON object, hashes as 0x-hex."""
        return {
            "version": PROOF_VERSION,
            "kind": "inclusion",
            "index": self.index,
            "leaf_count": self.leaf_count,
            "siblings": ["0x" + h.hex() for h in self.siblings],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> InclusionProof:
        """Parse :meth:`to_json` output (object or string); MalformedProofError if malformed."""
        obj = _load_json(data, "inclusion", {"index", "leaf_count", "siblings"})
        return cls(
            index=_json_int(obj, "index"),
            leaf_count=_json_int(obj, "leaf_count"),
            siblings=_json_hashes(obj, "siblings"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class MultiProof:
    """Proof for several leaves at once: ``indices`` ascending, ``hashes`` the minimal sibling set.

    ``hashes`` are ordered level by level from the leaves up, and by position within a level.
    """

    indices: tuple[int, ...]
    leaf_count: int
    hashes: tuple[Hash32, ...]

    def to_json(self) -> dict[str, Any]:
        """Versioned JSON object, hashes as 0x-hex."""
        return {
            "version": PROOF_VERSION,
            "kind": "multiproof",
            "indices": list(self.indices),
            "leaf_count": self.leaf_count,
            "hashes": ["0x" + h.hex() for h in self.hashes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> MultiProof:
        """Parse :meth:`to_json` output (object or string); MalformedProofError if malformed."""
        obj = _load_json(data, "multiproof", {"indices", "leaf_count", "hashes"})
        raw = obj["indices"]
        if not isinstance(raw, list):
            raise MalformedProofError(f"indices: expected a list, got {type(raw).__name__}")
        indices = tuple(_json_int({"i": v}, "i") for v in raw)
        return cls(
            indices=indices,
            leaf_count=_json_int(obj, "leaf_count"),
            hashes=_json_hashes(obj, "hashes"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsistencyProof:
    """RFC 6962 consistency proof: the ``new_size``-leaf tree extends the ``old_size``-leaf one.

    ``hashes`` is ``PROOF(old_size, D[new_size])`` (RFC 6962 section 2.1.2), checked by
    ``verify_consistency(old_size, new_size, old_root, new_root, proof.hashes)`` with sizes and
    roots taken from the verifier's own (signed) tree heads.
    """

    old_size: int
    new_size: int
    hashes: tuple[Hash32, ...]

    def to_json(self) -> dict[str, Any]:
        """Versioned JSON object, hashes as 0x-hex."""
        return {
            "version": PROOF_VERSION,
            "kind": "consistency",
            "old_size": self.old_size,
            "new_size": self.new_size,
            "hashes": ["0x" + h.hex() for h in self.hashes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> ConsistencyProof:
        """Parse :meth:`to_json` output (object or string); MalformedProofError if malformed."""
        obj = _load_json(data, "consistency", {"old_size", "new_size", "hashes"})
        return cls(
            old_size=_json_int(obj, "old_size"),
            new_size=_json_int(obj, "new_size"),
            hashes=_json_hashes(obj, "hashes"),
        )


def _load_json(data: Mapping[str, Any] | str, kind: str, fields: set[str]) -> Mapping[str, Any]:
    if isinstance(data, str):
        try:
            data = loads_untrusted(data, max_bytes=MAX_PROOF_JSON, what="proof JSON")
        except UntrustedJsonError as exc:
            raise MalformedProofError(str(exc)) from None
    if not isinstance(data, Mapping):
        raise MalformedProofError(f"proof JSON must be an object, got {type(data).__name__}")
    expected = fields | {"version", "kind"}
    if set(data) != expected:
        raise MalformedProofError(f"proof JSON keys {sorted(data)}, expected {sorted(expected)}")
    if data["version"] != PROOF_VERSION or data["kind"] != kind:
        raise MalformedProofError(
            f"proof version/kind {data['version']!r}/{data['kind']!r}, "
            f"expected {PROOF_VERSION}/{kind!r}"
        )
    return data


def _json_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedProofError(f"{key}: expected an int >= 0, got {value!r}")
    return value


def _json_hashes(obj: Mapping[str, Any], key: str) -> tuple[Hash32, ...]:
    values = obj[key]
    if not isinstance(values, list):
        raise MalformedProofError(f"{key}: expected a list of 0x-hex hashes")
    try:
        return tuple(Hash32(as_bytes(v, key, 32)) for v in values)
    except EncodingError as exc:
        raise MalformedProofError(str(exc)) from None


def _level_sizes(leaf_count: int) -> list[int]:
    """Node counts of each level, leaves first, root level (1) last."""
    sizes = [leaf_count]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class MerkleTree:
    """An RFC 6962 tree with every level kept, so proofs are lookups."""

    __slots__ = ("_levels",)

    def __init__(self, levels: list[bytes]) -> None:
        """Internal: use :meth:`build` or :meth:`from_leaf_hashes`."""
        self._levels = levels

    @classmethod
    def build(
        cls, leaves: Sequence[bytes | memoryview], *, workers: int | None = None
    ) -> MerkleTree:
        """Hash ``leaves`` (in parallel threads when large) and build the tree.

        ``workers`` defaults to the CPU count. Raises MalformedProofError on a non-bytes leaf.
        """
        return cls._from_level0(_hash_leaves(leaves, workers), workers)

    @classmethod
    def from_leaf_hashes(cls, hashes: Sequence[Hash32]) -> MerkleTree:
        """A tree whose level 0 is ``hashes`` (already RFC 6962 leaf hashes)."""
        for i, h in enumerate(hashes):
            if not isinstance(h, bytes) or len(h) != 32:
                raise MalformedProofError(f"leaf hash {i}: expected 32 bytes, got {h!r:.80}")
        return cls._from_level0(b"".join(hashes))

    @classmethod
    def _from_level0(cls, level0: bytes, workers: int | None = None) -> MerkleTree:
        levels = [level0]
        if accelerator.native_enabled():
            return cls(levels + accelerator.tree_levels(level0, workers or os.cpu_count() or 1))
        while len(levels[-1]) > 32:
            levels.append(_parent_level(levels[-1]))
        return cls(levels)

    @property
    def leaf_count(self) -> int:
        """Number of leaves."""
        return len(self._levels[0]) // 32

    @property
    def root(self) -> Root:
        """The tree head; sha256(b"") for an empty tree."""
        top = self._levels[-1]
        return EMPTY_ROOT if not top else Root(top)

    @property
    def leaf_hashes(self) -> tuple[Hash32, ...]:
        """The leaf hashes sha256(0x00 || leaf), in leaf order."""
        level = self._levels[0]
        return tuple(Hash32(level[i : i + 32]) for i in range(0, len(level), 32))

    def _node(self, level: int, index: int) -> Hash32:
        return Hash32(self._levels[level][32 * index : 32 * index + 32])

    def _check_index(self, index: object) -> int:
        if not isinstance(index, int) or isinstance(index, bool):
            raise MalformedProofError(f"leaf index must be an int, got {index!r}")
        if not 0 <= index < self.leaf_count:
            raise MalformedProofError(
                f"leaf index {index} out of range: tree has {self.leaf_count} leaves"
            )
        return index

    def proof(self, index: int) -> InclusionProof:
        """RFC 6962 audit path for leaf ``index``; MalformedProofError if out of range."""
        i = self._check_index(index)
        siblings = []
        for level, size in enumerate(_level_sizes(self.leaf_count)[:-1]):
            if not (i == size - 1 and size % 2):  # a lone last node has no sibling
                siblings.append(self._node(level, i ^ 1))
            i //= 2
        return InclusionProof(index=index, leaf_count=self.leaf_count, siblings=tuple(siblings))

    def multiproof(self, indices: Iterable[int]) -> MultiProof:
        """Minimal proof for the leaves at ``indices`` (any order, duplicates merged).

        Raises MalformedProofError if ``indices`` is empty or any index is out of range.
        """
        known = sorted({self._check_index(i) for i in indices})
        if not known:
            raise MalformedProofError("multiproof needs at least one leaf index, got none")
        proven = tuple(known)
        hashes: list[Hash32] = []
        for level, size in enumerate(_level_sizes(self.leaf_count)[:-1]):
            have = set(known)
            for i in known:
                sibling = i ^ 1
                if sibling < size and sibling not in have:
                    hashes.append(self._node(level, sibling))
            known = sorted({i // 2 for i in known})
        return MultiProof(indices=proven, leaf_count=self.leaf_count, hashes=tuple(hashes))

    def _range_hash(self, start: int, stop: int) -> Hash32:
        """MTH(D[start:stop]) for 0 <= start < stop <= leaf_count, from stored nodes.

        A range that is a node of this tree (aligned, and either full or running to the last
        leaf) is one lookup; any other (a prefix ending inside a node) is split as RFC 6962
        splits it, so at most one branch per level recurses.
        """
        size = stop - start
        level = (size - 1).bit_length()  # height of the smallest node that can hold the range
        if start % (1 << level) == 0 and min(start + (1 << level), self.leaf_count) == stop:
            return self._node(level, start >> level)
        k = 1 << (level - 1)  # largest power of two < size
        return node_hash(self._range_hash(start, start + k), self._range_hash(start + k, stop))

    def _check_size(self, size: object, what: str) -> int:
        if not isinstance(size, int) or isinstance(size, bool):
            raise MalformedProofError(f"{what} must be an int, got {size!r}")
        if not 0 <= size <= self.leaf_count:
            raise MalformedProofError(
                f"{what} {size} out of range: tree has {self.leaf_count} leaves"
            )
        return size

    def root_at(self, size: int) -> Root:
        """Root of the tree over the first ``size`` leaves (an earlier tree head of this log).

        Raises MalformedProofError unless 0 <= size <= leaf_count; ``root_at(0)`` is EMPTY_ROOT.
        """
        n = self._check_size(size, "tree size")
        return EMPTY_ROOT if n == 0 else Root(self._range_hash(0, n))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """RFC 6962 proof that the first ``new_size`` leaves (default: all) extend the first
        ``old_size``: O(log n) stored nodes, hashing only where a size ends inside a node.

        Raises MalformedProofError unless 0 < old_size <= new_size <= leaf_count (a proof from
        the empty tree is meaningless: every tree extends it).
        """
        new = self.leaf_count if new_size is None else self._check_size(new_size, "new_size")
        old = self._check_size(old_size, "old_size")
        hashes = consistency_path(old, new, self._range_hash)
        return ConsistencyProof(old_size=old, new_size=new, hashes=hashes)


def merkle_root(leaves: Sequence[bytes | memoryview], *, workers: int | None = None) -> Root:
    """Root of the RFC 6962 tree over ``leaves``."""
    return MerkleTree.build(leaves, workers=workers).root


def hash_leaves(leaves: Sequence[bytes | memoryview], *, workers: int | None = None) -> bytes:
    """The concatenated RFC 6962 leaf hashes sha256(0x00 || leaf) of ``leaves`` (32 bytes each):
    one call to the C accelerator when built, threads when large (as :meth:`MerkleTree.build`).

    Raises MalformedProofError on a non-bytes leaf.
    """
    return _hash_leaves(leaves, workers)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


def _leaf_digest(leaf: object) -> bytes | None:
    if not isinstance(leaf, bytes | bytearray | memoryview):
        return None
    h = hashlib.sha256(LEAF_PREFIX)
    try:
        h.update(leaf)
    except (BufferError, TypeError, ValueError):  # e.g. a non-contiguous view
        return None
    return h.digest()


def verify_inclusion(
    root: bytes, leaf: bytes, proof: InclusionProof, *, leaf_count: int | None = None
) -> bool:
    """True iff ``leaf`` sits at ``proof.index`` of a ``proof.leaf_count``-leaf tree with ``root``.

    RFC 9162 section 2.1.3.2 verification; returns False (never raises) on any malformed input.
    The root does not fix the tree size on its own (index 0 of 5 or 6 leaves can share a path),
    so a verifier that knows the committed size passes it as ``leaf_count``; a proof claiming
    another size is then rejected.
    """
    if not isinstance(proof, InclusionProof) or not _is_hash(root):
        return False
    if leaf_count is not None and leaf_count != proof.leaf_count:
        return False
    fn, sn = proof.index, proof.leaf_count - 1 if _is_count(proof.leaf_count) else -1
    if not _is_count(fn) or not 0 <= fn <= sn or not isinstance(proof.siblings, tuple):
        return False
    r = _leaf_digest(leaf)
    if r is None:
        return False
    for p in proof.siblings:
        if not _is_hash(p) or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = hashlib.sha256(NODE_PREFIX + p + r).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = hashlib.sha256(NODE_PREFIX + r + p).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_multiproof(
    root: bytes, leaves: Mapping[int, bytes], proof: MultiProof, *, leaf_count: int | None = None
) -> bool:
    """True iff ``leaves`` (index -> leaf bytes) are in the tree with ``root``.

    ``leaves`` must have exactly ``proof.indices`` as keys. Pass the committed tree size as
    ``leaf_count`` where known (see :func:`verify_inclusion`). False (never raises) on bad input.
    """
    if not isinstance(leaves, Mapping):
        return False
    digests: dict[int, bytes] = {}
    for i, leaf in leaves.items():
        digest = _leaf_digest(leaf)
        if digest is None:
            return False
        digests[i] = digest
    return verify_multiproof_leaf_hashes(root, digests, proof, leaf_count=leaf_count)


def verify_multiproof_leaf_hashes(
    root: bytes,
    leaf_hashes: Mapping[int, bytes],
    proof: MultiProof,
    *,
    leaf_count: int | None = None,
) -> bool:
    """As :func:`verify_multiproof`, given leaf hashes sha256(0x00 || leaf) instead of leaves.

    For verifiers that hashed (or were sent the hashes of) the leaves already. Never raises.
    """
    if not isinstance(proof, MultiProof) or not _is_hash(root):
        return False
    if not isinstance(leaf_hashes, Mapping) or not all(map(_is_hash, leaf_hashes.values())):
        return False
    if leaf_count is not None and leaf_count != proof.leaf_count:
        return False
    n, indices, hashes = proof.leaf_count, proof.indices, proof.hashes
    if not _is_count(n) or n < 1 or not isinstance(indices, tuple) or not indices:
        return False
    if not isinstance(hashes, tuple) or not all(_is_hash(h) for h in hashes):
        return False
    if not all(_is_count(i) for i in indices) or list(indices) != sorted(set(indices)):
        return False
    if indices[0] < 0 or indices[-1] >= n or set(leaf_hashes) != set(indices):
        return False
    nodes = {i: bytes(leaf_hashes[i]) for i in indices}
    feed = iter(hashes)
    for size in _level_sizes(n)[:-1]:
        parents: dict[int, bytes] = {}
        for i in sorted(nodes):
            if i // 2 in parents:
                continue  # already combined with its left sibling
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
    return next(feed, None) is None and nodes.get(0) == root and len(nodes) == 1


def legacy_root(leaves: Sequence[bytes]) -> Root:
    """The root merkletools.MerkleTools(hash_type="sha256") gives for ``leaves``.

    Reproduces ``add_leaf(leaf.hex(), do_hash=True)`` per leaf, then ``make_tree()``: leaf hash =
    sha256 of the leaf's lowercase hex *text*, node = sha256(left || right) with no domain
    separation, a lone last node carried up. Not for new commitments (see docs/merkle.md).
    Raises MalformedProofError on an empty list (merkletools has no root for it).
    """
    if not leaves:
        raise MalformedProofError("merkletools defines no root for an empty tree (got 0 leaves)")
    if accelerator.native_enabled():
        try:
            return Root(accelerator.legacy_root(leaves, os.cpu_count() or 1))
        except (TypeError, ValueError) as exc:
            _leaf_bytes_total(leaves)  # names the bad leaf by its index in ``leaves``
            raise MalformedProofError(str(exc)) from None
    _leaf_bytes_total(leaves)  # type check only
    sha = hashlib.sha256
    level = b"".join([sha(leaf.hex().encode("ascii")).digest() for leaf in leaves])
    while len(level) > 32:
        end = len(level) // 64 * 64
        parents = [sha(level[j : j + 64]).digest() for j in range(0, end, 64)]
        if end != len(level):
            parents.append(level[end:])
        level = b"".join(parents)
    return Root(level)
