"""A peer of a shared run: one round (:func:`run_round`) and the loop over rounds (:func:`join`).

Round r of peer P (docs/shared-runs.md, "The round protocol"):

1. theta_r is read from the shared store and checked against its root: the genesis
   ``initial_root`` for round 0, else the ``new_root`` of round record r-1 (signed by the
   aggregator, checked here).
2. The local state (inner optimizer state and error feedback e) comes from P's latest earlier
   contribution's ``local_state`` artifact; a peer that never contributed, or whose artifact is
   gone, starts fresh (a new optimizer, e = 0) and says so with ZERO32 in its record.
3. H inner steps run through :class:`~trainer.hook.AuditHook` into ``peers/P/rNNNNNN/``: run id
   ``inner_run_id(shared_run_id, r)``, assignment the genesis hash, so the hook's run seed (and
   with it every batch, ``Corpus.batch_for_step(run_seed, i)``) is bound to P's key. A peer killed
   mid-round resumes there through the hook's own resume.
4. delta = theta_r - theta_H; ``error_feedback_step`` gives the payload d and the new e.
5. Writes: theta_H and the new local state (objects), then the payload, then the signed
   contribution record last, so a record never names something that is not there yet.

Nothing here prints: progress goes to a callback (the CLI draws bars from it).
"""

from __future__ import annotations

import enum
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from proofs import bls
from proofs.errors import VeritrainError
from proofs.hashing import Hash32, sha256
from proofs.signatures import KeyPair
from trainer.checkpoint import (
    decode_checkpoint,
    encode_checkpoint,
    optimizer_state_dict,
    optimizer_tensors,
    param_layout,
)
from trainer.compression import encode_payload, error_feedback_step
from trainer.contribution import Contribution, SignedContribution
from trainer.data import Corpus
from trainer.globalstate import flatten, load_flat, theta_artifact
from trainer.hook import AuditHook, HookConfig
from trainer.innerrun import build_inner_optimizer
from trainer.loop import configure_determinism, pick_device
from trainer.models import build_model
from trainer.schedule import Schedule
from trainer.seeds import run_seed_for
from trainer.sharedrun import SHARED_VERSION, Genesis, inner_run_id
from trainer.sharedstore import SharedStore
from trainer.store import StoreError

logger = logging.getLogger(__name__)

ZERO32 = Hash32(bytes(32))
EF_KEY = "ef"
"""Name of the error-feedback vector in a local-state artifact (next to the ``optim/*`` tensors)."""


class PeerError(VeritrainError, ValueError):
    """The peer cannot take part as asked: not in the roster, another corpus, a round not open."""


class Status(enum.Enum):
    PUBLISHED = "published"
    LATE = "late"
    """Published after its round closed: the next round screens it as stale."""
    ALREADY = "already-published"
    SKIPPED_LATE = "skipped-late"
    ABANDONED = "abandoned"
    """Stopped mid-round; the inner run is checkpointed, a later call resumes it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Behaviour:
    """Deviations from the honest protocol, for tests and benchmarks of the screening only."""

    train_on: bytes | None = None
    """Train on the batches of this public key (a copier) while committing under one's own."""
    replace_delta: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Replace delta before error feedback (e.g. random noise of plausible norm)."""
    stale_by: int = 0
    """Build round r on theta_{r - stale_by} (at least theta_0) and say so in base_root."""
    rewrite: Callable[[Contribution, bytes], tuple[Contribution, bytes]] | None = None
    """Replace the finished record and payload before signing (a copier); trainer/adversaries.py."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PeerProgress:
    """One event for a progress display: waiting for a round, an inner step, a round's end."""

    round: int
    phase: str
    """``waiting``, ``training``, or a :class:`Status` value."""
    step: int = 0
    steps: int = 0
    loss: float = math.nan


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundResult:
    round: int
    status: Status
    resumed_at: int
    """The inner step this call started at (0, or where a killed run resumed)."""
    contribution: SignedContribution | None = None


Progress = Callable[[PeerProgress], None]
Flag = Callable[[], bool]


def _never() -> bool:
    return False


def _ignore(_: PeerProgress) -> None:
    return None


def check_peer(genesis: Genesis, keypair: KeyPair, peer_name: str) -> None:
    """PeerError unless ``peer_name`` is in the genesis roster with ``keypair``'s public key."""
    expected = genesis.peers.get(peer_name)
    if expected is None:
        raise PeerError(
            f"peer {peer_name!r} is not in the roster of {genesis.shared_run_id} "
            f"(roster: {', '.join(sorted(genesis.peers)) or 'empty'})"
        )
    if bytes(expected) != bytes(keypair.public):
        raise PeerError(
            f"peer {peer_name!r} is registered with key 0x{bytes(expected).hex()[:16]}..., "
            f"this key file holds 0x{bytes(keypair.public).hex()[:16]}..."
        )


