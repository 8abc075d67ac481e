"""The aggregator of a shared run: closes rounds in the shared store, and re-checks them.

``close_round`` closes the next open round r (docs/shared-runs.md, "The aggregator"):

- **When.** Round r opens at the previous round record's ``closed_at``; round 0 at the genesis
  file's modification time as the store reports it (the genesis has no time field; a store that
  reports none opens round 0 at the first look). It closes once ``now >= opened_at +
  deadline_s``, or as soon as ``max_contributions`` unscreened records named for round r are in
  the store; ``wait=True`` polls until one of the two holds.
- **What.** Every contribution record file that no earlier round record screened (an excluded
  file matched by file and file hash, an included one by file and contribution hash) is screened
  (trainer.aggregation); a record for an earlier round published late is screened here, as stale.
- **Crash safety.** The round record is the only commit: theta_{r+1}'s artifact is written and
  synced first (content-named, idempotent), the signed record last and write-once. A SIGKILL at
  any point leaves either no record (a rerun screens and aggregates again from the same theta_r;
  with the same files and ``now`` it writes the identical record, BLS signatures being
  deterministic) or the complete one. Applying a contribution means naming it in the record, so
  none is ever applied twice or lost.

``check_round`` / ``verify_round`` re-check a closed round from the store alone: signature and
chain, every screening decision (probe losses within ``PROBE_RTOL``; a decision that close to the
margin is reported as "close", not as a failure), and theta_{r+1}'s root bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from proofs.errors import VeritrainError
from proofs.hashing import Hash32
from proofs.signatures import KeyPair
from trainer.aggregation import (
    RoundResult,
    aggregate_hash,
    apply_sum,
    distinct_payloads,
    probe_threshold,
)
from trainer.data import Corpus
from trainer.globalstate import load_flat, theta_artifact
from trainer.roundinputs import (
    AggregatorError,
    Progress,
    RunState,
    StoreSource,
    contribution_hash,
    decide,
    load_run,
    read_candidate,
    theta_of,
    unscreened,
)
from trainer.roundrecord import RoundRecord, SignedRoundRecord
from trainer.screening import (
    CandidateFile,
    RoundContext,
    Survivor,
    record_name,
    screen_file,
    select_candidates,
)
from trainer.sharedrun import SHARED_VERSION, ZERO32, Genesis
from trainer.sharedstore import SharedStore
from trainer.store import StoreError

logger = logging.getLogger(__name__)

PAUSE_ENV = "VERITRAIN_AGGREGATOR_PAUSE"
"""Test hook for the SIGKILL test: ``<point>:<marker file>``. At that point the aggregator
creates the marker file and sleeps for an hour, for the test to kill it there. Points:
``screened`` (decided, nothing written), ``theta-written`` (theta synced, no record yet)."""


def close_round(
    store: SharedStore,
    keypair: KeyPair,
    *,
    now: float | None = None,
    wait: bool = False,
    poll_s: float = 2.0,
    corpus: Corpus | None = None,
    progress: Progress | None = None,
) -> SignedRoundRecord | None:
    """Close the next open round and return its signed record; None when it is not due yet
    (``wait=False``) or the genesis's rounds are all closed. ``now`` fixes the clock (unix
    seconds; tests, and re-runs that must write the identical record). Raises AggregatorError
    when ``keypair`` is not the genesis's aggregator or a theta does not verify."""
    state = load_run(store)
    genesis = state.genesis
    if bytes(keypair.public) != bytes(genesis.aggregator):
        raise AggregatorError("this key is not the genesis's aggregator key")
    r = state.next_round
    if genesis.rounds and r >= genesis.rounds:
        return None
    opened = state.opened_at(r)
    while True:
        clock = time.time() if now is None else now
        candidates = unscreened(store, state)
        due = sum(c.name == record_name(r) for c in candidates)
        if (
            clock >= opened + genesis.screening.deadline_s
            or due >= genesis.screening.max_contributions
        ):
            break
        if not wait or now is not None:  # a fixed clock never makes the round due
            return None
        time.sleep(max(0.05, min(poll_s, opened + genesis.screening.deadline_s - clock)))
    candidates, deferred = select_candidates(candidates, r, genesis.peers)
    if deferred:
        logger.warning("round %d: %d contribution files left for later rounds", r, deferred)
    result, model = decide(store, state, r, candidates, corpus=corpus, progress=progress)
    _pause("screened")
    load_flat(model, result.theta_next)
    encoded = theta_artifact(model, genesis.chunk_size)
    store.put_object(encoded.root, encoded.parts)  # synced: the record below names it
    _pause("theta-written")
    record = RoundRecord(
        version=SHARED_VERSION,
        shared_run_id=genesis.shared_run_id,
        genesis=genesis.hash(),
        round=r,
        prev=state.prev_hash(r),
        base_root=state.theta_roots(r)[-1],
        opened_at=opened,
        closed_at=max(opened, int(clock)),
        included=result.included,
        excluded=result.excluded,
        base_probe_loss=result.base_probe_loss,
        aggregate=result.aggregate,
        new_root=Hash32(encoded.root),
        carried_over=result.carried_over,
    )
    signed = SignedRoundRecord.sign(keypair, record)
    store.put_round(signed)
    logger.info(
        "round %d closed: %d included, %d excluded, theta %s",
        r,
        len(record.included),
        len(record.excluded),
        record.new_root.hex()[:16],
    )
    return signed


