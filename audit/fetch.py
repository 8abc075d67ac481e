"""Fetch what an audit needs from a run store, and trust none of it until it is checked.

:func:`load_run` reads the run header and every window manifest and checks, before anything is
used: the header's signature under its own key (and, when the auditor names the peer, that key);
manifests numbered 0..n-1 with no gap, each naming this run and its window, each carrying the hash
of the one before (the header hash for window 0), steps contiguous, step records hash-chained, and
the **last** manifest signed by the header's key. Through the hash chain that one signature binds
every earlier manifest and record, so an auditor pays two BLS verifications per run, not one per
window (py_ecc verifies in ~0.5 s).

:func:`fetch_artifact` reads one artifact's leaf table (two small range reads), refuses absurd
declared sizes before reading more, checks the table rebuilds the committed root, then reads the
leaves and checks each against its table hash. Any mismatch raises :class:`ArtifactInvalid`
naming the artifact and leaf index, with Merkle evidence a third party can re-check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from audit.verdict import Evidence, EvidenceKind
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, Root
from proofs.merkle import hash_leaves
from trainer.artifact import ArtifactIndex
from trainer.checkpoint import decode_checkpoint
from trainer.manifest import StateRef, StepRecord, WindowManifest
from trainer.recipe import RunHeader
from trainer.store import RunStore, StoreError, manifest_name, object_name

log = logging.getLogger(__name__)

MAX_WINDOWS = 1 << 20
MAX_STEPS = 1 << 24


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


@dataclass(frozen=True, kw_only=True, slots=True)
class VerifiedRun:
    """A run whose header, manifests and step records passed :func:`load_run`."""

    url: str
    header: RunHeader
    header_hash: Hash32
    manifests: tuple[WindowManifest, ...]
    final_hash: Hash32
    records: tuple[StepRecord, ...]  # records[t].step == t

    @property
    def total_steps(self) -> int:
        return len(self.records)

    def record(self, step: int) -> StepRecord:
        if not 0 <= step < len(self.records):
            raise IndexError(f"step {step} not in run of {len(self.records)} steps")
        return self.records[step]

    def manifest_of(self, step: int) -> WindowManifest:
        for m in self.manifests:
            if m.first_step <= step < m.end_step:
                return m
        raise IndexError(f"step {step} is in no window")

    def state_at_or_before(self, step: int) -> StateRef:
        """The nearest state checkpoint taken before ``step`` runs, at or before it."""
        best = self.header.initial_state
        for m in self.manifests:
            if m.state.step <= step and m.state.step > best.step:
                best = m.state
        return best

    def state_at(self, step: int) -> StateRef | None:
        """The state checkpoint taken exactly before ``step`` runs, if there is one."""
        refs = [self.header.initial_state, *(m.state for m in self.manifests)]
        return next((r for r in refs if r.step == step), None)


def load_run(
    store: RunStore, *, expected_peer: bytes | None = None, check_signatures: bool = True
) -> VerifiedRun:
    """Read and authenticate a run's header, manifests and records (see module docstring).

    ``check_signatures=False`` skips the two BLS verifications (~1 s) and keeps every other
    check: only for a run whose signatures this process already checked. Raises
    :class:`ArtifactInvalid` naming the first broken record.
    """
    try:
        signed_header = store.read_header()
    except StoreError as exc:
        raise ArtifactInvalid("header.json", str(exc)) from exc
    header = signed_header.header
    if expected_peer is not None and header.pubkey != expected_peer:
        raise ArtifactInvalid("header.json", "run header names another peer's key")
    if check_signatures and not signed_header.verify():
        raise ArtifactInvalid("header.json", "run header signature does not verify")
    header_hash = header.hash()
    windows = store.manifest_windows()
    if len(windows) > MAX_WINDOWS:
        raise ArtifactInvalid("manifests", f"{len(windows)} windows exceeds {MAX_WINDOWS}")
    if windows != list(range(len(windows))):
        missing = next(i for i, w in enumerate([*windows, -1]) if w != i)
        raise ArtifactInvalid(manifest_name(missing), "manifest missing (gap in windows)")
    manifests: list[WindowManifest] = []
    records: list[StepRecord] = []
    signed_last = None
    prev, prev_record = header_hash, header_hash
    for w in windows:
        name = manifest_name(w)
        try:
            signed = store.read_manifest(w)
        except StoreError as exc:
            raise ArtifactInvalid(name, str(exc)) from exc
        m = signed.manifest
        _check_manifest(name, m, header, window=w, prev=prev, first_step=len(records))
        for r in m.records:
            if r.prev != prev_record:
                raise ArtifactInvalid(name, f"step {r.step} record does not chain to its parent")
            prev_record = r.hash()
            records.append(r)
        if len(records) > MAX_STEPS:
            raise ArtifactInvalid(name, f"run exceeds {MAX_STEPS} steps")
        prev = m.hash()
        manifests.append(m)
        signed_last = signed
    if signed_last is None:
        raise ArtifactInvalid(manifest_name(0), "run has no manifest yet")
    if check_signatures and not signed_last.verify(header.pubkey):
        raise ArtifactInvalid(
            manifest_name(windows[-1]), "manifest signature does not verify under the run's key"
        )
    return VerifiedRun(
        url=store.url,
        header=header,
        header_hash=header_hash,
        manifests=tuple(manifests),
        final_hash=prev,
        records=tuple(records),
    )


def _check_manifest(
    name: str, m: WindowManifest, header: RunHeader, *, window: int, prev: bytes, first_step: int
) -> None:
    if m.run_id != header.run_id:
        raise ArtifactInvalid(name, f"manifest names run {m.run_id!r}, not {header.run_id!r}")
    if m.window != window:
        raise ArtifactInvalid(name, f"manifest says window {m.window}")
    if m.prev != prev:
        raise ArtifactInvalid(name, "manifest does not chain to the previous one (prev hash)")
    if m.first_step != first_step:
        raise ArtifactInvalid(name, f"first step {m.first_step}, expected {first_step}")
    for offset, r in enumerate(m.records):
        if r.step != first_step + offset:
            raise ArtifactInvalid(name, f"record {offset} is step {r.step}, not contiguous")
    if m.spans_checkpoint(header.checkpoint_every):
        raise ArtifactInvalid(
            name,
            f"window of steps {m.first_step}..{m.end_step - 1} is empty or crosses a multiple of"
            f" checkpoint_every {header.checkpoint_every}",
        )
    if m.state.step != m.end_step:
        raise ArtifactInvalid(name, f"state checkpoint at step {m.state.step}, not {m.end_step}")


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
