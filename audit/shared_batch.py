"""Audit a shared run's closed rounds: sample contributions from each round's beacon, judge each
with :func:`audit.contribution.audit_contribution`, write one signed verdict file per contribution.

Sampling (docs/auditing.md, "Auditing shared-run contributions"): round r's beacon B_r is the
hash of the block after the round record's on-chain commitment (registry key
``audit.onchain.round_registry_id(shared_run_id, r)``, the record hash as root, checked as
``audit.registry`` checks a solo run's) or a value given on the command line;
``sample_seed = sha256(b"veritrain/shared-sample/v1" || B_r || round record hash)``. The included
contributions of round r are ordered by ``sha256(sample_seed || contribution hash)`` and the first
``contributions`` are judged (all by default).

Output folder (resumable, one job at a time: ``audit.outfolder``'s lock and atomic writes)::

    OUT/rNNNNNN/_plan.json    the beacon, its source, the sample seed and the contributions drawn
    OUT/rNNNNNN/<peer>.json   this auditor's signed contribution verdict

A verdict file already there, valid, signed by this auditor and on the same contribution is kept
and never redone. One contribution that cannot be judged (an error, a worker that dies, a damaged
file in its slot) is an error line for it; the others go on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from audit.beacon import Beacon, BeaconForRun, RunCommitment
from audit.contribution import DEFAULT_STEPS, MODES, audit_contribution
from audit.contribution_verdict import ContributionVerdictError, load_contribution_verdict
from audit.onchain import round_registry_id
from audit.outfolder import VerdictSlotTaken, output_lock, sweep_temporaries, write_atomic
from audit.verdict import Outcome
from audit.workers import Send, WorkerDied, run_each
from proofs.errors import VeritrainError
from proofs.hashing import Hash32, sha256
from proofs.signatures import KeyPair
from trainer.data import Corpus
from trainer.roundinputs import load_run
from trainer.sharedrun import Genesis
from trainer.sharedstore import SharedStore
from trainer.store import StoreError

log = logging.getLogger(__name__)

SAMPLE_MAGIC = b"veritrain/shared-sample/v1"
PLAN_NAME = "_plan.json"
"""Each round folder's sampling plan (peer names cannot start with "_": no verdict is named so)."""


class SharedAuditInputError(VeritrainError, ValueError):
    """The job cannot start as asked: no shared run there, a round not closed, a corpus that is
    not the genesis's."""


def round_sample_seed(beacon: bytes, round_hash: bytes) -> Hash32:
    """sha256(b"veritrain/shared-sample/v1" || beacon || round record hash)."""
    return sha256(SAMPLE_MAGIC + bytes(beacon) + bytes(round_hash))


def sample_order(seed: bytes, contributions: Sequence[bytes]) -> list[bytes]:
    """``contributions`` ordered by sha256(seed || contribution hash): the first K are audited."""
    return sorted(contributions, key=lambda c: sha256(bytes(seed) + bytes(c)))


