"""Compare a recomputed gradient with the committed one: exact, tolerant, or chunk-sampled.

Every comparison yields per-tensor checks, whether the step passed, and Merkle evidence for the
mismatching leaves (at most :data:`MAX_EVIDENCE_LEAVES`, so a verdict stays small): the
committed leaf hashes with a multiproof against the committed root, and the auditor's own leaf
hashes at the same positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from audit.tolerance import Calibration, distance
from audit.verdict import Evidence, EvidenceKind, TensorCheck
from proofs.encoding import ChunkRef, chunk_layout, encode_tensors
from proofs.hashing import Hash32, Root
from proofs.merkle import MerkleTree
from trainer.artifact import ArtifactIndex
from trainer.tensors import dtype_name, to_tensor_bytes_list, torch_dtype

MAX_EVIDENCE_LEAVES = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class Comparison:
    passed: bool
    reason: str
    recomputed_root: Root
    tensors: tuple[TensorCheck, ...]
    evidence: tuple[Evidence, ...]


def encode_gradient(grads: Mapping[str, torch.Tensor], chunk_size: int) -> list[memoryview]:
    """The canonical leaves of a gradient checkpoint (what the hook commits)."""
    return encode_tensors(to_tensor_bytes_list(grads), chunk_size=chunk_size)


def _hashes_and_root(leaves: Sequence[bytes | memoryview]) -> tuple[tuple[Hash32, ...], Root]:
    tree = MerkleTree.build(leaves)  # one batched (native) hash call, not one per leaf
    return tree.leaf_hashes, tree.root


def _mismatch_evidence(
    artifact: str,
    committed_root: Root,
    committed_hashes: Sequence[Hash32],
    observed: Mapping[int, Hash32],
) -> tuple[Evidence, ...]:
    if not observed:
        return ()
    picked = sorted(observed)[:MAX_EVIDENCE_LEAVES]
    proof = MerkleTree.from_leaf_hashes(list(committed_hashes)).multiproof(picked)
    return (
        Evidence(
            kind=EvidenceKind.MISMATCH,
            artifact=artifact,
            root=Hash32(committed_root),
            leaf_count=len(committed_hashes),
            indices=proof.indices,
            leaf_hashes=tuple(committed_hashes[i] for i in proof.indices),
            observed_hashes=tuple(observed[i] for i in proof.indices),
            proof_hashes=proof.hashes,
        ),
    )


def _checks(
    committed: Mapping[str, torch.Tensor],
    recomputed: Mapping[str, torch.Tensor],
    calibration: Calibration | None,
    *,
    identical: bool,
) -> list[TensorCheck]:
    out = []
    for name in sorted(recomputed):
        if calibration is None and identical:
            # Equal roots: every tensor is bit for bit the committed one, at distance 0.
            out.append(TensorCheck(name=name, rel_l2=0.0, cosine=0.0, max_rel_l2=None,
                                   max_cosine=None, passed=True))  # fmt: skip
            continue
        d = distance(committed[name], recomputed[name])
        if calibration is None:
            out.append(
                TensorCheck(
                    name=name,
                    rel_l2=d.rel_l2,
                    cosine=d.cosine,
                    max_rel_l2=None,
                    max_cosine=None,
                    passed=torch.equal(committed[name], recomputed[name]),
                )
            )
        else:
            t = calibration.threshold(name)
            out.append(
                TensorCheck(
                    name=name,
                    rel_l2=d.rel_l2,
                    cosine=d.cosine,
                    max_rel_l2=t.rel_l2,
                    max_cosine=t.cosine,
                    passed=t.admits(d),
                )
            )
    return out


def structure_problem(
    committed: Mapping[str, torch.Tensor],
    recomputed: Mapping[str, torch.Tensor],
    *,
    allow_missing: bool = False,
) -> str | None:
    """Why two gradients cannot be compared tensor by tensor (names, shapes, dtypes), or None.

    ``allow_missing``: committed may lack names (a parameter that got no gradient).
    """
    missing = sorted(set(recomputed) - set(committed))[:3]
    extra = sorted(set(committed) - set(recomputed))[:3]
    if extra or (missing and not allow_missing):
        return f"committed gradient names differ: missing {missing}, unexpected {extra}"
    for name, c in committed.items():
        r = recomputed[name]
        if c.shape != r.shape or c.dtype != r.dtype:
            return (
                f"{name}: committed {dtype_name(c.dtype)}{tuple(c.shape)}, "
                f"expected {dtype_name(r.dtype)}{tuple(r.shape)}"
            )
    return None


def compare_full(
    *,
    artifact: str,
    committed_root: Root,
    committed_index: ArtifactIndex,
    committed: Mapping[str, torch.Tensor],
    recomputed: Mapping[str, torch.Tensor],
    chunk_size: int,
    calibration: Calibration | None,
) -> Comparison:
    """Exact (``calibration`` None: roots must be equal) or tolerant comparison of whole tensors."""
    ours, root = _hashes_and_root(encode_gradient(recomputed, chunk_size))
    problem = structure_problem(committed, recomputed)
    if problem is not None:
        return Comparison(
            passed=False, reason=problem, recomputed_root=root, tensors=(), evidence=()
        )
    checks = _checks(committed, recomputed, calibration, identical=root == committed_root)
    theirs = committed_index.hashes
    observed = {i: Hash32(h) for i, h in enumerate(ours) if i < len(theirs) and h != theirs[i]}
    if calibration is None:
        passed = root == committed_root
        reason = (
            "recomputed root equals the committed root"
            if passed
            else (f"recomputed root differs: {len(observed)} of {len(theirs)} leaves mismatch")
        )
    else:
        failing = [c.name for c in checks if not c.passed]
        passed = not failing
        reason = (
            "every tensor within tolerance"
            if passed
            else f"{len(failing)} of {len(checks)} tensors beyond tolerance: "
            + ", ".join(failing[:3])
        )
        if passed:
            observed = {}
        else:
            layout = chunk_layout(to_tensor_bytes_list(recomputed), chunk_size=chunk_size)
            bad = set(failing)
            observed = {i: h for i, h in observed.items() if layout[i].tensor in bad}
    evidence = () if passed else _mismatch_evidence(artifact, committed_root, theirs, observed)
    return Comparison(
        passed=passed, reason=reason, recomputed_root=root, tensors=tuple(checks), evidence=evidence
    )


def _chunk_values(ref: ChunkRef, data: bytes, dtype: str) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return raw.view(torch_dtype(dtype))


def compare_chunks(
    *,
    artifact: str,
    committed_root: Root,
    committed_index: ArtifactIndex,
    committed_leaves: Mapping[int, bytes],
    recomputed: Mapping[str, torch.Tensor],
    chunk_size: int,
    calibration: Calibration | None,
) -> Comparison:
    """Compare only the committed leaves in ``committed_leaves`` (already checked against the
    committed table). Header leaves must match exactly; data leaves exactly (exact mode) or
    within the tensor's threshold, measured on the chunk's values (tolerant mode)."""
    tensors = to_tensor_bytes_list(recomputed)
    leaves = encode_tensors(tensors, chunk_size=chunk_size)
    ours, root = _hashes_and_root(leaves)
    if len(ours) != committed_index.leaf_count:
        return Comparison(
            passed=False,
            reason=f"committed gradient has {committed_index.leaf_count} leaves, "
            f"expected {len(ours)}",
            recomputed_root=root,
            tensors=(),
            evidence=(),
        )
    layout = chunk_layout(tensors, chunk_size=chunk_size)
    dtypes = {t.name: t.dtype for t in tensors}
    observed: dict[int, Hash32] = {}
    checks: list[TensorCheck] = []
    for i, data in sorted(committed_leaves.items()):
        if ours[i] == committed_index.hashes[i]:
            continue
        ref = layout[i]
        if calibration is None or ref.kind == "header":
            observed[i] = ours[i]
            continue
        c = _chunk_values(ref, data, dtypes[ref.tensor])
        r = _chunk_values(ref, bytes(leaves[i]), dtypes[ref.tensor])
        d = distance(c, r) if c.shape == r.shape else None
        t = calibration.threshold(ref.tensor)
        ok = d is not None and t.admits(d)
        if d is not None:
            checks.append(
                TensorCheck(
                    name=f"{ref.tensor}[leaf {i}]",
                    rel_l2=d.rel_l2,
                    cosine=d.cosine,
                    max_rel_l2=t.rel_l2,
                    max_cosine=t.cosine,
                    passed=ok,
                )
            )
        if not ok:
            observed[i] = ours[i]
    passed = not observed
    n = len(committed_leaves)
    reason = (
        f"{n} sampled leaves of {len(ours)} match"
        if passed
        else (f"{len(observed)} of {n} sampled leaves mismatch (first: leaf {min(observed)})")
    )
    evidence = (
        ()
        if passed
        else _mismatch_evidence(artifact, committed_root, committed_index.hashes, observed)
    )
    return Comparison(
        passed=passed, reason=reason, recomputed_root=root, tensors=tuple(checks), evidence=evidence
    )
