"""Re-check a signed verdict offline: its signature, its Merkle evidence, and (given the run
store) that it speaks of what the peer actually committed.

Used by ``python -m audit verify-verdict`` (alias ``check-evidence``). :func:`check_verdict`
returns the list of problems found (empty when everything checks out) and never raises on a bad
verdict or store.
"""

from __future__ import annotations

from audit.chunks import leaf_hash_map, verify_leaf_hashes
from audit.fetch import ArtifactInvalid, VerifiedRun, load_run
from audit.verdict import Evidence, EvidenceKind, Outcome, SignedVerdict, verify_verdict
from proofs.hashing import leaf_hash
from proofs.merkle import MultiProof
from trainer.store import RunStore, StoreError


def check_evidence_proofs(evidence: Evidence) -> list[str]:
    """Problems with one evidence entry taken on its own (proof against its root)."""
    problems = []
    proof = MultiProof(
        indices=evidence.indices, leaf_count=evidence.leaf_count, hashes=evidence.proof_hashes
    )
    if not verify_leaf_hashes(
        evidence.root, leaf_hash_map(evidence.indices, evidence.leaf_hashes), proof
    ):
        problems.append(f"{evidence.artifact}: committed leaf hashes do not prove to the root")
    same = [i for i, a, b in zip(
        evidence.indices, evidence.leaf_hashes, evidence.observed_hashes, strict=True
    ) if a == b]  # fmt: skip
    if same:
        problems.append(f"{evidence.artifact}: leaves {same[:5]} are not mismatches")
    return problems


def _against_store(signed: SignedVerdict, run: VerifiedRun, store: RunStore) -> list[str]:
    v = signed.verdict
    h = run.header
    problems = []
    if v.run_id != h.run_id or v.peer != h.pubkey or v.recipe_hash != run.header_hash:
        problems.append("verdict names another run, peer or recipe than the store holds")
        return problems
    if v.step >= run.total_steps:
        return [f"step {v.step} is not in the run ({run.total_steps} steps)"]
    if v.outcome is not Outcome.INVALID or v.committed_root is not None:
        record = run.record(v.step)
        if v.committed_root is None or bytes(v.committed_root) != bytes(record.grad_root):
            problems.append("committed root in the verdict is not the step's committed root")
        if v.manifest_hash != run.manifest_of(v.step).hash():
            problems.append("manifest hash in the verdict is not the step's manifest")
    for ev in v.evidence:
        try:
            leaves = store.read_leaves(ev.root, ev.indices)
        except StoreError as exc:
            problems.append(f"{ev.artifact}: cannot read evidence leaves: {exc}")
            continue
        found = {i: leaf_hash(b) for i, b in leaves.items()}
        expected = ev.observed_hashes if ev.kind is EvidenceKind.CORRUPT else ev.leaf_hashes
        if [found[i] for i in ev.indices] != list(expected):
            what = "corrupt bytes" if ev.kind is EvidenceKind.CORRUPT else "committed bytes"
            problems.append(f"{ev.artifact}: stored leaves are not the {what} the verdict cites")
    return problems


def check_verdict(signed: SignedVerdict, *, store_url: str | None = None) -> list[str]:
    """Every problem found with ``signed``; an empty list means it checks out."""
    problems = []
    if not verify_verdict(signed):
        problems.append("auditor signature does not verify")
    for ev in signed.verdict.evidence:
        problems.extend(check_evidence_proofs(ev))
    if store_url is not None:
        store = RunStore(store_url)
        try:
            run = load_run(store)
        except ArtifactInvalid as exc:
            if signed.verdict.outcome is Outcome.INVALID:
                return problems  # the run is indeed broken, as the verdict says
            problems.append(f"run store does not verify: {exc}")
            return problems
        except Exception as exc:  # an unreadable store is a finding, not a crash
            problems.append(f"cannot read run store: {exc}")
            return problems
        problems.extend(_against_store(signed, run, store))
    return problems
