"""Reading signed contribution verdicts for ``ingest-shared`` (rewards/shared_ingest.py).

A verdict (audit/contribution_verdict.py, as ``python -m audit shared --out DIR`` writes them:
``DIR/rNNNNNN/<peer>.json``, beside each round's ``_plan.json``, which is skipped) is loaded when
it is signed by its auditor key, that key is a registered auditor of the warehouse, it judges a
contribution the warehouse holds (or the same batch stages) with the same run, genesis, round and
peer key, and that auditor has no other verdict on the contribution. Anything else is a rejection
with its reason; a verdict already loaded is a duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from audit.contribution_verdict import (
    MAX_CONTRIBUTION_VERDICT_JSON,
    SignedContributionVerdict,
    load_contribution_verdict,
)
from audit.verdict import read_verdict_json
from proofs.codec import canonical_json
from proofs.errors import VeritrainError
from rewards.ingest import IngestError, Rejection
from rewards.warehouse import Connection, query


@dataclass
class VerdictIntake:
    """One batch's verdicts: ``staged`` are the contributions the batch loads (by hash) and
    ``new_genesis`` the genesis hash of a run it loads; ``rows`` collects the verdicts to write."""

    epoch: int
    batch_id: str
    staged: Mapping[str, Mapping[str, object]]
    new_genesis: str | None
    rows: list[dict[str, object]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    duplicates: int = 0

    def reject(self, source: str, reason: str) -> None:
        self.rejections.append(Rejection(kind="contribution-verdict", source=source, reason=reason))


SHARED_PLAN_KIND = "veritrain-shared-audit-plan"  # audit/shared_batch.py's rNNNNNN/_plan.json


def _is_plan(data: bytes) -> bool:
    """True for the sampling plan `audit shared` writes beside its verdicts (not a verdict)."""
    try:
        obj = read_verdict_json(data, max_bytes=MAX_CONTRIBUTION_VERDICT_JSON)
    except VeritrainError:
        return False
    return isinstance(obj, dict) and obj.get("kind") == SHARED_PLAN_KIND


def _hex(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def verdict_files(folder: str) -> list[Path]:
    """Every ``*.json`` below ``folder`` (``DIR/rNNNNNN/<peer>.json``), sorted; IngestError when
    the folder is missing."""
    root = Path(folder)
    if not root.is_dir():
        raise IngestError(f"verdict folder {folder} does not exist")
    return sorted(p for p in root.rglob("*.json") if p.is_file())


def read_verdicts(con: Connection, folder: str, batch: VerdictIntake) -> None:
    """Stage every verdict file below ``folder`` that verifies in ``batch.rows``; record the
    others in ``batch.rejections``. IngestError when the folder is missing."""
    staged = batch.staged
    for path in verdict_files(folder):
        source = str(path)
        try:
            data = path.read_bytes()
            if _is_plan(data):
                continue
            signed = load_contribution_verdict(data)
        except (OSError, VeritrainError) as exc:
            batch.reject(source, f"malformed: {exc}")
            continue
        reason = _verdict_problem(batch, con, signed, staged)
        if reason is not None:
            if reason != "duplicate":
                batch.reject(source, reason)
            continue
        v = signed.verdict
        batch.rows.append(
            {
                "id": _verdict_id(signed),
                "s": v.shared_run_id,
                "r": v.round,
                "h": _hex(v.contribution),
                "e": batch.epoch,
                "o": v.outcome.value,
                "m": v.mode.value,
                "why": v.reason,
                "passed": sorted({s.step for s in v.steps if s.outcome == "pass"}),
                "n": len(v.steps),
                "hsteps": v.inner_steps,
                "lb": v.loss_before,
                "la": v.loss_after,
                "held": v.heldout,
                "seed": _hex(v.sample_seed),
                "dev": v.device,
                "b": batch.batch_id,
                "auditor": _hex(v.auditor),
            }
        )


def _verdict_id(signed: SignedContributionVerdict) -> str:
    return "0x" + hashlib.sha256(canonical_json(signed.to_json())).hexdigest()


def _verdict_problem(
    batch: VerdictIntake,
    con: Connection,
    signed: SignedContributionVerdict,
    staged: Mapping[str, Mapping[str, object]],
) -> str | None:
    """Why the verdict cannot be loaded ("duplicate" when it already is), or None."""
    v = signed.verdict
    verdict_id = _verdict_id(signed)
    if query(con, "SELECT 1 FROM contribution_verdicts WHERE verdict_id = $v", {"v": verdict_id}):
        batch.duplicates += 1
        return "duplicate"
    if any(x["id"] == verdict_id for x in batch.rows):
        batch.duplicates += 1
        return "duplicate"
    auditor = query(
        con,
        "SELECT peer_id, role FROM peers WHERE bls_pubkey = $k",
        {"k": _hex(v.auditor)},
    )
    if not auditor or auditor[0][1] != "auditor":
        return f"auditor key {_hex(v.auditor)[:18]}... is not a registered auditor"
    if not signed.verify():
        return "contribution verdict signature does not verify under its auditor key"
    held = query(
        con,
        "SELECT c.shared_run_id, c.round, p.bls_pubkey, r.genesis_hash FROM contributions AS c"
        " JOIN peers AS p USING (peer_id) JOIN shared_runs AS r USING (shared_run_id)"
        " WHERE c.contribution_hash = $h AND c.shared_run_id = $s",
        {"h": _hex(v.contribution), "s": v.shared_run_id},
    )
    known = [tuple(x) for x in held]
    if not known and _hex(v.contribution) in staged:
        c = staged[_hex(v.contribution)]
        genesis = batch.new_genesis or _genesis_hash(con, str(c["s"]))
        key = query(con, "SELECT bls_pubkey FROM peers WHERE peer_id = $p", {"p": c["p"]})
        known = [(c["s"], c["r"], key[0][0], genesis)]
    if not known:
        return f"contribution {_hex(v.contribution)} of {v.shared_run_id!r} is not in the warehouse"
    run, r, pubkey, genesis = known[0]
    if (run, r, pubkey, genesis) != (v.shared_run_id, v.round, _hex(v.pubkey), _hex(v.genesis)):
        return "verdict names another run, genesis, round or peer key than the contribution has"
    earlier = query(
        con,
        "SELECT verdict_id FROM contribution_verdicts AS x JOIN peers AS p"
        " ON p.peer_id = x.auditor_id WHERE x.contribution_hash = $h AND p.bls_pubkey = $k",
        {"h": _hex(v.contribution), "k": _hex(v.auditor)},
    )
    staged_same = any(
        x["h"] == _hex(v.contribution) and x["auditor"] == _hex(v.auditor) for x in batch.rows
    )
    if earlier or staged_same:
        return "this auditor already filed another verdict on this contribution"
    return None


def _genesis_hash(con: Connection, shared_run_id: str) -> str | None:
    rows = query(
        con, "SELECT genesis_hash FROM shared_runs WHERE shared_run_id = $s", {"s": shared_run_id}
    )
    return None if not rows else str(rows[0][0])
