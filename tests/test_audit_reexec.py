"""Re-execution against runs produced by the real trainer: honest passes, cheats fail, damage is
named. Batch-job tests (signing, resume) are in test_audit_jobs.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from audit_runs import AUDITOR, copy_run, corpus, make_run, threads

from audit.beacon import Beacon
from audit.chunks import leaf_hash_map, verify_leaf_hashes
from audit.fetch import ArtifactInvalid, VerifiedRun, load_run
from audit.jobs import SampleSpec, audit_run
from audit.reexec import ReexecConfig, StepAuditor
from audit.tolerance import Mode
from audit.verdict import EvidenceKind, SignedVerdict, verify_verdict
from proofs.merkle import MultiProof
from trainer.artifact import PREFIX_SIZE
from trainer.store import RunStore, object_name

EXACT = ReexecConfig(mode=Mode.EXACT)
TOLERANT = ReexecConfig(mode=Mode.TOLERANT)


_VERIFIED: dict[str, VerifiedRun] = {}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _auditor(url: str, config: ReexecConfig) -> StepAuditor:
    # load_run costs two BLS verifications (~1 s): do it once per stored run.
    store = RunStore(url)
    if url not in _VERIFIED:
        _VERIFIED[url] = load_run(store, check_signatures=url.endswith("honest"))
    return StepAuditor(store, _VERIFIED[url], corpus(), config)


def _scaled(factor: float, steps: set[int]):  # type: ignore[no-untyped-def]
    def tamper(step: int, model: torch.nn.Module) -> None:
        if step in steps:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    return tamper


def test_honest_run_passes_in_exact_mode_with_signed_verdicts(tmp_path: Path) -> None:
    url = make_run("honest")
    outcome = audit_run(
        url,
        out=tmp_path,
        keypair=AUDITOR,
        beacon=Beacon(value=b"\x42" * 32, source="cli"),
        spec=SampleSpec(count=6),
        config=EXACT,
        corpus=corpus(),
    )
    assert outcome.error is None, outcome.error
    assert outcome.steps == tuple(range(6))
    assert (outcome.passed, outcome.failed, outcome.invalid) == (6, 0, 0)
    signed = SignedVerdict.from_json(json.loads(Path(outcome.verdict_files[4]).read_text()))
    v = signed.verdict
    assert v.step == 4 and v.committed_root == v.recomputed_root is not None
    assert v.usefulness is not None and v.usefulness.loss_before > 0
    assert verify_verdict(signed)


def test_scaled_gradient_fails_exactly_on_cheated_steps_exact_mode() -> None:
    url = make_run("scaled-half", tamper=_scaled(0.5, {1, 4}))
    auditor = _auditor(url, EXACT)
    results = {s: auditor.audit(s) for s in range(6)}
    assert {s for s, r in results.items() if not r.passed} == {1, 4}
    assert not any(r.invalid for r in results.values())
    bad = results[1]
    assert bad.committed_root != bad.recomputed_root
    (ev,) = bad.evidence
    assert ev.kind is EvidenceKind.MISMATCH and ev.root == bad.committed_root
    proof = MultiProof(indices=ev.indices, leaf_count=ev.leaf_count, hashes=ev.proof_hashes)
    assert verify_leaf_hashes(ev.root, leaf_hash_map(ev.indices, ev.leaf_hashes), proof)


@pytest.mark.parametrize(
    ("factor", "name", "steps"), [(1.05, "scaled-1.05", {2}), (0.5, "scaled-half", {1, 4})]
)
def test_tolerant_mode_catches_scaling(factor: float, name: str, steps: set[int]) -> None:
    url = make_run(name, tamper=_scaled(factor, steps))
    auditor = _auditor(url, TOLERANT)
    cheat = min(steps)
    honest, cheated = auditor.audit(cheat - 1), auditor.audit(cheat)
    assert honest.passed, honest.reason
    assert not cheated.passed and not cheated.invalid
    # rel L2 = ||c - r|| / ||r|| with c = factor * r.
    worst = max(t.rel_l2 for t in cheated.tensors)
    assert worst == pytest.approx(abs(factor - 1.0), rel=1e-3)
    assert "beyond tolerance" in cheated.reason


def test_honest_run_passes_tolerant_mode() -> None:
    auditor = _auditor(make_run("honest"), TOLERANT)
    for step in range(6):
        result = auditor.audit(step)
        assert result.passed, (step, result.reason)
    cal = auditor.calibration
    assert cal is not None and cal.max_rel_l2() < 1e-3


def test_changed_artifact_byte_is_invalid_naming_artifact_and_leaf() -> None:
    url = copy_run(make_run("honest"), "honest-corrupt")
    store = RunStore(url)
    run = load_run(store, check_signatures=False)
    record = run.record(2)
    index = store.read_index(record.grad_root)
    leaf = 3
    start, _ = index.leaf_range(leaf)
    path = Path(url) / object_name(record.grad_root)
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0x01
    path.write_bytes(bytes(data))
    result = _auditor(url, EXACT).audit(2)
    assert result.invalid and not result.passed
    assert object_name(record.grad_root) in result.reason and f"leaf {leaf}" in result.reason
    (ev,) = result.evidence
    assert ev.kind is EvidenceKind.CORRUPT and ev.indices == (leaf,)
    proof = MultiProof(indices=ev.indices, leaf_count=ev.leaf_count, hashes=ev.proof_hashes)
    assert verify_leaf_hashes(record.grad_root, leaf_hash_map(ev.indices, ev.leaf_hashes), proof)
    assert ev.observed_hashes != ev.leaf_hashes
    # A step of another window does not need that artifact and still passes.
    assert _auditor(url, EXACT).audit(4).passed


def test_truncated_and_oversized_artifacts_are_invalid_not_crashes() -> None:
    url = copy_run(make_run("honest"), "honest-hostile")
    store = RunStore(url)
    run = load_run(store, check_signatures=False)
    truncated = Path(url) / object_name(run.record(1).grad_root)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    huge = Path(url) / object_name(run.record(4).grad_root)
    data = bytearray(huge.read_bytes())
    data[PREFIX_SIZE : PREFIX_SIZE + 8] = (1 << 40).to_bytes(8, "big")  # leaf 0 claims 1 TiB
    huge.write_bytes(bytes(data))
    auditor = _auditor(url, EXACT)
    r1, r4 = auditor.audit(1), auditor.audit(4)
    assert r1.invalid and object_name(run.record(1).grad_root) in r1.reason
    assert r4.invalid and "limit" in r4.reason


def test_chunk_sampling_catches_dense_cheat_and_fetches_less() -> None:
    sampled = ReexecConfig(mode=Mode.EXACT, chunk_fraction=0.25)
    cheat = _auditor(make_run("scaled-half", tamper=_scaled(0.5, {1, 4})), sampled)
    assert not cheat.audit(4).passed  # every leaf changed: any sample catches it
    honest_url = make_run("honest")
    full = _auditor(honest_url, ReexecConfig(mode=Mode.EXACT, check_chain=False))
    part = _auditor(honest_url, sampled)
    r_full, r_part = full.audit(3), part.audit(3)
    assert r_full.passed and r_part.passed, (r_full.reason, r_part.reason)
    assert r_part.bytes_fetched < r_full.bytes_fetched


def test_load_run_rejects_manifest_signed_by_another_key() -> None:
    from audit_runs import OTHER_PEER

    from trainer.manifest import sign_manifest

    url = copy_run(make_run("honest"), "honest-resigned")
    store = RunStore(url)
    last = store.manifest_windows()[-1]
    forged = sign_manifest(OTHER_PEER, store.read_manifest(last).manifest)
    from proofs.codec import canonical_json
    from trainer.store import manifest_name

    store.put_bytes(manifest_name(last), canonical_json(forged.to_json()), exclusive=False)
    with pytest.raises(ArtifactInvalid, match="signature"):
        load_run(store)


@pytest.mark.slow
def test_no_false_positive_over_20_steps_when_thread_counts_differ() -> None:
    # The peer trains with 2 threads; the auditor re-executes with 1 (calibrating against 2 and
    # a float64 reference). Every step must pass.
    url = make_run("honest-2-threads", steps=20, every=5, threads=2)
    auditor = _auditor(url, TOLERANT)
    failures = [(s, r.reason) for s in range(20) if not (r := auditor.audit(s)).passed]
    assert failures == []


def test_usefulness_matches_loss_of_the_committed_next_state() -> None:
    # Step 2 is the last of window 0: the state after it is the committed checkpoint at step 3,
    # so its held-out loss can be computed independently from that artifact.
    from audit.usefulness import HELDOUT_SEED, HELDOUT_STEP
    from trainer.checkpoint import PARAM, decode_checkpoint
    from trainer.models import build_model

    url = make_run("honest")
    auditor = _auditor(url, EXACT)
    result = auditor.audit(2)
    assert result.passed and result.loss_before is not None and result.loss_after is not None
    run = _VERIFIED[url]
    state_ref = run.state_at(3)
    assert state_ref is not None
    _, leaves = RunStore(url).read_artifact(state_ref.root)
    state = decode_checkpoint(leaves)
    model = build_model(run.header.model, run.header.model_config)
    model.load_state_dict({k[len(PARAM) :]: v for k, v in state.items() if k.startswith(PARAM)})
    model.eval()
    batch = corpus().batch_for_step(HELDOUT_SEED, HELDOUT_STEP, batch_size=4, context=16)
    with torch.no_grad():
        logits, _ = model(batch.inputs)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch.targets.reshape(-1))
    assert result.loss_after == pytest.approx(float(loss), rel=1e-6)
    assert result.loss_after != result.loss_before
