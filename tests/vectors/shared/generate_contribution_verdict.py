"""Regenerate contribution_verdict.json WITHOUT importing audit/ or trainer/: hashlib, json and
proofs.signatures only, so the vector states the contribution verdict format of docs/auditing.md
("Auditing shared-run contributions") independently of audit/contribution_verdict.py. The
verdicts judge alice's contribution of records.json.

    .venv/bin/python tests/vectors/shared/generate_contribution_verdict.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from proofs.signatures import Domain, keypair_from_seed, sign

HERE = Path(__file__).parent
AUDITOR = keypair_from_seed(b"veritrain-shared-vector-auditor--")
CHECKS = ("record", "start-state", "local-chain", "inner-steps", "final-state", "error-feedback")


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def hx(data: bytes) -> str:
    return "0x" + data.hex()


def entry(description: str, verdict: dict[str, Any]) -> dict[str, Any]:
    data = canonical(verdict)
    digest = hashlib.sha256(data).digest()
    signature = sign(AUDITOR, Domain.CONTRIBUTION_VERDICT, verdict["shared_run_id"], digest)
    return {
        "description": description,
        "canonical": data.decode("ascii"),
        "hash": hx(digest),
        "signed": {"verdict": verdict, "signature": hx(bytes(signature))},
    }


def main() -> None:
    records = json.loads((HERE / "records.json").read_text())
    contribution = records["contribution"]
    base = {
        "kind": "veritrain-contribution-verdict",
        "version": 1,
        "shared_run_id": contribution["record"]["shared_run_id"],
        "genesis": contribution["record"]["genesis"],
        "round": contribution["record"]["round"],
        "peer": contribution["record"]["peer"],
        "pubkey": contribution["record"]["pubkey"],
        "contribution": contribution["hash"],
        "inner_steps": 3,
        "heldout": "heldout corpus 0x..; seed=0x..; round=0; batch=4; context=32",
        "sample_seed": hx(hashlib.sha256(b"vector sample seed").digest()),
        "auditor": hx(AUDITOR.public),
        "device": "cpu",
        "torch_version": "2.5.1",
    }
    passing = {
        **base,
        "outcome": "pass",
        "mode": "exact",
        "reason": "",
        "checks": [{"name": n, "passed": True, "detail": "ok"} for n in CHECKS],
        "steps": [
            {"step": 0, "outcome": "pass", "reason": ""},
            {"step": 2, "outcome": "pass", "reason": ""},
        ],
        "loss_before": 5.5,
        "loss_after": 5.375,
    }
    failing = {
        **base,
        "outcome": "fail",
        "mode": "tolerant",
        "reason": "error-feedback: payload differs from the recomputed d at 12 entries",
        "checks": [
            {"name": n, "passed": n != "error-feedback", "detail": "ok"}
            if n != "error-feedback"
            else {"name": n, "passed": False, "detail": "payload differs at 12 entries"}
            for n in CHECKS
        ],
        "steps": [{"step": 1, "outcome": "pass", "reason": ""}],
        "loss_before": 5.5,
        "loss_after": "NaN",
    }
    out = {
        "auditor_seed": hx(b"veritrain-shared-vector-auditor--"),
        "verdicts": [
            entry("a passing exact-mode verdict on alice's round-0 contribution", passing),
            entry("a failing tolerant-mode verdict whose usefulness loss is NaN", failing),
        ],
    }
    (HERE / "contribution_verdict.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