def aggregate_loop(
    store: SharedStore,
    keypair: KeyPair,
    *,
    rounds: int | None = None,
    poll_s: float = 2.0,
    corpus: Corpus | None = None,
    progress: Progress | None = None,
    on_round: Callable[[SignedRoundRecord], None] | None = None,
) -> int:
    """Close rounds as they come due until the genesis's ``rounds`` (or ``rounds`` more of
    them) are closed; returns how many this call closed. ``rounds=None`` with a genesis of 0
    rounds runs until interrupted."""
    closed = 0
    while rounds is None or closed < rounds:
        state = load_run(store)
        if state.genesis.rounds and state.next_round >= state.genesis.rounds:
            break
        signed = close_round(
            store, keypair, wait=True, poll_s=poll_s, corpus=corpus, progress=progress
        )
        if signed is None:
            break
        closed += 1
        if on_round is not None:
            on_round(signed)
    return closed


PROBE_RTOL = 1e-4
"""Relative tolerance between a recorded and a recomputed probe loss (float32 reductions may
round differently on another CPU or thread count; everything else is compared bit for bit)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundCheck:
    """What :func:`check_round` found: failures, and decisions too close to the margin to
    call (the recomputed probe loss is within ``PROBE_RTOL`` of the threshold)."""

    problems: tuple[str, ...]
    close: tuple[str, ...]


def _near(a: float | None, b: float | None, tol: float = PROBE_RTOL) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _listed_candidates(
    store: SharedStore, record: RoundRecord
) -> tuple[list[CandidateFile], list[str]]:
    """The files ``record`` screened, read again; problems for those that changed or vanished."""
    problems: list[str] = []
    out: list[CandidateFile] = []
    wanted = {e.file: bytes(e.file_hash) for e in record.excluded}
    applied = {
        f"{i.peer}/{record_name(record.round)}": bytes(i.contribution) for i in record.included
    }
    for file in sorted(set(wanted) | set(applied)):
        folder, _, name = file.partition("/")
        candidate = read_candidate(store, folder, name)
        if file in applied and contribution_hash(candidate.raw) != applied[file]:
            problems.append(f"{file}: the included contribution is no longer in the store")
        elif file in wanted and bytes(candidate.file_hash) != wanted[file]:
            problems.append(f"{file}: its bytes changed since the round closed; not re-screened")
            continue
        out.append(candidate)
    return out, problems


def compare_decisions(
    record: RoundRecord, result: RoundResult, genesis: Genesis
) -> tuple[list[str], list[str]]:
    """How ``record``'s decisions differ from ``result``'s (recomputed): (problems, close calls).

    Norms must be equal bit for bit, probe losses within PROBE_RTOL. A file recorded as included
    and recomputed as excluded by the probe (or the reverse) is a close call, not a problem, when
    its recomputed loss is within PROBE_RTOL of the recomputed threshold (probe_threshold)."""
    problems: list[str] = []
    close: list[str] = []
    screening = genesis.screening
    base = result.base_probe_loss
    if not _near(record.base_probe_loss, base):
        problems.append(f"base probe loss {record.base_probe_loss}, recomputed {base}")
    probed = [i.probe_loss for i in result.included] + [e.probe_loss for e in result.excluded]
    threshold = (
        None
        if base is None
        else probe_threshold(
            base,
            [x for x in probed if x is not None],
            screening.probe_margin,
            screening.probe_gain,
        )
    )

    def outcomes(r: RoundRecord | RoundResult) -> dict[str, tuple[str, float | None, float | None]]:
        out: dict[str, tuple[str, float | None, float | None]] = {
            f"{i.peer}/{record_name(record.round)}": ("included", i.norm, i.probe_loss)
            for i in r.included
        }
        out.update({e.file: (e.reason, e.norm, e.probe_loss) for e in r.excluded})
        return out

    seen, redo = outcomes(record), outcomes(result)
    for file in sorted(set(seen) | set(redo)):
        (got, norm, loss), (want, norm2, loss2) = (
            seen.get(file, ("absent", None, None)),
            redo.get(file, ("absent", None, None)),
        )
        if got != want:
            probe_call = {got, want} <= {"included", "probe"} and loss2 is not None
            if probe_call and threshold is not None and _near(loss2, threshold):
                close.append(
                    f"{file}: recorded {got}, recomputed {want}; loss {loss2} is at the "
                    f"margin {threshold}"
                )
            else:
                problems.append(f"{file}: recorded {got}, recomputed {want}")
            continue
        if norm is not None and norm2 is not None and norm != norm2:
            problems.append(f"{file}: norm {norm!r}, recomputed {norm2!r}")
        if not _near(loss, loss2):
            problems.append(f"{file}: probe loss {loss}, recomputed {loss2}")
    built_on = {e.file: e.built_on for e in result.excluded}
    for e in record.excluded:
        if e.file in built_on and e.built_on != built_on[e.file]:
            problems.append(f"{e.file}: built_on {e.built_on}, recomputed {built_on[e.file]}")
    return problems, close


def check_round(store: SharedStore, r: int, *, corpus: Corpus | None = None) -> RoundCheck:
    """Re-check closed round ``r`` (module docstring). Store errors become problems."""
    try:
        state = load_run(store, upto=r)
        if state.next_round != r:
            return RoundCheck(problems=(f"round {state.next_round} has no valid record",), close=())
        signed = store.read_round(r)
    except (VeritrainError, OSError) as exc:
        return RoundCheck(problems=(str(exc),), close=())
    genesis, record = state.genesis, signed.round
    problems = list(record.check_roster(genesis))
    if not signed.verify(genesis.aggregator):
        problems.append("the round record is not signed by the genesis's aggregator key")
    if record.prev != state.prev_hash(r):
        problems.append("prev is not the hash of the previous round record (or the genesis)")
    if record.base_root != state.theta_roots(r)[-1]:
        problems.append("base_root is not the previous round's new_root (or the initial root)")
    if r > 0 and record.opened_at != state.records[r - 1].round.closed_at:
        # Round 0's opening is the genesis file's time, which no record signs.
        problems.append(
            f"opened_at {record.opened_at} is not round {r - 1}'s closed_at "
            f"{state.records[r - 1].round.closed_at}"
        )
    if problems:
        return RoundCheck(problems=tuple(problems), close=())
    candidates, read_problems = _listed_candidates(store, record)
    try:
        result, model = decide(store, state, r, candidates, corpus=corpus)
        theta_next = _recorded_theta(store, state, r, record, candidates, model)
    except (VeritrainError, OSError) as exc:
        return RoundCheck(problems=(*read_problems, str(exc)), close=())
    compared, close = compare_decisions(record, result, genesis)
    problems = [*read_problems, *compared]
    if theta_next is None:
        problems.append("the included contributions cannot all be recomputed")
    else:
        theta, aggregate = theta_next
        if aggregate != record.aggregate:
            problems.append(f"aggregate {record.aggregate.hex()}, recomputed {aggregate.hex()}")
        load_flat(model, theta)
        root = Hash32(theta_artifact(model, genesis.chunk_size).root)
        if root != record.new_root:
            problems.append(f"new_root {record.new_root.hex()}, recomputed {root.hex()}")
        else:
            try:
                store.read_theta(root, model)  # every leaf checked against the root
            except StoreError as exc:
                problems.append(f"theta_{r + 1} in the store does not verify: {exc}")
    for note in close:
        logger.warning("round %d: close call: %s", r, note)
    return RoundCheck(problems=tuple(problems), close=tuple(close))


def _recorded_theta(
    store: SharedStore,
    state: RunState,
    r: int,
    record: RoundRecord,
    candidates: list[CandidateFile],
    model: nn.Module,
) -> tuple[torch.Tensor, Hash32] | None:
    """theta_{r+1} and the aggregate hash from theta_r and the record's included list (its
    decisions, not the recomputed ones: a close probe call must not change the root)."""
    genesis = state.genesis
    theta = theta_of(store, genesis, record.base_root, model)
    if record.carried_over:
        return theta, ZERO32
    roots = state.theta_roots(r)
    ctx = RoundContext(genesis=genesis, round=r, size=theta.numel(), theta_roots=roots)
    by_file = {c.file: c for c in candidates}
    deltas = []
    for inc in record.included:
        candidate = by_file.get(f"{inc.peer}/{record_name(r)}")
        survivor = None if candidate is None else screen_file(candidate, ctx, StoreSource(store))
        if (
            not isinstance(survivor, Survivor)
            or survivor.signed.contribution.hash() != inc.contribution
        ):
            return None
        deltas.append((inc.delta, survivor.delta))
    theta_next, u = apply_sum(theta, distinct_payloads(deltas), genesis.outer.alpha)
    return theta_next, aggregate_hash(u)


def verify_round(store: SharedStore, r: int, *, corpus: Corpus | None = None) -> list[str]:
    """The problems :func:`check_round` finds in round ``r`` (empty: it verifies); close probe
    calls are logged, not returned."""
    return list(check_round(store, r, corpus=corpus).problems)


def _pause(point: str) -> None:
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, marker = spec.partition(":")
    if name != point:
        return
    logger.warning("pausing at %s for the SIGKILL test (%s)", point, PAUSE_ENV)
    with open(marker, "w", encoding="utf-8") as handle:
        handle.write(point)
    time.sleep(3600)


__all__ = [
    "PAUSE_ENV",
    "PROBE_RTOL",
    "AggregatorError",
    "RoundCheck",
    "aggregate_loop",
    "check_round",
    "close_round",
    "compare_decisions",
    "verify_round",
]
