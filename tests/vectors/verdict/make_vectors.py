"""Regenerate the verdict test vectors (run once per format version; the files are then frozen).

    .venv/bin/python tests/vectors/verdict/make_vectors.py

Keys come from fixed seeds, evidence from a real proofs.merkle tree, so every byte is reproducible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from audit.bundle import aggregate_verdicts
from audit.tolerance import Mode
from audit.verdict import (
    Evidence,
    EvidenceKind,
    Outcome,
    TensorCheck,
    Usefulness,
    Verdict,
    sign_verdict,
)
from proofs.hashing import Hash32, leaf_hash, sha256
from proofs.merkle import MerkleTree
from proofs.signatures import BLSPubkey, keypair_from_seed

HERE = Path(__file__).parent
AUDITOR_SEEDS = [bytes([0xA1]) * 32, bytes([0xA2]) * 32]
PEER_SEED = bytes([0xB0]) * 32


def _evidence(kind: EvidenceKind) -> Evidence:
    leaves = [b"header-%d" % i if i % 2 == 0 else b"chunk-%d" % i for i in range(7)]
    tree = MerkleTree.build(leaves)
    proof = tree.multiproof([1, 4])
    return Evidence(
        kind=kind,
        artifact="gradients/00000003",
        root=Hash32(tree.root),
        leaf_count=tree.leaf_count,
        indices=proof.indices,
        leaf_hashes=tuple(tree.leaf_hashes[i] for i in proof.indices),
        observed_hashes=(leaf_hash(b"other-1"), leaf_hash(b"other-4")),
        proof_hashes=proof.hashes,
    )


def _verdict(auditor: BLSPubkey, outcome: Outcome, mode: Mode) -> Verdict:
    peer = keypair_from_seed(PEER_SEED).public
    tensors = (
        TensorCheck(
            name="blocks.0.attn.qkv.weight",
            rel_l2=2.5e-7 if outcome is Outcome.PASS else 0.05,
            cosine=1.25e-13 if outcome is Outcome.PASS else math.nan,
            max_rel_l2=1e-5 if mode is Mode.TOLERANT else None,
            max_cosine=1e-9 if mode is Mode.TOLERANT else None,
            passed=outcome is Outcome.PASS,
        ),
    )
    evidence = (
        ()
        if outcome is Outcome.PASS
        else (
            _evidence(EvidenceKind.MISMATCH if outcome is Outcome.FAIL else EvidenceKind.CORRUPT),
        )
    )
    return Verdict(
        run_id="run-vector-0001",
        peer=peer,
        step=3,
        outcome=outcome,
        mode=mode,
        reason={
            Outcome.PASS: "within tolerance",
            Outcome.FAIL: "1 of 1 tensors beyond tolerance",
            Outcome.INVALID: "gradients/00000003: leaf 1 does not match its commitment",
        }[outcome],
        replay_seed=bytes(range(8)),
        recipe_hash=sha256(b"recipe"),
        manifest_hash=sha256(b"manifest-3"),
        committed_root=sha256(b"committed"),
        recomputed_root=sha256(b"recomputed") if outcome is not Outcome.INVALID else None,
        tensors=tensors if outcome is not Outcome.INVALID else (),
        evidence=evidence,
        usefulness=Usefulness(heldout="seed=7;batch=4", loss_before=5.5, loss_after=5.25)
        if outcome is Outcome.PASS
        else None,
        auditor=auditor,
        sample_seed=sha256(b"sample"),
        device="cpu",
        torch_version="2.13.0+cpu",
    )


def main() -> None:
    keys = [keypair_from_seed(s) for s in AUDITOR_SEEDS]
    cases = {
        "pass_tolerant": _verdict(keys[0].public, Outcome.PASS, Mode.TOLERANT),
        "fail_tolerant_nan": _verdict(keys[0].public, Outcome.FAIL, Mode.TOLERANT),
        "invalid_exact": _verdict(keys[0].public, Outcome.INVALID, Mode.EXACT),
    }
    for name, verdict in cases.items():
        signed = sign_verdict(keys[0], verdict)
        doc = {
            "description": f"signed verdict ({name})",
            "auditor_seed": "0x" + AUDITOR_SEEDS[0].hex(),
            "canonical_sha256": "0x" + sha256(verdict.canonical_bytes()).hex(),
            "signed": signed.to_json(),
        }
        (HERE / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    pair = [
        sign_verdict(keys[0], _verdict(keys[0].public, Outcome.PASS, Mode.TOLERANT)),
        sign_verdict(keys[1], _verdict(keys[1].public, Outcome.FAIL, Mode.TOLERANT)),
    ]
    bundle = aggregate_verdicts(pair)
    doc = {
        "description": "two auditors' verdicts on one run under one aggregate signature",
        "auditor_seeds": ["0x" + s.hex() for s in AUDITOR_SEEDS],
        "individual_signatures": ["0x" + p.signature.hex() for p in pair],
        "bundle": bundle.to_json(),
    }
    (HERE / "bundle_two_auditors.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
