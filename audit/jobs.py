"""Batch audit jobs over many runs: resumable, idempotent, one signed verdict file per (run, step).

Layout of the output folder::

    OUT/<run id>/plan.json            the sample (beacon, seed, steps, detection probability)
    OUT/<run id>/step-<t>.json        one signed verdict per sampled step
    OUT/<run id>/run-invalid.json     when the run's header or manifests fail (no step re-executed)

Every file is written to a temporary name in the same folder, fsynced, then hard-linked into place
(``os.link`` refuses an existing name), so a job killed at any point leaves either no file or a
complete one, and a restarted job skips every verdict already on disk: nothing is redone and
nothing is duplicated. A run that cannot be read or audited never stops the other runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audit.beacon import Beacon, BeaconFor, RunCommitment, beacon_for_run
from audit.fetch import ArtifactInvalid, VerifiedRun, load_run
from audit.reexec import ReexecConfig, StepAuditor, StepResult
from audit.sampling import SamplePlan, plan_sample
from audit.usefulness import heldout_description
from audit.verdict import (
    Outcome,
    SignedVerdict,
    Usefulness,
    Verdict,
    VerdictError,
    load_signed_verdict,
    sign_verdict,
)
from proofs.hashing import Hash32, sha256
from proofs.signatures import BLSPubkey, KeyPair
from trainer.data import Corpus
from trainer.store import RunStore, StoreError

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


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


def write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` at ``path`` unless it exists; False (writing nothing) when it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def run_folder(out: Path, run_id: str) -> Path:
    """The run's output folder; a run id that is not a plain name is hashed (no path traversal)."""
    name = (
        run_id
        if _SAFE_NAME.match(run_id) and run_id not in (".", "..")
        else ("run-" + sha256(run_id.encode()).hex()[:32])
    )
    return out / name


def verdict_path(out: Path, run_id: str, step: int) -> Path:
    return run_folder(out, run_id) / f"step-{step:08d}.json"


def _existing(path: Path, auditor: bytes) -> SignedVerdict | None:
    """A finished verdict by this auditor at ``path`` (parsed, not re-verified), or None."""
    try:
        signed = load_signed_verdict(path.read_bytes())
    except (OSError, VerdictError):
        return None
    return signed if signed.verdict.auditor == auditor else None


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
    on_verdict: Callable[[str, int, Outcome | None], None] | None = None,
) -> RunOutcome:
    """Audit the sampled steps of the run at ``url``; never raises for a bad run.

    ``beacon`` is the value itself or a beacon-for (``audit.beacon``), asked once the run is
    loaded and authenticated; a beacon it cannot give (not yet mined, registry root mismatch)
    is this run's ``error``."""
    try:
        return _audit_run(url, out, keypair, beacon, spec, config, corpus, on_verdict)
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
    on_verdict: Callable[[str, int, Outcome | None], None] | None,
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
    counts = {Outcome.PASS: 0, Outcome.FAIL: 0, Outcome.INVALID: 0}
    skipped = 0
    auditor: StepAuditor | None = None
    try:
        for step in plan.steps:
            path = verdict_path(out, run.header.run_id, step)
            done = _existing(path, me)
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
    if _existing(path, me) is None:
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


def _worker(job: JobSpec, url: str) -> RunOutcome:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, job.workers)))
    return audit_run(
        url,
        out=job.out,
        keypair=job.keypair,
        beacon=job.beacon_for,
        spec=job.spec,
        config=job.config,
        corpus=_corpus(job.corpus_paths),
    )


def run_job(
    job: JobSpec,
    *,
    on_run: Callable[[RunOutcome], None] | None = None,
    on_verdict: Callable[[str, int, Outcome | None], None] | None = None,
) -> list[RunOutcome]:
    """Audit every run of ``job``; ``workers`` > 1 uses that many processes (one run each).

    ``on_run`` is called after each run; ``on_verdict(run id, step, outcome)`` after each step
    (single-process jobs only: worker processes report per run).
    """
    results: list[RunOutcome] = []
    if job.workers <= 1:
        corpus = _corpus(job.corpus_paths)
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
            )
            results.append(outcome)
            if on_run is not None:
                on_run(outcome)
        return results
    with ProcessPoolExecutor(max_workers=job.workers) as pool:
        futures = {pool.submit(_worker, job, url): url for url in job.urls}
        for fut in as_completed(futures):
            try:
                outcome = fut.result()
            except Exception as exc:  # a crashed worker loses its run, not the job
                outcome = RunOutcome(url=futures[fut], run_id="?", error=f"worker: {exc}")
            results.append(outcome)
            if on_run is not None:
                on_run(outcome)
    order = {u: i for i, u in enumerate(job.urls)}
    return sorted(results, key=lambda r: order[r.url])