def check_corpus(corpus: Corpus, genesis: Genesis) -> None:
    """PeerError unless ``corpus`` is the genesis dataset (same Merkle root and size)."""
    have, want = corpus.commitment(), genesis.dataset
    if have.root != want.root or have.nbytes != want.nbytes:
        raise PeerError(
            f"corpus {have.source} (root 0x{have.root.hex()[:16]}..., {have.nbytes} bytes) is not "
            f"the genesis dataset {want.source} (root 0x{want.root.hex()[:16]}..., "
            f"{want.nbytes} bytes): pass the genesis corpus with --corpus"
        )


def base_root(store: SharedStore, genesis: Genesis, r: int) -> Hash32:
    """The root of theta_r: the genesis initial root, or round record r-1's new root (its
    signature checked against the genesis aggregator). PeerError when round r is not open."""
    if r == 0:
        return genesis.initial_root
    if r - 1 not in store.rounds():
        raise PeerError(f"round {r} is not open: round {r - 1} has no round record yet")
    signed = store.read_round(r - 1)
    if not signed.verify(genesis.aggregator):
        raise PeerError(f"round record {r - 1} is not signed by the genesis aggregator")
    return signed.record.new_root


_RECORD_NAME = re.compile(r"r(\d{6})\.json")


def _previous(store: SharedStore, peer_name: str, r: int, pubkey: bytes) -> Contribution | None:
    """This peer's latest contribution for a round before ``r`` (signed by its own key)."""
    earlier = sorted(
        int(match.group(1))
        for folder, name in store.list_contribution_files()
        if folder == peer_name and (match := _RECORD_NAME.fullmatch(name)) is not None
    )
    for n in reversed([n for n in earlier if n < r]):
        try:
            signed = store.read_contribution(peer_name, n)
        except StoreError as exc:
            logger.warning("skipping unreadable own contribution of round %d: %s", n, exc)
            continue
        if signed.verify(pubkey) and signed.record.peer == peer_name:
            return signed.record
        logger.warning("skipping %s's round %d record: not signed by this key", peer_name, n)
    return None


def load_local_state(
    store: SharedStore,
    previous: Contribution | None,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    size: int,
) -> tuple[torch.Tensor, Hash32]:
    """e and the optimizer state from ``previous``'s local-state artifact (loaded into
    ``optimizer``); (zeros, ZERO32) when there is none or it is missing or corrupt."""
    fresh = torch.zeros(size, dtype=torch.float32), ZERO32
    if previous is None:
        return fresh
    root = previous.local_state
    try:
        state = decode_checkpoint(store.read_verified_leaves(root))
        ef = state.pop(EF_KEY)
        if ef.dtype != torch.float32 or ef.shape != (size,):
            raise StoreError(f"error feedback is {ef.dtype} {tuple(ef.shape)}, expected ({size},)")
        optimizer.load_state_dict(optimizer_state_dict(state, param_layout(model, optimizer)))
    except (StoreError, VeritrainError, KeyError, ValueError) as exc:
        logger.warning("local state 0x%s unusable (%s): starting fresh", root.hex()[:16], exc)
        return fresh
    return ef, root


def _closed(store: SharedStore, r: int) -> bool:
    latest = store.latest_round()
    return latest is not None and latest >= r


@dataclass(frozen=True, kw_only=True, slots=True)
class _Start:
    """What a round starts from: theta_r (flat, CPU) and its root, the local state, the hook."""

    root: Hash32
    theta: torch.Tensor
    e: torch.Tensor
    previous: Contribution | None
    prev_local: Hash32
    hook: AuditHook


def _start(
    store: SharedStore, genesis: Genesis, keypair: KeyPair, peer_name: str, r: int,
    where: torch.device, stale_by: int = 0,
) -> _Start:  # fmt: skip
    """theta_r (checked against its root) in a fresh model, the local state, the inner hook;
    theta_{r - stale_by} for a stale peer (a test behaviour)."""
    root = base_root(store, genesis, max(0, r - stale_by))
    model = build_model(genesis.model, genesis.model_config)
    theta = store.read_theta(root, model)
    load_flat(model, theta)
    model.to(where)
    optimizer = build_inner_optimizer(genesis, model)
    previous = _previous(store, peer_name, r, bytes(keypair.public))
    e, prev_local = load_local_state(store, previous, optimizer, model, theta.numel())
    config = HookConfig(
        run_id=inner_run_id(genesis.shared_run_id, r), assignment=genesis.hash(),
        schedule=Schedule.constant(genesis.inner_lr), checkpoint_every=genesis.checkpoint_every,
        chunk_size=genesis.chunk_size, grad_clip=genesis.grad_clip, model_name=genesis.model,
        model_config=dict(genesis.model_config), dataset=genesis.dataset,
        batch_size=genesis.batch_size, context=genesis.context,
        # A forked signer keeps py_ecc's ~0.2 s signatures off the GIL; the native backend signs
        # in ~1 ms, less than forking a process with torch loaded costs every round.
        sign_in_subprocess=bls.active().name != "native",
    )  # fmt: skip
    hook = AuditHook(
        model, optimizer, store=store.inner_store(peer_name, r), keypair=keypair, config=config
    )
    return _Start(root=root, theta=theta, e=e, previous=previous, prev_local=prev_local, hook=hook)