@dataclass(frozen=True, kw_only=True, slots=True)
class SharedJob:
    """One ``audit shared`` job; picklable so that worker processes can receive it."""

    store_url: str
    out: Path
    keypair: KeyPair
    rounds: tuple[int, ...] | None = None
    """None: every closed round."""
    beacon: bytes | BeaconForRun
    """A value for every round, or a registry beacon (``audit.registry.RegistryBeaconFor``) asked
    with each round record's commitment."""
    contributions: int | None = None
    steps: int = DEFAULT_STEPS
    mode: str = "auto"
    corpus_paths: tuple[str, ...] = ()
    heldout_paths: tuple[str, ...] = ()
    workers: int = 1
    device: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SharedAuditInputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 1:
            raise SharedAuditInputError(f"--steps must be >= 1, got {self.steps}")
        if self.contributions is not None and self.contributions < 1:
            raise SharedAuditInputError(f"--contributions must be >= 1, got {self.contributions}")
        if self.workers < 1:
            raise SharedAuditInputError(f"--workers must be >= 1, got {self.workers}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Task:
    """One contribution to judge."""

    round: int
    peer: str
    contribution: Hash32
    sample_seed: Hash32


@dataclass(frozen=True, kw_only=True, slots=True)
class Judgement:
    """What the job found for one contribution (or why it could not judge it)."""

    round: int
    peer: str
    outcome: Outcome | None = None
    reason: str = ""
    usefulness: float | None = None
    skipped: bool = False
    """True when the verdict was already in OUT (resumed, not redone)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.outcome is Outcome.PASS


def verdict_file(out: Path, r: int, peer: str) -> Path:
    return out / f"r{r:06d}" / f"{peer}.json"


def corpus_of(paths: Sequence[str]) -> Corpus:
    return Corpus.from_paths(paths) if paths else Corpus.stdlib()


def check_inputs(job: SharedJob) -> tuple[SharedStore, Genesis]:
    """The store and its verified genesis; SharedAuditInputError for a job that cannot start."""
    store = SharedStore(job.store_url)
    if not store.has_genesis():
        raise SharedAuditInputError(f"no shared run at {job.store_url} (no genesis.json)")
    try:
        state = load_run(store)
    except (StoreError, VeritrainError) as exc:
        raise SharedAuditInputError(f"{job.store_url}: {exc}") from exc
    genesis = state.genesis
    closed = set(range(len(state.records)))
    missing = sorted(set(job.rounds or ()) - closed)
    if missing:
        raise SharedAuditInputError(
            f"round(s) {missing} have no verified round record; closed rounds: "
            + (f"0..{len(state.records) - 1}" if closed else "none")
        )
    if corpus_of(job.corpus_paths).commitment().root != genesis.dataset.root:
        raise SharedAuditInputError("--corpus is not the genesis dataset (its root differs)")
    if genesis.heldout is not None:
        if not job.heldout_paths:
            raise SharedAuditInputError("the genesis names a held-out corpus: give --heldout")
        if corpus_of(job.heldout_paths).commitment().root != genesis.heldout.root:
            raise SharedAuditInputError("--heldout is not the genesis held-out corpus")
    return store, genesis


def round_beacon(job: SharedJob, genesis: Genesis, r: int, round_hash: Hash32) -> Beacon:
    """B_r: the given value, or the registry beacon of the round record's commitment."""
    if isinstance(job.beacon, bytes):
        return Beacon(value=job.beacon, source="cli")
    commitment = RunCommitment(
        run_id=round_registry_id(genesis.shared_run_id, r), root=bytes(round_hash)
    )
    return job.beacon.for_run(commitment)


def plan(
    job: SharedJob, store: SharedStore, genesis: Genesis
) -> tuple[list[Task], list[Judgement]]:
    """The contributions to judge, round by round (each round's _plan.json written), and an error
    judgement for each round whose beacon is not available."""
    rounds = job.rounds if job.rounds is not None else tuple(store.rounds())
    tasks, errors = [], []
    for r in sorted(set(rounds)):
        record = store.read_round(r).round
        try:
            beacon = round_beacon(job, genesis, r, record.hash())
        except Exception as exc:  # not mined yet, not recorded, node down: this round waits
            errors.append(Judgement(round=r, peer="*", error=f"beacon: {exc}"))
            continue
        seed = round_sample_seed(beacon.value, record.hash())
        by_hash = {bytes(i.contribution): i.peer for i in record.included}
        order = sample_order(seed, list(by_hash))[: job.contributions]
        drawn = [
            Task(round=r, peer=by_hash[h], contribution=Hash32(h), sample_seed=seed) for h in order
        ]
        tasks += drawn
        doc = {
            "version": 1,
            "kind": "veritrain-shared-audit-plan",
            "round": r,
            "round_record": "0x" + record.hash().hex(),
            "beacon": "0x" + beacon.value.hex(),
            "beacon_source": beacon.source,
            "sample_seed": "0x" + seed.hex(),
            "included": len(record.included),
            "sampled": [
                {"peer": t.peer, "contribution": "0x" + t.contribution.hex()} for t in drawn
            ],
            "steps": job.steps,
        }
        path = job.out / f"r{r:06d}" / PLAN_NAME
        if not path.exists():
            write_atomic(path, json.dumps(doc, indent=1).encode())
    return tasks, errors


def _existing(path: Path, job: SharedJob, task: Task) -> Judgement | None:
    """The judgement of a verdict file already in its slot, None when the slot is empty; raises
    VerdictSlotTaken for anything else there (never redone, never replaced)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        signed = load_contribution_verdict(data)
    except ContributionVerdictError as exc:
        raise VerdictSlotTaken(f"{path} exists but is not a contribution verdict: {exc}") from exc
    v = signed.verdict
    if v.auditor != bytes(job.keypair.public) or not signed.verify():
        raise VerdictSlotTaken(
            f"{path} is not a verdict signed by this auditor: give another --out"
        )
    if v.contribution != task.contribution or v.round != task.round or v.peer != task.peer:
        raise VerdictSlotTaken(f"{path} judges another contribution than round {task.round}'s")
    return Judgement(round=task.round, peer=task.peer, outcome=v.outcome, reason=v.reason,
                     usefulness=v.usefulness, skipped=True)  # fmt: skip


def judge(job: SharedJob, task: Task, *, store: SharedStore | None = None,
          genesis: Genesis | None = None, corpus: Corpus | None = None) -> Judgement:  # fmt: skip
    """Judge one task (or keep its verdict already on disk); never raises."""
    try:
        path = verdict_file(job.out, task.round, task.peer)
        done = _existing(path, job, task)
        if done is not None:
            return done
        store = store or SharedStore(job.store_url)
        genesis = genesis or store.read_genesis().genesis
        signed = audit_contribution(
            store, genesis, task.round, task.peer, keypair=job.keypair,
            sample_seed=task.sample_seed, steps=job.steps, mode=job.mode,
            corpus=corpus or corpus_of(job.corpus_paths),
            heldout=corpus_of(job.heldout_paths) if job.heldout_paths else None,
            device=job.device,
        )  # fmt: skip
        write_atomic(path, json.dumps(signed.to_json(), indent=1).encode())
        v = signed.verdict
        return Judgement(round=task.round, peer=task.peer, outcome=v.outcome, reason=v.reason,
                         usefulness=v.usefulness)  # fmt: skip
    except Exception as exc:  # one hostile contribution must never stop the batch
        log.warning("round %d %s not judged: %s", task.round, task.peer, exc)
        return Judgement(round=task.round, peer=task.peer, error=f"{type(exc).__name__}: {exc}")


def _worker(job: SharedJob, task: Task, send: Send) -> Judgement:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.workers))
    return judge(job, task)


def audit_shared(
    job: SharedJob,
    *,
    on_plan: Callable[[int], None] | None = None,
    on_result: Callable[[Judgement], None] | None = None,
) -> list[Judgement]:
    """Run ``job`` under OUT's lock: plan every round, then judge every drawn contribution
    (``workers`` > 1: one forked process each; fork from a process that has not run a parallel
    torch kernel yet, as the CLI does: GNU OpenMP's thread pool does not survive a fork).
    ``on_plan(total)`` is called once with the number of contributions drawn, ``on_result``
    after each. Raises SharedAuditInputError
    before anything is written when the job cannot start, OutputLocked when OUT is in use."""
    store, genesis = check_inputs(job)
    with output_lock(job.out):
        sweep_temporaries(job.out)
        tasks, errors = plan(job, store, genesis)
        if on_plan is not None:
            on_plan(len(tasks))
        for e in errors:
            if on_result is not None:
                on_result(e)
        if job.workers <= 1:
            corpus = corpus_of(job.corpus_paths)
            results = []
            for task in tasks:
                result = judge(job, task, store=store, genesis=genesis, corpus=corpus)
                results.append(result)
                if on_result is not None:
                    on_result(result)
            return errors + results

        def finished(task: Task, result: Judgement | WorkerDied) -> None:
            if on_result is not None:
                on_result(_as_judgement(task, result))

        done = run_each(tasks, partial(_worker, job), workers=job.workers, on_result=finished)
        return errors + [_as_judgement(t, r) for t, r in zip(tasks, done, strict=True)]


def _as_judgement(task: Task, result: Judgement | WorkerDied) -> Judgement:
    if isinstance(result, WorkerDied):  # a crashed worker loses its contribution, not the job
        return Judgement(round=task.round, peer=task.peer, error=result.reason)
    return result
