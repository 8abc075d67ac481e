"""Replaying a run's committed updates for an auditor, window by window, on worker threads.

:class:`WindowReplay` rebuilds the state before any step from the nearest committed state
checkpoint, keeps what steps of one window share, and checks each window's chain once, on a
worker thread while the auditor re-executes. :class:`GradientFetcher` below it reads the
gradient checkpoints ahead of use.

Re-executing step ``t`` of a window that starts at ``c`` needs the committed gradients of steps
``c .. t`` (and, for the chain check, the rest of the window), in order. :class:`GradientFetcher`
reads and verifies them (one batched hash of the leaves against the root-checked table) on one
worker thread, ahead of use: reading and hashing release the GIL. Decoding happens on the thread
that asks. Nothing reaches the caller before it is verified; a gradient that fails raises
:class:`audit.fetch.ArtifactInvalid` where it is used, exactly as a fetch on the caller's thread
would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from audit.compare import structure_problem
from audit.fetch import ArtifactInvalid, VerifiedRun, decode_checked, fetch_artifact
from proofs.hashing import Root
from trainer.artifact import ArtifactIndex
from trainer.chain import CHAIN_SAFETY_FACTOR, ChainComparison, compare_chain
from trainer.checkpoint import checkpoint_root
from trainer.manifest import StateRef
from trainer.replay import replay_states
from trainer.store import RunStore, object_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Gradient:
    """One step's committed gradient, verified against its root and the model's structure."""

    step: int
    index: ArtifactIndex
    tensors: dict[str, torch.Tensor]
    nbytes: int  # leaf bytes read from the store


class GradientFetcher:
    """Fetches gradients of one verified run ahead of use and keeps them until forgotten.

    ``shapes`` are the model's parameters (names, shapes, dtypes) a gradient must match, a
    parameter without gradient may be absent; ``max_bytes`` caps what one artifact may declare.
    Call :meth:`close` to stop the worker thread.
    """

    def __init__(
        self,
        store: RunStore,
        run: VerifiedRun,
        *,
        shapes: Mapping[str, torch.Tensor],
        max_bytes: int,
    ) -> None:
        self.store, self.run, self.shapes, self.max_bytes = store, run, dict(shapes), max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-fetch")
        self._ready: dict[int, Gradient] = {}
        self._pending: dict[int, Future[tuple[ArtifactIndex, list[bytes]]]] = {}

    def prefetch(self, steps: Iterable[int]) -> None:
        """Queue ``steps`` (in the order they will be used) unless held or queued already."""
        for step in steps:
            if step not in self._ready and step not in self._pending:
                self._pending[step] = self._pool.submit(self._fetch, step)

    def get(self, step: int) -> tuple[Gradient, bool]:
        """(the verified gradient of ``step``, whether it was read from the store for this call:
        False when an earlier call already returned it). Raises ArtifactInvalid."""
        held = self._ready.get(step)
        if held is not None:
            return held, False
        future = self._pending.pop(step, None)
        fetched = future.result() if future is not None else self._fetch(step)
        grad = self._decode(step, *fetched)
        self._ready[step] = grad
        return grad, True

    def forget_before(self, step: int) -> None:
        """Drop gradients of steps before ``step``: steps audited in ascending order never need
        them again (out of order, they are fetched again)."""
        self._ready = {s: g for s, g in self._ready.items() if s >= step}
        for s in [s for s in self._pending if s < step]:
            self._pending.pop(s).cancel()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def _fetch(self, step: int) -> tuple[ArtifactIndex, list[bytes]]:
        """Read and verify (the worker's part: reading and hashing release the GIL)."""
        record = self.run.record(step)
        return fetch_artifact(
            self.store,
            record.grad_root,
            leaf_count=record.grad_leaves,
            max_bytes=self.max_bytes,
            leaf_bytes=record.grad_bytes,
        )

    def _decode(self, step: int, index: ArtifactIndex, leaves: list[bytes]) -> Gradient:
        """Tensors of verified leaves, on the caller's thread: decoding is Python and torch
        calls that would hand the GIL back and forth with the auditor's own work."""
        name = object_name(self.run.record(step).grad_root)
        tensors = decode_checked(name, leaves)
        # Names, dtypes and shapes must be the model's; a parameter without gradient may be absent.
        problem = structure_problem(tensors, self.shapes, allow_missing=True)
        if problem is not None:
            raise ArtifactInvalid(name, problem)
        return Gradient(step=step, index=index, tensors=tensors, nbytes=sum(map(len, leaves)))


State = dict[str, torch.Tensor]


class ReplayedStates:
    """States rebuilt from committed state checkpoints, by origin (the checkpoint's step) and step.

    A state under ``(origin, step)`` is the state before ``step`` runs, replayed from the committed
    checkpoint at ``origin`` through the committed gradients of ``origin .. step-1`` (or, under
    ``(step, step)``, a replayed state proven equal to the committed checkpoint at ``step``).
    At most ``limit`` states are kept per origin.
    """

    def __init__(self, *, limit: int = 8) -> None:
        self.limit = limit
        self._by_origin: dict[int, dict[int, State]] = {}

    def nearest(self, origin: int, step: int) -> tuple[int, State] | None:
        """The furthest state from ``origin`` that is not past ``step``."""
        held = self._by_origin.get(origin, {})
        best = max((s for s in held if s <= step), default=None)
        return None if best is None else (best, held[best])

    def get(self, origin: int, step: int) -> State | None:
        return self._by_origin.get(origin, {}).get(step)

    def has(self, origin: int, step: int) -> bool:
        return step in self._by_origin.get(origin, {})

    def put(self, origin: int, step: int, state: State) -> None:
        held = self._by_origin.setdefault(origin, {})
        if step in held or len(held) < self.limit:
            held[step] = state

    def forget_before(self, origin: int, step: int) -> None:
        """Drop states of earlier origins and those from ``origin`` before ``step``."""
        self._by_origin = {o: h for o, h in self._by_origin.items() if o >= origin}
        if origin in self._by_origin:
            held = self._by_origin[origin]
            self._by_origin[origin] = {s: st for s, st in held.items() if s >= step}


# States kept per window for the steps a job said it will audit (each ~3x the parameters).
MAX_KEPT_STATES = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class _ChainReplay:
    """A window replayed to its next checkpoint on the worker thread."""

    states: dict[int, State]  # the kept states and the final one
    root: Root  # of the final state
    nbytes: int  # gradient bytes the replay read


ChainJob = Future[_ChainReplay]


class WindowReplay:
    """The committed updates of one verified run, replayed for an auditor window by window.

    It hands out the state before any step (replayed from the nearest committed checkpoint
    through the committed gradients, reusing what it replayed before), checks each window's chain
    (that its next checkpoint follows from its gradients) once, and runs that check on a worker
    thread when asked. ``bytes_fetched`` counts the artifact bytes it read; the caller resets it.
    """

    def __init__(
        self, store: RunStore, run: VerifiedRun, *, shapes: Mapping[str, torch.Tensor],
        param_bytes: int, device: torch.device, bitwise: bool,
        safety_factor: float = CHAIN_SAFETY_FACTOR,
    ) -> None:  # fmt: skip
        """``bitwise``: this auditor reproduces the run's recorded determinism key, so a chain
        whose replayed root differs fails; otherwise its states are compared per tensor within
        the tolerance calibrated with ``safety_factor`` (trainer.chain)."""
        self.store, self.run, self.device, self.param_bytes = store, run, device, param_bytes
        self.bitwise, self.safety_factor = bitwise, safety_factor
        self.fetcher = GradientFetcher(
            store, run, shapes=shapes, max_bytes=max_artifact_bytes(param_bytes, 2)
        )
        self.states = ReplayedStates(limit=MAX_KEPT_STATES)
        self.expected: tuple[int, ...] = ()
        self.chain: dict[int, str | None] = {}  # window end step -> chain problem or None
        # window end step -> the per-tensor comparison, where the roots differed and it ran
        self.comparisons: dict[int, ChainComparison] = {}
        self.bytes_fetched = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-replay")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.fetcher.close()

    def gradient(self, step: int) -> Gradient:
        grad, fetched = self.fetcher.get(step)
        self.bytes_fetched += grad.nbytes if fetched else 0
        return grad

    def prefetch(self, ref: StateRef, step: int, *, whole: bool, chain: bool) -> None:
        """Queue every gradient auditing ``step`` will use, in the order it uses them (``whole``:
        the step's own gradient is compared whole and applied; ``chain``: the window is checked),
        then the window of the next expected step, read while this one re-executes."""
        near = self.states.nearest(ref.step, step)
        needed = list(range(near[0] if near is not None else ref.step, step))
        if whole:
            needed.append(step)
            end = self.run.manifest_of(step).state.step
            if chain and end not in self.chain:
                needed += range(step + 1, end)
            later = [e for e in self.expected if e > step]
            nxt = self.run.manifest_of(later[0]) if later else None
            if nxt is not None and nxt.first_step > step:
                needed += range(nxt.first_step, nxt.end_step)
        self.fetcher.prefetch(needed)

    def state(self, ref: StateRef, target: int) -> State:
        """The state before ``target`` runs, replayed from the committed checkpoint ``ref``
        through the furthest state already replayed from it; on the way it keeps the states that
        expected steps start from (and reach after their own update)."""
        near = self.states.nearest(ref.step, target)
        if near is None:
            near = (ref.step, self._checkpoint(ref))
            self.states.put(ref.step, ref.step, near[1])
        start, state = near
        if target == start:
            return state
        keep = self._keep(ref, start, target)
        states, nbytes = self._replay_range(state, start, target, keep)
        self.bytes_fetched += nbytes
        for s, st in sorted(states.items()):
            self.states.put(ref.step, s, st)
        return states[target]

    def forget_before(self, origin: int, step: int) -> None:
        """Drop what auditing steps in ascending order no longer needs once ``step`` is reached
        from ``origin``: earlier windows, earlier states and gradients (out of order, they are
        fetched and replayed again)."""
        self.states.forget_before(origin, step)
        self.fetcher.forget_before(step)

    def check_chain(self, ref: StateRef, step: int) -> str | None:
        """Whether ``step``'s window replays to its next state checkpoint: None, or why not.

        The answer depends only on the window's committed artifacts, so it is worked out once per
        window. A replayed state whose root equals the next checkpoint's *is* that checkpoint:
        it is kept as the starting point of the next window."""
        end = self.run.manifest_of(step).state
        if end.step not in self.chain:
            final = self.state(ref, end.step)
            root = checkpoint_root(final, chunk_size=self.run.header.chunk_size)
            self._store_chain(ref, end, root, final)
        return self.chain[end.step]

    def comparison(self, step: int) -> ChainComparison | None:
        """The per-tensor comparison of ``step``'s window, when its roots differed."""
        return self.comparisons.get(self.run.manifest_of(step).state.step)

    def start_chain(self, ref: StateRef, step: int, state: State) -> ChainJob | None:
        """Replay ``step``'s window from ``state`` (the state before ``step``) to its next
        checkpoint on the worker thread, unless its chain is known. The caller's thread must not
        use this object's fetcher until :meth:`finish_chain`, nor change torch's thread count."""
        end = self.run.manifest_of(step).state
        if end.step in self.chain:
            return None
        self.gradient(step)  # fetched here: the caller compares it meanwhile
        keep = self._keep(ref, step, end.step) | {step + 1}
        return self._pool.submit(self._chain_replay, step, state, end, keep)

    def finish_chain(self, ref: StateRef, step: int, job: ChainJob, *, passed: bool) -> None:
        """Store what the chain replay found. A failure to fetch or replay counts only for a
        step that passed on its own (one that failed never needed the rest of the window)."""
        end = self.run.manifest_of(step).state
        try:
            out = job.result()
        except ArtifactInvalid:
            if passed:
                raise
            return
        self.bytes_fetched += out.nbytes
        for s, st in sorted(out.states.items()):
            self.states.put(ref.step, s, st)
        try:
            self._store_chain(ref, end, out.root, out.states[end.step])
        except ArtifactInvalid:
            if passed:
                raise

    def _store_chain(self, ref: StateRef, end: StateRef, root: Root, final: State) -> None:
        """Judge the window ``ref`` .. ``end`` from its replayed final state: equal roots pass;
        otherwise bit for bit (fail) where this auditor reproduces the recorded key, else per
        tensor within the calibrated tolerance. Never skipped, whatever the header declares."""
        if root == end.root:
            self.states.put(end.step, end.step, final)
            self.chain[end.step] = None
            return
        problem = (
            f"state checkpoint at step {end.step} ({object_name(end.root)}) does not follow "
            f"from the committed gradients"
        )
        if self.bitwise:
            self.chain[end.step] = (
                f"{problem} (compared bit for bit: this auditor reproduces the run's recorded "
                "determinism settings)"
            )
            return
        cmp = self._tolerant_chain(ref, end, final)
        self.comparisons[end.step] = cmp
        self.chain[end.step] = None if cmp.passed else f"{problem} within tolerance: {cmp.reason}"

    def _tolerant_chain(self, ref: StateRef, end: StateRef, final: State) -> ChainComparison:
        """Compare the replayed end state with the committed one per tensor (trainer.chain):
        reads the window's start and end checkpoints and its gradients (verified as ever)."""
        start = self.states.get(ref.step, ref.step)
        if start is None:
            start = self._checkpoint(ref)
        committed = self._checkpoint(end)
        steps = []
        for s in range(ref.step, end.step):
            steps.append((self.run.record(s), self.gradient(s).tensors))
        try:
            return compare_chain(header=self.run.header, start=start, steps=steps, replayed=final,
                                 committed=committed, device=self.device,
                                 safety_factor=self.safety_factor)  # fmt: skip
        except (ValueError, KeyError) as exc:
            name = f"steps {ref.step}..{end.step - 1}"
            raise ArtifactInvalid(name, f"replay failed: {exc}") from exc

    def _keep(self, ref: StateRef, start: int, stop: int) -> set[int]:
        """Steps in (start, stop) where expected steps start or land, not held yet."""
        wanted = {s for e in self.expected for s in (e, e + 1) if start < s < stop}
        return {s for s in wanted if not self.states.has(ref.step, s)}

    def _chain_replay(self, step: int, state: State, end: StateRef, keep: set[int]) -> _ChainReplay:
        """Worker thread: replay ``step .. end-1`` from ``state``; reads no cache but the
        fetcher's, writes none (the caller's thread stores the outcome)."""
        states, nbytes = self._replay_range(state, step, end.step, keep)
        root = checkpoint_root(states[end.step], chunk_size=self.run.header.chunk_size)
        return _ChainReplay(states=states, root=root, nbytes=nbytes)

    def _replay_range(
        self, state: State, start: int, stop: int, keep: set[int]
    ) -> tuple[dict[int, State], int]:
        """States after replaying ``start .. stop-1`` from ``state`` (at ``stop`` and ``keep``),
        and the gradient bytes read for it. Safe on the worker thread: it writes no cache."""
        steps, nbytes = [], 0
        for s in range(start, stop):
            grad, fetched = self.fetcher.get(s)
            nbytes += grad.nbytes if fetched else 0
            steps.append((self.run.record(s), grad.tensors))
        try:
            states = replay_states(self.run.header, state, steps, keep=keep, device=self.device)
        except (ValueError, KeyError) as exc:
            raise ArtifactInvalid(f"steps {start}..{stop - 1}", f"replay failed: {exc}") from exc
        return states, nbytes

    def _checkpoint(self, ref: StateRef) -> State:
        _, leaves = fetch_artifact(
            self.store, ref.root, leaf_count=ref.leaf_count,
            max_bytes=max_artifact_bytes(self.param_bytes, 8),
        )  # fmt: skip
        self.bytes_fetched += sum(len(b) for b in leaves)
        return decode_checked(object_name(ref.root), leaves)


def max_artifact_bytes(param_bytes: int, factor: int) -> int:
    """Largest artifact worth reading: ``factor`` x the parameter bytes plus slack for headers."""
    return factor * param_bytes + (4 << 20)
