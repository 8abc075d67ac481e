"""Audit one contribution of a shared run: :func:`audit_contribution` (docs/auditing.md,
"Auditing shared-run contributions").

Peer P's inner steps of round r are an ordinary solo run store, so the solo-run machinery judges
them unchanged (``audit.fetch.load_run``, ``audit.reexec.StepAuditor`` with its chain check); the
checks of the round protocol around them are in :mod:`audit.contribution_checks`. Every check in
:data:`audit.contribution_verdict.CHECK_NAMES` is reported, each on its own, so a verdict says
everything that is wrong, and ``reason`` names the first failure in that order.

Sampling: the inner steps re-executed are drawn with ``audit.sampling.sample_steps`` seeded by
``sha256(sample_seed || contribution hash)``; ``sample_seed`` comes from the round's beacon
(:mod:`audit.shared_batch`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from audit.contribution_checks import (
    Finding,
    check_error_feedback,
    check_final_state,
    check_local_chain,
    check_record,
    check_start_state,
    decode_committed,
    fail,
    flat_of,
    ok,
    read_payload,
    theta_tensors_at,
)
from audit.contribution_usefulness import heldout_description, usefulness
from audit.contribution_verdict import (
    CHECK_NAMES,
    Check,
    ContributionVerdict,
    SignedContributionVerdict,
    StepCheck,
    sign_contribution_verdict,
)
from audit.fetch import ArtifactInvalid, VerifiedRun, load_run
from audit.reexec import AuditSetupError, ReexecConfig, StepAuditor
from audit.sampling import sample_steps
from audit.tolerance import Mode
from audit.verdict import Outcome
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, sha256
from proofs.signatures import KeyPair
from trainer.checkpoint import (
    decode_checkpoint,
    optimizer_state_dict,
    optimizer_tensors,
    param_layout,
)
from trainer.compression import PayloadError, SparseDelta
from trainer.contribution import Contribution
from trainer.data import Corpus
from trainer.determinism import key_differences
from trainer.innerrun import build_inner_optimizer, genesis_header_check
from trainer.models import build_model
from trainer.peer import EF_KEY
from trainer.roundrecord import RoundRecord
from trainer.sharedrun import ZERO32, Genesis
from trainer.sharedstore import SharedStore
from trainer.store import RunStore, StoreError

log = logging.getLogger(__name__)

MODES = ("auto", "exact", "tolerant")
DEFAULT_STEPS = 4


class ContributionAuditError(VeritrainError, RuntimeError):
    """The auditor cannot judge this contribution (not the peer's fault): the round record is
    missing or not the aggregator's, theta_r is missing from the store, the corpus is not the
    genesis dataset."""


def steps_seed(sample_seed: bytes, contribution: bytes) -> bytes:
    """The seed of a contribution's inner-step sample: sha256(sample_seed || contribution hash)."""
    return sha256(bytes(sample_seed) + bytes(contribution))


def sampled_steps(
    sample_seed: bytes, contribution: bytes, inner_steps: int, count: int
) -> tuple[int, ...]:
    """The inner steps an auditor re-executes (all of them when ``count`` >= H)."""
    seed = steps_seed(sample_seed, contribution)
    return tuple(int(s) for s in sample_steps(seed, total_steps=inner_steps, count=count))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Judged:
    findings: dict[str, Finding]
    steps: tuple[StepCheck, ...]
    mode: Mode
    device: str


def audit_contribution(
    store: SharedStore,
    genesis: Genesis,
    r: int,
    peer: str,
    *,
    keypair: KeyPair,
    sample_seed: bytes,
    steps: int = DEFAULT_STEPS,
    mode: str = "auto",
    corpus: Corpus,
    heldout: Corpus | None = None,
    device: str | None = None,
) -> SignedContributionVerdict:
    """Judge ``peer``'s contribution to round ``r`` and return the auditor's signed verdict.

    ``corpus`` must be the genesis dataset; ``heldout`` the genesis held-out corpus when the
    genesis names one (usefulness is then measured on it). Raises ContributionAuditError when
    the auditor cannot judge (see the class); anything wrong with the peer's records or
    artifacts is the verdict (fail or invalid), never an exception.
    """
    if mode not in MODES:
        raise ContributionAuditError(f"mode must be one of {MODES}, got {mode!r}")
    round_record = _round_record(store, genesis, r)
    if corpus.commitment().root != genesis.dataset.root:
        raise ContributionAuditError("the corpus is not the genesis dataset (--corpus)")
    eval_corpus = _eval_corpus(genesis, corpus, heldout)
    model = build_model(genesis.model, genesis.model_config)
    try:
        theta_r = theta_tensors_at(store, round_record.base_root)
        flat_r = flat_of(model, theta_r)
    except (StoreError, EncodingError) as exc:
        raise ContributionAuditError(f"theta_{r} is not usable from the store: {exc}") from exc
    included = {i.peer: i.contribution for i in round_record.included}
    record_hash = included.get(peer, ZERO32)
    try:
        signed = store.read_contribution(peer, r)
        if (signed.contribution.peer, signed.contribution.round) != (peer, r):
            c = signed.contribution
            raise StoreError(f"the file of {peer}'s round {r} holds {c.peer!r}'s round {c.round}")
    except StoreError as exc:
        findings = {"record": fail("record", f"unreadable: {exc}"[:400], invalid=True)}
        judged = _Judged(findings=findings, steps=(), mode=_fixed(mode), device="cpu")
        description = heldout_description(genesis, r, heldout is not None)
        return _sign(keypair, genesis, r, peer, record_hash, sample_seed, judged,
                     (math.nan, math.nan), description)  # fmt: skip
    record = signed.contribution
    record_hash = record.hash()
    judged = _judge(store, genesis, r, peer, record, signed.verify_roster(genesis), round_record,
                    theta_r, flat_r, model, corpus, sample_seed, steps, mode, device)  # fmt: skip
    d = _committed_d(store, genesis, record, flat_r.numel())
    losses = usefulness(model, genesis, r, eval_corpus, flat_r, d)
    description = heldout_description(genesis, r, heldout is not None)
    return _sign(keypair, genesis, r, peer, record_hash, sample_seed, judged, losses, description,
                 pubkey=record.pubkey)  # fmt: skip


def _round_record(store: SharedStore, genesis: Genesis, r: int) -> RoundRecord:
    try:
        signed = store.read_round(r)
    except StoreError as exc:
        raise ContributionAuditError(f"round {r} has no readable round record: {exc}") from exc
    if not signed.verify(genesis.aggregator):
        raise ContributionAuditError(f"round {r}'s record is not signed by the genesis aggregator")
    return signed.round


def _eval_corpus(genesis: Genesis, corpus: Corpus, heldout: Corpus | None) -> Corpus:
    if genesis.heldout is None:
        return corpus
    if heldout is None:
        raise ContributionAuditError("the genesis names a held-out corpus: give it (--heldout)")
    if heldout.commitment().root != genesis.heldout.root:
        raise ContributionAuditError("the --heldout corpus is not the genesis held-out corpus")
    return heldout


def _fixed(mode: str) -> Mode:
    return Mode.EXACT if mode == "exact" else Mode.TOLERANT


def _committed_d(
    store: SharedStore, genesis: Genesis, record: Contribution, size: int
) -> SparseDelta | None:
    try:
        payload = read_payload(store, genesis, record, size)
        if sha256(payload) != record.delta:
            return None
        return decode_committed(genesis, payload, size)
    except (StoreError, PayloadError):
        return None


def local_state_at(
    store: SharedStore, genesis: Genesis, model: nn.Module, root: bytes, size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(e, optimizer tensors) of local-state artifact ``root``: zeros and a fresh optimizer's for
    ZERO32. Raises StoreError/EncodingError/ValueError/KeyError when it is not usable."""
    optimizer = build_inner_optimizer(genesis, model)
    if root == ZERO32:
        return torch.zeros(size, dtype=torch.float32), optimizer_tensors(optimizer.state_dict())
    state = decode_checkpoint(store.read_verified_leaves(root))
    e = state.pop(EF_KEY)
    if e.dtype != torch.float32 or e.shape != (size,):
        raise EncodingError(f"error feedback is {e.dtype} {tuple(e.shape)}, expected ({size},)")
    optimizer.load_state_dict(optimizer_state_dict(state, param_layout(model, optimizer)))
    return e, optimizer_tensors(optimizer.state_dict())


def _judge(
    store: SharedStore, genesis: Genesis, r: int, peer: str, record: Contribution, signed_ok: bool,
    round_record: RoundRecord, theta_r: dict[str, torch.Tensor], flat_r: torch.Tensor,
    model: nn.Module, corpus: Corpus, sample_seed: bytes, count: int, mode: str,
    device: str | None,
) -> _Judged:  # fmt: skip
    size = flat_r.numel()
    param_bytes = 4 * size
    findings = {
        "record": check_record(signed_ok, record, genesis, r, peer, round_record, record.hash())
    }
    findings["local-chain"] = check_local_chain(store, genesis, record, model, size).finding
    try:
        e_prev, start_optim = local_state_at(store, genesis, model, record.prev_local_state, size)
    except (StoreError, EncodingError, ValueError, KeyError) as exc:
        e_prev, start_optim = None, None
        findings["start-state"] = fail(
            "start-state", f"prev_local_state unusable: {exc}"[:400], invalid=True
        )
    inner = store.inner_store(peer, r)  # the slot judged, whatever peer the record names
    try:
        run: VerifiedRun | None = load_run(inner, expected_peer=record.pubkey)
    except ArtifactInvalid as exc:
        run = None
        findings.setdefault(
            "start-state", fail("start-state", f"inner run: {exc}"[:400], invalid=True)
        )
    fixed = _fixed(mode)
    steps: tuple[StepCheck, ...] = ()
    device_name = "cpu"
    final_optim = None
    if run is not None:
        problems = genesis_header_check(genesis, run.header, record.pubkey, round=r)
        if start_optim is not None:
            findings["start-state"] = check_start_state(
                inner, run, record, theta_r, start_optim, problems, param_bytes
            )
        final = check_final_state(inner, run, record, genesis, param_bytes)
        findings["final-state"], final_optim = final.finding, final.optim
        if mode == "auto":
            fixed = _auto_mode(run, device)
        picks = (
            sampled_steps(sample_seed, record.hash(), run.total_steps, count)
            if run.total_steps
            else ()
        )
        findings["inner-steps"], steps, device_name = _reexecute(
            inner, run, corpus, fixed, picks, sample_seed, device, peer_at_fault=bool(problems)
        )
    if e_prev is not None:
        try:
            theta_h = store.read_theta(record.final_state, model)
        except StoreError as exc:
            findings["error-feedback"] = fail(
                "error-feedback", f"final_state: {exc}"[:400], invalid=True
            )
        else:
            findings["error-feedback"] = check_error_feedback(
                store, genesis, record, theta_r=flat_r, theta_h=theta_h, e_prev=e_prev,
                final_optim=final_optim, tolerant=fixed is Mode.TOLERANT,
            )  # fmt: skip
    return _Judged(findings=findings, steps=steps, mode=fixed, device=device_name)


def _auto_mode(run: VerifiedRun, device: str | None) -> Mode:
    """Exact where this auditor reproduces the inner run's recorded determinism key, else
    tolerant."""
    here = device or ("cuda" if torch.cuda.is_available() else "cpu")
    h = run.header
    differs = key_differences(
        device=h.device, torch_version=h.torch_version, recorded=h.determinism, here=here
    )
    return Mode.TOLERANT if differs else Mode.EXACT


def _reexecute(
    inner: RunStore, run: VerifiedRun, corpus: Corpus, mode: Mode, picks: tuple[int, ...],
    sample_seed: bytes, device: str | None, *, peer_at_fault: bool,
) -> tuple[Finding, tuple[StepCheck, ...], str]:  # fmt: skip
    """Re-execute the sampled inner steps with the solo-run StepAuditor (chain check on).

    A run this auditor cannot re-execute is the peer's failure only when its header is not the
    genesis assignment (``peer_at_fault``); otherwise (exact mode on another CPU kernel, say) it
    raises ContributionAuditError: no verdict blames the peer for the auditor's setup."""
    name = "inner-steps"
    if not picks:
        return fail(name, "the inner run has no steps"), (), "cpu"
    config = ReexecConfig(mode=mode, device=device, check_chain=True, usefulness=False)
    try:
        auditor = StepAuditor(inner, run, corpus, config, sample_seed=sample_seed)
    except AuditSetupError as exc:
        if not peer_at_fault:
            raise ContributionAuditError(f"cannot re-execute the inner steps: {exc}") from exc
        return fail(name, f"not re-executed: {exc}"[:400]), (), "cpu"
    checks = []
    try:
        auditor.expect(picks)
        for step in picks:
            result = auditor.audit(step)
            outcome = "invalid" if result.invalid else ("pass" if result.passed else "fail")
            checks.append(StepCheck(step=step, outcome=outcome, reason=result.reason[:1000]))
    finally:
        auditor.close()
    bad = [c for c in checks if c.outcome != "pass"]
    if not bad:
        return (
            ok(name, f"{len(checks)} sampled inner steps re-execute ({mode.value})"),
            tuple(checks),
            auditor.device.type,
        )
    first = bad[0]
    finding = fail(
        name, f"step {first.step}: {first.reason}"[:400], invalid=first.outcome == "invalid"
    )
    return finding, tuple(checks), auditor.device.type


def _sign(
    keypair: KeyPair, genesis: Genesis, r: int, peer: str, record_hash: Hash32,
    sample_seed: bytes, judged: _Judged, losses: tuple[float, float], description: str,
    *, pubkey: bytes | None = None,
) -> SignedContributionVerdict:  # fmt: skip
    checks = []
    for name in CHECK_NAMES:
        found = judged.findings.get(name)
        if found is None:
            found = fail(name, "not checked: an earlier check found nothing to check against")
        checks.append(found)
    failed = [c for c in checks if not c.passed]
    if not failed:
        outcome, reason = Outcome.PASS, ""
    else:
        outcome = Outcome.INVALID if any(c.invalid for c in failed) else Outcome.FAIL
        reason = f"{failed[0].name}: {failed[0].detail}"
    verdict = ContributionVerdict(
        version=1,
        shared_run_id=genesis.shared_run_id,
        genesis=genesis.hash(),
        round=r,
        peer=peer,
        pubkey=bytes(pubkey if pubkey is not None else genesis.peers.get(peer, bytes(48))),
        contribution=record_hash,
        outcome=outcome,
        mode=judged.mode,
        reason=reason,
        checks=tuple(Check(name=c.name, passed=c.passed, detail=c.detail) for c in checks),
        steps=judged.steps,
        inner_steps=genesis.inner_steps,
        loss_before=losses[0],
        loss_after=losses[1],
        heldout=description,
        sample_seed=Hash32(bytes(sample_seed)),
        auditor=bytes(keypair.public),
        device=judged.device,
        torch_version=torch.__version__,
    )
    return sign_contribution_verdict(keypair, verdict)