def _train(
    start: _Start, genesis: Genesis, corpus: Corpus, r: int, *, batch_seed: int,
    where: torch.device, abandon: Flag, progress: Progress,
) -> int:  # fmt: skip
    """The H inner steps through the hook (resuming a killed run); returns the first step run."""
    hook, model, steps = start.hook, start.hook.model, genesis.inner_steps
    with hook:
        first = hook.start()  # a new inner run, or the resume of a killed one
        model.train()
        for i in range(first, steps):
            if abandon():
                break  # leaving the block checkpoints the steps done: a later call resumes
            hook.begin_step(i)  # the replay seed and the constant inner learning rate
            batch = corpus.batch_for_step(
                batch_seed, i, batch_size=genesis.batch_size, context=genesis.context
            )
            _, loss = model(batch.inputs.to(where), batch.targets.to(where))
            if loss is None:  # pragma: no cover - registry LMs return a loss with targets
                raise RuntimeError("model returned no loss")
            loss.backward()
            hook.step(loss, batch=batch.offsets)
            progress(PeerProgress(round=r, phase="training", step=i + 1, steps=steps,
                                  loss=float(loss.detach())))  # fmt: skip
    return first


def run_round(
    store: SharedStore,
    genesis: Genesis,
    keypair: KeyPair,
    peer_name: str,
    r: int,
    *,
    corpus: Corpus,
    behaviour: Behaviour | None = None,
    progress: Progress = _ignore,
    skip_late: bool = False,
    abandon: Flag = _never,
    device: str = "cpu",
    threads: int | None = None,
) -> RoundResult:
    """Train round ``r`` of ``genesis`` as ``peer_name`` and publish its contribution.

    Idempotent: a round already published returns its record; a killed round resumes. A round
    that closed while this peer trained is still published (``Status.LATE``, screened stale next
    round) unless ``skip_late``. ``abandon()`` is checked before each inner step: when it turns
    true the inner run is checkpointed and left (``Status.ABANDONED``). ``device``: auto, cpu or
    cuda; ``threads``: torch CPU threads (recorded in the inner header, so a resume must use the
    same). Raises PeerError (not in the roster, another corpus, round not open), StoreError,
    PipelineError.
    """
    check_peer(genesis, keypair, peer_name)
    check_corpus(corpus, genesis)
    if (peer_name, f"r{r:06d}.json") in store.list_contribution_files():
        done = store.read_contribution(peer_name, r)
        return RoundResult(round=r, status=Status.ALREADY, resumed_at=genesis.inner_steps,
                           contribution=done)  # fmt: skip
    behaviour = behaviour or Behaviour()
    configure_determinism(threads)  # as the reference trainer does
    where = pick_device(device)
    start = _start(store, genesis, keypair, peer_name, r, where, behaviour.stale_by)
    batch_seed = start.hook.run_seed
    if behaviour.train_on is not None:  # a copier: another key's batches under its own run
        batch_seed = run_seed_for(behaviour.train_on, genesis.hash(), start.hook.config.run_id)
    first = _train(start, genesis, corpus, r, batch_seed=batch_seed, where=where,
                   abandon=abandon, progress=progress)  # fmt: skip
    steps = genesis.inner_steps
    if start.hook.next_step < steps:
        progress(PeerProgress(round=r, phase=Status.ABANDONED.value, step=start.hook.next_step,
                              steps=steps))  # fmt: skip
        return RoundResult(round=r, status=Status.ABANDONED, resumed_at=first)
    late = _closed(store, r)  # checked just before writing anything
    if late and skip_late:
        logger.info("round %d closed before this peer finished: not publishing", r)
        status, signed = Status.SKIPPED_LATE, None
    else:
        signed = _publish(store, genesis, keypair, peer_name, r, start, behaviour)
        status = Status.LATE if late else Status.PUBLISHED
    progress(PeerProgress(round=r, phase=status.value, step=steps, steps=steps))
    return RoundResult(round=r, status=status, resumed_at=first, contribution=signed)


