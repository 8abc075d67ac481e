"""Batch audit jobs over many runs: resumable, idempotent, one signed verdict file per (run, step).

The output folder (its layout, atomic writes, resume and the one-job lock) is ``audit.outfolder``:
a job killed at any point leaves complete files only, and a restarted job redoes nothing. A run
that cannot be read or audited never stops the other runs: with ``workers`` > 1 each run has its
own process (``audit.workers``), so even a run that kills its process is one errored run, and the
worker processes die with their job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from audit.beacon import Beacon, BeaconFor, RunCommitment, beacon_for_run
from audit.fetch import ArtifactInvalid, VerifiedRun, load_run
from audit.outfolder import (
    VerdictSlotTaken,
    output_lock,
    run_folder,
    sweep_temporaries,
    verdict_path,
    verified_existing,
    write_atomic,
)
from audit.reexec import ReexecConfig, StepAuditor, StepResult
from audit.sampling import SamplePlan, plan_sample
from audit.usefulness import heldout_description
from audit.verdict import (
    Outcome,
    Usefulness,
    Verdict,
    sign_verdict,
)
from audit.workers import Send, WorkerDied, run_each
from proofs.hashing import Hash32
from proofs.signatures import BLSPubkey, KeyPair
from trainer.data import Corpus
from trainer.store import RunStore, StoreError

log = logging.getLogger(__name__)

OnVerdict = Callable[[str, int, Outcome], None]
OnPlan = Callable[[str, int], None]


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleSpec:
    """How many steps to sample: a count, or a target (cheat fraction, confidence)."""

    count: int | None = None
    cheat_fraction: float = 0.05
    confidence: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunOutcome:
    """What a job did for one run."""

    url: str
    run_id: str
    steps: tuple[int, ...] = ()
    passed: int = 0
    failed: int = 0
    invalid: int = 0
    skipped: int = 0
    error: str | None = None
    detection: float | None = None
    verdict_files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0 and self.invalid == 0


def build_verdict(
    *,
    run: VerifiedRun,
    step: int,
    result: StepResult,
    config: ReexecConfig,
    auditor: BLSPubkey,
    sample_seed: Hash32 | None,
    device: str,
) -> Verdict:
    record = run.record(step)
    outcome = (
        Outcome.INVALID if result.invalid else (Outcome.PASS if result.passed else Outcome.FAIL)
    )
    useful = None
    if result.loss_before is not None and result.loss_after is not None:
        useful = Usefulness(
            heldout=heldout_description(run.header),
            loss_before=result.loss_before,
            loss_after=result.loss_after,
        )
    return Verdict(
        run_id=run.header.run_id,
        peer=BLSPubkey(run.header.pubkey),
        step=step,
        outcome=outcome,
        mode=config.mode,
        reason=result.reason,
        replay_seed=record.replay_seed.to_bytes(8, "big"),
        recipe_hash=run.header_hash,
        manifest_hash=run.manifest_of(step).hash(),
        committed_root=Hash32(result.committed_root) if result.committed_root else None,
        recomputed_root=Hash32(result.recomputed_root) if result.recomputed_root else None,
        tensors=result.tensors,
        evidence=result.evidence,
        usefulness=useful,
        auditor=auditor,
        sample_seed=sample_seed,
        device=device,
        torch_version=torch.__version__,
    )


def _invalid_run_verdict(
    exc: ArtifactInvalid, store: RunStore, auditor: BLSPubkey, config: ReexecConfig
) -> Verdict | None:
    """A run-level invalid verdict (step 0) when the header at least parses; else None."""
    try:
        header = store.read_header().header
    except StoreError:
        return None
    return Verdict(
        run_id=header.run_id,
        peer=BLSPubkey(header.pubkey),
        step=0,
        outcome=Outcome.INVALID,
        mode=config.mode,
        reason=f"run records rejected: {exc}",
        replay_seed=b"",
        recipe_hash=header.hash(),
        manifest_hash=Hash32(bytes(32)),
        committed_root=None,
        recomputed_root=None,
        tensors=(),
        evidence=exc.evidence,
        usefulness=None,
        auditor=auditor,
        sample_seed=None,
        device="-",
        torch_version=torch.__version__,
    )


def plan_for(run: VerifiedRun, beacon: Beacon, auditor: bytes, spec: SampleSpec) -> SamplePlan:
    return plan_sample(
        beacon=beacon.value,
        manifest_hash=run.final_hash,
        auditor_pubkey=auditor,
        total_steps=run.total_steps,
        count=spec.count,
        cheat_fraction=spec.cheat_fraction,
        confidence=spec.confidence,
    )


def audit_run(
    url: str,
    *,
    out: Path,
    keypair: KeyPair,
    beacon: Beacon | BeaconFor,
    spec: SampleSpec,
    config: ReexecConfig,
    corpus: Corpus | None,
    on_verdict: OnVerdict | None = None,
    on_plan: OnPlan | None = None,
) -> RunOutcome:
    """Audit the sampled steps of the run at ``url``; never raises for a bad run.

    ``beacon`` is the value itself or a beacon-for (``audit.beacon``), asked once the run is
    loaded and authenticated; a beacon it cannot give (not yet mined, registry root mismatch)
    is this run's ``error``. ``on_plan(run id, number of sampled steps)`` is called once the
    sample is drawn, ``on_verdict(run id, step, outcome)`` after each step (resumed ones too)."""
    try:
        return _audit_run(url, out, keypair, beacon, spec, config, corpus, on_verdict, on_plan)
    except Exception as exc:  # one hostile or unreadable run must never stop the batch
        log.warning("run %s not audited: %s", url, exc)
        return RunOutcome(url=url, run_id="?", error=f"{type(exc).__name__}: {exc}")


def _audit_run(
    url: str,
    out: Path,
    keypair: KeyPair,
    beacon_for: Beacon | BeaconFor,
    spec: SampleSpec,
    config: ReexecConfig,
    corpus: Corpus | None,
    on_verdict: OnVerdict | None,
    on_plan: OnPlan | None,
) -> RunOutcome:
    store = RunStore(url)
    me = BLSPubkey(keypair.public)
    try:
        run = load_run(store)
    except ArtifactInvalid as exc:
        return _run_invalid(url, exc, store, out, keypair, config)
    try:
        commitment = RunCommitment(run_id=run.header.run_id, root=run.final_hash)
        beacon = beacon_for_run(beacon_for, url, commitment)
    except Exception as exc:  # not ready yet, refused, node down: this run waits, not the job
        log.warning("run %s: no beacon: %s", url, exc)
        return RunOutcome(url=url, run_id=run.header.run_id, error=f"beacon: {exc}")
    plan = plan_for(run, beacon, me, spec)
    folder = run_folder(out, run.header.run_id)
    write_atomic(folder / "plan.json", json.dumps(_plan_json(plan, beacon, url), indent=1).encode())
    if on_plan is not None:
        on_plan(run.header.run_id, len(plan.steps))
    counts = {Outcome.PASS: 0, Outcome.FAIL: 0, Outcome.INVALID: 0}
    skipped = 0
    auditor: StepAuditor | None = None
    try:
        for step in plan.steps:
            path = verdict_path(out, run.header.run_id, step)
            done = verified_existing(path, me)
            if done is not None:  # finished before a crash or by an earlier job: never redone
                outcome = done.verdict.outcome
                skipped += 1
            else:
                if auditor is None:
                    auditor = StepAuditor(store, run, corpus, config, sample_seed=plan.seed)
                    auditor.expect(plan.steps)  # sampled steps of one window share its replay
                verdict = build_verdict(
                    run=run,
                    step=step,
                    result=auditor.audit(step),
                    config=config,
                    auditor=me,
                    sample_seed=plan.seed,
                    device=auditor.device.type,
                )
                signed = sign_verdict(keypair, verdict)
                write_atomic(path, json.dumps(signed.to_json(), indent=1).encode())
                outcome = verdict.outcome
            counts[outcome] += 1
            if on_verdict is not None:
                on_verdict(run.header.run_id, step, outcome)
    finally:
        if auditor is not None:
            auditor.close()
    return RunOutcome(
        url=url,
        run_id=run.header.run_id,
        steps=tuple(plan.steps),
        passed=counts[Outcome.PASS],
        failed=counts[Outcome.FAIL],
        invalid=counts[Outcome.INVALID],
        skipped=skipped,
        detection=plan.detection_exact,
        verdict_files=tuple(str(verdict_path(out, run.header.run_id, s)) for s in plan.steps),
    )


def _run_invalid(
    url: str,
    exc: ArtifactInvalid,
    store: RunStore,
    out: Path,
    keypair: KeyPair,
    config: ReexecConfig,
) -> RunOutcome:
    """Sign and write ``run-invalid.json`` for a run whose records fail (once)."""
    me = BLSPubkey(keypair.public)
    verdict = _invalid_run_verdict(exc, store, me, config)
    if verdict is None:
        return RunOutcome(url=url, run_id="?", error=str(exc))
    path = run_folder(out, verdict.run_id) / "run-invalid.json"
    try:
        done = verified_existing(path, me)
    except VerdictSlotTaken as exc:
        return RunOutcome(url=url, run_id=verdict.run_id, error=str(exc))
    if done is None:
        write_atomic(path, json.dumps(sign_verdict(keypair, verdict).to_json(), indent=1).encode())
    return RunOutcome(url=url, run_id=verdict.run_id, invalid=1, verdict_files=(str(path),))


def _plan_json(plan: SamplePlan, beacon: Beacon, url: str) -> dict[str, object]:
    return {
        "version": 1,
        "kind": "veritrain-audit-plan",
        "store": url,
        "beacon": "0x" + beacon.value.hex(),
        "beacon_source": beacon.source,
        "seed": "0x" + plan.seed.hex(),
        "total_steps": plan.total_steps,
        "steps": list(plan.steps),
        "cheat_fraction": plan.cheat_fraction,
        "detection_binomial": plan.detection_binomial,
        "detection_exact": plan.detection_exact,
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """Everything one batch job needs; picklable so workers can receive it."""

    urls: tuple[str, ...]
    out: Path
    keypair: KeyPair
    beacon_for: BeaconFor
    spec: SampleSpec
    config: ReexecConfig
    corpus_paths: tuple[str, ...]
    workers: int = 1


def _corpus(paths: Sequence[str]) -> Corpus:
    return Corpus.from_paths(paths) if paths else Corpus.stdlib()


def _worker(job: JobSpec, url: str, send: Send) -> RunOutcome:
    """One run in a worker process; its plan and verdicts are reported back through ``send``."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, job.workers)))
    return audit_run(
        url,
        out=job.out,
        keypair=job.keypair,
        beacon=job.beacon_for,
        spec=job.spec,
        config=job.config,
        corpus=_corpus(job.corpus_paths),
        on_verdict=lambda run_id, step, outcome: send(("verdict", run_id, step, outcome)),
        on_plan=lambda run_id, count: send(("plan", run_id, count)),
    )


