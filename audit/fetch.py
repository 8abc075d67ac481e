"""Fetch what an audit needs from a run store, and trust none of it until it is checked.

:func:`load_run` walks the run's signed chain with :class:`trainer.chainwalk.ChainWalk`, the same
walker ``verify-store`` uses, before anything is used: the header's signature under its own key
(and, when the auditor names the peer, that key); manifests numbered 0..n-1 with no gap, each
naming this run and its window, each carrying the hash of the one before (the header hash for
window 0), steps contiguous, step records hash-chained, and the **last** manifest signed by the
header's key. Through the hash chain that one signature binds every earlier manifest and record,
so an auditor pays two BLS verifications per run, not one per window (py_ecc verifies in ~0.5 s).
A broken link becomes :class:`ArtifactInvalid` naming the file.

:func:`fetch_artifact` reads one artifact's leaf table (two small range reads), refuses absurd
declared sizes before reading more, checks the table rebuilds the committed root, then reads the
leaves and checks each against its table hash. Any mismatch raises :class:`ArtifactInvalid`
naming the artifact and leaf index, with Merkle evidence a third party can re-check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from audit.verdict import Evidence, EvidenceKind
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, Root
from proofs.merkle import hash_leaves
from trainer.artifact import ArtifactIndex
from trainer.chainwalk import MAX_STEPS, MAX_WINDOWS, ChainBroken, ChainWalk, VerifiedRun
from trainer.checkpoint import decode_checkpoint
from trainer.store import RunStore, StoreError, manifest_name, object_name

log = logging.getLogger(__name__)

__all__ = ["MAX_STEPS", "MAX_WINDOWS", "ArtifactInvalid", "VerifiedRun", "load_run"]


class ArtifactInvalid(VeritrainError, ValueError):
    """A stored artifact or record does not match its commitment or signature.

    ``artifact`` names it (a store path), ``leaf_index`` the first bad leaf (None when the whole
    record or table is at fault), ``evidence`` carries Merkle proofs where they exist.
    """

    def __init__(
        self,
        artifact: str,
        reason: str,
        *,
        leaf_index: int | None = None,
        evidence: tuple[Evidence, ...] = (),
    ) -> None:
        where = artifact if leaf_index is None else f"{artifact} leaf {leaf_index}"
        super().__init__(f"{where}: {reason}")
        self.artifact = artifact
        self.reason = reason
        self.leaf_index = leaf_index
        self.evidence = evidence


def load_run(
    store: RunStore,
    *,
    expected_peer: bytes | None = None,
    check_signatures: bool = True,
    derived: bool = False,
) -> VerifiedRun:
    """Read and authenticate a run's header, manifests and records (see module docstring).

    ``check_signatures=False`` skips the two BLS verifications (~1 s) and keeps every other
    check: only for a run whose signatures this process already checked. ``derived=True`` also
    checks every record's seed, learning rates and batch offsets against the header (ingest does;
    the auditor does not, so that such a record fails its step's verdict instead of hiding the
    run). Raises :class:`ArtifactInvalid` naming the first broken record.
    """
    walk = ChainWalk(
        store,
        expected_key=expected_peer,
        signatures="last" if check_signatures else "none",
        derived=derived,
    )
    try:
        run = walk.run()
    except ChainBroken as exc:
        link = exc.link
        reason = link.reason if link.step is None else f"step {link.step}: {link.reason}"
        raise ArtifactInvalid(link.artifact, reason) from exc
    if not run.manifests:
        raise ArtifactInvalid(manifest_name(0), "run has no manifest yet")
    return run


def _corrupt_evidence(
    artifact: str, root: Root, index: ArtifactIndex, bad: Sequence[tuple[int, Hash32]]
) -> Evidence:
    tree = index.tree()
    proof = tree.multiproof([i for i, _ in bad])
    return Evidence(
        kind=EvidenceKind.CORRUPT,
        artifact=artifact,
        root=Hash32(root),
        leaf_count=index.leaf_count,
        indices=proof.indices,
        leaf_hashes=tuple(index.hashes[i] for i in proof.indices),
        observed_hashes=tuple(h for _, h in sorted(bad)),
        proof_hashes=proof.hashes,
    )


def fetch_index(
    store: RunStore,
    root: Root,
    *,
    leaf_count: int | None,
    max_bytes: int,
    leaf_bytes: int | None = None,
) -> ArtifactIndex:
    """The leaf table of artifact ``root``, checked against the root, the record's leaf count and
    total leaf bytes (when given) and the size limit."""
    name = object_name(root)
    try:
        index = store.read_index(root)
    except StoreError as exc:
        raise ArtifactInvalid(name, str(exc)) from exc
    if leaf_count is not None and index.leaf_count != leaf_count:
        raise ArtifactInvalid(name, f"{index.leaf_count} leaves, manifest says {leaf_count}")
    if index.nbytes > max_bytes:
        raise ArtifactInvalid(name, f"declares {index.nbytes} bytes, limit is {max_bytes}")
    if leaf_bytes is not None and sum(index.lengths) != leaf_bytes:
        raise ArtifactInvalid(name, f"{sum(index.lengths)} leaf bytes, record says {leaf_bytes}")
    if index.tree().root != root:
        raise ArtifactInvalid(name, "leaf table does not rebuild the committed root")
    return index


def fetch_artifact(
    store: RunStore,
    root: Root,
    *,
    leaf_count: int | None,
    max_bytes: int,
    leaf_bytes: int | None = None,
) -> tuple[ArtifactIndex, list[bytes]]:
    """Every leaf of artifact ``root``, each checked against the committed table.

    Raises :class:`ArtifactInvalid` (with CORRUPT evidence for bad leaves).
    """
    name = object_name(root)
    index = fetch_index(
        store, root, leaf_count=leaf_count, max_bytes=max_bytes, leaf_bytes=leaf_bytes
    )
    try:
        got = store.read_leaves(root, range(index.leaf_count), index=index)
    except StoreError as exc:
        raise ArtifactInvalid(name, str(exc)) from exc
    _check_leaves(name, root, index, got)
    return index, [got[i] for i in range(index.leaf_count)]


def fetch_leaves(
    store: RunStore, root: Root, index: ArtifactIndex, indices: Sequence[int]
) -> dict[int, bytes]:
    """Only ``indices`` of an artifact whose table was checked by :func:`fetch_index`."""
    name = object_name(root)
    try:
        got = store.read_leaves(root, indices, index=index)
    except StoreError as exc:
        raise ArtifactInvalid(name, str(exc)) from exc
    _check_leaves(name, root, index, got)
    return got


def _check_leaves(name: str, root: Root, index: ArtifactIndex, got: Mapping[int, bytes]) -> None:
    """ArtifactInvalid, with CORRUPT evidence for the first 16 bad leaves, unless every leaf in
    ``got`` hashes to its entry in the (root-checked) table. One batched hash call."""
    order = sorted(got)
    ours = hash_leaves([got[i] for i in order])
    if ours == b"".join([index.hashes[i] for i in order]):
        return
    bad = [
        (i, Hash32(ours[32 * k : 32 * k + 32]))
        for k, i in enumerate(order)
        if ours[32 * k : 32 * k + 32] != index.hashes[i]
    ]
    raise ArtifactInvalid(
        name,
        "stored bytes do not match the committed leaf hash",
        leaf_index=bad[0][0],
        evidence=(_corrupt_evidence(name, root, index, bad[:16]),),
    )


def decode_checked(name: str, leaves: Sequence[bytes]) -> dict[str, torch.Tensor]:
    """Named tensors of a checked artifact; :class:`ArtifactInvalid` if not canonical."""
    try:
        return decode_checkpoint(leaves)
    except (EncodingError, ValueError, KeyError) as exc:
        raise ArtifactInvalid(name, f"not a canonical tensor encoding: {exc}") from exc