def _publish(
    store: SharedStore,
    genesis: Genesis,
    keypair: KeyPair,
    peer_name: str,
    r: int,
    start: _Start,
    behaviour: Behaviour,
) -> SignedContribution:
    """Compute d and the new e from theta_H, write objects, payload and record (in that order)."""
    rule, hook = genesis.outer, start.hook
    # Two ops, no fused multiply-add: the same bits on every machine (docs/shared-runs.md).
    delta = start.theta - flatten(hook.model)
    if behaviour.replace_delta is not None:
        delta = behaviour.replace_delta(delta)
    d, e_next = error_feedback_step(
        start.e, delta, beta=rule.beta, chunk=rule.chunk, topk=rule.topk,
        quantization=rule.quantization,
    )  # fmt: skip
    payload = encode_payload(d)
    final = theta_artifact(hook.model, genesis.chunk_size)
    local = encode_checkpoint(
        {EF_KEY: e_next, **optimizer_tensors(hook.optimizer.state_dict())},
        chunk_size=genesis.chunk_size,
    )
    store.put_object(final.root, final.parts)
    store.put_object(local.root, local.parts)
    manifests = store.inner_store(peer_name, r).read_manifests()
    if hook.header is None or not manifests:  # pragma: no cover - start() and close() ran
        raise PeerError(f"round {r}: the inner run has no header or manifest")
    fresh = start.previous is None or start.prev_local == ZERO32
    record = Contribution(
        version=SHARED_VERSION, shared_run_id=genesis.shared_run_id, genesis=genesis.hash(),
        round=r, peer=peer_name, pubkey=bytes(keypair.public), base_root=start.root,
        prev_contribution=ZERO32 if fresh or start.previous is None else start.previous.hash(),
        prev_local_state=start.prev_local, inner_header=hook.header.hash(),
        inner_manifest=manifests[-1].manifest.hash(), final_state=Hash32(final.root),
        delta=sha256(payload), payload_bytes=len(payload), nnz=d.nnz,
        local_state=Hash32(local.root),
        losses=tuple(float(rec.loss) for m in manifests for rec in m.manifest.records),
    )  # fmt: skip
    if behaviour.rewrite is not None:
        record, payload = behaviour.rewrite(record, payload)
    signed = SignedContribution.sign(keypair, record)
    store.put_contribution(signed, payload)  # payload first, the record last
    return signed


def open_round(store: SharedStore) -> int:
    """The round now open: one past the latest round record (0 before any)."""
    latest = store.latest_round()
    return 0 if latest is None else latest + 1


def join(
    store: SharedStore,
    genesis: Genesis,
    keypair: KeyPair,
    peer_name: str,
    *,
    corpus: Corpus,
    rounds: int | None = None,
    poll_s: float = 1.0,
    leave: Flag = _never,
    abandon: Flag = _never,
    progress: Progress = _ignore,
    skip_late: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    behaviour: Behaviour | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> list[RoundResult]:
    """Take part in rounds until ``genesis.rounds`` (when not 0) or ``rounds`` of them are done.

    Starts at the round now open (a new peer joins there with fresh local state; a returning one
    carries its local state over). After each round it waits (polling every ``poll_s`` seconds)
    for that round's record and then trains the round then open, skipping any that closed while
    it trained or waited. ``leave()`` ends the loop at a round boundary (or while waiting);
    ``abandon()`` also stops mid-round (the inner run stays resumable). Returns one result per
    round taken part in (each also passed to ``on_round`` as it ends). Raises PeerError before
    anything is written when the key is not in the roster or the corpus is not the genesis
    dataset.
    """
    check_peer(genesis, keypair, peer_name)
    check_corpus(corpus, genesis)
    results: list[RoundResult] = []
    target = open_round(store)
    while rounds is None or len(results) < rounds:
        if genesis.rounds and target >= genesis.rounds:
            break
        while open_round(store) < target:  # round target-1 still running
            if leave() or abandon():
                return results
            progress(PeerProgress(round=target, phase="waiting"))
            time.sleep(poll_s)
        if leave() or abandon():
            break
        r = max(target, open_round(store))  # rounds that closed meanwhile are skipped
        if genesis.rounds and r >= genesis.rounds:
            break
        result = run_round(
            store, genesis, keypair, peer_name, r, corpus=corpus, behaviour=behaviour,
            progress=progress, skip_late=skip_late, abandon=abandon, device=device,
            threads=threads,
        )  # fmt: skip
        if result.status is Status.ABANDONED:
            break
        results.append(result)
        if on_round is not None:
            on_round(result)
        target = r + 1
    return results