def run_job(
    job: JobSpec,
    *,
    on_run: Callable[[RunOutcome], None] | None = None,
    on_verdict: OnVerdict | None = None,
    on_plan: OnPlan | None = None,
) -> list[RunOutcome]:
    """Audit every run of ``job``; ``workers`` > 1 runs that many processes, one per run.

    Holds ``job.out``'s lock throughout: raises OutputLocked (``audit.outfolder``) when another
    job holds it. ``on_run`` is called after each run, ``on_plan``/``on_verdict`` as in
    :func:`audit_run` (from worker processes too). A worker process that dies (a crash, a
    signal, the OOM killer) makes its run errored; the other runs go on.
    """
    with output_lock(job.out):
        sweep_temporaries(job.out)
        if job.workers <= 1:
            return _run_here(job, on_run, on_verdict, on_plan)

        def relay(url: str, message: object) -> None:
            match message:
                case ("verdict", str(run_id), int(step), Outcome() as outcome):
                    if on_verdict is not None:
                        on_verdict(run_id, step, outcome)
                case ("plan", str(run_id), int(count)):
                    if on_plan is not None:
                        on_plan(run_id, count)

        def finished(url: str, result: RunOutcome | WorkerDied) -> None:
            if on_run is not None:
                on_run(_outcome(url, result))

        done = run_each(
            job.urls,
            partial(_worker, job),
            workers=job.workers,
            on_message=relay,
            on_result=finished,
        )
        return [_outcome(url, r) for url, r in zip(job.urls, done, strict=True)]


def _outcome(url: str, result: RunOutcome | WorkerDied) -> RunOutcome:
    if isinstance(result, WorkerDied):  # a crashed worker loses its run, not the job
        return RunOutcome(url=url, run_id="?", error=result.reason)
    return result


def _run_here(
    job: JobSpec,
    on_run: Callable[[RunOutcome], None] | None,
    on_verdict: OnVerdict | None,
    on_plan: OnPlan | None,
) -> list[RunOutcome]:
    corpus = _corpus(job.corpus_paths)
    results = []
    for url in job.urls:
        outcome = audit_run(
            url,
            out=job.out,
            keypair=job.keypair,
            beacon=job.beacon_for,
            spec=job.spec,
            config=job.config,
            corpus=corpus,
            on_verdict=on_verdict,
            on_plan=on_plan,
        )
        results.append(outcome)
        if on_run is not None:
            on_run(outcome)
    return results
