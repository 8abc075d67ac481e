"""Dispatch to the optional C accelerator ``proofs._sha256tree`` for proofs.merkle.

The extension hashes Merkle leaves and levels in C (SHA-NI or OpenSSL sha256) with the GIL
released; this module holds the switch that turns it on or off and the thread-pool batching
around it. Results are byte-identical to the hashlib code in proofs.merkle. The extension is
missing where it could not be built (no C compiler or OpenSSL headers); then, or with
``VERITRAIN_NO_NATIVE=1`` in the environment, proofs.merkle uses hashlib.

Functions here raise the extension's TypeError/ValueError on bad leaves; proofs.merkle turns
them into MalformedProofError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import pairwise

logger = logging.getLogger(__name__)

try:
    from proofs import _sha256tree
except ImportError as exc:  # not built: hashlib is used instead
    logger.debug("proofs._sha256tree unavailable, Merkle trees use hashlib: %s", exc)
    _sha256tree = None  # type: ignore[assignment]

# Below this many leaves a thread pool costs more than it saves (the C code drops the GIL for any
# leaf size, so unlike hashlib small leaves gain from threads too).
PARALLEL_MIN_LEAVES = 1 << 15

_enabled = _sha256tree is not None and os.environ.get("VERITRAIN_NO_NATIVE", "") in ("", "0")


def native_available() -> bool:
    """True if the C accelerator ``proofs._sha256tree`` was built and imported."""
    return _sha256tree is not None


def native_enabled() -> bool:
    """True if Merkle tree construction currently uses the C accelerator."""
    return _enabled


def set_native(enabled: bool) -> None:
    """Use (True) or bypass (False) the C accelerator; results are the same either way.

    Raises RuntimeError when asked to enable an accelerator that was not built.
    """
    global _enabled
    if enabled and _sha256tree is None:
        raise RuntimeError("proofs._sha256tree is not built (see docs/merkle.md)")
    _enabled = bool(enabled)


def leaf_hashes(leaves: Sequence[bytes | memoryview], workers: int, parallel: bool) -> bytes:
    """Concatenated sha256(0x00 || leaf); with ``parallel``, batches run in ``workers`` threads.

    TypeError/ValueError (from the C code) on a leaf that is not bytes, bytearray or a
    C-contiguous memoryview.
    """
    n = len(leaves)
    if workers == 1 or not parallel or n < 2:
        return _sha256tree.leaf_hashes(leaves, strict=True)
    batches = min(n, workers * 4)  # several per worker balance uneven leaves
    bounds = [n * b // batches for b in range(batches + 1)]
    parts = [leaves[a:b] for a, b in pairwise(bounds)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return b"".join(pool.map(partial(_sha256tree.leaf_hashes, strict=True), parts))


def tree_levels(level0: bytes, workers: int) -> list[bytes]:
    """The RFC 6962 levels above ``level0`` (concatenated leaf hashes), root level last.

    Node i of level j depends only on leaves [i * 2**j, (i + 1) * 2**j), so aligned blocks of
    2**d leaves, hashed in threads, give exact slices of levels 1..d; the top levels are built
    from level d.
    """
    n = len(level0) // 32
    if workers == 1 or n < PARALLEL_MIN_LEAVES:
        return _sha256tree.tree_levels(level0)
    depth = (n // workers).bit_length() - 1  # blocks of 2**depth leaves, >= workers of them
    span = 32 << depth
    view = memoryview(level0)
    blocks = [view[a : a + span] for a in range(0, len(level0), span)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        block_levels = list(pool.map(_sha256tree.tree_levels, blocks))
    # A short last block reaches its single node early; that node is carried up unchanged.
    tops = [lv if lv else [bytes(b)] for lv, b in zip(block_levels, blocks, strict=True)]
    lower = [b"".join([lv[min(j, len(lv) - 1)] for lv in tops]) for j in range(depth)]
    return lower + _sha256tree.tree_levels(lower[-1])


def legacy_root(leaves: Sequence[bytes | memoryview], workers: int) -> bytes:
    """merkletools' sha256 root of ``leaves`` (at least one); blocks in threads as above.

    TypeError/ValueError as for :func:`leaf_hashes`.
    """
    n = len(leaves)
    if workers == 1 or n < PARALLEL_MIN_LEAVES:
        return _sha256tree.legacy_root(leaves, strict=True)
    span = 1 << ((n // workers).bit_length() - 1)
    blocks = [leaves[a : a + span] for a in range(0, n, span)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Each block's root is its node on level d (a short last block's is carried up to it).
        tops = pool.map(partial(_sha256tree.legacy_root, strict=True), blocks)
        return _sha256tree.legacy_root_from_hashes(b"".join(tops))
